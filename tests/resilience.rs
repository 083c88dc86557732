//! Breakers, readiness, graceful shutdown, SSE, metrics, retention.

mod common;

use std::io::{BufRead, BufReader};

use common::*;
use serde_json::{json, Value};

fn flaky_env() -> (Env, std::path::PathBuf) {
    let env = Env::new();
    let healthy = env.path().join("healthy");
    env.script(
        "flaky.sh",
        &format!(
            "cat >/dev/null\nif [ -e {} ]; then echo '{{\"response\":\"ok\"}}'; else echo 'upstream down' >&2; exit 1; fi",
            healthy.display()
        ),
    );
    (env, healthy)
}

#[test]
fn breaker_opens_after_failures_half_opens_and_closes_on_a_good_trial() {
    let (env, healthy) = flaky_env();
    let server = env.start(
        r#"
[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
breaker = { failures = 3, open_for = "1s" }

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let flaky = format!("{}?wait=10", server.url("default/flaky"));
    for _ in 0..3 {
        let r = post_json(&flaky, &json!({}));
        assert_eq!(r.json["status"], "FAILURE", "{}", r.text);
    }
    // The breaker hears of an outcome beside its answer, not before it: wait until it is open.
    assert!(wait_until(
        || server.get("/ready/default/flaky").status == 503
    ));
    let refused = post_json(&flaky, &json!({}));
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.error_code(), "breaker_open");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=1).contains(&retry), "{retry}");

    let agent_ready = server.get("/ready/default/flaky");
    assert_eq!(agent_ready.status, 503);
    assert_eq!(
        agent_ready.json["agents"]["default/flaky"]["breaker"],
        "open"
    );
    let all = server.get("/ready");
    assert_eq!(all.status, 200, "another agent is usable: {}", all.text);
    assert_eq!(all.json["ready"], true);
    assert_eq!(all.json["agents"]["default/flaky"]["breaker"], "open");
    assert_eq!(all.json["agents"]["default/echo"]["breaker"], "closed");
    assert_eq!(
        post_json(server.url("default/echo"), &json!({})).status,
        202
    );

    // Still failing: the trial fails and the breaker opens again.
    let mut trial = None;
    assert!(wait_until(|| {
        let r = post_json(&flaky, &json!({}));
        if r.status == 503 {
            return false;
        }
        trial = Some(r);
        true
    }));
    assert_eq!(trial.unwrap().json["status"], "FAILURE");
    assert_eq!(
        post_json(&flaky, &json!({})).status,
        503,
        "a failed trial re-opens the breaker"
    );

    // Fixed: the next trial succeeds and closes the breaker.
    std::fs::write(&healthy, "").unwrap();
    let mut trial = None;
    assert!(wait_until(|| {
        let r = post_json(&flaky, &json!({}));
        if r.status == 503 {
            assert_eq!(r.error_code(), "breaker_open");
            return false;
        }
        trial = Some(r);
        true
    }));
    assert_eq!(trial.unwrap().json["status"], "SUCCESS");
    assert_eq!(post_json(&flaky, &json!({})).status, 200);
    assert_eq!(server.get("/ready/default/flaky").status, 200);
}

#[test]
fn ready_is_503_when_every_breaker_is_open_and_admin_reset_closes_it() {
    let (env, _healthy) = flaky_env();
    let admin = "admin-token-for-breaker-test-0123";
    let server = env.start_with(
        r#"
[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
breaker = { failures = 1, open_for = "1h" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", admin)],
    );
    assert_eq!(server.get("/ready").status, 200);
    let flaky = format!("{}?wait=10", server.url("default/flaky"));
    assert_eq!(post_json(&flaky, &json!({})).json["status"], "FAILURE");
    let ready = server.get("/ready");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["ready"], false);
    assert!(ready.header("retry-after").is_some());
    let refused = post_json(&flaky, &json!({}));
    assert_eq!(refused.status, 503);
    assert!(
        refused
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 3000
    );

    let list = send(
        client()
            .get(format!("{}/admin/agents", server.base))
            .bearer_auth(admin),
    );
    assert_eq!(list.json["agents"][0]["breaker"], "open");
    let reset_url = format!("{}/admin/agents/default/flaky/breaker/reset", server.base);
    assert_eq!(send(client().post(&reset_url)).status, 401);
    let reset = send(client().post(&reset_url).bearer_auth(admin));
    assert_eq!(reset.status, 200, "{}", reset.text);
    assert_eq!(server.get("/ready").status, 200);
    assert_eq!(
        post_json(&flaky, &json!({})).status,
        200,
        "accepted again (and fails again)"
    );
}

#[test]
fn sigterm_drains_running_ticks_refuses_new_ones_and_keeps_pending_tasks() {
    let env = Env::new();
    let release = env.path().join("release");
    env.script(
        "block.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {} ]; do sleep 0.02; done\necho '{{\"response\":\"done\"}}'",
            release.display()
        ),
    );
    let config = r#"
[server]
shutdown_grace = "20s"

[[agent]]
name = "block"
runner = { kind = "command", program = "{dir}/block.sh" }
mailbox = 100
"#;
    let server = env.start(config);
    let url = server.url("default/block").to_string();
    let ids: Vec<String> = (0..20)
        .map(|i| {
            let r = post_json(&url, &json!({"i": i}));
            assert_eq!(r.status, 202);
            r.json["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    server.wait_task(&ids[0], |t| t["status"] == "STARTED");
    unsafe {
        libc::kill(server.pid(), libc::SIGTERM);
    }
    // While the running tick finishes, new triggers and readiness say 503.
    assert!(wait_until(|| server.get("/ready").status == 503));
    let refused = post_json(&url, &json!({}));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_code(), "shutting_down");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(
        server.get("/healthz").status,
        200,
        "still serving while draining"
    );

    std::fs::write(&release, "").unwrap();
    let status = server.terminate();
    assert!(status.success(), "exit 0 after draining: {status:?}");

    let server = env.start(config);
    let first = server.finished(&ids[0]);
    assert_eq!(first["status"], "SUCCESS");
    assert_eq!(first["attempt"], 1, "the running tick finished before exit");
    for id in &ids {
        assert_eq!(
            server.finished(id)["status"],
            "SUCCESS",
            "pending tasks ran after restart"
        );
    }
}

#[test]
fn killed_persistent_runner_comes_back_with_memory_intact() {
    let env = Env::new();
    env.script(
        "p.sh",
        "while read -r line; do mem=$(printf '%s' \"$line\" | sed 's/.*\"memory\"://; s/}$//'); printf '{\"response\":{\"seen\":%s,\"pid\":%s},\"memory\":{\"last_pid\":%s}}\\n' \"$mem\" $$ $$; done",
    );
    let server = env.start(
        r#"
[[agent]]
name = "p"
runner = { kind = "command", program = "{dir}/p.sh", mode = "persistent" }
"#,
    );
    let url = format!("{}?wait=10", server.url("default/p"));
    let first = post_json(&url, &json!({}));
    let pid = first.json["response"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{}", first.text));
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let second = post_json(&url, &json!({}));
    assert_eq!(second.json["status"], "SUCCESS", "{}", second.text);
    assert_ne!(second.json["response"]["pid"], pid);
    assert_eq!(
        second.json["response"]["seen"],
        json!({"last_pid": pid}),
        "memory survived the crash"
    );
}

/// An open SSE stream, read one `status` event at a time.
struct Sse(std::io::Lines<BufReader<reqwest::blocking::Response>>);

impl Sse {
    fn open(url: &str) -> Sse {
        let resp = client().get(url).send().unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        Sse(BufReader::new(resp).lines())
    }

    /// The next event, or `None` once the server closed the stream.
    fn next(&mut self) -> Option<Value> {
        let mut event = String::new();
        for line in self.0.by_ref() {
            let line = line.unwrap();
            if let Some(name) = line.strip_prefix("event: ") {
                event = name.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                assert_eq!(event, "status");
                return Some(serde_json::from_str(data).unwrap());
            }
        }
        None
    }
}

#[test]
fn sse_streams_every_status_in_order_and_closes() {
    let env = Env::new();
    let release = env.path().join("release");
    env.script(
        "block.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {} ]; do sleep 0.02; done\necho '{{}}'",
            release.display()
        ),
    );
    let server = env.start(
        r#"
[[agent]]
name = "block"
runner = { kind = "command", program = "{dir}/block.sh" }
"#,
    );
    let url = server.url("default/block").to_string();
    let first = post_json(&url, &json!({}));
    let second = post_json(&url, &json!({}));
    let first_id = first.json["task_id"].as_str().unwrap().to_string();
    let id = second.json["task_id"].as_str().unwrap().to_string();
    server.wait_task(&first_id, |t| t["status"] == "STARTED");
    let mut stream = Sse::open(&format!("{}/tasks/{id}/events", server.base));
    let mut statuses = vec![stream.next().unwrap()["status"].clone()];
    std::fs::write(&release, "").unwrap();
    while let Some(event) = stream.next() {
        statuses.push(event["status"].clone());
    }
    assert_eq!(statuses, vec!["PENDING", "STARTED", "SUCCESS"]);

    let mut done = Sse::open(&format!("{}/tasks/{id}/events", server.base));
    assert_eq!(done.next().unwrap()["status"], "SUCCESS");
    assert!(
        done.next().is_none(),
        "a finished task's stream closes after one event"
    );
    assert_eq!(
        server
            .get("/tasks/00000000-0000-4000-8000-000000000000/events")
            .status,
        404
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_ticks() {
    let env = Env::new();
    let server = env.start("[[agent]]\nname = \"echo\"\nrunner = { kind = \"echo\" }\n");
    let sample = |text: &str, name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|lbl| l.contains(lbl)))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    let before = server.get("/metrics");
    assert_eq!(before.status, 200);
    assert!(before
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    for line in before.text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.split_whitespace();
            assert!(
                matches!(parts.next(), Some("HELP") | Some("TYPE")),
                "{line}"
            );
            assert!(parts.next().unwrap().starts_with("tickgate_"), "{line}");
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        assert!(name_labels.starts_with("tickgate_"), "{line}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
    }
    let ticks_before = sample(
        &before.text,
        "tickgate_ticks_total",
        &["default/echo", "success"],
    );
    for _ in 0..3 {
        post_json(
            &format!("{}?wait=10", server.url("default/echo")),
            &json!({}),
        );
    }
    // A sync answer comes with the task's outcome; the mailbox slot (and so the queue depth
    // gauge) is freed just after it, so the gauge is waited for rather than read at once.
    let mut after = String::new();
    assert!(
        wait_until(|| {
            after = server.get("/metrics").text;
            after.contains("tickgate_queue_depth{agent=\"default/echo\"} 0")
                && sample(&after, "tickgate_ticks_total", &["default/echo", "success"])
                    >= ticks_before + 3.0
        }),
        "the queue depth never went back to 0 after three ticks:\n{after}"
    );
    assert_eq!(
        sample(&after, "tickgate_ticks_total", &["default/echo", "success"]),
        ticks_before + 3.0
    );
    assert!(
        sample(
            &after,
            "tickgate_http_requests_total",
            &["default/echo", "code=\"200\""]
        ) >= 3.0
    );
    assert!(
        sample(
            &after,
            "tickgate_tick_duration_seconds_count",
            &["default/echo"]
        ) >= 3.0
    );
    assert!(sample(&after, "tickgate_store_flush_duration_seconds_count", &[]) >= 6.0);
    assert!(after.contains("tickgate_queue_depth{agent=\"default/echo\"} 0"));
    assert!(after.contains("tickgate_breaker_state{agent=\"default/echo\"} 0"));
}

#[test]
fn finished_tasks_and_their_keys_are_purged_after_retention() {
    let env = Env::new();
    let server = env.start(
        r#"
[store]
task_retention = "1s"

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let url = format!("{}?wait=10", server.url("default/echo"));
    let first = send(
        client()
            .post(&url)
            .header("Idempotency-Key", "once")
            .json(&json!({})),
    );
    let id = first.json["task_id"].as_str().unwrap().to_string();
    assert_eq!(first.json["status"], "SUCCESS");
    assert!(
        wait_until(|| server.get(&format!("/tasks/{id}")).status == 404),
        "the task was purged"
    );
    let again = send(
        client()
            .post(&url)
            .header("Idempotency-Key", "once")
            .json(&json!({})),
    );
    assert_eq!(again.status, 200);
    assert!(
        again.json.get("duplicate").is_none(),
        "the key was purged with its task"
    );
    assert_ne!(again.json["task_id"], id);
}

#[test]
fn admin_restart_gives_a_fresh_runner_and_keeps_queue_and_memory() {
    let env = Env::new();
    let admin = "admin-token-for-restart-test-0123";
    env.script(
        "p.sh",
        "while read -r line; do mem=$(printf '%s' \"$line\" | sed 's/.*\"memory\"://; s/}$//'); printf '{\"response\":{\"seen\":%s,\"pid\":%s},\"memory\":{\"last_pid\":%s}}\\n' \"$mem\" $$ $$; done",
    );
    let server = env.start_with(
        r#"
[[agent]]
name = "p"
runner = { kind = "command", program = "{dir}/p.sh", mode = "persistent" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", admin)],
    );
    let url = server.url("default/p").to_string();
    let first = post_json(&format!("{url}?wait=10"), &json!({}));
    let pid = first.json["response"]["pid"].as_i64().unwrap();
    let restart_url = format!("{}/admin/agents/default/p/restart", server.base);
    assert_eq!(send(client().post(&restart_url)).status, 401);
    let restart = send(client().post(&restart_url).bearer_auth(admin));
    assert_eq!(restart.status, 202, "{}", restart.text);
    // Tasks sent after the restart request still run, on a new process, with the old memory.
    let second = post_json(&format!("{url}?wait=10"), &json!({}));
    assert_eq!(second.json["status"], "SUCCESS", "{}", second.text);
    assert_ne!(second.json["response"]["pid"], pid);
    assert_eq!(second.json["response"]["seen"], json!({"last_pid": pid}));
    assert_eq!(second.json["tick"], 2);
    // The old process was stopped.
    assert!(wait_until(|| gone(pid)));
}

fn gone(pid: i64) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).map(str::to_string))
        .unwrap_or(None);
    matches!(state.as_deref(), None | Some("Z") | Some("X"))
}

#[test]
fn a_crash_looping_persistent_runner_opens_the_breaker() {
    let env = Env::new();
    env.script("die.sh", "read -r line\nexit 7");
    let server = env.start(
        r#"
[[agent]]
name = "die"
runner = { kind = "command", program = "{dir}/die.sh", mode = "persistent" }
breaker = { failures = 2, open_for = "1h" }
"#,
    );
    let url = format!("{}?wait=30", server.url("default/die"));
    for _ in 0..2 {
        let r = post_json(&url, &json!({}));
        assert_eq!(r.json["status"], "FAILURE", "{}", r.text);
    }
    assert!(wait_until(|| server.get("/ready/default/die").status == 503));
    let refused = post_json(&url, &json!({}));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_code(), "breaker_open");
}
