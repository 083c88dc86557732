//! A failing store: the app runs in-process on a real sled store wrapped in `FaultyStore`, and
//! is driven over real HTTP. Write failures must give 503s and an unready service, never a panic
//! and never a 202 for a task that is not stored.

mod common;

use std::sync::Arc;

use common::*;
use serde_json::json;
use tickgate::config::Config;
use tickgate::metrics::Metrics;
use tickgate_actors::store::faulty::FaultyStore;
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::Store;

#[test]
fn write_failures_give_503_and_unready_and_nothing_false_is_acknowledged() {
    let env = Env::new();
    let config_path = env.write_config(
        r#"
[server]
listen = "127.0.0.1:0"

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let (config, source) = Config::load(Some(&config_path)).unwrap();
    let settings = config.validate(source, &|_| None).unwrap();
    let sled = SledStore::open(&env.path().join("store")).unwrap();
    let token = sled_token(&sled);
    let faulty = FaultyStore::new(sled.clone());
    let store: Arc<dyn Store> = faulty.clone();

    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            tickgate::app::run(
                settings,
                store,
                Arc::new(Metrics::new()),
                async move {
                    let _ = stop_rx.await;
                },
                move |addr| addr_tx.send(addr).unwrap(),
            )
            .await
        })
    });
    let base = format!("http://{}", addr_rx.recv().unwrap());
    let url = format!("{base}/webhooks/{token}?wait=10");
    let get = |path: &str| send(client().get(format!("{base}{path}")));

    let ok = post_json(&url, &json!({"n": 1}));
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json["tick"], 1);
    assert_eq!(get("/ready").status, 200);

    faulty.fail_writes(true);
    for n in 0..5 {
        let refused = send(
            client()
                .post(&url)
                .header("Idempotency-Key", format!("k{n}"))
                .json(&json!({"n": n})),
        );
        assert_eq!(refused.status, 503, "{}", refused.text);
        assert_eq!(refused.error_code(), "store_unavailable");
        assert!(refused.header("retry-after").is_some());
    }
    let ready = get("/ready");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json["ready"], false);
    assert_eq!(get("/healthz").status, 200, "the process is alive");

    faulty.fail_writes(false);
    let after = post_json(&url, &json!({"n": 2}));
    assert_eq!(after.status, 200, "{}", after.text);
    assert_eq!(after.json["tick"], 2, "none of the refused triggers ran");
    assert_eq!(get("/ready").status, 200);
    // The refused keys were never stored: reusing one makes a new task.
    let reuse = send(
        client()
            .post(&url)
            .header("Idempotency-Key", "k0")
            .json(&json!({"n": 0})),
    );
    assert_eq!(reuse.status, 200);
    assert!(reuse.json.get("duplicate").is_none());
    assert_eq!(sled.queued(&"echo".parse().unwrap()).unwrap().len(), 0);

    stop_tx.send(()).unwrap();
    app.join().unwrap().unwrap();
    sled.close().unwrap();
}

/// Issues the agent's token before the app starts, which then finds and keeps it.
fn sled_token(store: &Arc<SledStore>) -> String {
    tickgate_actors::registry::rotate_offline(store.as_ref(), &"echo".parse().unwrap()).unwrap()
}
