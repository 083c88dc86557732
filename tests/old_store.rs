//! Stores written by earlier releases still open. Each fixture is a dump of every sled tree of a
//! store that an earlier binary left with tasks in every state (see `fixtures/make_old_store.sh`):
//! - `fixtures/old_store.json`: JSON records (commit 8c2f9fe, before the binary records);
//! - `fixtures/old_store_v1.json`: the first binary layout, a head written once and a state
//!   record beside it for every change (commit 8babe44, before a change rewrote the head).
//!
//! The test writes a dump into a fresh sled directory, starts the current binary on it, and
//! checks that every task is found with its status, that interrupted and queued ones run, that
//! the retry, the parked task, the idempotency keys and the pending callback delivery carry on,
//! that the changes survive a restart, and that retention purges the finished tasks and leaves
//! the others.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{json, Value};

const FIXTURE_JSON: &str = include_str!("fixtures/old_store.json");
const FIXTURE_V1: &str = include_str!("fixtures/old_store_v1.json");

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Not a test: the dump tool behind `fixtures/make_old_store.sh`. Writes every key/value of every
/// tree of the sled store at `OLD_STORE_DIR` (and the task table at `OLD_STORE_TASKS`) as JSON to
/// `OLD_STORE_OUT`. Values that are JSON text are kept as JSON, others as hex.
#[test]
#[ignore]
fn dump_store() {
    let dir = std::env::var("OLD_STORE_DIR").expect("OLD_STORE_DIR");
    let tasks: Value = serde_json::from_str(
        &std::fs::read_to_string(std::env::var("OLD_STORE_TASKS").unwrap()).unwrap(),
    )
    .unwrap();
    let db = sled::open(&dir).unwrap();
    let mut trees = BTreeMap::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).unwrap();
        let mut entries = Vec::new();
        for entry in tree.iter() {
            let (k, v) = entry.unwrap();
            let value = match serde_json::from_slice::<Value>(&v) {
                Ok(json) if v.first().is_some_and(|b| matches!(b, b'{' | b'[' | b'"')) => {
                    json!({"k": hex(&k), "json": json})
                }
                _ => json!({"k": hex(&k), "hex": hex(&v)}),
            };
            entries.push(value);
        }
        trees.insert(hex(&name), entries);
    }
    // One record per line: small, and a regenerated fixture diffs record by record.
    let mut out = format!("{{\n\"tasks\": {tasks},\n\"trees\": {{");
    for (i, (name, entries)) in trees.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        out.push_str(&format!("{sep}\n{name:?}: [\n"));
        let lines: Vec<String> = entries.iter().map(Value::to_string).collect();
        out.push_str(&lines.join(",\n"));
        out.push_str("\n]");
    }
    out.push_str("\n}\n}\n");
    let path = std::env::var("OLD_STORE_OUT").expect("OLD_STORE_OUT");
    std::fs::write(path, out).unwrap();
}

const ECHO_TOKEN: &str = "fixture-echo-token-0123456789abcdef";
const TOOLCALL_TOKEN: &str = "fixture-toolcall-token-0123456789ab";
const ADMIN: &str = "fixture-admin-token-0123456789";

/// The agents of the fixture's config, with runners that now answer at once (the fixture's
/// `slow` agent was stuck on purpose).
fn config() -> String {
    format!(
        r#"
{{retention}}
[[agent]]
name = "echo"
runner = {{ kind = "command", program = "{{dir}}/echo.sh" }}
[agent.webhook]
token_env = "ECHO_TOKEN"
[[agent.notify]]
url = "http://127.0.0.1:9/hook"
secret_env = "NOTIFY_SECRET"
allow_private = true

[[agent]]
name = "fail"
runner = {{ kind = "command", program = "{{dir}}/fail.sh" }}
[agent.webhook]
token_env = "FAIL_TOKEN"

[[agent]]
name = "flaky"
runner = {{ kind = "command", program = "{{dir}}/fail.sh" }}
retry = {{ schedule = ["1h"] }}
[agent.webhook]
token_env = "FLAKY_TOKEN"

[[agent]]
name = "slow"
runner = {{ kind = "command", program = "{{dir}}/echo.sh" }}
[agent.webhook]
token_env = "SLOW_TOKEN"

[[agent]]
name = "toolcall"
runner = {{ kind = "command", program = "{}/config/agents/toolcall.sh", mode = "oneshot" }}
[agent.webhook]
token_env = "TOOLCALL_TOKEN"

[[agent]]
name = "cron"
runner = {{ kind = "command", program = "{{dir}}/echo.sh" }}
schedule = [{{ every = "24h", inputs = {{}} }}]
[agent.webhook]
enabled = false
"#,
        env!("CARGO_MANIFEST_DIR")
    )
}

fn start(env: &Env) -> Server {
    start_config(env, &config().replace("{retention}", ""))
}

/// With a retention short enough for a test to see the purge.
fn start_purging(env: &Env) -> Server {
    start_config(
        env,
        &config().replace("{retention}", "[store]\ntask_retention = \"1s\"\n"),
    )
}

fn start_config(env: &Env, config: &str) -> Server {
    env.start_with(
        config,
        &[
            ("ECHO_TOKEN", ECHO_TOKEN),
            ("FAIL_TOKEN", "fixture-fail-token-0123456789abcdef"),
            ("FLAKY_TOKEN", "fixture-flaky-token-0123456789abcde"),
            ("SLOW_TOKEN", "fixture-slow-token-0123456789abcdef"),
            ("TOOLCALL_TOKEN", TOOLCALL_TOKEN),
            (
                "NOTIFY_SECRET",
                "whsec_Zml4dHVyZS1zZWNyZXQtMDEyMzQ1Njc4OQ==",
            ),
            ("TICKGATE_ADMIN_TOKEN", ADMIN),
        ],
    )
}

fn admin_get(server: &Server, path: &str) -> Response {
    send(
        client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(ADMIN),
    )
}

/// The ids of the first page of the admin listing (the fixtures hold fewer tasks than a page).
fn listed_ids(server: &Server) -> Vec<String> {
    let listed = admin_get(server, "/admin/tasks?limit=100");
    assert_eq!(listed.status, 200, "{}", listed.text);
    listed.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t["task_id"]
                .as_str()
                .or(t["id"].as_str())
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Moves the fixture's timers (the retry's due time, the parked task's expiry) a day past now, in
/// the timer keys and in the task records alike, so that what the previous release left waiting
/// is still waiting whenever the test runs.
fn postpone_timers(dump: &mut Value) {
    let later = now() * 1000 + 86_400_000;
    for entries in dump["trees"].as_object_mut().unwrap().values_mut() {
        for e in entries.as_array_mut().unwrap() {
            let key = unhex(e["k"].as_str().unwrap());
            if key.starts_with(b"r/") || key.starts_with(b"w/") {
                let mut moved = key.clone();
                moved[2..10].copy_from_slice(&later.to_be_bytes());
                e["k"] = json!(hex(&moved));
            }
            let task = &mut e["json"];
            match task["status"].as_str() {
                Some("RETRY") => task["next_attempt_at"] = json!(later),
                Some("AWAITING_INPUT") => task["awaiting"]["expires_at"] = json!(later),
                _ => {}
            }
        }
    }
}

/// Writes the dump into a fresh sled directory where the harness keeps its store.
fn restore(env: &Env, dump: &Value) {
    let db = sled::open(env.path().join("store")).unwrap();
    for (name, entries) in dump["trees"].as_object().unwrap() {
        let tree = db.open_tree(unhex(name)).unwrap();
        for e in entries.as_array().unwrap() {
            let value = match (&e["json"], e["hex"].as_str()) {
                (_, Some(h)) => unhex(h),
                (json, None) => serde_json::to_vec(json).unwrap(),
            };
            tree.insert(unhex(e["k"].as_str().unwrap()), value).unwrap();
        }
    }
    db.flush().unwrap();
}

#[test]
fn a_store_of_json_records_opens_and_every_task_carries_on() {
    carries_on(FIXTURE_JSON);
}

#[test]
fn a_store_of_the_first_binary_layout_opens_and_every_task_carries_on() {
    carries_on(FIXTURE_V1);
}

fn carries_on(fixture: &str) {
    let mut dump: Value = serde_json::from_str(fixture).unwrap();
    postpone_timers(&mut dump);
    let tasks = dump["tasks"].as_object().unwrap().clone();
    assert_eq!(tasks.len(), 7, "the fixture has a task in every state");
    let id = |name: &str| tasks[name]["id"].as_str().unwrap().to_string();
    let env = Env::new();
    env.script(
        "echo.sh",
        r#"cat >/dev/null; echo '{"response":{"ok":true},"memory":{"count":1},"steps":1}'"#,
    );
    env.script("fail.sh", "cat >/dev/null; echo boom >&2; exit 3");
    restore(&env, &dump);

    let server = start(&env);
    let mut before = BTreeMap::new();
    for (name, t) in &tasks {
        let read = server.get(&format!("/tasks/{}", id(name)));
        assert_eq!(read.status, 200, "{name}: {}", read.text);
        let expected = t["status"].as_str().unwrap();
        match expected {
            // Interrupted by the kill, or queued behind it: they run now.
            "STARTED" | "PENDING" => {
                let done = server.finished(&id(name));
                assert_eq!(done["status"], "SUCCESS", "{name}: {done}");
                assert_eq!(done["response"], json!({"ok": true}), "{done}");
                assert_eq!(done["result"]["response"], json!({"ok": true}), "{done}");
            }
            _ => assert_eq!(read.json["status"], expected, "{name}: {}", read.text),
        }
        before.insert(name.clone(), read.json);
    }
    let echoed = &before["echo_keyed"];
    assert_eq!(echoed["response"], json!({"ok": true}), "{echoed}");
    assert_eq!(echoed["result"]["memory"], json!({"count": 1}), "{echoed}");
    assert_eq!(before["failed"]["attempts"].as_array().unwrap().len(), 1);
    assert!(!before["retry"]["next_attempt_at"].is_null());
    let restarted = server.get(&format!("/tasks/{}", id("started")));
    assert_eq!(restarted.json["attempt"], 2, "{}", restarted.text);

    // The idempotency key written by the previous release still deduplicates.
    let dup = send(
        client()
            .post(format!("{}/webhooks/{ECHO_TOKEN}", server.base))
            .header("Content-Type", "application/json")
            .header("Idempotency-Key", "fixture-key-1")
            .body(r#"{"n":1,"title":"keyed"}"#),
    );
    assert_eq!(dup.status, 200, "{}", dup.text);
    assert_eq!(
        dup.json["task_id"],
        id("echo_keyed").as_str(),
        "{}",
        dup.text
    );

    // The parked task takes its answer and asks its second question.
    let answer = send(
        client()
            .post(format!("{}/tasks/{}/resume", server.base, id("awaiting")))
            .bearer_auth(ADMIN)
            .json(&json!({"response": {"found": 1}})),
    );
    assert_eq!(answer.status, 202, "{}", answer.text);
    server.wait_task(&id("awaiting"), |t| {
        t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["step"] == 2
    });

    // The listing finds every task, the outbox its deliveries.
    let listed = listed_ids(&server);
    for name in tasks.keys() {
        assert!(listed.contains(&id(name)), "{name} not listed");
    }
    let deliveries = admin_get(&server, "/admin/deliveries");
    assert_eq!(deliveries.status, 200, "{}", deliveries.text);
    let old_deliveries = dump["trees"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|t| t.as_array().unwrap())
        .filter(|e| e["k"].as_str().unwrap().starts_with("6f2f"))
        .count();
    assert!(old_deliveries >= 2);
    assert!(
        deliveries.json["deliveries"].as_array().unwrap().len() >= old_deliveries,
        "{}",
        deliveries.text
    );
    assert_eq!(server.get("/ready").json["store"]["unreadable_records"], 0);

    // Changes written over the old records survive a restart.
    assert_eq!(server.terminate().code(), Some(0));
    let server = start(&env);
    for name in ["echo_keyed", "failed", "retry", "started", "pending"] {
        let read = server.get(&format!("/tasks/{}", id(name)));
        assert_eq!(read.status, 200, "{name}: {}", read.text);
        let expected = match name {
            "started" | "pending" => "SUCCESS",
            _ => tasks[name]["status"].as_str().unwrap(),
        };
        assert_eq!(read.json["status"], expected, "{name}: {}", read.text);
    }
    let parked = server.get(&format!("/tasks/{}", id("awaiting")));
    assert_eq!(
        parked.json["awaiting"]["request"]["step"], 2,
        "{}",
        parked.text
    );
    assert_eq!(server.terminate().code(), Some(0));

    // Retention purges every finished task, whichever layout wrote it and whether or not it
    // changed since, and leaves the retrying and the parked one.
    let server = start_purging(&env);
    for name in ["echo_keyed", "echo_plain", "failed", "started", "pending"] {
        assert!(
            wait_until(|| server.get(&format!("/tasks/{}", id(name))).status == 404),
            "{name} was not purged"
        );
    }
    for name in ["retry", "awaiting"] {
        let read = server.get(&format!("/tasks/{}", id(name)));
        assert_eq!(read.status, 200, "{name}: {}", read.text);
    }
    // The listing entries go with their tasks.
    let listed = listed_ids(&server);
    for name in tasks.keys() {
        let kept = name == "retry" || name == "awaiting";
        assert_eq!(listed.contains(&id(name)), kept, "{name}");
    }
    assert_eq!(server.get("/ready").json["store"]["unreadable_records"], 0);
    assert_eq!(server.terminate().code(), Some(0));
}
