//! Triggers over real HTTP: fire-and-forget, sync waits, ordering, memory, GET, aliases.

mod common;

use common::*;
use serde_json::{json, Value};

const ECHO: &str = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }
[agent.webhook]
allow_get = true
"#;

#[test]
fn fire_and_forget_then_poll_to_success() {
    let env = Env::new();
    let server = env.start(ECHO);
    let r = post_json(server.url("default/echo"), &json!({"hello": "world"}));
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["status"], "PENDING");
    assert_eq!(r.json["agent"], "default/echo");
    let id = r.json["task_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    let poll = r.json["poll_url"].as_str().unwrap();
    assert_eq!(r.header("location"), Some(poll));
    assert_eq!(poll, format!("{}/tasks/{id}", server.base));

    let task = server.finished(&id);
    assert_eq!(task["status"], "SUCCESS");
    assert_eq!(task["phase"], "Complete");
    assert_eq!(task["response"], json!({"hello": "world"}));
    assert_eq!(task["result"]["response"], json!({"hello": "world"}));
    assert_eq!(task["tick"], 1);
    assert_eq!(task["attempt"], 1);
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(
            task[field].as_str().unwrap().ends_with('Z'),
            "{field}: {task}"
        );
    }
    assert!(task["error"].is_null());

    let alias = server.get(&format!("/api/task_status?task_id={id}"));
    assert_eq!(alias.status, 200);
    assert_eq!(alias.json["task_id"], id);
    assert_eq!(alias.json["status"], "SUCCESS");

    let alias_route = format!(
        "{}/api/webhooks/agents/{}",
        server.base,
        server.url("default/echo").rsplit('/').next().unwrap()
    );
    assert_eq!(post_json(&alias_route, &json!({})).status, 202);

    let missing = server.get("/tasks/00000000-0000-4000-8000-000000000000");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "not_found");
    assert_eq!(server.get("/tasks/not-a-uuid").error_code(), "not_found");
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn sync_wait_in_all_three_forms() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo");

    let body = post_json(url, &json!({"x": 1, "wait": true}));
    assert_eq!(body.status, 200, "{}", body.text);
    assert_eq!(body.json["status"], "SUCCESS");
    assert_eq!(body.json["response"]["x"], 1);
    assert!(body.json.get("timed_out").is_none());

    let query = post_json(&format!("{url}?wait=10"), &json!({"x": 2}));
    assert_eq!(query.status, 200);
    assert_eq!(query.json["response"], json!({"x": 2}));

    let prefer = send(
        client()
            .post(url)
            .header("Prefer", "wait=10")
            .json(&json!({"x": 3})),
    );
    assert_eq!(prefer.status, 200);
    assert_eq!(prefer.json["response"], json!({"x": 3}));

    let bad = post_json(&format!("{url}?wait=soon"), &json!({}));
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_code(), "bad_request");
}

#[test]
fn sync_wait_times_out_to_202_and_the_task_still_finishes() {
    let env = Env::new();
    let release = env.path().join("release");
    env.script(
        "slow.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {} ]; do sleep 0.05; done\necho '{{\"response\":\"done\"}}'",
            release.display()
        ),
    );
    let server = env.start(
        r#"
[[agent]]
name = "slow"
runner = { kind = "command", program = "{dir}/slow.sh" }
tick_timeout = "60s"
"#,
    );
    let r = post_json(
        &format!("{}?wait=0.3", server.url("default/slow")),
        &json!({}),
    );
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["timed_out"], true);
    assert!(r.json["status"] == "PENDING" || r.json["status"] == "STARTED");
    let id = r.json["task_id"].as_str().unwrap().to_string();
    std::fs::write(&release, "").unwrap();
    let task = server.finished(&id);
    assert_eq!(task["status"], "SUCCESS");
    assert_eq!(task["response"], "done");
}

#[test]
fn ticks_of_one_agent_never_overlap_and_follow_acceptance_order() {
    let env = Env::new();
    let log = env.path().join("ticks.log");
    env.script(
        "record.sh",
        &format!(
            "cat >/dev/null\necho \"start $TICKGATE_TICK\" >> {log}\nsleep 0.02\necho \"end $TICKGATE_TICK\" >> {log}\necho '{{}}'",
            log = log.display()
        ),
    );
    let server = env.start(
        r#"
[[agent]]
name = "rec"
runner = { kind = "command", program = "{dir}/record.sh" }
mailbox = 64
"#,
    );
    let url = server.url("default/rec").to_string();

    // Sequential triggers: each 202 comes before the next request, so tick order is send order.
    let mut sequential = Vec::new();
    for i in 0..5 {
        let r = post_json(&url, &json!({"i": i}));
        assert_eq!(r.status, 202);
        sequential.push(r.json["task_id"].as_str().unwrap().to_string());
    }
    // Concurrent triggers from 8 threads.
    let concurrent: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let url = url.clone();
                s.spawn(move || {
                    (0..3)
                        .map(|i| {
                            let r = post_json(&url, &json!({"t": t, "i": i}));
                            assert_eq!(r.status, 202, "{}", r.text);
                            r.json["task_id"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let all: Vec<Value> = sequential
        .iter()
        .chain(&concurrent)
        .map(|id| server.finished(id))
        .collect();
    let seq_ticks: Vec<u64> = all[..5]
        .iter()
        .map(|t| t["tick"].as_u64().unwrap())
        .collect();
    assert_eq!(seq_ticks, vec![1, 2, 3, 4, 5]);
    let mut ticks: Vec<u64> = all.iter().map(|t| t["tick"].as_u64().unwrap()).collect();
    ticks.sort_unstable();
    assert_eq!(ticks, (1..=29).collect::<Vec<_>>());

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 58);
    for (n, pair) in lines.chunks(2).enumerate() {
        assert_eq!(
            pair[0],
            format!("start {}", n + 1),
            "overlap or reorder: {lines:?}"
        );
        assert_eq!(
            pair[1],
            format!("end {}", n + 1),
            "overlap or reorder: {lines:?}"
        );
    }
}

#[test]
fn memory_is_carried_across_ticks_and_restarts() {
    let env = Env::new();
    // The tick input's last field is `memory`; the script echoes it back and stores a counter.
    env.script(
        "mem.sh",
        "input=$(cat)\nmem=$(printf '%s' \"$input\" | sed 's/.*\"memory\"://; s/}$//')\nprintf '{\"response\":{\"seen\":%s},\"memory\":{\"count\":%s}}\\n' \"$mem\" \"$TICKGATE_TICK\"",
    );
    let config = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }

[[agent]]
name = "mem"
runner = { kind = "command", program = "{dir}/mem.sh" }
"#;
    let server = env.start(config);
    let echo = server.url("default/echo").to_string();
    let mem = server.url("default/mem").to_string();
    for n in 1..=3 {
        let r = post_json(&format!("{echo}?wait=10"), &json!({}));
        assert_eq!(r.json["result"]["memory"], json!({"ticks": n}));
    }
    let first = post_json(&format!("{mem}?wait=10"), &json!({}));
    assert_eq!(
        first.json["response"],
        json!({"seen": {}}),
        "{}",
        first.text
    );
    let second = post_json(&format!("{mem}?wait=10"), &json!({}));
    assert_eq!(second.json["response"], json!({"seen": {"count": 1}}));
    server.terminate();

    let server = env.start(config);
    assert!(server.urls.is_empty(), "tokens must not be printed again");
    let (echo, mem) = (server.rebase(&echo), server.rebase(&mem));
    let r = post_json(&format!("{echo}?wait=10"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["tick"], 4);
    assert_eq!(r.json["result"]["memory"], json!({"ticks": 4}));
    let third = post_json(&format!("{mem}?wait=10"), &json!({}));
    assert_eq!(third.json["response"], json!({"seen": {"count": 2}}));
    assert_eq!(third.json["tick"], 3);
}

#[test]
fn get_ping_get_trigger_and_form_bodies() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo").to_string();
    let ping = server_get(&url);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json, json!({"ok": true}));

    let r = server_get(&format!("{url}?a=1&b=two&wait=10"));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json["response"],
        json!({"a": "1", "b": "two", "wait": "10"})
    );

    let form = send(
        client()
            .post(format!("{url}?wait=10"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("payload=%7B%22action%22%3A%22opened%22%7D&x=1"),
    );
    assert_eq!(form.status, 200, "{}", form.text);
    assert_eq!(
        form.json["response"],
        json!({"payload": {"action": "opened"}, "x": "1"})
    );

    let titled = post_json(&format!("{url}?wait=10"), &json!({"title": "nightly"}));
    assert_eq!(titled.json["title"], "nightly");
}

fn server_get(url: &str) -> Response {
    send(client().get(url))
}

#[test]
fn a_deep_queue_keeps_acceptance_order_when_it_spills_to_the_store() {
    // Past 1,024 queued tasks an agent's queue holds ids and reads each task back when its turn
    // comes; order and content must not change at the boundary.
    const TASKS: u64 = 1_100;
    let env = Env::new();
    let go = env.path().join("go");
    env.script(
        "gated.sh",
        &format!(
            "while read -r line; do\n  while [ ! -e {go} ]; do sleep 0.01; done\n  i=$(printf '%s' \"$line\" | sed -n 's/.*\"inputs\":{{\"i\":\\([0-9]*\\)}}.*/\\1/p')\n  echo \"{{\\\"response\\\":$i}}\"\ndone\n",
            go = go.display()
        ),
    );
    let server = env.start(
        r#"
[[agent]]
name = "deep"
runner = { kind = "command", program = "{dir}/gated.sh", mode = "persistent" }
mailbox = 2000
"#,
    );
    let url = server.url("default/deep").to_string();
    let ids: Vec<String> = (0..TASKS)
        .map(|i| {
            let r = post_json(&url, &json!({"i": i}));
            assert_eq!(r.status, 202, "{}", r.text);
            r.json["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    std::fs::write(&go, b"").unwrap();
    let last = server.finished(ids.last().unwrap());
    assert_eq!(last["tick"], TASKS);
    for (i, id) in ids.iter().enumerate() {
        let task = server.get(&format!("/tasks/{id}")).json;
        assert_eq!(task["status"], "SUCCESS", "{task}");
        assert_eq!(task["tick"], i as u64 + 1, "task {i} ran out of order");
        assert_eq!(
            task["response"], i as u64,
            "task {i} did not see its own inputs"
        );
        assert_eq!(task["attempt"], 1);
        assert_eq!(task["title"], "Webhook trigger — default/deep");
    }
}
