//! The A2A server (SPEC section 10) against the real binary over HTTP: the Agent Card; bearer
//! authentication; the JSON-RPC envelope, version and method errors; blocking and non-blocking
//! `SendMessage` with idempotent message ids; `GetTask` and `ListTasks`; `CancelTask` on a
//! queued task and on a finished one; a full mailbox as a retryable error; streams whose events
//! arrive in order and end at the terminal state; and the input-required round trip with the
//! shipped tool-call agent.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;

use common::*;
use serde_json::{json, Value};

const ECHO: &str = "echo-token-0123456789-abcdefghijklmnopqrstu";
const GATED: &str = "gated-token-0123456789-abcdefghijklmnopqrst";
const TOOL: &str = "toolcall-token-0123456789-abcdefghijklmnopq";
const BROKEN: &str = "broken-token-0123456789-abcdefghijklmnopqrs";
const ASKER: &str = "asker-token-0123456789-abcdefghijklmnopqrstu";

fn config() -> String {
    format!(
        r#"
[[agent]]
name = "echo"
runner = {{ kind = "echo" }}
[agent.webhook]
token_env = "ECHO_TOKEN"
[agent.a2a]
enabled = true
description = "Echoes what it is sent"
skills = [{{ id = "echo", name = "Echo", description = "Answers with its input", tags = ["test"] }}]

[[agent]]
name = "gated"
runner = {{ kind = "command", program = "{{dir}}/gated.sh" }}
tick_timeout = "120s"
mailbox = 2
[agent.webhook]
token_env = "GATED_TOKEN"
[agent.a2a]
enabled = true

[[agent]]
name = "toolcall"
runner = {{ kind = "command", program = "{}/config/agents/toolcall.sh", mode = "oneshot" }}
tick_timeout = "30s"
[agent.webhook]
token_env = "TOOL_TOKEN"
[agent.a2a]
enabled = true

[[agent]]
name = "broken"
runner = {{ kind = "command", program = "{{dir}}/broken.sh" }}
breaker = {{ failures = 1, open_for = "1h" }}
[agent.webhook]
token_env = "BROKEN_TOKEN"
[agent.a2a]
enabled = true

[[agent]]
name = "asker"
runner = {{ kind = "command", program = "{{dir}}/asker.sh" }}
tick_timeout = "120s"
[agent.webhook]
token_env = "ASKER_TOKEN"
[agent.a2a]
enabled = true

[[agent]]
name = "plain"
runner = {{ kind = "echo" }}
"#,
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Starts the server; the gated agent's ticks wait for the file `go` in the test directory and
/// answer with the text `done`.
fn start(env: &Env) -> Server {
    let go = env.path().join("go");
    env.script(
        "gated.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho '{{\"response\":\"done\"}}'",
            go = go.display()
        ),
    );
    env.script("broken.sh", "cat >/dev/null\nexit 3");
    // Asks a question; its continuation waits for `go`, then answers.
    env.script(
        "asker.sh",
        &format!(
            "input=$(cat)\nif printf '%s' \"$input\" | grep -q '\"resume\":{{'; then\n  while [ ! -e {go} ]; do sleep 0.05; done\n  echo '{{\"response\":\"answered\"}}'\nelse\n  echo '{{\"await\":{{\"request\":\"which colour?\"}}}}'\nfi",
            go = go.display()
        ),
    );
    env.start_with(
        &config(),
        &[
            ("ECHO_TOKEN", ECHO),
            ("GATED_TOKEN", GATED),
            ("TOOL_TOKEN", TOOL),
            ("BROKEN_TOKEN", BROKEN),
            ("ASKER_TOKEN", ASKER),
        ],
    )
}

fn open_gate(env: &Env) {
    std::fs::write(env.path().join("go"), "").unwrap();
}

fn endpoint(server: &Server, agent: &str) -> String {
    format!("{}/a2a/default/{agent}", server.base)
}

/// One JSON-RPC call with `A2A-Version: 1.0` and the bearer token.
fn rpc(server: &Server, agent: &str, token: &str, method: &str, params: Value) -> Response {
    send(
        client()
            .post(endpoint(server, agent))
            .header("A2A-Version", "1.0")
            .bearer_auth(token)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})),
    )
}

/// The `result` of a successful call.
fn result(r: &Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json.get("error").is_none(), "{}", r.text);
    assert_eq!(r.json["jsonrpc"], "2.0");
    r.json["result"].clone()
}

/// The JSON-RPC error code of a failed call (answered with HTTP 200).
fn rpc_error(r: &Response) -> i64 {
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json.get("result").is_none(), "{}", r.text);
    let e = &r.json["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text
    );
    e["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("no error code: {}", r.text))
}

fn message(id: &str, text: &str) -> Value {
    json!({"messageId": id, "role": "ROLE_USER", "parts": [{"text": text}]})
}

fn send_params(msg: Value, return_immediately: bool) -> Value {
    json!({"message": msg, "configuration": {"returnImmediately": return_immediately}})
}

fn state(task: &Value) -> &str {
    task["status"]["state"].as_str().unwrap_or_default()
}

/// Opens a stream; its `result` objects arrive on the channel, which closes when the stream does.
fn stream(
    server: &Server,
    agent: &str,
    token: &str,
    method: &str,
    params: Value,
) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    let req = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap()
        .post(endpoint(server, agent))
        .header("A2A-Version", "1.0")
        .bearer_auth(token)
        .json(&json!({"jsonrpc": "2.0", "id": "s", "method": method, "params": params}));
    std::thread::spawn(move || {
        let resp = req.send().expect("stream");
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        for line in BufReader::new(resp).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(v["id"], "s", "{v}");
                let _ = tx.send(v["result"].clone());
            }
        }
    });
    rx
}

/// Everything a stream sends until it closes.
fn drain(rx: &mpsc::Receiver<Value>) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        match rx.recv_timeout(DEADLINE) {
            Ok(v) => events.push(v),
            Err(mpsc::RecvTimeoutError::Disconnected) => return events,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("stream did not end; got {events:?}"),
        }
    }
}

/// The state each event reports.
fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| {
            e["task"]["status"]["state"]
                .as_str()
                .or(e["statusUpdate"]["status"]["state"].as_str())
                .map(str::to_string)
        })
        .collect()
}

fn rank(state: &str) -> u8 {
    match state {
        "TASK_STATE_SUBMITTED" => 0,
        "TASK_STATE_WORKING" => 1,
        "TASK_STATE_INPUT_REQUIRED" => 2,
        _ => 3,
    }
}

#[test]
fn card_authentication_and_protocol_errors() {
    let env = Env::new();
    let server = start(&env);

    let card = server.get("/a2a/default/echo/.well-known/agent-card.json");
    assert_eq!(card.status, 200, "{}", card.text);
    let c = &card.json;
    assert_eq!(c["name"], "default/echo");
    assert_eq!(c["description"], "Echoes what it is sent");
    assert_eq!(c["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        c["supportedInterfaces"],
        json!([{"url": endpoint(&server, "echo"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}])
    );
    assert_eq!(c["capabilities"]["streaming"], true);
    assert_eq!(
        c["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"],
        "Bearer"
    );
    assert_eq!(
        c["securityRequirements"],
        json!([{"schemes": {"bearer": {"list": []}}}])
    );
    assert_eq!(c["skills"][0]["id"], "echo");
    assert_eq!(c["skills"][0]["tags"], json!(["test"]));
    assert!(c["defaultInputModes"]
        .as_array()
        .unwrap()
        .contains(&json!("text/plain")));
    assert!(!card.text.contains(ECHO), "the card never holds the token");
    // Without configured skills the card still has one (it requires one).
    let gated = server.get("/a2a/default/gated/.well-known/agent-card.json");
    assert_eq!(gated.json["skills"].as_array().unwrap().len(), 1);
    // An agent without [agent.a2a] is not served.
    for path in [
        "/a2a/default/plain/.well-known/agent-card.json",
        "/a2a/default/nobody/.well-known/agent-card.json",
    ] {
        let r = server.get(path);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (404, "not_found"),
            "{path}"
        );
    }

    // Bearer: missing, wrong, or another agent's token.
    let get = json!({"id": "00000000-0000-4000-8000-000000000000"});
    for auth in [None, Some("nope"), Some(GATED)] {
        let mut req = client()
            .post(endpoint(&server, "echo"))
            .header("A2A-Version", "1.0")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": get}));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = send(req);
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text);
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.error_code(), "unauthorized");
        assert!(!r.text.contains(ECHO));
    }

    let raw = |body: &str, version: Option<&str>| {
        let mut req = client()
            .post(endpoint(&server, "echo"))
            .bearer_auth(ECHO)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(v) = version {
            req = req.header("A2A-Version", v);
        }
        send(req)
    };
    // Malformed JSON-RPC.
    let r = raw("{not json", Some("1.0"));
    assert_eq!((rpc_error(&r), &r.json["id"]), (-32700, &Value::Null));
    assert_eq!(rpc_error(&raw("[1, 2]", Some("1.0"))), -32600);
    let r = raw(
        r#"{"jsonrpc": "1.0", "id": 9, "method": "GetTask"}"#,
        Some("1.0"),
    );
    assert_eq!((rpc_error(&r), &r.json["id"]), (-32600, &json!(9)));
    assert_eq!(
        rpc_error(&raw(r#"{"jsonrpc": "2.0", "id": 9}"#, Some("1.0"))),
        -32600
    );
    // Unknown methods, 0.3 method names under 1.0, and push notifications (not declared).
    assert_eq!(
        rpc_error(&rpc(&server, "echo", ECHO, "Frobnicate", json!({}))),
        -32601
    );
    assert_eq!(
        rpc_error(&rpc(&server, "echo", ECHO, "message/send", json!({}))),
        -32601
    );
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "echo",
            ECHO,
            "GetTaskPushNotificationConfig",
            json!({})
        )),
        -32003
    );
    // A2A-Version: absent means 0.3 (not served), other versions are refused; the query
    // parameter works like the header.
    let body = r#"{"jsonrpc": "2.0", "id": 3, "method": "GetTask", "params": {"id": "x"}}"#;
    for version in [None, Some("0.3"), Some("2.0")] {
        let r = raw(body, version);
        assert_eq!(
            (rpc_error(&r), &r.json["id"]),
            (-32009, &json!(3)),
            "{version:?}"
        );
    }
    let r = send(
        client()
            .post(format!("{}?A2A-Version=1.0", endpoint(&server, "echo")))
            .bearer_auth(ECHO)
            .header("Content-Type", "application/json")
            .body(body),
    );
    assert_eq!(
        rpc_error(&r),
        -32001,
        "with the version as a query parameter"
    );
    // Invalid params and unsupported content.
    assert_eq!(
        rpc_error(&rpc(&server, "echo", ECHO, "SendMessage", json!({}))),
        -32602
    );
    let png = json!({"message": {"messageId": "p", "role": "ROLE_USER",
        "parts": [{"url": "https://example.com/a.png", "mediaType": "image/png"}]}});
    assert_eq!(
        rpc_error(&rpc(&server, "echo", ECHO, "SendMessage", png)),
        -32005
    );
    // A body that is not JSON at all by its type.
    let r = send(
        client()
            .post(endpoint(&server, "echo"))
            .bearer_auth(ECHO)
            .header("A2A-Version", "1.0")
            .header("Content-Type", "text/plain")
            .body(body),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (415, "unsupported_media_type")
    );
    // Nothing above created a task.
    let list = result(&rpc(&server, "echo", ECHO, "ListTasks", json!({})));
    assert_eq!(list["tasks"], json!([]));
}

#[test]
fn send_blocking_and_non_blocking_get_list_and_idempotent_message_ids() {
    let env = Env::new();
    let server = start(&env);

    // Blocking (the default): the answer is the completed task with the response as artifact.
    let msg = json!({"messageId": "m-1", "role": "ROLE_USER", "contextId": "ctx-1",
        "parts": [{"text": "hello"}, {"data": {"n": 1}}]});
    let sent = result(&rpc(
        &server,
        "echo",
        ECHO,
        "SendMessage",
        json!({"message": msg}),
    ));
    let task = &sent["task"];
    assert_eq!(state(task), "TASK_STATE_COMPLETED", "{sent}");
    assert_eq!(task["contextId"], "ctx-1");
    let id = task["id"].as_str().unwrap().to_string();
    // echo answers with its inputs: {"message": <the message>} comes back as a data part.
    let part = &task["artifacts"][0]["parts"][0];
    assert_eq!(
        part["data"]["message"]["parts"][0]["text"], "hello",
        "{task}"
    );
    assert_eq!(task["history"][0]["messageId"], "m-1");
    // The A2A task id is the tickgate task id, and the title joins the text parts.
    let record = server.get(&format!("/tasks/{id}"));
    assert_eq!(record.json["status"], "SUCCESS");
    assert_eq!(record.json["title"], "hello");
    assert_eq!(record.json["source"]["method"], "A2A");

    // The same message again is the same task (idempotency by messageId), even blocking.
    let again = result(&rpc(
        &server,
        "echo",
        ECHO,
        "SendMessage",
        json!({"message": msg}),
    ));
    assert_eq!(again["task"]["id"], id.as_str());
    // The same messageId with another message is refused, naming nothing internal.
    let other = json!({"messageId": "m-1", "role": "ROLE_USER", "parts": [{"text": "bye"}]});
    let r = rpc(
        &server,
        "echo",
        ECHO,
        "SendMessage",
        json!({"message": other}),
    );
    assert_eq!(rpc_error(&r), -32602);

    // Non-blocking: answered at once with the accepted task.
    let quick = result(&rpc(
        &server,
        "echo",
        ECHO,
        "SendMessage",
        send_params(message("m-2", "later"), true),
    ));
    assert_eq!(state(&quick["task"]), "TASK_STATE_SUBMITTED", "{quick}");
    let quick_id = quick["task"]["id"].as_str().unwrap().to_string();
    let mut done = Value::Null;
    assert!(wait_until(|| {
        done = result(&rpc(
            &server,
            "echo",
            ECHO,
            "GetTask",
            json!({"id": quick_id}),
        ));
        state(&done) == "TASK_STATE_COMPLETED"
    }));
    assert_eq!(
        done["artifacts"][0]["parts"][0]["data"]["message"]["messageId"],
        "m-2"
    );
    assert_eq!(
        result(&rpc(
            &server,
            "echo",
            ECHO,
            "GetTask",
            json!({"id": quick_id, "historyLength": 0})
        ))
        .get("history"),
        None
    );

    // GetTask: unknown ids, malformed ids and another agent's task are all "not found".
    for missing in ["00000000-0000-4000-8000-000000000000", "not-a-task"] {
        let r = rpc(&server, "echo", ECHO, "GetTask", json!({"id": missing}));
        assert_eq!(rpc_error(&r), -32001, "{missing}");
    }
    assert_eq!(
        rpc_error(&rpc(&server, "gated", GATED, "GetTask", json!({"id": id}))),
        -32001
    );
    // A webhook task of the same agent is one of its A2A tasks too.
    let hook = post_json(
        &format!("{}/webhooks/{ECHO}?wait=30", server.base),
        &json!({"x": 1}),
    );
    assert_eq!(hook.status, 200, "{}", hook.text);

    // ListTasks: the agent's tasks, newest first; artifacts only when asked for.
    let list = result(&rpc(&server, "echo", ECHO, "ListTasks", json!({})));
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{list}");
    assert_eq!(tasks[1]["id"], quick_id.as_str());
    assert_eq!(tasks[2]["id"], id.as_str());
    assert!(tasks.iter().all(|t| t.get("artifacts").is_none()));
    assert_eq!(list["nextPageToken"], "");
    let page = result(&rpc(
        &server,
        "echo",
        ECHO,
        "ListTasks",
        json!({"pageSize": 2, "includeArtifacts": true, "status": "TASK_STATE_COMPLETED"}),
    ));
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    assert!(page["tasks"][0]["artifacts"].is_array());
    let token = page["nextPageToken"].as_str().unwrap();
    assert!(!token.is_empty());
    let rest = result(&rpc(
        &server,
        "echo",
        ECHO,
        "ListTasks",
        json!({"pageSize": 2, "pageToken": token}),
    ));
    assert_eq!(rest["tasks"][0]["id"], id.as_str());
    let ctx = result(&rpc(
        &server,
        "echo",
        ECHO,
        "ListTasks",
        json!({"contextId": "ctx-1"}),
    ));
    assert_eq!(ctx["tasks"].as_array().unwrap().len(), 1);
    let none = result(&rpc(
        &server,
        "echo",
        ECHO,
        "ListTasks",
        json!({"status": "TASK_STATE_FAILED"}),
    ));
    assert_eq!(none["tasks"], json!([]));
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "echo",
            ECHO,
            "ListTasks",
            json!({"pageSize": 0})
        )),
        -32602
    );
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "echo",
            ECHO,
            "ListTasks",
            json!({"pageToken": "zz"})
        )),
        -32602
    );
    // Another agent's listing does not show them.
    let gated = result(&rpc(&server, "gated", GATED, "ListTasks", json!({})));
    assert_eq!(gated["tasks"], json!([]));
}

#[test]
fn cancel_a_queued_task_refuse_a_finished_one_and_a_full_mailbox() {
    let env = Env::new();
    let server = start(&env);
    let send_quick = |id: &str| {
        rpc(
            &server,
            "gated",
            GATED,
            "SendMessage",
            send_params(message(id, id), true),
        )
    };
    let running = result(&send_quick("c-1"))["task"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(wait_until(|| {
        let t = result(&rpc(
            &server,
            "gated",
            GATED,
            "GetTask",
            json!({"id": running}),
        ));
        state(&t) == "TASK_STATE_WORKING"
    }));
    let queued = result(&send_quick("c-2"))["task"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // mailbox = 2: a running and a queued task fill it; the next message is a retryable refusal
    // (HTTP 429 with Retry-After), never a task.
    let full = send_quick("c-3");
    assert_eq!(full.status, 429, "{}", full.text);
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(full.json["error"]["code"], -32000);
    assert_eq!(full.json["error"]["data"][0]["reason"], "MAILBOX_FULL");
    assert!(full.json.get("result").is_none());

    // A task that has not started is canceled; waiters hear of it.
    let canceled = result(&rpc(
        &server,
        "gated",
        GATED,
        "CancelTask",
        json!({"id": queued}),
    ));
    assert_eq!(state(&canceled), "TASK_STATE_CANCELED", "{canceled}");
    assert_eq!(
        server.get(&format!("/tasks/{queued}")).json["status"],
        "REVOKED"
    );
    // Again, or on the running task: not cancelable.
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "gated",
            GATED,
            "CancelTask",
            json!({"id": queued})
        )),
        -32002
    );
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "gated",
            GATED,
            "CancelTask",
            json!({"id": running})
        )),
        -32002
    );
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "gated",
            GATED,
            "CancelTask",
            json!({"id": "00000000-0000-4000-8000-000000000000"})
        )),
        -32001
    );

    open_gate(&env);
    assert!(wait_until(|| {
        let t = result(&rpc(
            &server,
            "gated",
            GATED,
            "GetTask",
            json!({"id": running}),
        ));
        state(&t) == "TASK_STATE_COMPLETED"
    }));
    let finished = result(&rpc(
        &server,
        "gated",
        GATED,
        "GetTask",
        json!({"id": running}),
    ));
    assert_eq!(finished["artifacts"][0]["parts"], json!([{"text": "done"}]));
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "gated",
            GATED,
            "CancelTask",
            json!({"id": running})
        )),
        -32002
    );
    // A message to a task in a terminal state is UnsupportedOperation.
    let mut late = message("c-4", "more");
    late["taskId"] = json!(running);
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "gated",
            GATED,
            "SendMessage",
            json!({"message": late})
        )),
        -32004
    );
    // The canceled task never ran.
    let t = server.get(&format!("/tasks/{queued}"));
    assert_eq!(
        (t.json["status"].as_str(), t.json["tick"].as_u64()),
        (Some("REVOKED"), None)
    );
}

#[test]
fn streams_deliver_events_in_order_and_end_at_the_terminal_state() {
    let env = Env::new();
    let server = start(&env);
    let sent = stream(
        &server,
        "gated",
        GATED,
        "SendStreamingMessage",
        json!({"message": message("s-1", "stream me")}),
    );
    let first = sent.recv_timeout(DEADLINE).expect("first event");
    let id = first["task"]["id"]
        .as_str()
        .expect("the first event is the task")
        .to_string();
    assert!(["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING"].contains(&state(&first["task"])));
    // A second stream on the same task, while it runs.
    assert!(wait_until(|| {
        let t = result(&rpc(&server, "gated", GATED, "GetTask", json!({"id": id})));
        state(&t) == "TASK_STATE_WORKING"
    }));
    let watched = stream(
        &server,
        "gated",
        GATED,
        "SubscribeToTask",
        json!({"id": id}),
    );
    let sub_first = watched
        .recv_timeout(DEADLINE)
        .expect("subscription's first event");
    assert_eq!(state(&sub_first["task"]), "TASK_STATE_WORKING");
    open_gate(&env);

    for (name, rx, first) in [("send", &sent, first), ("subscribe", &watched, sub_first)] {
        let mut events = vec![first];
        events.extend(drain(rx));
        let s = states(&events);
        assert!(
            s.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
            "{name}: {s:?}"
        );
        assert_eq!(
            s.last().map(String::as_str),
            Some("TASK_STATE_COMPLETED"),
            "{name}: {events:?}"
        );
        let last = events.last().unwrap();
        assert_eq!(last["statusUpdate"]["taskId"], id.as_str());
        // The response arrives as an artifact just before the completed status.
        let artifact = &events[events.len() - 2]["artifactUpdate"];
        assert_eq!(
            artifact["artifact"]["parts"],
            json!([{"text": "done"}]),
            "{name}: {events:?}"
        );
        assert_eq!(artifact["lastChunk"], true);
    }
    // A finished task cannot be subscribed to.
    let r = rpc(
        &server,
        "gated",
        GATED,
        "SubscribeToTask",
        json!({"id": id}),
    );
    assert_eq!(rpc_error(&r), -32004);
}

#[test]
fn input_required_round_trip_with_the_tool_call_agent() {
    let env = Env::new();
    let server = start(&env);
    let ask = json!({"messageId": "t-1", "role": "ROLE_USER", "contextId": "trip",
        "parts": [{"text": "plan"}, {"data": {"query": "weather in Oslo"}}]});
    // Blocking send stops at the interrupted state; the agent's question is the status message.
    let first = result(&rpc(
        &server,
        "toolcall",
        TOOL,
        "SendMessage",
        json!({"message": ask}),
    ));
    let task = &first["task"];
    assert_eq!(state(task), "TASK_STATE_INPUT_REQUIRED", "{first}");
    let question = &task["status"]["message"];
    assert_eq!(question["role"], "ROLE_AGENT");
    assert_eq!(question["parts"][0]["data"]["step"], 1, "{question}");
    let id = task["id"].as_str().unwrap().to_string();
    assert_eq!(
        server.get(&format!("/tasks/{id}")).json["status"],
        "AWAITING_INPUT"
    );

    // A context that is not the task's is refused.
    let mut wrong = message("t-x", "nope");
    wrong["taskId"] = json!(id);
    wrong["contextId"] = json!("elsewhere");
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "toolcall",
            TOOL,
            "SendMessage",
            json!({"message": wrong})
        )),
        -32602
    );

    // The answer, as a stream: it resumes the task and ends at the next question.
    let mut answer = message("t-2", "sunny");
    answer["taskId"] = json!(id);
    let events = drain(&stream(
        &server,
        "toolcall",
        TOOL,
        "SendStreamingMessage",
        json!({"message": answer}),
    ));
    let s = states(&events);
    assert_eq!(
        s.last().map(String::as_str),
        Some("TASK_STATE_INPUT_REQUIRED"),
        "{events:?}"
    );
    assert!(
        s.windows(2)
            .all(|w| w[0] != "TASK_STATE_INPUT_REQUIRED" || w[1] != "TASK_STATE_SUBMITTED"),
        "{s:?}"
    );
    let second = &events.last().unwrap()["statusUpdate"]["status"]["message"]["parts"][0]["data"];
    assert_eq!(second["step"], 2, "{events:?}");
    // The tick got resume.response = {"message": <the A2A message>}.
    assert_eq!(
        second["previous"]["message"]["parts"][0]["text"], "sunny",
        "{second}"
    );

    // A message while the task works (or to a question already answered) is refused; the final
    // answer completes the task and its response is the artifact.
    let mut last = message("t-3", "confirmed");
    last["taskId"] = json!(id);
    last["contextId"] = json!("trip");
    let done = result(&rpc(
        &server,
        "toolcall",
        TOOL,
        "SendMessage",
        json!({"message": last}),
    ));
    let task = &done["task"];
    assert_eq!(state(task), "TASK_STATE_COMPLETED", "{done}");
    let answers = &task["artifacts"][0]["parts"][0]["data"]["answers"];
    assert_eq!(
        answers[1]["message"]["parts"][0]["text"], "confirmed",
        "{task}"
    );
    assert_eq!(
        task["history"][0]["messageId"], "t-1",
        "the message the task came from"
    );
    let mut after = message("t-4", "again");
    after["taskId"] = json!(id);
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "toolcall",
            TOOL,
            "SendMessage",
            json!({"message": after})
        )),
        -32004
    );
}

/// The official A2A Python SDK (`a2a-sdk` 1.x) drives the server through
/// `tests/a2a_sdk/interop.py`: card resolution, blocking, polling and streaming sends, GetTask,
/// ListTasks, the A2A errors, a wrong token, and the input-required round trip. Runs when the
/// interpreter named by `A2A_SDK_PYTHON` (default `python3`) can import the SDK; otherwise it
/// says so and passes (`.ci/run` installs the SDK when it can).
#[test]
fn sdk_client_interoperates() {
    let python = std::env::var("A2A_SDK_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_sdk = std::process::Command::new(&python)
        .args(["-c", "import a2a.client, httpx"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        eprintln!("skipped: {python} cannot import a2a-sdk (pip install a2a-sdk==1.3.0, or set A2A_SDK_PYTHON)");
        return;
    }
    let env = Env::new();
    let server = start(&env);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/a2a_sdk/interop.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(["--url", &endpoint(&server, "echo"), "--token", ECHO])
        .args([
            "--toolcall-url",
            &endpoint(&server, "toolcall"),
            "--toolcall-token",
            TOOL,
        ])
        .output()
        .expect("run the interop script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interop failed:\n{stdout}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.logs()
    );
    assert!(stdout.contains("interop: all checks passed"), "{stdout}");
}

#[test]
fn a_failing_agent_answers_failed_then_breaker_open_and_accepted_messages_survive_a_crash() {
    let env = Env::new();
    let server = start(&env);
    // The tick fails: the task is FAILED with the error as the agent's status message.
    let failed = result(&rpc(
        &server,
        "broken",
        BROKEN,
        "SendMessage",
        json!({"message": message("b-1", "x")}),
    ));
    assert_eq!(state(&failed["task"]), "TASK_STATE_FAILED", "{failed}");
    assert_eq!(failed["task"]["status"]["message"]["role"], "ROLE_AGENT");
    // One failure opens this agent's breaker (the breaker hears of the outcome beside the
    // answer, not before it, so the test waits for /ready to show it): a retryable 503 with
    // Retry-After, no task.
    assert!(wait_until(|| server.get("/ready").json["agents"]
        ["default/broken"]["breaker"]
        == "open"));
    let refused = rpc(
        &server,
        "broken",
        BROKEN,
        "SendMessage",
        json!({"message": message("b-2", "x")}),
    );
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert!(refused
        .header("retry-after")
        .is_some_and(|s| s.parse::<u64>().unwrap() > 1));
    assert_eq!(refused.json["error"]["code"], -32000);
    assert_eq!(refused.json["error"]["data"][0]["reason"], "BREAKER_OPEN");
    let listed = result(&rpc(&server, "broken", BROKEN, "ListTasks", json!({})));
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);

    // A message accepted without waiting is durable: after kill -9 and a restart it is still
    // there, runs, and its messageId still names it.
    let msg = message("d-1", "keep me");
    let accepted = result(&rpc(
        &server,
        "gated",
        GATED,
        "SendMessage",
        send_params(msg.clone(), true),
    ));
    let id = accepted["task"]["id"].as_str().unwrap().to_string();
    server.kill();
    let server = start(&env);
    let again = result(&rpc(
        &server,
        "gated",
        GATED,
        "SendMessage",
        send_params(msg, true),
    ));
    assert_eq!(
        again["task"]["id"],
        id.as_str(),
        "the same messageId after a restart"
    );
    open_gate(&env);
    let mut task = Value::Null;
    assert!(wait_until(|| {
        task = result(&rpc(&server, "gated", GATED, "GetTask", json!({"id": id})));
        state(&task) == "TASK_STATE_COMPLETED"
    }));
    assert_eq!(task["artifacts"][0]["parts"], json!([{"text": "done"}]));
}

#[test]
fn a_repeated_answer_is_not_taken_twice() {
    let env = Env::new();
    let server = start(&env);
    let asked = result(&rpc(
        &server,
        "asker",
        ASKER,
        "SendMessage",
        json!({"message": message("q-1", "start")}),
    ));
    let task = &asked["task"];
    assert_eq!(state(task), "TASK_STATE_INPUT_REQUIRED", "{asked}");
    // A string request is a text part.
    assert_eq!(
        task["status"]["message"]["parts"],
        json!([{"text": "which colour?"}])
    );
    let id = task["id"].as_str().unwrap().to_string();
    let mut answer = message("q-2", "blue");
    answer["taskId"] = json!(id);
    let taken = result(&rpc(
        &server,
        "asker",
        ASKER,
        "SendMessage",
        send_params(answer.clone(), true),
    ));
    assert_eq!(state(&taken["task"]), "TASK_STATE_SUBMITTED", "{taken}");
    // The continuation waits for the gate; the same answer again is the task as it is, and
    // another message is refused (the task no longer requires input).
    let again = result(&rpc(
        &server,
        "asker",
        ASKER,
        "SendMessage",
        send_params(answer, true),
    ));
    assert_eq!(again["task"]["id"], id.as_str());
    assert!(
        ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING"].contains(&state(&again["task"])),
        "{again}"
    );
    let mut other = message("q-3", "red");
    other["taskId"] = json!(id);
    assert_eq!(
        rpc_error(&rpc(
            &server,
            "asker",
            ASKER,
            "SendMessage",
            json!({"message": other})
        )),
        -32004
    );
    open_gate(&env);
    let mut done = Value::Null;
    assert!(wait_until(|| {
        done = result(&rpc(&server, "asker", ASKER, "GetTask", json!({"id": id})));
        state(&done) == "TASK_STATE_COMPLETED"
    }));
    assert_eq!(done["artifacts"][0]["parts"], json!([{"text": "answered"}]));
    let ticks = server.get(&format!("/tasks/{id}")).json["tick"].as_u64();
    assert_eq!(ticks, Some(2), "one question, one continuation");
}
