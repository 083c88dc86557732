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
    let app = App::start(&env, &config_path, "echo");
    let (faulty, sled, token, base) = (
        app.faulty.clone(),
        app.sled.clone(),
        app.token.clone(),
        app.base.clone(),
    );
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
    assert_eq!(
        sled.queued_blocking(&"echo".parse().unwrap())
            .unwrap()
            .len(),
        0
    );

    app.stop();
}

#[test]
fn a_tick_whose_start_cannot_be_recorded_waits_for_the_store_instead_of_running() {
    let env = Env::new();
    let ran = env.path().join("ran.log");
    let go = env.path().join("go");
    let program = env.script(
        "gated.sh",
        &format!(
            "cat >/dev/null\necho run >> {}\nwhile [ ! -e {} ]; do sleep 0.02; done\necho '{{}}'\n",
            ran.display(),
            go.display()
        ),
    );
    let config_path = env.write_config(&format!(
        r#"
[server]
listen = "127.0.0.1:0"

[[agent]]
name = "cmd"
runner = {{ kind = "command", program = "{}", mode = "oneshot" }}
"#,
        program.display()
    ));
    let app = App::start(&env, &config_path, "cmd");
    let url = format!("{}/webhooks/{}", app.base, app.token);
    let runs = || {
        std::fs::read_to_string(&ran)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };

    let first = post_json(&url, &json!({"n": 1}));
    assert_eq!(first.status, 202, "{}", first.text);
    let second = post_json(&url, &json!({"n": 2}));
    assert_eq!(second.status, 202, "{}", second.text);
    assert!(wait_until(|| runs() == 1), "the first tick never started");

    // The disk fails while the first tick runs: its outcome cannot be stored, and the second
    // task's STARTED record cannot be written, so the second tick must not run.
    app.faulty.fail_writes(true);
    std::fs::write(&go, b"").unwrap();
    assert!(
        wait_until(|| app.faulty.refused_writes() >= 3),
        "the agent did not keep trying to record the second tick's start"
    );
    assert_eq!(runs(), 1, "a tick ran although its start was not recorded");

    app.faulty.fail_writes(false);
    let id = second.json["task_id"].as_str().unwrap().to_string();
    let done = || {
        let r = send(client().get(format!("{}/tasks/{id}", app.base)));
        r.json["status"] == "SUCCESS"
    };
    assert!(
        wait_until(done),
        "the second task did not finish once the store recovered"
    );
    assert_eq!(runs(), 2);
    let task = send(client().get(format!("{}/tasks/{id}", app.base)));
    assert_eq!(task.json["attempt"], 1);
    app.stop();
}

/// The app running in-process on sled wrapped in a [`FaultyStore`].
#[test]
fn a2a_messages_get_a_retryable_error_while_the_store_fails_and_nothing_is_stored() {
    let env = Env::new();
    let config_path = env.write_config(
        r#"
[server]
listen = "127.0.0.1:0"

[[agent]]
name = "echo"
runner = { kind = "echo" }
[agent.a2a]
enabled = true
"#,
    );
    let app = App::start(&env, &config_path, "echo");
    let call =
        |id: &str| {
            send(
            client()
                .post(format!("{}/a2a/default/echo", app.base))
                .header("A2A-Version", "1.0")
                .bearer_auth(&app.token)
                .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
                    "message": {"messageId": id, "role": "ROLE_USER", "parts": [{"text": "hi"}]}
                }})),
        )
        };
    let ok = call("m-1");
    assert_eq!(
        ok.json["result"]["task"]["status"]["state"], "TASK_STATE_COMPLETED",
        "{}",
        ok.text
    );

    app.faulty.fail_writes(true);
    let refused = call("m-2");
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert!(refused.header("retry-after").is_some());
    assert_eq!(refused.json["error"]["code"], -32000);
    assert_eq!(
        refused.json["error"]["data"][0]["reason"],
        "STORE_UNAVAILABLE"
    );
    assert!(refused.json.get("result").is_none());
    assert!(
        !refused.text.contains("injected"),
        "no internals: {}",
        refused.text
    );

    app.faulty.fail_writes(false);
    // The refused message was never stored: sent again, it is a new task that runs.
    let again = call("m-2");
    let task = &again.json["result"]["task"];
    assert_eq!(
        task["status"]["state"], "TASK_STATE_COMPLETED",
        "{}",
        again.text
    );
    assert_ne!(task["id"], ok.json["result"]["task"]["id"]);
    app.stop();
}

struct App {
    faulty: Arc<FaultyStore>,
    sled: Arc<SledStore>,
    token: String,
    base: String,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), tickgate::app::AppError>>,
}

impl App {
    fn start(env: &Env, config_path: &std::path::Path, agent: &str) -> Self {
        let (config, source) = Config::load(Some(config_path)).unwrap();
        let settings = config.validate(source, &|_| None).unwrap();
        let sled = SledStore::open(&env.path().join("store")).unwrap();
        // Issued before the app starts, which then finds and keeps it.
        let token =
            tickgate_actors::registry::rotate_offline(sled.as_ref(), &agent.parse().unwrap())
                .unwrap();
        let faulty = FaultyStore::new(sled.clone());
        let store: Arc<dyn Store> = faulty.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
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
        Self {
            faulty,
            sled,
            token,
            base,
            stop_tx,
            thread,
        }
    }

    fn stop(self) {
        self.stop_tx.send(()).unwrap();
        self.thread.join().unwrap().unwrap();
        self.sled.close().unwrap();
    }
}
