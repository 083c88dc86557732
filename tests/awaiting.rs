//! Ticks that wait for input (SPEC section 8), against the real binary: the shipped tool-call
//! agent parks twice and succeeds on its third tick with both answers; answers are
//! authenticated, taken once, and refused when the mailbox is full; unanswered tasks expire;
//! parked tasks and their timers survive `kill -9`; a parked task holds no mailbox slot; and
//! `approvals = "await"` parks on `pending_approvals`.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;

use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "toolcall-token-0123456789-abcdefghijklmnopq";
const ADMIN: &str = "admin-token-0123456789";

fn toolcall_config() -> String {
    format!(
        r#"
[[agent]]
name = "toolcall"
runner = {{ kind = "command", program = "{}/config/agents/toolcall.sh", mode = "oneshot" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "TOOLCALL_TOKEN"
"#,
        env!("CARGO_MANIFEST_DIR")
    )
}

fn start(env: &Env, config: &str) -> Server {
    env.start_with(
        config,
        &[("TOOLCALL_TOKEN", TOKEN), ("TICKGATE_ADMIN_TOKEN", ADMIN)],
    )
}

fn webhook(server: &Server) -> String {
    format!("{}/webhooks/{TOKEN}", server.base)
}

fn resume(server: &Server, id: &str, auth: Option<&str>, body: &Value) -> Response {
    let mut req = client()
        .post(format!("{}/tasks/{id}/resume", server.base))
        .json(body);
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    send(req)
}

fn awaiting(server: &Server, id: &str) -> Value {
    server.wait_task(id, |t| t["status"] == "AWAITING_INPUT")
}

/// Statuses of the task's SSE stream, as they arrive, until the stream closes.
fn watch(server: &Server, id: &str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let url = format!("{}/tasks/{id}/events", server.base);
    std::thread::spawn(move || {
        let resp = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .unwrap()
            .get(url)
            .send()
            .expect("events");
        for line in BufReader::new(resp).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                let _ = tx.send(v["status"].as_str().unwrap().to_string());
            }
        }
    });
    rx
}

#[test]
fn tool_call_agent_awaits_twice_then_succeeds_with_both_answers() {
    let env = Env::new();
    let server = start(&env, &toolcall_config());

    // A sync wait returns at the stopping point AWAITING_INPUT, with 200.
    let r = post_json(
        &format!("{}?wait=60", webhook(&server)),
        &json!({"query": "q"}),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "AWAITING_INPUT", "{}", r.text);
    assert_eq!(r.json["phase"], "Waiting");
    assert!(r.json.get("timed_out").is_none(), "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let first = &r.json["awaiting"];
    assert_eq!(first["request"]["step"], 1, "{first}");
    assert_eq!(first["request"]["args"]["query"], "q");
    assert_eq!(
        first["resume_url"],
        format!("{}/tasks/{id}/resume", server.base)
    );
    assert!(first["since"].is_string() && first["expires_at"].is_string());
    assert_eq!(
        (r.json["tick"].clone(), r.json["attempt"].clone()),
        (json!(1), json!(1))
    );

    let events = watch(&server, &id);
    assert_eq!(events.recv_timeout(DEADLINE).unwrap(), "AWAITING_INPUT");

    // Wrong or missing credentials: 401, nothing changes.
    let answer = json!({"response": {"temperature": 21}});
    for auth in [None, Some("Bearer nope"), Some(&*format!("Basic {TOKEN}"))] {
        let r = resume(&server, &id, auth, &answer);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text);
        assert_eq!(r.error_code(), "unauthorized");
    }
    // Authenticated but malformed: 400.
    let bearer = format!("Bearer {TOKEN}");
    let r = resume(&server, &id, Some(&bearer), &json!({"answer": 1}));
    assert_eq!(r.status, 400, "{}", r.text);
    let r = send(
        client()
            .post(format!("{}/tasks/{id}/resume", server.base))
            .header("Authorization", &bearer)
            .header("Content-Type", "application/json")
            .body("{not json"),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    // Unknown task: 404.
    let r = resume(
        &server,
        "5676e39f-4c30-4628-8368-61e91f909049",
        Some(&bearer),
        &answer,
    );
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(awaiting(&server, &id)["awaiting"]["request"]["step"], 1);

    // The admin token answers the first question.
    let r = resume(&server, &id, Some(&format!("Bearer {ADMIN}")), &answer);
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(r.json["status"], "PENDING", "{}", r.text);
    assert!(r.json["awaiting"].is_null(), "{}", r.text);

    // The continuation asks again, carrying the first answer along.
    let second = server.wait_task(&id, |t| {
        t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["step"] == 2
    });
    assert_eq!(
        second["awaiting"]["request"]["previous"],
        json!({"temperature": 21})
    );
    assert_eq!(
        (second["tick"].clone(), second["attempt"].clone()),
        (json!(2), json!(1))
    );

    // The agent's own token, with a lower-case scheme, answers the second.
    let r = resume(
        &server,
        &id,
        Some(&format!("bearer {TOKEN}")),
        &json!({"response": "confirmed"}),
    );
    assert_eq!(r.status, 202, "{}", r.text);
    let done = server.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(
        done["response"]["answers"],
        json!([{"temperature": 21}, "confirmed"]),
        "{done}"
    );
    assert_eq!(
        (done["tick"].clone(), done["attempt"].clone()),
        (json!(3), json!(1))
    );
    assert!(done["awaiting"].is_null());

    // A finished task takes no answer.
    let r = resume(&server, &id, Some(&bearer), &answer);
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "conflict");

    // The stream went through every round and closed at the terminal status.
    let seen: Vec<String> = std::iter::once("AWAITING_INPUT".to_string())
        .chain(events.iter())
        .collect();
    assert_eq!(seen.last().map(String::as_str), Some("SUCCESS"), "{seen:?}");
    for round in [
        ["AWAITING_INPUT", "PENDING"],
        ["PENDING", "STARTED"],
        ["STARTED", "AWAITING_INPUT"],
        ["STARTED", "SUCCESS"],
    ] {
        assert!(
            seen.windows(2).any(|w| w == round),
            "{round:?} not in {seen:?}"
        );
    }
    assert_eq!(
        seen.iter().filter(|s| *s == "AWAITING_INPUT").count(),
        2,
        "{seen:?}"
    );
}

#[test]
fn unanswered_tasks_expire_and_parked_tasks_survive_kill_9() {
    let env = Env::new();
    let config = toolcall_config();
    let server = start(&env, &config);
    let url = webhook(&server);

    // One task parked for long, one that will expire while the server is down.
    let r = post_json(&url, &json!({"query": "long"}));
    assert_eq!(r.status, 202, "{}", r.text);
    let long = r.json["task_id"].as_str().unwrap().to_string();
    let r = post_json(&url, &json!({"query": "short", "timeout": "3s"}));
    let short = r.json["task_id"].as_str().unwrap().to_string();
    awaiting(&server, &long);
    awaiting(&server, &short);
    server.kill();

    let server = start(&env, &config);
    let bearer = format!("Bearer {TOKEN}");
    // The timer written before the kill still fires.
    let expired = server.wait_task(&short, |t| t["status"] == "FAILURE");
    assert_eq!(expired["error"], "awaiting input timed out", "{expired}");
    assert!(expired["awaiting"].is_null());
    let r = resume(&server, &short, Some(&bearer), &json!({"response": 1}));
    assert_eq!(r.status, 409, "{}", r.text);

    // The long one is still parked and resumes after the restart.
    let parked = awaiting(&server, &long);
    assert_eq!(parked["awaiting"]["request"]["step"], 1, "{parked}");
    let r = resume(&server, &long, Some(&bearer), &json!({"response": "a"}));
    assert_eq!(r.status, 202, "{}", r.text);
    server.wait_task(&long, |t| t["awaiting"]["request"]["step"] == 2);
    // The answer and the second question are durable too.
    server.kill();
    let server = start(&env, &config);
    awaiting(&server, &long);
    let r = resume(&server, &long, Some(&bearer), &json!({"response": "b"}));
    assert_eq!(r.status, 202, "{}", r.text);
    let done = server.finished(&long);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["response"]["answers"], json!(["a", "b"]), "{done}");

    // A short timeout while the server runs.
    let r = post_json(&webhook(&server), &json!({"timeout": "2s"}));
    let id = r.json["task_id"].as_str().unwrap().to_string();
    awaiting(&server, &id);
    let failed = server.wait_task(&id, |t| t["status"] == "FAILURE");
    assert_eq!(failed["error"], "awaiting input timed out", "{failed}");
}

#[test]
fn parked_tasks_hold_no_slot_answers_take_one_and_approvals_can_park() {
    let env = Env::new();
    let go = env.path().join("go");
    env.script(
        "gate.sh",
        &format!(
            r#"input=$(cat)
case "$input" in
  *'"resume"'*) echo '{{"response":"continued"}}' ;;
  *'"approve"'*) echo '{{"response":"needs approval","pending_approvals":["deploy"]}}' ;;
  *'"ask"'*) echo '{{"await":{{"request":"may I?"}},"memory":{{"asked":true}}}}' ;;
  *'"block"'*) while [ ! -e {go} ]; do sleep 0.05; done; echo '{{"response":"unblocked"}}' ;;
  *'"asked":true'*) echo '{{"response":"plain, remembered"}}' ;;
  *) echo '{{"response":"plain"}}' ;;
esac"#,
            go = go.display()
        ),
    );
    let config = r#"
[[agent]]
name = "gate"
runner = { kind = "command", program = "{dir}/gate.sh", mode = "oneshot" }
mailbox = 2
approvals = "await"
[agent.webhook]
token_env = "TOOLCALL_TOKEN"
"#;
    let server = start(&env, config);
    let url = webhook(&server);
    let bearer = format!("Bearer {TOKEN}");
    let queued = |server: &Server| {
        server.get("/ready/default/gate").json["agents"]["default/gate"]["queued"].clone()
    };

    // A parked task holds no slot and does not block the next task.
    let r = post_json(&url, &json!({"ask": 1}));
    let asked = r.json["task_id"].as_str().unwrap().to_string();
    assert_eq!(awaiting(&server, &asked)["awaiting"]["request"], "may I?");
    assert!(wait_until(|| queued(&server) == json!(0)));
    let r = post_json(&format!("{url}?wait=60"), &json!({"plain": 1}));
    assert_eq!(
        (r.status, r.json["status"].clone()),
        (200, json!("SUCCESS")),
        "{}",
        r.text
    );
    // The parking tick's memory was kept.
    assert_eq!(r.json["response"], "plain, remembered", "{}", r.text);

    // approvals = "await": a non-empty pending_approvals parks the task.
    let r = post_json(&url, &json!({"approve": 1}));
    let approval = r.json["task_id"].as_str().unwrap().to_string();
    let parked = awaiting(&server, &approval);
    assert_eq!(
        parked["awaiting"]["request"],
        json!({"pending_approvals": ["deploy"]}),
        "{parked}"
    );
    assert_eq!(parked["result"]["pending_approvals"], json!(["deploy"]));

    // Fill the mailbox: an answer needs a slot, and is refused with nothing changed.
    let r = post_json(&url, &json!({"block": 1}));
    let blocker = r.json["task_id"].as_str().unwrap().to_string();
    server.wait_task(&blocker, |t| t["status"] == "STARTED");
    let r = post_json(&url, &json!({"plain": 2}));
    assert_eq!(r.status, 202, "{}", r.text);
    let behind = r.json["task_id"].as_str().unwrap().to_string();
    let r = resume(&server, &asked, Some(&bearer), &json!({"response": "yes"}));
    assert_eq!(r.status, 429, "{}", r.text);
    assert!(r.header("retry-after").is_some());
    assert_eq!(awaiting(&server, &asked)["status"], "AWAITING_INPUT");
    std::fs::write(&go, "").unwrap();
    server.finished(&behind);

    // The answer queues the continuation behind what is queued; a second answer is refused.
    std::fs::remove_file(&go).unwrap();
    let r = post_json(&url, &json!({"block": 2}));
    let blocker = r.json["task_id"].as_str().unwrap().to_string();
    server.wait_task(&blocker, |t| t["status"] == "STARTED");
    let r = resume(&server, &asked, Some(&bearer), &json!({"response": "yes"}));
    assert_eq!(r.status, 202, "{}", r.text);
    let r = resume(
        &server,
        &asked,
        Some(&bearer),
        &json!({"response": "again"}),
    );
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(
        server.get(&format!("/tasks/{asked}")).json["status"],
        "PENDING"
    );
    // The mailbox now holds the blocker and the continuation.
    let r = resume(
        &server,
        &approval,
        Some(&bearer),
        &json!({"response": "ok"}),
    );
    assert_eq!(r.status, 429, "{}", r.text);
    std::fs::write(&go, "").unwrap();
    let done = server.finished(&asked);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["response"], "continued");
    assert_eq!(done["attempt"], 1);
    let blocked = server.finished(&blocker);
    assert!(
        blocked["tick"].as_u64() < done["tick"].as_u64(),
        "the continuation ran after what was queued before it: {blocked} {done}"
    );

    let r = resume(
        &server,
        &approval,
        Some(&bearer),
        &json!({"response": "ok"}),
    );
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(server.finished(&approval)["response"], "continued");
}
