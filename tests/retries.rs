//! Retries (SPEC section 8) against the real binary: attempts on the record, delays respected,
//! an exhausted schedule, `order = "requeue"` against `order = "block"`, and a `RETRY` task that
//! survives `kill -9` and runs at its time after the restart.

mod common;

use common::*;
use serde_json::{json, Value};

/// Unix milliseconds of an RFC 3339 timestamp in a task record.
fn ms(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    humantime::parse_rfc3339(s)
        .unwrap_or_else(|e| panic!("not a timestamp: {v}: {e}"))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A script that fails (exit 1) until it has run `fail_times` times, counting in a file.
fn counting_script(env: &Env, name: &str, fail_times: u32) {
    let count = env.path().join(format!("{name}.count"));
    env.script(
        &format!("{name}.sh"),
        &format!(
            "cat >/dev/null\nn=$(cat {c} 2>/dev/null || echo 0)\nn=$((n+1))\necho $n > {c}\nif [ $n -le {fail_times} ]; then echo \"failure $n\" >&2; exit 1; fi\necho '{{\"response\":\"ok\"}}'",
            c = count.display()
        ),
    );
}

#[test]
fn a_flaky_tick_is_retried_on_schedule_and_every_attempt_is_recorded() {
    let env = Env::new();
    counting_script(&env, "flaky", 2);
    let server = env.start(
        r#"
[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
retry = { schedule = ["1s", "2s", "30s"] }
"#,
    );
    let url = server.url("default/flaky").to_string();
    // A sync waiter keeps waiting through RETRY: its answer is the final state.
    let r = post_json(&format!("{url}?wait=60"), &json!({"n": 1}));
    assert_eq!(r.status, 200, "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let t = server.finished(&id);
    assert_eq!(t["status"], "SUCCESS", "{t}");
    assert_eq!(t["attempt"], 3, "{t}");
    assert_eq!(t["next_attempt_at"], Value::Null, "{t}");
    let attempts = t["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{t}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i as u64 + 1, "{t}");
        assert!(ms(&a["finished_at"]) >= ms(&a["started_at"]), "{t}");
    }
    assert!(
        attempts[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{t}"
    );
    assert!(
        attempts[1]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{t}"
    );
    assert_eq!(attempts[2]["error"], Value::Null, "{t}");
    // The delays are respected: never early, and not grossly late on a loaded machine.
    for (i, delay) in [1_000u64, 2_000].into_iter().enumerate() {
        let gap = ms(&attempts[i + 1]["started_at"]) - ms(&attempts[i]["finished_at"]);
        assert!(
            gap >= delay,
            "retry {i} ran after {gap} ms, before its {delay} ms: {t}"
        );
        assert!(gap < delay + 15_000, "retry {i} ran after {gap} ms: {t}");
    }
    let metrics = server.get("/metrics").text;
    assert!(
        metrics.contains("tickgate_task_retries_total{agent=\"default/flaky\"} 2"),
        "{metrics}"
    );
}

#[test]
fn an_exhausted_schedule_fails_the_task_with_all_its_attempts() {
    let env = Env::new();
    counting_script(&env, "broken", 1000);
    let server = env.start(
        r#"
[[agent]]
name = "broken"
runner = { kind = "command", program = "{dir}/broken.sh" }
retry = { schedule = ["1s"] }
"#,
    );
    let r = post_json(server.url("default/broken"), &json!({}));
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let retrying = server.wait_task(&id, |t| t["status"] == "RETRY");
    assert!(
        ms(&retrying["next_attempt_at"]) >= ms(&retrying["attempts"][0]["finished_at"]) + 1_000
    );
    let t = server.finished(&id);
    assert_eq!(t["status"], "FAILURE", "{t}");
    let attempts = t["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{t}");
    assert!(attempts.iter().all(|a| a["error"].is_string()), "{t}");
    assert!(t["error"].is_string(), "{t}");
}

/// Posts a task that fails once and then, while it waits in `RETRY`, one that succeeds, to an
/// agent with the given order, and returns the two final records. The retry delay is the margin
/// the second post has to arrive before the retry comes due, hence generous.
fn first_fails_once(order: &str) -> (Value, Value) {
    let env = Env::new();
    let marker = env.path().join("failed-once");
    env.script(
        "work.sh",
        &format!(
            "input=$(cat)\ncase \"$input\" in *'\"fail\":true'*) if [ ! -e {m} ]; then touch {m}; exit 1; fi;; esac\necho '{{\"response\":\"ok\"}}'",
            m = marker.display()
        ),
    );
    let server = env.start(&format!(
        r#"
[[agent]]
name = "work"
runner = {{ kind = "command", program = "{{dir}}/work.sh" }}
retry = {{ schedule = ["6s"], order = "{order}" }}
"#
    ));
    let url = server.url("default/work").to_string();
    let a = post_json(&url, &json!({"fail": true}));
    assert_eq!(a.status, 202, "{}", a.text);
    let a = a.json["task_id"].as_str().unwrap().to_string();
    server.wait_task(&a, |t| t["status"] == "RETRY");
    let b = post_json(&url, &json!({"fail": false}));
    assert_eq!(b.status, 202, "{}", b.text);
    let b = b.json["task_id"].as_str().unwrap().to_string();
    (server.finished(&a), server.finished(&b))
}

#[test]
fn requeue_lets_later_tasks_pass_a_waiting_retry() {
    let (a, b) = first_fails_once("requeue");
    assert_eq!(a["status"], "SUCCESS", "{a}");
    assert_eq!(b["status"], "SUCCESS", "{b}");
    assert_eq!(a["attempts"].as_array().unwrap().len(), 2, "{a}");
    assert_eq!(
        b["tick"], 2,
        "the later task ran while the retry waited: {b}"
    );
    assert_eq!(a["tick"], 3, "{a}");
    assert!(ms(&b["finished_at"]) <= ms(&a["started_at"]), "{a} {b}");
}

#[test]
fn block_holds_later_tasks_until_the_retried_task_is_done() {
    let (a, b) = first_fails_once("block");
    assert_eq!(a["status"], "SUCCESS", "{a}");
    assert_eq!(b["status"], "SUCCESS", "{b}");
    assert_eq!(a["attempts"].as_array().unwrap().len(), 2, "{a}");
    assert_eq!(a["tick"], 2, "the retry ran before the later task: {a}");
    assert_eq!(b["tick"], 3, "{b}");
    assert!(ms(&b["started_at"]) >= ms(&a["finished_at"]), "{a} {b}");
}

#[test]
fn a_retry_survives_sigkill_and_runs_at_its_time_after_restart() {
    let env = Env::new();
    counting_script(&env, "flaky", 1);
    let config = r#"
[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
retry = { schedule = ["5s"] }
"#;
    let server = env.start(config);
    let r = post_json(server.url("default/flaky"), &json!({}));
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let retrying = server.wait_task(&id, |t| t["status"] == "RETRY");
    let due = ms(&retrying["next_attempt_at"]);
    server.kill();

    let server = env.start(config);
    let t = server.finished(&id);
    assert_eq!(t["status"], "SUCCESS", "{t}");
    let attempts = t["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{t}");
    assert!(attempts[0]["error"].is_string(), "{t}");
    assert!(
        ms(&attempts[1]["started_at"]) >= due,
        "the retry ran before its time ({due}): {t}"
    );
    assert_eq!(t["attempt"], 2, "{t}");
}

#[test]
fn a_retry_due_while_the_breaker_is_open_waits_for_half_open_and_is_the_trial() {
    let env = Env::new();
    counting_script(&env, "flaky", 1);
    let server = env.start(
        r#"
[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
retry = { schedule = ["1s"] }
breaker = { failures = 1, open_for = "4s" }
"#,
    );
    let r = post_json(server.url("default/flaky"), &json!({}));
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let t = server.finished(&id);
    assert_eq!(t["status"], "SUCCESS", "{t}");
    let attempts = t["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{t}");
    let gap = ms(&attempts[1]["started_at"]) - ms(&attempts[0]["finished_at"]);
    assert!(
        gap >= 4_000,
        "the retry ran {gap} ms after the failure, while the breaker was open: {t}"
    );
    // The retry was the trial and succeeded: the breaker is closed again.
    assert!(wait_until(|| server
        .get("/metrics")
        .text
        .contains("tickgate_breaker_state{agent=\"default/flaky\"} 0")));
}

#[test]
fn a_block_ordered_agent_stays_held_for_its_retry_across_a_sigkill() {
    let env = Env::new();
    let marker = env.path().join("failed-once");
    env.script(
        "work.sh",
        &format!(
            "input=$(cat)\ncase \"$input\" in *'\"fail\":true'*) if [ ! -e {m} ]; then touch {m}; exit 1; fi;; esac\necho '{{\"response\":\"ok\"}}'",
            m = marker.display()
        ),
    );
    let config = r#"
[[agent]]
name = "work"
runner = { kind = "command", program = "{dir}/work.sh" }
retry = { schedule = ["4s"], order = "block" }
"#;
    let server = env.start(config);
    let url = server.url("default/work").to_string();
    let a = post_json(&url, &json!({"fail": true}));
    assert_eq!(a.status, 202, "{}", a.text);
    let a = a.json["task_id"].as_str().unwrap().to_string();
    server.wait_task(&a, |t| t["status"] == "RETRY");
    let b = post_json(&url, &json!({"fail": false}));
    assert_eq!(b.status, 202, "{}", b.text);
    let b = b.json["task_id"].as_str().unwrap().to_string();
    server.kill();

    let server = env.start(config);
    let (a, b) = (server.finished(&a), server.finished(&b));
    assert_eq!(a["status"], "SUCCESS", "{a}");
    assert_eq!(b["status"], "SUCCESS", "{b}");
    assert_eq!(
        a["tick"], 2,
        "the retry still runs first after the restart: {a}"
    );
    assert_eq!(b["tick"], 3, "{b}");
    assert!(ms(&b["started_at"]) >= ms(&a["finished_at"]), "{a} {b}");
}
