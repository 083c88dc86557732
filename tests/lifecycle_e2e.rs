//! Cross-feature lifecycle paths against the real binary: cancelling a task that waits in
//! `RETRY` or `AWAITING_INPUT`, the signed callbacks those transitions produce, and a resumed
//! continuation that fails and is retried with its answer intact. The cancels hold across
//! `kill -9`.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-lifecycle-e2e-0123456";
const TOKEN: &str = "lifecycle-e2e-agent-token-0123456789-abcdef";
/// `whsec_` + base64 of the key `tickgate-test-signing-key-32bytes`.
const SECRET: &str = "whsec_dGlja2dhdGUtdGVzdC1zaWduaW5nLWtleS0zMmJ5dGVz";

/// The test agent, driven by its trigger payload: `{"mode":"fail"}` always fails;
/// `{"mode":"await"}` parks with `{"q": …}` (for `timeout`, default 60s) and, resumed, answers
/// with the resume response, after failing its first `fail_continuation` continuation ticks;
/// anything else succeeds. Every tick input is appended to `ticks.jsonl`.
const AGENT_PY: &str = r#"
import json, os, sys
tick = json.load(sys.stdin)
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ticks.jsonl")
with open(log, "a") as f:
    f.write(json.dumps(tick) + "\n")
inputs = tick.get("inputs") if isinstance(tick.get("inputs"), dict) else {}
mode = inputs.get("mode")
resume = tick.get("resume")
if mode == "fail":
    sys.stderr.write("always fails\n")
    sys.exit(1)
if mode == "await":
    if resume is None:
        out = {"await": {"request": {"q": inputs.get("q")}, "timeout": inputs.get("timeout", "60s")}}
    else:
        with open(log) as f:
            seen = [json.loads(l) for l in f if l.strip()]
        runs = sum(1 for t in seen if t["task_id"] == tick["task_id"] and t.get("resume") is not None)
        if runs <= inputs.get("fail_continuation", 0):
            sys.stderr.write("continuation fails\n")
            sys.exit(1)
        out = {"response": {"answer": resume["response"]}}
else:
    out = {"response": "ok"}
print(json.dumps(out))
"#;

fn agent_config(env: &Env, retry: &str, extra: &str) -> String {
    std::fs::write(env.path().join("agent.py"), AGENT_PY).unwrap();
    env.script("agent.sh", "exec python3 \"$(dirname \"$0\")/agent.py\"");
    format!(
        r#"
[[agent]]
name = "life"
runner = {{ kind = "command", program = "{{dir}}/agent.sh" }}
tick_timeout = "30s"
retry = {retry}
[agent.webhook]
token_env = "LIFE_TOKEN"
{extra}
"#
    )
}

fn start(env: &Env, config: &str) -> Server {
    env.start_with(
        config,
        &[
            ("LIFE_TOKEN", TOKEN),
            ("TICKGATE_ADMIN_TOKEN", ADMIN),
            ("NOTIFY_SECRET", SECRET),
        ],
    )
}

fn submit(server: &Server, body: &Value) -> String {
    let r = post_json(&format!("{}/webhooks/{TOKEN}", server.base), body);
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["task_id"].as_str().unwrap().to_string()
}

fn cancel(server: &Server, id: &str) -> Response {
    send(
        client()
            .post(format!("{}/admin/tasks/{id}/cancel", server.base))
            .bearer_auth(ADMIN),
    )
}

fn resume(server: &Server, id: &str, answer: &Value) -> Response {
    send(
        client()
            .post(format!("{}/tasks/{id}/resume", server.base))
            .bearer_auth(TOKEN)
            .json(&json!({ "response": answer })),
    )
}

fn task(server: &Server, id: &str) -> Value {
    let r = server.get(&format!("/tasks/{id}"));
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

/// Tick inputs the agent logged, in order.
fn ticks(env: &Env) -> Vec<Value> {
    std::fs::read_to_string(env.path().join("ticks.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ticks_of(env: &Env, id: &str) -> Vec<Value> {
    ticks(env)
        .into_iter()
        .filter(|t| t["task_id"] == id)
        .collect()
}

#[test]
fn a_task_cancelled_in_retry_never_runs_again_and_releases_the_queue() {
    let env = Env::new();
    // The 10 s delay leaves the cancel ample time on a loaded machine. `order = "block"`: while the task waits for its retry, nothing else of the agent runs, so
    // the later task running shows the cancel released the queue.
    let server = start(
        &env,
        &agent_config(&env, r#"{ schedule = ["10s"], order = "block" }"#, ""),
    );
    let doomed = submit(&server, &json!({"mode": "fail"}));
    let retrying = server.wait_task(&doomed, |t| t["status"] == "RETRY");
    let later = submit(&server, &json!({"mode": "ok"}));

    let r = cancel(&server, &doomed);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "REVOKED", "{}", r.text);
    assert_eq!(r.json["phase"], "Canceled", "{}", r.text);
    assert_eq!(server.finished(&later)["status"], "SUCCESS");

    // A witness that fails under the same schedule: once it has retried and failed, the
    // cancelled task's retry time has long passed.
    let witness = submit(&server, &json!({"mode": "fail"}));
    let w = server.finished(&witness);
    assert_eq!(w["status"], "FAILURE", "{w}");
    assert_eq!(w["attempts"].as_array().unwrap().len(), 2, "{w}");

    let t = task(&server, &doomed);
    assert_eq!(t["status"], "REVOKED", "{t}");
    assert_eq!(t["phase"], "Canceled", "{t}");
    assert_eq!(t["tick"], retrying["tick"], "{t}");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(ticks_of(&env, &doomed).len(), 1, "ran again after cancel");
    assert_eq!(cancel(&server, &doomed).status, 409);

    // After `kill -9` the retry timers are rebuilt from disk: the cancelled task has none.
    server.kill();
    let config = agent_config(&env, r#"{ schedule = ["10s"], order = "block" }"#, "");
    let server = start(&env, &config);
    let witness = submit(&server, &json!({"mode": "fail"}));
    assert_eq!(server.finished(&witness)["status"], "FAILURE");
    let t = task(&server, &doomed);
    assert_eq!(t["status"], "REVOKED", "{t}");
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(ticks_of(&env, &doomed).len(), 1, "ran again after restart");
}

#[test]
fn a_task_cancelled_while_awaiting_input_takes_no_answer_and_never_expires() {
    let env = Env::new();
    let server = start(&env, &agent_config(&env, r#"{ schedule = [] }"#, ""));
    let parked = submit(
        &server,
        &json!({"mode": "await", "q": "a", "timeout": "2s"}),
    );
    server.wait_task(&parked, |t| t["status"] == "AWAITING_INPUT");

    let r = cancel(&server, &parked);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "REVOKED", "{}", r.text);
    assert_eq!(r.json["phase"], "Canceled", "{}", r.text);

    let r = resume(&server, &parked, &json!("too late"));
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "conflict");

    // A witness parked later with the same timeout expires; by then the cancelled task's
    // expiry has passed too.
    let witness = submit(
        &server,
        &json!({"mode": "await", "q": "w", "timeout": "2s"}),
    );
    let w = server.finished(&witness);
    assert_eq!(w["status"], "FAILURE", "{w}");
    assert_eq!(w["error"], "awaiting input timed out", "{w}");

    let t = task(&server, &parked);
    assert_eq!(t["status"], "REVOKED", "{t}");
    assert_eq!(t["phase"], "Canceled", "{t}");
    assert_eq!(ticks_of(&env, &parked).len(), 1, "ran again after cancel");

    // After `kill -9` the expiry timers are rebuilt from disk: the cancelled task has none.
    server.kill();
    let config = agent_config(&env, r#"{ schedule = [] }"#, "");
    let server = start(&env, &config);
    let witness = submit(
        &server,
        &json!({"mode": "await", "q": "w2", "timeout": "2s"}),
    );
    assert_eq!(server.finished(&witness)["status"], "FAILURE");
    let t = task(&server, &parked);
    assert_eq!(t["status"], "REVOKED", "{t}");
    assert_eq!(resume(&server, &parked, &json!("later")).status, 409);
    assert_eq!(ticks_of(&env, &parked).len(), 1, "ran again after restart");
}

#[test]
fn a_resumed_continuation_that_fails_is_retried_with_the_same_answer() {
    let env = Env::new();
    let server = start(&env, &agent_config(&env, r#"{ schedule = ["1s"] }"#, ""));
    let id = submit(
        &server,
        &json!({"mode": "await", "q": "c", "fail_continuation": 1}),
    );
    let parked = server.wait_task(&id, |t| t["status"] == "AWAITING_INPUT");
    assert_eq!(parked["attempt"], 1, "{parked}");
    let answer = json!({"temperature": 21});
    let r = resume(&server, &id, &answer);
    assert_eq!(r.status, 202, "{}", r.text);

    let done = server.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["response"], json!({"answer": answer}), "{done}");
    assert_eq!(done["attempt"], 2, "{done}");

    let seen = ticks_of(&env, &id);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].get("resume").is_none(), "{}", seen[0]);
    let expected = json!({"request": {"q": "c"}, "response": answer});
    for (t, attempt) in seen[1..].iter().zip([1, 2]) {
        assert_eq!(t["attempt"], attempt, "{t}");
        assert_eq!(t["resume"], expected, "{t}");
    }
    assert!(
        seen[2]["tick"].as_u64() > seen[1]["tick"].as_u64(),
        "{seen:?}"
    );
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// Verifies the signature the way a Standard Webhooks receiver does.
    fn verify(&self) {
        let expected = standard_webhook_signature(
            SECRET,
            self.header("webhook-id"),
            self.header("webhook-timestamp"),
            &self.body,
        );
        assert_eq!(self.header("webhook-signature"), expected);
        let ts: u64 = self.header("webhook-timestamp").parse().unwrap();
        assert!(ts.abs_diff(now()) < 300, "timestamp {ts} is not now");
    }
}

/// A tiny HTTP receiver that answers 200 to every request, one request per connection.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = serve_one(stream, &got);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Self {
            port,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits for an event of `kind` about task `id` and returns it.
    fn event(&self, id: &str, kind: &str) -> Got {
        let mut found = None;
        let ok = wait_until(|| {
            found = self.got().into_iter().find(|g| {
                let b = g.json();
                b["type"] == kind && b["data"]["task_id"] == id
            });
            found.is_some()
        });
        assert!(
            ok,
            "no {kind} for {id}; got {:?}",
            self.got()
                .iter()
                .map(|g| String::from_utf8_lossy(&g.body).into_owned())
                .collect::<Vec<_>>()
        );
        found.unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(stream: TcpStream, got: &Mutex<Vec<Got>>) -> std::io::Result<()> {
    let (headers, body) = read_request(&stream)?;
    got.lock().unwrap().push(Got { headers, body });
    let mut stream = stream;
    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")?;
    stream.flush()
}

#[test]
fn retrying_awaiting_canceled_and_succeeded_callbacks_arrive_signed() {
    let env = Env::new();
    let rx = Receiver::start();
    let notify = format!(
        "[[agent.notify]]\nurl = \"{}\"\nsecret_env = \"NOTIFY_SECRET\"\nallow_private = true\nevents = [\"task.started\", \"task.retrying\", \"task.awaiting_input\", \"task.succeeded\", \"task.failed\", \"task.canceled\"]\n",
        rx.url()
    );
    let server = start(
        &env,
        &agent_config(&env, r#"{ schedule = ["30s"] }"#, &notify),
    );

    let failing = submit(&server, &json!({"mode": "fail"}));
    server.wait_task(&failing, |t| t["status"] == "RETRY");
    let parked = submit(&server, &json!({"mode": "await", "q": "n"}));
    server.wait_task(&parked, |t| t["status"] == "AWAITING_INPUT");

    let r = cancel(&server, &failing);
    assert_eq!(r.status, 200, "{}", r.text);
    let r = resume(&server, &parked, &json!("yes"));
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(server.finished(&parked)["status"], "SUCCESS");

    for (id, kind, status) in [
        (&failing, "task.retrying", "RETRY"),
        (&failing, "task.canceled", "REVOKED"),
        (&parked, "task.awaiting_input", "AWAITING_INPUT"),
        (&parked, "task.succeeded", "SUCCESS"),
    ] {
        let g = rx.event(id, kind);
        g.verify();
        let body = g.json();
        assert_eq!(body["data"]["status"], status, "{body}");
        assert_eq!(
            g.header("webhook-id"),
            format!("{id}.{kind}.{}", body["data"]["tick"]),
            "{body}"
        );
    }
    // The cancelled task never failed, and nothing reported the parked task as failed.
    assert!(
        !rx.got().iter().any(|g| g.json()["type"] == "task.failed"),
        "unexpected task.failed"
    );
}
