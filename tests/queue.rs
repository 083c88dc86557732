//! Queue triggers (SPEC section 11) against a real `nats-server -js` and the real binary on the
//! sled store with `[queue] url`: messages become tasks (one per `Nats-Msg-Id`, or per stream
//! sequence without it), bad payloads are terminated and counted while later messages flow,
//! messages are acknowledged only once their task is durable and redelivered while the agent
//! cannot take them, finished tasks are published to `reply_subject` (through JetStream or core
//! NATS), and neither a tickgate restart nor a NATS restart loses or duplicates a message.
//! Each test starts its own nats-server and stops it.

mod common;

use std::collections::BTreeMap;

use common::nats::{Collector, Nats, NatsServer};
use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "queue-test-admin-token-0123456789";

fn start(env: &Env, config: &str) -> Server {
    env.start_with(config, &[("TICKGATE_ADMIN_TOKEN", ADMIN)])
}

/// The agent's tasks, newest first, through the admin listing.
fn tasks(server: &Server, agent: &str) -> Vec<Value> {
    let r = send(
        client()
            .get(format!(
                "{}/admin/tasks?agent={agent}&limit=1000",
                server.base
            ))
            .bearer_auth(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["tasks"].as_array().unwrap().clone()
}

/// Waits until the agent has `n` tasks, all finished, and returns them.
fn finished_tasks(server: &Server, agent: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(|| {
        last = tasks(server, agent);
        last.len() >= n
            && last
                .iter()
                .all(|t| t["status"] == "SUCCESS" || t["status"] == "FAILURE")
    });
    assert!(ok, "expected {n} finished tasks of {agent}; have {last:#?}");
    assert_eq!(last.len(), n, "more tasks than messages: {last:#?}");
    last
}

/// `tickgate_queue_messages_total` for the agent and outcome (0 when absent).
fn counted(server: &Server, agent: &str, outcome: &str) -> u64 {
    let metrics = server.get("/metrics").text;
    let needle =
        format!("tickgate_queue_messages_total{{agent=\"{agent}\",outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until the consumer has nothing pending and nothing awaiting an ack.
fn drained(nats: &Nats, stream: &str, consumer: &str) {
    let mut last = None;
    let ok = wait_until(|| {
        last = nats.consumer_counts(stream, consumer);
        matches!(last, Some((0, 0, _)))
    });
    assert!(ok, "consumer {consumer} not drained: {last:?}");
}

/// A config with `[queue] url` and one `echo` agent named `name` consuming `<name>.in`.
fn echo_consumer(url: &str, name: &str) -> String {
    format!(
        r#"
[queue]
url = "{url}"

[[agent]]
name = "{name}"
runner = {{ kind = "echo" }}
[[agent.queue]]
subject = "{name}.in"
"#
    )
}

/// A oneshot command runner whose response is its whole tick input.
fn input_echo(env: &Env) -> String {
    env.script(
        "input.sh",
        r#"input=$(cat)
printf '{"response":%s}\n' "$input""#,
    )
    .display()
    .to_string()
}

#[test]
fn messages_become_tasks_once_and_bad_payloads_are_terminated() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    // A stream the operator made, covering more than the trigger's subject, with a short
    // deduplication window so that the same Nats-Msg-Id can be stored twice.
    nats.create_stream(
        "JOBS",
        &["jobs.>"],
        Some(std::time::Duration::from_millis(100)),
    );
    let env = Env::new();
    let program = input_echo(&env);
    let server = start(
        &env,
        &format!(
            r#"
[queue]
url = "{}"

[[agent]]
name = "worker"
runner = {{ kind = "command", program = "{program}" }}
[[agent.queue]]
subject = "jobs.in"
"#,
            nats_server.url()
        ),
    );
    let consumer = "tickgate_default_worker_0";

    // With an id, the same id again (stored twice), without an id, not JSON, then more.
    nats.publish_js("jobs.in", Some("a"), br#"{"n":1}"#);
    nats.publish_js_again("jobs.in", "a", br#"{"n":1}"#);
    nats.publish_js_headers(
        "jobs.in",
        &[
            ("X-Trace", "t-2"),
            ("X-Trace", "again"),
            ("Authorization", "Bearer producer-secret"),
        ],
        br#"{"n":2}"#,
    );
    nats.publish_js("jobs.in", Some("bad"), b"this is not JSON");
    nats.publish_js("jobs.in", Some("c"), br#"{"n":3}"#);

    let all = finished_tasks(&server, "default/worker", 3);
    drained(&nats, "JOBS", consumer);
    assert_eq!(nats.stream_messages("JOBS"), 5);
    assert_eq!(counted(&server, "default/worker", "task"), 3);
    assert_eq!(counted(&server, "default/worker", "duplicate"), 1);
    assert_eq!(counted(&server, "default/worker", "not_json"), 1);
    let mut seen: Vec<i64> = Vec::new();
    for t in &all {
        assert_eq!(t["status"], "SUCCESS", "{t}");
        assert_eq!(t["source"]["method"], "QUEUE");
        assert_eq!(t["source"]["event"], "jobs.in");
        let input = &t["response"];
        assert_eq!(input["source"]["method"], "QUEUE");
        assert_eq!(input["source"]["event"], "jobs.in");
        let n = input["inputs"]["n"].as_i64().unwrap();
        let headers = &input["source"]["headers"];
        if n == 2 {
            // No Nats-Msg-Id: the stream sequence is the key. Repeated headers are joined,
            // credentials never reach the runner.
            assert_eq!(headers["x-trace"], "t-2, again", "{input}");
            assert!(headers.get("authorization").is_none(), "{input}");
            assert!(headers.get("nats-msg-id").is_none(), "{input}");
        } else {
            let id = if n == 1 { "a" } else { "c" };
            assert_eq!(headers["nats-msg-id"], id, "{input}");
        }
        seen.push(n);
    }
    seen.sort();
    assert_eq!(seen, vec![1, 2, 3]);
    // The record never shows headers; the payload of the terminated message is not logged.
    assert!(all.iter().all(|t| t["source"].get("headers").is_none()));
    assert!(!server.logs().contains("this is not JSON"));
    assert!(server.logs().contains("queue message terminated"));
}

#[test]
fn messages_wait_in_jetstream_while_the_agent_cannot_take_them() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    let env = Env::new();
    let gate = env.path().join("gate");
    let program = env.script(
        "slow.sh",
        &format!(
            r#"input=$(cat)
while [ ! -e {} ]; do sleep 0.05; done
echo '{{"response":"done"}}'"#,
            gate.display()
        ),
    );
    let server = start(
        &env,
        &format!(
            r#"
[queue]
url = "{}"

[[agent]]
name = "narrow"
mailbox = 1
runner = {{ kind = "command", program = "{}" }}
[[agent.queue]]
subject = "narrow.jobs"
"#,
            nats_server.url(),
            program.display()
        ),
    );
    // tickgate created the stream for the subject.
    assert!(wait_until(|| nats.stream_for("narrow.jobs").is_some()));
    let stream = nats.stream_for("narrow.jobs").unwrap();
    assert_eq!(stream, "TICKGATE_Q_narrow_jobs");
    let consumer = "tickgate_default_narrow_0";
    for n in 0..3 {
        nats.publish_js(
            "narrow.jobs",
            Some(&format!("m{n}")),
            json!({ "n": n }).to_string().as_bytes(),
        );
    }
    // One task holds the only mailbox slot; the others are refused and redelivered, so they stay
    // unacknowledged in JetStream and make no task.
    assert!(wait_until(|| counted(
        &server,
        "default/narrow",
        "deferred"
    ) >= 2));
    let (_, ack_pending, _) = nats.consumer_counts(&stream, consumer).unwrap();
    assert!(ack_pending >= 2, "deferred messages are not acked");
    // JetStream redelivers them (after the nak's delay), and they are refused again.
    assert!(wait_until(|| nats
        .consumer_counts(&stream, consumer)
        .is_some_and(|(_, _, redelivered)| redelivered >= 1)));
    assert!(wait_until(|| counted(
        &server,
        "default/narrow",
        "deferred"
    ) >= 4));
    assert_eq!(tasks(&server, "default/narrow").len(), 1);
    std::fs::write(&gate, "").unwrap();
    let all = finished_tasks(&server, "default/narrow", 3);
    drained(&nats, &stream, consumer);
    assert!(all.iter().all(|t| t["status"] == "SUCCESS"));
    assert_eq!(counted(&server, "default/narrow", "task"), 3);
}

#[test]
fn finished_tasks_are_published_to_reply_subjects() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    nats.create_stream("RESULTS", &["results.>"], None);
    let env = Env::new();
    let server = start(
        &env,
        &format!(
            r#"
[queue]
url = "{}"

[[agent]]
name = "js"
runner = {{ kind = "echo" }}
[[agent.queue]]
subject = "in.js"
reply_subject = "results.js"

[[agent]]
name = "core"
runner = {{ kind = "echo" }}
[[agent.queue]]
subject = "in.core"
reply_subject = "plain.core"
"#,
            nats_server.url()
        ),
    );
    let plain = Collector::subscribe(&nats_server.url(), "plain.core");
    // A webhook task of the same agent is not a queue task: nothing is published for it.
    let hook = post_json(
        &format!("{}?wait=10", server.url("default/core")),
        &json!({"via": "hook"}),
    );
    assert_eq!(hook.status, 200, "{}", hook.text);

    nats.publish_js("in.core", Some("k1"), br#"{"via":"queue"}"#);
    assert!(wait_until(|| !plain.json().is_empty()));
    let core_task = &finished_tasks(&server, "default/core", 2)
        .into_iter()
        .find(|t| t["source"]["method"] == "QUEUE")
        .unwrap();
    // The webhook task finished first, so a record wrongly published for it would have arrived
    // before the queue task's.
    let got = plain.json();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["task_id"], core_task["task_id"]);
    assert_eq!(got[0]["status"], "SUCCESS");
    assert_eq!(got[0]["response"], json!({"via": "queue"}));
    assert_eq!(got[0]["source"]["method"], "QUEUE");

    nats.publish_js("in.js", Some("k2"), br#"{"to":"stream"}"#);
    let js_task = finished_tasks(&server, "default/js", 1).remove(0);
    let mut stored = None;
    assert!(wait_until(|| {
        stored = nats.last_message("RESULTS", "results.js");
        stored.is_some()
    }));
    let (msg_id, payload) = stored.unwrap();
    let record: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        msg_id.as_deref(),
        js_task["task_id"].as_str(),
        "Nats-Msg-Id is the task id"
    );
    assert_eq!(record["task_id"], js_task["task_id"]);
    assert_eq!(record["status"], "SUCCESS");
    assert_eq!(record["response"], json!({"to": "stream"}));
    assert_eq!(nats.stream_messages("RESULTS"), 1);
}

#[test]
fn a_restart_or_a_kill_loses_and_duplicates_no_message() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    let env = Env::new();
    let config = format!(
        r#"
[queue]
url = "{}"

[[agent]]
name = "steady"
runner = {{ kind = "echo" }}
[[agent.queue]]
subject = "steady.in"
ack_wait = "2s"
"#,
        nats_server.url()
    );
    let publish = |range: std::ops::Range<i64>, with_id: bool| {
        for n in range {
            let id = format!("s{n}");
            let body = json!({ "n": n }).to_string();
            nats.publish_js("steady.in", with_id.then_some(id.as_str()), body.as_bytes());
        }
    };
    let server = start(&env, &config);
    assert!(wait_until(|| nats.stream_for("steady.in").is_some()));
    publish(0..5, true);
    finished_tasks(&server, "default/steady", 5);
    assert_eq!(server.terminate().code(), Some(0));
    // Published while no tickgate runs.
    publish(5..10, false);
    let server = start(&env, &config);
    finished_tasks(&server, "default/steady", 10);
    // Killed while messages are being taken: accepted but unacked ones are redelivered after
    // ack_wait and recognised by their key.
    publish(10..40, true);
    assert!(wait_until(|| tasks(&server, "default/steady").len() > 10));
    server.kill();
    publish(40..45, false);
    let server = start(&env, &config);
    let all = finished_tasks(&server, "default/steady", 45);
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for t in &all {
        *count
            .entry(t["response"]["n"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(count.len(), 45);
    assert!(count.values().all(|&c| c == 1), "{count:?}");
    drained(&nats, "TICKGATE_Q_steady_in", "tickgate_default_steady_0");
}

#[test]
fn the_consumer_resumes_after_nats_restarts() {
    let Some(mut nats_server) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let server = start(&env, &echo_consumer(&nats_server.url(), "sturdy"));
    {
        let nats = Nats::connect(&nats_server.url());
        assert!(wait_until(|| nats.stream_for("sturdy.in").is_some()));
        nats.publish_js("sturdy.in", Some("before"), br#"{"when":"before"}"#);
        finished_tasks(&server, "default/sturdy", 1);
    }
    nats_server.stop();
    // The outage lasts until tickgate noticed it (missed heartbeats) and tried to re-create its
    // consumer, so that the resumption below is a recovery, not a reconnect within one breath.
    assert!(
        wait_until(|| server.logs().contains("queue consumer interrupted")),
        "{}",
        server.logs()
    );
    // tickgate keeps serving without NATS.
    assert_eq!(server.get("/healthz").status, 200);
    let hook = post_json(
        &format!("{}?wait=10", server.url("default/sturdy")),
        &json!({"when":"outage"}),
    );
    assert_eq!(hook.status, 200, "{}", hook.text);
    nats_server.restart();
    let nats = Nats::connect(&nats_server.url());
    nats.publish_js("sturdy.in", Some("after"), br#"{"when":"after"}"#);
    let all = finished_tasks(&server, "default/sturdy", 3);
    assert!(
        all.iter()
            .any(|t| t["response"] == json!({"when": "after"})),
        "{all:#?}"
    );
    assert!(!server.logs().contains("panicked"));
}

#[test]
fn queue_entries_without_a_nats_url_are_refused_at_start() {
    let env = Env::new();
    let path = env.write_config(
        r#"
[[agent]]
name = "lonely"
runner = { kind = "echo" }
[[agent.queue]]
subject = "lonely.in"
"#,
    );
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent default/lonely") && err.contains("[queue] url"),
        "{err}"
    );
    let path = env.write_config(
        r#"
[queue]
url = "nats://127.0.0.1:4222"
[[agent]]
name = "lonely"
runner = { kind = "echo" }
[[agent.queue]]
subject = "lonely.in"
reply_subject = "lonely.*"
"#,
    );
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("queue[0]: reply_subject") && err.contains("wildcard"),
        "{err}"
    );
}

#[test]
fn an_open_breaker_defers_messages_until_its_trial() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    let env = Env::new();
    let program = env.script("fail.sh", "cat >/dev/null\nexit 1");
    let server = start(
        &env,
        &format!(
            r#"
[queue]
url = "{}"

[[agent]]
name = "fragile"
runner = {{ kind = "command", program = "{}" }}
breaker = {{ failures = 1, open_for = "2s" }}
[[agent.queue]]
subject = "fragile.in"
"#,
            nats_server.url(),
            program.display()
        ),
    );
    assert!(wait_until(|| nats.stream_for("fragile.in").is_some()));
    nats.publish_js("fragile.in", Some("first"), br#"{"n":1}"#);
    finished_tasks(&server, "default/fragile", 1);
    // The failure opened the breaker: the next message is refused and stays in JetStream, then
    // becomes the half-open trial once open_for has passed.
    nats.publish_js("fragile.in", Some("second"), br#"{"n":2}"#);
    assert!(wait_until(|| counted(
        &server,
        "default/fragile",
        "deferred"
    ) >= 1));
    assert_eq!(tasks(&server, "default/fragile").len(), 1);
    let all = finished_tasks(&server, "default/fragile", 2);
    assert!(all.iter().all(|t| t["status"] == "FAILURE"));
    drained(&nats, "TICKGATE_Q_fragile_in", "tickgate_default_fragile_0");
    assert_eq!(counted(&server, "default/fragile", "task"), 2);
}

#[test]
fn two_nodes_with_the_same_config_share_the_messages() {
    let Some(nats_server) = NatsServer::start() else {
        return;
    };
    let nats = Nats::connect(&nats_server.url());
    let config = echo_consumer(&nats_server.url(), "shared");
    let (env_a, env_b) = (Env::new(), Env::new());
    let a = start(&env_a, &config);
    let b = start(&env_b, &config);
    assert!(wait_until(|| nats.stream_for("shared.in").is_some()));
    for n in 0..30 {
        let body = json!({ "n": n }).to_string();
        nats.publish_js("shared.in", Some(&format!("x{n}")), body.as_bytes());
    }
    let mut all = Vec::new();
    let ok = wait_until(|| {
        all = tasks(&a, "default/shared");
        all.extend(tasks(&b, "default/shared"));
        all.len() >= 30
    });
    assert!(ok, "{} tasks", all.len());
    drained(&nats, "TICKGATE_Q_shared_in", "tickgate_default_shared_0");
    all = tasks(&a, "default/shared");
    all.extend(tasks(&b, "default/shared"));
    let mut ns: Vec<i64> = all
        .iter()
        .map(|t| t["response"]["n"].as_i64().unwrap_or(-1))
        .collect();
    ns.sort();
    assert_eq!(
        ns,
        (0..30).collect::<Vec<_>>(),
        "each message once, on one node"
    );
}

#[test]
fn a_result_finished_during_an_outage_is_published_when_nats_returns() {
    let Some(mut nats_server) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let gate = env.path().join("gate");
    let program = env.script(
        "gated.sh",
        &format!(
            r#"input=$(cat)
while [ ! -e {} ]; do sleep 0.05; done
echo '{{"response":"late"}}'"#,
            gate.display()
        ),
    );
    {
        let nats = Nats::connect(&nats_server.url());
        nats.create_stream("LATE", &["late.out"], None);
    }
    let server = start(
        &env,
        &format!(
            r#"
[queue]
url = "{}"

[[agent]]
name = "late"
runner = {{ kind = "command", program = "{}" }}
[[agent.queue]]
subject = "late.in"
reply_subject = "late.out"
"#,
            nats_server.url(),
            program.display()
        ),
    );
    let task_id = {
        let nats = Nats::connect(&nats_server.url());
        assert!(wait_until(|| nats.stream_for("late.in").is_some()));
        nats.publish_js("late.in", Some("l1"), br#"{}"#);
        let mut id = String::new();
        assert!(wait_until(|| {
            let t = tasks(&server, "default/late");
            if let Some(t) = t.first().filter(|t| t["status"] == "STARTED") {
                id = t["task_id"].as_str().unwrap().to_string();
            }
            !id.is_empty()
        }));
        id
    };
    nats_server.stop();
    std::fs::write(&gate, "").unwrap();
    server.finished(&task_id);
    assert!(wait_until(|| server
        .logs()
        .contains("cannot publish a finished task's record; retrying")));
    nats_server.restart();
    let nats = Nats::connect(&nats_server.url());
    let mut stored = None;
    assert!(wait_until(|| {
        stored = nats.last_message("LATE", "late.out");
        stored.is_some()
    }));
    let (msg_id, payload) = stored.unwrap();
    let record: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(msg_id.as_deref(), Some(task_id.as_str()));
    assert_eq!(record["task_id"], task_id.as_str());
    assert_eq!(record["status"], "SUCCESS");
    assert_eq!(record["response"], "late");
    // Retried publishes carried the same Nats-Msg-Id: the stream holds the record once.
    assert_eq!(nats.stream_messages("LATE"), 1);
}

#[test]
fn tickgate_starts_without_nats_and_consumes_once_it_comes() {
    let Some(mut nats_server) = NatsServer::start() else {
        return;
    };
    nats_server.stop();
    let env = Env::new();
    let server = start(&env, &echo_consumer(&nats_server.url(), "patient"));
    // Webhooks work meanwhile; the queue side keeps trying.
    let hook = post_json(
        &format!("{}?wait=10", server.url("default/patient")),
        &json!({"via": "hook"}),
    );
    assert_eq!(hook.status, 200, "{}", hook.text);
    assert!(wait_until(|| server
        .logs()
        .contains("cannot connect to NATS for queue triggers")));
    nats_server.restart();
    let nats = Nats::connect(&nats_server.url());
    assert!(wait_until(|| nats.stream_for("patient.in").is_some()));
    nats.publish_js("patient.in", Some("p1"), br#"{"via":"queue"}"#);
    let all = finished_tasks(&server, "default/patient", 2);
    assert!(all.iter().any(|t| t["source"]["method"] == "QUEUE"));
}
