//! Idempotency keys and provider delivery ids.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

const ECHO: &str = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }
mailbox = 64
"#;

#[test]
fn repeated_key_returns_the_original_task_and_runs_nothing() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo");
    let first = send(
        client()
            .post(url)
            .header("Idempotency-Key", "k-1")
            .json(&json!({"a": 1})),
    );
    assert_eq!(first.status, 202);
    let id = first.json["task_id"].as_str().unwrap().to_string();
    server.finished(&id);

    let again = send(
        client()
            .post(url)
            .header("Idempotency-Key", "k-1")
            .json(&json!({"a": 1})),
    );
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true);
    assert_eq!(again.json["task_id"], id);
    assert_eq!(again.json["status"], "SUCCESS");

    let changed = send(
        client()
            .post(url)
            .header("Idempotency-Key", "k-1")
            .json(&json!({"a": 2})),
    );
    assert_eq!(changed.status, 422);
    assert_eq!(changed.error_code(), "idempotency_conflict");

    // Nothing ran for the repeats: the next task is tick 2.
    let next = post_json(&format!("{url}?wait=10"), &json!({}));
    assert_eq!(next.json["tick"], 2);
}

#[test]
fn sixteen_concurrent_repeats_create_exactly_one_task() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo").to_string();
    let responses: Vec<Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let url = url.clone();
                s.spawn(move || {
                    send(
                        client()
                            .post(&url)
                            .header("Idempotency-Key", "same")
                            .json(&json!({"n": 1})),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: HashSet<String> = responses
        .iter()
        .map(|r| r.json["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{responses:?}");
    assert_eq!(responses.iter().filter(|r| r.status == 202).count(), 1);
    assert_eq!(
        responses
            .iter()
            .filter(|r| r.status == 200 && r.json["duplicate"] == true)
            .count(),
        15
    );
    let id = ids.into_iter().next().unwrap();
    server.finished(&id);
    let next = post_json(&format!("{url}?wait=10"), &json!({}));
    assert_eq!(
        next.json["tick"], 2,
        "exactly one tick ran for the 16 repeats"
    );
}

#[test]
fn provider_delivery_ids_deduplicate_and_survive_restart() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo").to_string();
    let gh = |url: &str| {
        send(
            client()
                .post(url)
                .header("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
                .json(&json!({"zen": "Keep it logically awesome."})),
        )
    };
    let first = gh(&url);
    assert_eq!(first.status, 202);
    let id = first.json["task_id"].as_str().unwrap().to_string();
    let second = gh(&url);
    assert_eq!(second.status, 200);
    assert_eq!(second.json["task_id"], id);
    server.finished(&id);
    server.terminate();

    let server = env.start(ECHO);
    let url = server.rebase(&url);
    let third = gh(&url);
    assert_eq!(third.status, 200, "{}", third.text);
    assert_eq!(third.json["duplicate"], true);
    assert_eq!(third.json["task_id"], id);

    for header in ["webhook-id", "Linear-Delivery"] {
        let a = send(
            client()
                .post(&url)
                .header(header, header)
                .json(&json!({"h": header})),
        );
        let b = send(
            client()
                .post(&url)
                .header(header, header)
                .json(&json!({"h": header})),
        );
        assert_eq!(a.status, 202, "{header}: {}", a.text);
        assert_eq!(b.status, 200, "{header}: {}", b.text);
        assert_eq!(a.json["task_id"], b.json["task_id"]);
    }
}
