//! The `a2a` runner (SPEC section 10) against the real binary: each test runs a small A2A 1.0
//! JSON-RPC agent of its own on 127.0.0.1 (agent card, `SendMessage`, `GetTask`, `CancelTask`
//! in the protocol's real shapes), points an agent's runner at its card and triggers the agent
//! through its webhook. Covered: a text artifact and a data artifact as the response, a working
//! task polled to completion, failed and refused exchanges, input-required parked as
//! `AWAITING_INPUT` and resumed as the next message of the same remote task, the bearer token
//! taken from the environment (and never logged), a parked task's remote ids surviving `kill -9`,
//! a continuation re-run after `kill -9` resending the same answer message, a remote that never
//! finishes, and the config check of `token_env`. Then two agents of one tickgate bridged over
//! A2A: a webhook on one runs a tick on the other and returns its answer, and input-required on
//! the far side parks the near side until it is answered. Last, an official A2A SDK agent.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::*;
use serde_json::{json, Value};

/// The webhook token of the agent under test (pinned so that resumes can use it).
const HOOK: &str = "a2a-runner-hook-token-0123456789-abcdefgh";
/// The bearer token the remote agent expects; must never show up in tickgate's output.
const REMOTE_SECRET: &str = "remote-bearer-secret-9f8e7d6c5b4a";

/// What the fake remote answers to one JSON-RPC call.
enum Reply {
    /// `{"jsonrpc":"2.0","id":…,"result":…}`.
    Result(Value),
    /// An HTTP error status with no JSON-RPC body, as an auth layer in front of an agent sends.
    Status(u16),
}

/// One JSON-RPC call the fake remote received (an agent card fetch is method `card`).
#[derive(Debug, Clone)]
struct Call {
    /// The path prefix the call was made under (`/fails`, `/denied`, …).
    agent: String,
    method: String,
    params: Value,
    /// Header names lower-cased.
    headers: HashMap<String, String>,
}

type Handler = dyn Fn(&str, &str, &Value) -> Reply + Send + Sync;

/// A minimal A2A 1.0 agent over plain HTTP/1.1. `GET <prefix>/.well-known/agent-card.json`
/// serves a card whose JSON-RPC interface is `<prefix>/rpc`; a POST there is handed to the
/// test's handler with the prefix, the method and the params. Stopped (and joined) on drop.
struct Remote {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Remote {
    fn start(handler: impl Fn(&str, &str, &Value) -> Reply + Send + Sync + 'static) -> Remote {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (calls, stop) = (calls.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (calls, handler) = (calls.clone(), handler.clone());
                    std::thread::spawn(move || serve(stream, addr, &calls, &*handler));
                }
            })
        };
        Remote {
            addr,
            calls,
            stop,
            thread: Some(thread),
        }
    }

    fn card_url(&self, agent: &str) -> String {
        format!("http://{}/{agent}/.well-known/agent-card.json", self.addr)
    }

    fn calls(&self, method: &str) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, addr: SocketAddr, calls: &Mutex<Vec<Call>>, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(DEADLINE));
    let Some((head, body)) = read_request(&mut stream) else {
        return;
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (status, reply) = if method == "GET" && path.ends_with("/.well-known/agent-card.json") {
        let prefix = path.trim_end_matches("/.well-known/agent-card.json");
        calls.lock().unwrap().push(Call {
            agent: prefix.trim_start_matches('/').to_string(),
            method: "card".to_string(),
            params: Value::Null,
            headers,
        });
        (200, card(addr, prefix))
    } else if let (true, Some(prefix)) = (method == "POST", path.strip_suffix("/rpc")) {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let call = Call {
            agent: prefix.trim_start_matches('/').to_string(),
            method: request["method"].as_str().unwrap_or("").to_string(),
            params: request["params"].clone(),
            headers,
        };
        // Recorded before the handler runs, so that a test can see a call the handler holds.
        calls.lock().unwrap().push(call.clone());
        let reply = handler(&call.agent, &call.method, &call.params);
        match reply {
            Reply::Result(result) => (
                200,
                json!({ "jsonrpc": "2.0", "id": request["id"], "result": result }),
            ),
            Reply::Status(status) => (status, json!({ "detail": "no" })),
        }
    } else {
        (404, json!({ "detail": "not found" }))
    };
    let body = reply.to_string();
    let text = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(text.as_bytes());
}

/// An A2A 1.0 agent card with one JSON-RPC interface.
fn card(addr: SocketAddr, prefix: &str) -> Value {
    json!({
        "name": format!("remote{prefix}"),
        "description": "a test agent",
        "version": "1.0.0",
        "supportedInterfaces": [
            { "url": format!("http://{addr}{prefix}/grpc"), "protocolBinding": "GRPC", "protocolVersion": "1.0" },
            { "url": format!("http://{addr}{prefix}/rpc"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0" },
        ],
        "capabilities": { "streaming": false },
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [],
    })
}

/// Reads one request: the head as text and the body by `Content-Length`.
fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                return Some((head, data[end + 4..end + 4 + length].to_vec()));
            }
        }
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => data.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// A remote task in A2A 1.0 JSON.
fn task(id: &str, state: &str, more: Value) -> Value {
    let mut t = json!({ "id": id, "contextId": format!("ctx-{id}"), "status": { "state": state } });
    if let Value::Object(more) = more {
        t.as_object_mut().unwrap().extend(more);
    }
    t
}

fn agent_message(text: &str) -> Value {
    json!({ "messageId": "m-agent", "role": "ROLE_AGENT", "parts": [{ "text": text }] })
}

/// One agent `a` whose runner calls the remote's card for `remote_agent`.
fn config(remote: &Remote, remote_agent: &str, tick_timeout: &str) -> String {
    format!(
        r#"
[[agent]]
name = "a"
runner = {{ kind = "a2a", url = "{}", token_env = "REMOTE_TOKEN" }}
tick_timeout = "{tick_timeout}"
[agent.webhook]
token_env = "A_HOOK"
"#,
        remote.card_url(remote_agent)
    )
}

fn start(env: &Env, config: &str) -> Server {
    env.start_with(config, &[("A_HOOK", HOOK), ("REMOTE_TOKEN", REMOTE_SECRET)])
}

/// Triggers agent `a` and waits for a stopping point.
fn trigger(server: &Server, body: Value) -> Response {
    let r = post_json(&format!("{}/webhooks/{HOOK}?wait=60", server.base), &body);
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

#[test]
fn a_text_artifact_is_the_response_and_the_message_carries_the_tick_input() {
    let remote = Remote::start(|_, method, _| match method {
        "SendMessage" => {
            Reply::Result(json!({ "task": task("rt-1", "TASK_STATE_COMPLETED", json!({
            "artifacts": [{ "artifactId": "a1", "parts": [{ "text": "hello from remote" }] }],
        })) }))
        }
        _ => Reply::Status(500),
    });
    let env = Env::new();
    let server = start(&env, &config(&remote, "text", "30s"));

    let r = trigger(&server, json!({ "title": "Greet", "who": "me" }));
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(r.json["response"], "hello from remote", "{}", r.text);
    assert_eq!(r.json["result"]["a2a"]["taskId"], "rt-1", "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap();

    let sent = remote.calls("SendMessage");
    assert_eq!(sent.len(), 1);
    let call = &sent[0];
    assert_eq!(call.agent, "text");
    assert_eq!(
        call.headers.get("authorization").map(String::as_str),
        Some(&*format!("Bearer {REMOTE_SECRET}"))
    );
    assert_eq!(
        call.headers.get("a2a-version").map(String::as_str),
        Some("1.0")
    );
    let message = &call.params["message"];
    assert_eq!(message["role"], "ROLE_USER");
    assert!(message["messageId"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(message.get("taskId").is_none(), "{message}");
    let tick = &message["parts"][0]["data"];
    assert_eq!(tick["inputs"]["who"], "me", "{message}");
    assert_eq!(tick["task_id"], id);
    assert_eq!(tick["agent"], "default/a");
    assert_eq!(message["parts"][1]["text"], "Greet");
    assert!(
        !server.logs().contains(REMOTE_SECRET),
        "the bearer token was logged"
    );
}

#[test]
fn a_working_task_is_polled_until_its_data_artifact_is_ready() {
    let polls = Arc::new(Mutex::new(0u32));
    let counted = polls.clone();
    let remote = Remote::start(move |_, method, params| match method {
        "SendMessage" => {
            Reply::Result(json!({ "task": task("rt-2", "TASK_STATE_WORKING", json!({})) }))
        }
        "GetTask" if params["id"] == "rt-2" => {
            let mut n = counted.lock().unwrap();
            *n += 1;
            if *n < 3 {
                Reply::Result(task("rt-2", "TASK_STATE_WORKING", json!({})))
            } else {
                Reply::Result(task(
                    "rt-2",
                    "TASK_STATE_COMPLETED",
                    json!({
                        "artifacts": [{ "artifactId": "a1", "parts": [{ "data": { "temperature": 21 } }] }],
                    }),
                ))
            }
        }
        _ => Reply::Status(404),
    });
    let env = Env::new();
    let server = start(&env, &config(&remote, "data", "30s"));

    let r = trigger(&server, json!({ "city": "Oslo" }));
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(
        r.json["response"],
        json!({ "temperature": 21 }),
        "{}",
        r.text
    );
    let gets = remote.calls("GetTask");
    assert_eq!(gets.len(), 3);
    // The card was read once (the interface is cached for later ticks), without the token:
    // that goes only to the JSON-RPC endpoint.
    let r = trigger(&server, json!({ "city": "Bergen" }));
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    let cards = remote.calls("card");
    assert_eq!(cards.len(), 1);
    assert!(!cards[0].headers.contains_key("authorization"));
    assert!(gets.iter().all(|c| c.params["id"] == "rt-2"
        && c.headers.get("authorization") == Some(&format!("Bearer {REMOTE_SECRET}"))));
}

#[test]
fn failed_and_refused_exchanges_fail_the_task_with_a_clear_error() {
    let remote = Remote::start(|agent, method, _| match (agent, method) {
        ("fails", "SendMessage") => {
            Reply::Result(json!({ "task": task("rt-3", "TASK_STATE_FAILED", json!({
            "status": { "state": "TASK_STATE_FAILED", "message": agent_message("quota exceeded") },
        })) }))
        }
        ("rejects", "SendMessage") => {
            Reply::Result(json!({ "task": task("rt-4", "TASK_STATE_REJECTED", json!({})) }))
        }
        _ => Reply::Status(401),
    });
    let env = Env::new();
    let hooks = ["fails", "rejects", "denied"];
    let config: String = hooks
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "[[agent]]\nname = \"{name}\"\nrunner = {{ kind = \"a2a\", url = \"{}\", token_env = \"REMOTE_TOKEN\" }}\n[agent.webhook]\ntoken_env = \"HOOK_{i}\"\n",
                remote.card_url(name)
            )
        })
        .collect();
    let tokens: Vec<String> = (0..hooks.len()).map(|i| format!("{HOOK}-{i}")).collect();
    let vars: Vec<String> = (0..hooks.len()).map(|i| format!("HOOK_{i}")).collect();
    let mut vars_env: Vec<(&str, &str)> = vars
        .iter()
        .zip(&tokens)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    vars_env.push(("REMOTE_TOKEN", REMOTE_SECRET));
    let server = env.start_with(&config, &vars_env);

    let mut errors = Vec::new();
    for token in &tokens {
        let r = post_json(
            &format!("{}/webhooks/{token}?wait=60", server.base),
            &json!({}),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "FAILURE", "{}", r.text);
        errors.push(r.json["error"].as_str().unwrap().to_string());
    }
    assert!(
        errors[0].contains("rt-3") && errors[0].contains("FAILED: quota exceeded"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains("REJECTED"), "{}", errors[1]);
    assert!(
        errors[2].contains("refused the credentials") && errors[2].contains("401"),
        "{}",
        errors[2]
    );
    for e in &errors {
        assert!(e.starts_with("remote A2A agent: "), "{e}");
        assert!(!e.contains(REMOTE_SECRET), "{e}");
    }
    assert!(!server.logs().contains(REMOTE_SECRET));
}

#[test]
fn input_required_parks_the_task_and_the_resume_continues_the_same_remote_task() {
    let remote = Remote::start(|_, method, params| {
        let message = &params["message"];
        match (method, message["taskId"].as_str()) {
            ("SendMessage", None) => Reply::Result(
                json!({ "task": task("rt-5", "TASK_STATE_INPUT_REQUIRED", json!({
                "status": { "state": "TASK_STATE_INPUT_REQUIRED", "message": agent_message("Which city?") },
            })) }),
            ),
            ("SendMessage", Some("rt-5")) => {
                let city = message["parts"][0]["data"]["city"].as_str().unwrap_or("?");
                Reply::Result(json!({ "task": task("rt-5", "TASK_STATE_COMPLETED", json!({
                    "artifacts": [{ "artifactId": "a1", "parts": [{ "text": format!("sunny in {city}") }] }],
                })) }))
            }
            _ => Reply::Status(400),
        }
    });
    let env = Env::new();
    let server = start(&env, &config(&remote, "ask", "30s"));

    let r = trigger(&server, json!({ "question": "weather?" }));
    assert_eq!(r.json["status"], "AWAITING_INPUT", "{}", r.text);
    let request = &r.json["awaiting"]["request"];
    assert_eq!(request["parts"][0]["text"], "Which city?", "{request}");
    assert_eq!(request["taskId"], "rt-5", "{request}");
    assert_eq!(request["contextId"], "ctx-rt-5", "{request}");
    let id = r.json["task_id"].as_str().unwrap().to_string();

    // The remote ids live in the parked task's record: they survive `kill -9`.
    server.kill();
    let server = start(&env, &config(&remote, "ask", "30s"));
    let parked = server.get(&format!("/tasks/{id}"));
    assert_eq!(parked.json["status"], "AWAITING_INPUT", "{}", parked.text);
    assert_eq!(parked.json["awaiting"]["request"]["taskId"], "rt-5");

    let answer = send(
        client()
            .post(format!("{}/tasks/{id}/resume", server.base))
            .header("Authorization", format!("Bearer {HOOK}"))
            .json(&json!({ "response": { "city": "Oslo" } })),
    );
    assert!(answer.status < 300, "{}", answer.text);
    let done = server.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["response"], "sunny in Oslo", "{done}");

    let sent = remote.calls("SendMessage");
    assert_eq!(sent.len(), 2);
    let second = &sent[1].params["message"];
    assert_eq!(second["taskId"], "rt-5", "{second}");
    assert_eq!(second["contextId"], "ctx-rt-5", "{second}");
    assert_eq!(second["role"], "ROLE_USER");
    assert_eq!(second["parts"], json!([{ "data": { "city": "Oslo" } }]));
    assert_ne!(second["messageId"], sent[0].params["message"]["messageId"]);
}

#[test]
fn a_remote_that_never_finishes_times_the_tick_out_and_is_cancelled() {
    let remote = Remote::start(|_, method, params| match method {
        "SendMessage" => {
            Reply::Result(json!({ "task": task("rt-6", "TASK_STATE_SUBMITTED", json!({})) }))
        }
        "GetTask" => Reply::Result(task("rt-6", "TASK_STATE_WORKING", json!({}))),
        "CancelTask" if params["id"] == "rt-6" => {
            Reply::Result(task("rt-6", "TASK_STATE_CANCELED", json!({})))
        }
        _ => Reply::Status(400),
    });
    let env = Env::new();
    let server = start(&env, &config(&remote, "slow", "2s"));

    let r = trigger(&server, json!({}));
    assert_eq!(r.json["status"], "FAILURE", "{}", r.text);
    assert_eq!(r.json["error"], "tick timed out after 2s", "{}", r.text);
    assert!(!remote.calls("GetTask").is_empty());
    assert!(
        wait_until(|| !remote.calls("CancelTask").is_empty()),
        "the remote task was not cancelled"
    );
    let cancel = &remote.calls("CancelTask")[0];
    assert_eq!(
        cancel.headers.get("authorization").map(String::as_str),
        Some(&*format!("Bearer {REMOTE_SECRET}"))
    );
}

#[test]
fn an_unset_token_variable_or_a_bad_url_is_a_config_error() {
    let env = Env::new();
    let path = env.write_config(
        "[[agent]]\nname = \"a\"\nrunner = { kind = \"a2a\", url = \"http://127.0.0.1:9/card\", token_env = \"TICKGATE_TEST_UNSET_A2A\" }\n",
    );
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("runner.token_env") && text.contains("TICKGATE_TEST_UNSET_A2A"),
        "{text}"
    );

    let path = env.write_config(
        "[[agent]]\nname = \"a\"\nrunner = { kind = \"a2a\", url = \"ftp://example.com/card\" }\n",
    );
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("runner.url"), "{text}");

    let path = env.write_config(
        "[[agent]]\nname = \"a\"\nrunner = { kind = \"a2a\", url = \"http://127.0.0.1:9/card\", token_env = \"TICKGATE_TEST_SET_A2A\" }\n",
    );
    let out = env.run(
        &["check", "--config", path.to_str().unwrap()],
        &[("TICKGATE_TEST_SET_A2A", "x")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_continuation_re_run_after_a_crash_sends_the_same_answer_message() {
    // The remote holds the first answer until the test is done with it: tickgate dies with the
    // answer delivered but its outcome unknown, which is what a crash mid-continuation looks like.
    let released = Arc::new(AtomicBool::new(false));
    let held = released.clone();
    let answers = Arc::new(Mutex::new(0u32));
    let remote = Remote::start(move |_, method, params| {
        match (method, params["message"]["taskId"].as_str()) {
            ("SendMessage", None) => Reply::Result(
                json!({ "task": task("rt-7", "TASK_STATE_INPUT_REQUIRED", json!({
                "status": { "state": "TASK_STATE_INPUT_REQUIRED", "message": agent_message("Proceed?") },
            })) }),
            ),
            ("SendMessage", Some("rt-7")) => {
                let first = {
                    let mut n = answers.lock().unwrap();
                    *n += 1;
                    *n == 1
                };
                if first {
                    let deadline = std::time::Instant::now() + DEADLINE;
                    while !held.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
                Reply::Result(json!({ "task": task("rt-7", "TASK_STATE_COMPLETED", json!({
                    "artifacts": [{ "artifactId": "a1", "parts": [{ "text": "proceeded" }] }],
                })) }))
            }
            _ => Reply::Status(400),
        }
    });
    let env = Env::new();
    let server = start(&env, &config(&remote, "crash", "30s"));
    let r = trigger(&server, json!({}));
    assert_eq!(r.json["status"], "AWAITING_INPUT", "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let answer = send(
        client()
            .post(format!("{}/tasks/{id}/resume", server.base))
            .header("Authorization", format!("Bearer {HOOK}"))
            .json(&json!({ "response": "yes" })),
    );
    assert!(answer.status < 300, "{}", answer.text);
    assert!(
        wait_until(|| remote.calls("SendMessage").len() == 2),
        "the answer never reached the remote"
    );
    server.kill();

    let server = start(&env, &config(&remote, "crash", "30s"));
    let done = server.finished(&id);
    released.store(true, Ordering::SeqCst);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(done["response"], "proceeded", "{done}");
    let sent = remote.calls("SendMessage");
    assert_eq!(sent.len(), 3);
    let (before, after) = (&sent[1].params["message"], &sent[2].params["message"]);
    assert_eq!(after["taskId"], "rt-7");
    assert_eq!(
        after["messageId"], before["messageId"],
        "a re-run must resend the same answer"
    );
    assert_eq!(after["parts"], before["parts"]);
}

/// Two agents in one config bridged over A2A: `b-echo` and `b-tool` are served by tickgate's own
/// A2A server, and `a-echo` / `a-tool` are `kind = "a2a"` runners pointing at their cards, with
/// B's webhook token as the bearer. The card names the interface by `public_url`, which is the
/// bound address, so the port must be known before the config is written: a free port is picked
/// and, should another process take it first, a start that fails to bind is retried on another.
fn start_bridge(env: &Env) -> Server {
    let vars = [
        ("A_ECHO_HOOK", "bridge-a-echo-hook-0123456789-abcdefghij"),
        ("A_TOOL_HOOK", "bridge-a-tool-hook-0123456789-abcdefghij"),
        ("B_ECHO_HOOK", "bridge-b-echo-hook-0123456789-abcdefghij"),
        ("B_TOOL_HOOK", "bridge-b-tool-hook-0123456789-abcdefghij"),
    ];
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let card = |agent: &str| {
            format!("http://127.0.0.1:{port}/a2a/default/{agent}/.well-known/agent-card.json")
        };
        let config = format!(
            r#"
[[agent]]
name = "b-echo"
runner = {{ kind = "echo" }}
[agent.webhook]
token_env = "B_ECHO_HOOK"
[agent.a2a]
enabled = true

[[agent]]
name = "b-tool"
runner = {{ kind = "command", program = "{root}/config/agents/toolcall.sh", mode = "oneshot" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "B_TOOL_HOOK"
[agent.a2a]
enabled = true

[[agent]]
name = "a-echo"
runner = {{ kind = "a2a", url = "{echo}", token_env = "B_ECHO_HOOK" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "A_ECHO_HOOK"

[[agent]]
name = "a-tool"
runner = {{ kind = "a2a", url = "{tool}", token_env = "B_TOOL_HOOK" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "A_TOOL_HOOK"
"#,
            root = env!("CARGO_MANIFEST_DIR"),
            echo = card("b-echo"),
            tool = card("b-tool"),
        );
        let listen = format!("127.0.0.1:{port}");
        let mut all: Vec<(&str, &str)> = vars.to_vec();
        all.push(("TICKGATE_SERVER_LISTEN", &listen));
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            env.start_with(&config, &all)
        }));
        match started {
            Ok(server) => return server,
            Err(panic) => {
                let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
                if !text.contains("in use") {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
    panic!("tickgate could not be started on a free port in 5 tries");
}

#[test]
fn a_webhook_on_one_agent_runs_a_tick_on_another_over_a2a() {
    let env = Env::new();
    let server = start_bridge(&env);

    // a-echo → b-echo: B echoes its inputs, `{"message": <the message A sent>}`, and that value
    // comes back as A's response, holding A's own tick input.
    let r = post_json(
        &format!(
            "{}/webhooks/bridge-a-echo-hook-0123456789-abcdefghij?wait=60",
            server.base
        ),
        &json!({ "title": "Bridge", "n": 7 }),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    let message = &r.json["response"]["message"];
    assert_eq!(message["parts"][0]["data"]["inputs"]["n"], 7, "{}", r.text);
    assert_eq!(message["parts"][0]["data"]["agent"], "default/a-echo");
    assert_eq!(message["parts"][1]["text"], "Bridge");
    // A's result names B's task, which is a task of b-echo in the same tickgate.
    let b_task = r.json["result"]["a2a"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let b = server.get(&format!("/tasks/{b_task}"));
    assert_eq!(b.json["agent"], "default/b-echo", "{}", b.text);
    assert_eq!(b.json["status"], "SUCCESS");
    assert!(
        !server.logs().contains("bridge-b-echo-hook"),
        "a token was logged"
    );
}

#[test]
fn a_remote_tickgate_agent_that_waits_for_input_parks_the_caller_until_answered() {
    let env = Env::new();
    let server = start_bridge(&env);
    let hook = "bridge-a-tool-hook-0123456789-abcdefghij";

    // The tool-call agent behind A parks twice; each time A's task parks too, with B's question.
    let r = post_json(
        &format!("{}/webhooks/{hook}?wait=60", server.base),
        &json!({ "q": 1 }),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "AWAITING_INPUT", "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    let request = &r.json["awaiting"]["request"];
    assert_eq!(request["parts"][0]["data"]["step"], 1, "{request}");
    let b_task = request["taskId"].as_str().unwrap().to_string();
    let b = server.get(&format!("/tasks/{b_task}"));
    assert_eq!(b.json["agent"], "default/b-tool", "{}", b.text);
    assert_eq!(b.json["status"], "AWAITING_INPUT");

    let resume = |answer: Value| {
        let r = send(
            client()
                .post(format!("{}/tasks/{id}/resume", server.base))
                .header("Authorization", format!("Bearer {hook}"))
                .json(&json!({ "response": answer })),
        );
        assert!(r.status < 300, "{}", r.text);
    };
    resume(json!({ "temperature": 21 }));
    let second = server.wait_task(&id, |t| {
        t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["parts"][0]["data"]["step"] == 2
    });
    assert_eq!(second["awaiting"]["request"]["taskId"], b_task);

    resume(json!("yes"));
    let done = server.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    // B got each answer as the data part of A's message, in its `resume.response.message`.
    let answers = &done["response"]["answers"];
    assert_eq!(
        answers[0]["message"]["parts"][0]["data"],
        json!({ "temperature": 21 }),
        "{done}"
    );
    assert_eq!(answers[1]["message"]["parts"][0]["data"], "yes", "{done}");
    assert_eq!(done["result"]["a2a"]["taskId"], b_task);
}

/// The runner against an agent built with the official A2A Python SDK (server side):
/// `tests/a2a_sdk/runner_interop.py` serves the SDK agent and drives this binary (data artifact,
/// input-required and resumed on the same SDK task, refused token). Runs when the interpreter
/// named by `A2A_SDK_PYTHON` (default `python3`) can import the SDK's server with uvicorn;
/// otherwise it says so and passes (`.ci/run` and `tests/a2a_sdk/run.sh` install them).
#[test]
fn sdk_agent_interoperates() {
    let python = std::env::var("A2A_SDK_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import a2a.server.routes, starlette, uvicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        eprintln!("skipped: {python} cannot import the a2a-sdk server and uvicorn (pip install \"a2a-sdk[http-server]==1.3.0\" uvicorn, or set A2A_SDK_PYTHON)");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/a2a_sdk/runner_interop.py"
    );
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_tickgate"))
        .env_remove("TICKGATE_ADMIN_TOKEN")
        .output()
        .expect("run the runner interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "runner interop failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("runner interop: all checks passed"),
        "{stdout}"
    );
}
