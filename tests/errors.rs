//! Refusals: status codes, the one error shape, Retry-After.

mod common;

use common::*;
use serde_json::json;

#[test]
fn refusals_have_the_right_status_and_shape() {
    let env = Env::new();
    let server = env.start(
        r#"
[server]
max_body_bytes = 1024

[[agent]]
name = "echo"
namespace = "ns"
runner = { kind = "echo" }
"#,
    );
    let url = server.url("ns/echo").to_string();
    let token = url.rsplit('/').next().unwrap().to_string();

    let malformed = send(
        client()
            .post(&url)
            .header("Content-Type", "application/json")
            .body("{\"a\":"),
    );
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.error_code(), "invalid_json");

    let unknown = post_json(
        &format!("{}/webhooks/{}", server.base, "x".repeat(43)),
        &json!({}),
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "not_found");

    let big = post_json(&url, &json!({"blob": "x".repeat(2000)}));
    assert_eq!(big.status, 413);
    assert_eq!(big.error_code(), "payload_too_large");

    let chunked = send(
        client()
            .post(&url)
            .header("Content-Type", "application/json")
            .body(reqwest::blocking::Body::new(std::io::Cursor::new(
                format!("{{\"blob\":\"{}\"}}", "y".repeat(4000)).into_bytes(),
            ))),
    );
    assert_eq!(chunked.status, 413, "{}", chunked.text);

    let text = send(
        client()
            .post(&url)
            .header("Content-Type", "text/plain")
            .body("hi"),
    );
    assert_eq!(text.status, 415);
    assert_eq!(text.error_code(), "unsupported_media_type");

    let named_ok = post_json(
        &format!("{}/webhooks/ns/echo/{token}", server.base),
        &json!({}),
    );
    assert_eq!(named_ok.status, 202, "{}", named_ok.text);
    let named_wrong = post_json(
        &format!("{}/webhooks/ns/echo/{}", server.base, "z".repeat(43)),
        &json!({}),
    );
    assert_eq!(named_wrong.status, 401);
    assert_eq!(named_wrong.error_code(), "unauthorized");
    let named_unknown = post_json(
        &format!("{}/webhooks/ns/other/{token}", server.base),
        &json!({}),
    );
    assert_eq!(named_unknown.status, 404);

    let route = server.get("/no/such/route");
    assert_eq!(route.status, 404);
    assert_eq!(route.error_code(), "not_found");
    let method = send(client().delete(&url));
    assert_eq!(method.status, 405);
    assert_eq!(method.error_code(), "method_not_allowed");
    let query = server.get("/api/task_status");
    assert_eq!(query.status, 400);
    assert_eq!(query.error_code(), "bad_request");
    assert!(
        query.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("task_id"),
        "the message names the missing parameter: {}",
        query.text
    );
    let bad_wait = post_json(&url, &json!({"wait": "later"}));
    assert_eq!(bad_wait.status, 400);
    assert_eq!(bad_wait.error_code(), "bad_request");
    let bad_env = post_json(&url, &json!({"env": "A=1"}));
    assert_eq!(bad_env.status, 400);
    // GET with a query string on an agent without allow_get.
    let get = send(client().get(format!("{url}?a=1")));
    assert_eq!(get.status, 405);
    assert_eq!(get.error_code(), "method_not_allowed");
}

#[test]
fn full_mailbox_gives_429_with_retry_after_and_stores_nothing() {
    let env = Env::new();
    let release = env.path().join("release");
    env.script(
        "block.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {} ]; do sleep 0.05; done\necho '{{}}'",
            release.display()
        ),
    );
    let server = env.start(
        r#"
[[agent]]
name = "busy"
runner = { kind = "command", program = "{dir}/block.sh" }
mailbox = 2

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let url = server.url("default/busy").to_string();
    let a = post_json(&url, &json!({"n": 1}));
    let b = post_json(&url, &json!({"n": 2}));
    assert_eq!((a.status, b.status), (202, 202));
    let full = send(
        client()
            .post(&url)
            .header("Idempotency-Key", "third")
            .json(&json!({"n": 3})),
    );
    assert_eq!(full.status, 429, "{}", full.text);
    assert_eq!(full.error_code(), "mailbox_full");
    assert!(full.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // Other agents are unaffected.
    assert_eq!(
        post_json(server.url("default/echo"), &json!({})).status,
        202
    );

    std::fs::write(&release, "").unwrap();
    server.finished(a.json["task_id"].as_str().unwrap());
    let b_task = server.finished(b.json["task_id"].as_str().unwrap());
    assert_eq!(b_task["tick"], 2);
    // The refused request left no idempotency record: the same key is now accepted as new.
    let retry = send(
        client()
            .post(format!("{url}?wait=10"))
            .header("Idempotency-Key", "third")
            .json(&json!({"n": 3})),
    );
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert!(retry.json.get("duplicate").is_none());
    assert_eq!(retry.json["tick"], 3);
}
