//! The handlers served in-process (`actix_web::test`, no socket) over the state `build_state`
//! makes from a config, against a real temporary sled store: a trigger goes through the intake,
//! runs, and its task is read back; duplicates and refusals keep their status codes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::test::{call_service, init_service, read_body_json, TestRequest};
use serde_json::{json, Value};
use tickgate::app::{build_state, create_app};
use tickgate::config::Config;
use tickgate::metrics::Metrics;
use tickgate_actors::registry::rotate_offline;
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::Store;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"

[[agent]]
name = "echo"
runner = { kind = "echo" }
mailbox = 4
"#;

#[actix_rt::test]
async fn trigger_then_task_read_in_process_on_a_real_store() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("tickgate.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let (config, source) = Config::load(Some(&config_path)).unwrap();
    let settings = config.validate(source, &|_| None).unwrap();
    let sled = SledStore::open(&dir.path().join("store")).unwrap();
    let token = rotate_offline(sled.as_ref(), &"echo".parse().unwrap()).unwrap();
    let store: Arc<dyn Store> = sled.clone();

    let built = build_state(
        &settings,
        store,
        Arc::new(Metrics::new()),
        "http://tickgate.test".into(),
    )
    .await
    .unwrap();
    assert!(built.created.is_empty(), "the stored token was kept");
    let app = init_service(create_app(built.state.clone(), built.admin_enabled)).await;

    // Fire-and-forget: 202 with a poll URL under the public URL.
    let resp = call_service(
        &app,
        TestRequest::post()
            .uri(&format!("/webhooks/{token}"))
            .set_json(json!({"hello": "world"}))
            .to_request(),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let accepted: Value = read_body_json(resp).await;
    let id = accepted["task_id"].as_str().unwrap().to_string();
    assert_eq!(
        accepted["poll_url"],
        format!("http://tickgate.test/tasks/{id}")
    );

    // The task is read back through the async store read until the echo tick finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    let task = loop {
        let resp = call_service(
            &app,
            TestRequest::get().uri(&format!("/tasks/{id}")).to_request(),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let task: Value = read_body_json(resp).await;
        if task["status"] == "SUCCESS" {
            break task;
        }
        assert!(Instant::now() < deadline, "task never finished: {task}");
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(task["tick"], 1);
    assert_eq!(task["response"], json!({"hello": "world"}), "{task}");

    // A synchronous trigger with a key, then its repeat: same task, marked duplicate.
    let keyed = || {
        TestRequest::post()
            .uri(&format!("/webhooks/{token}?wait=10"))
            .insert_header(("Idempotency-Key", "in-process-1"))
            .set_json(json!({"n": 2}))
            .to_request()
    };
    let first = call_service(&app, keyed()).await;
    assert_eq!(first.status(), 200);
    let first: Value = read_body_json(first).await;
    assert_eq!(first["status"], "SUCCESS");
    assert_eq!(first["tick"], 2);
    let repeat = call_service(&app, keyed()).await;
    assert_eq!(repeat.status(), 200);
    let repeat: Value = read_body_json(repeat).await;
    assert_eq!(repeat["duplicate"], true);
    assert_eq!(repeat["task_id"], first["task_id"]);

    // The same key with another body is a conflict, refused by the intake.
    let conflict = call_service(
        &app,
        TestRequest::post()
            .uri(&format!("/webhooks/{token}"))
            .insert_header(("Idempotency-Key", "in-process-1"))
            .set_json(json!({"n": 3}))
            .to_request(),
    )
    .await;
    assert_eq!(conflict.status(), 422);
    let conflict: Value = read_body_json(conflict).await;
    assert_eq!(conflict["error"]["code"], "idempotency_conflict");

    // Shutting down: the intake refuses, the edge answers 503 with Retry-After.
    built.state.lifecycle.drain();
    let refused = call_service(
        &app,
        TestRequest::post()
            .uri(&format!("/webhooks/{token}"))
            .set_json(json!({}))
            .to_request(),
    )
    .await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));

    built.stop_agents();
    sled.close().unwrap();
}
