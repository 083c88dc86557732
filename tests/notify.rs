//! Signed status callbacks (SPEC section 9) against real receivers on 127.0.0.1: signatures
//! checked with the Standard Webhooks recipe computed here, retries with a stable `webhook-id`,
//! `Retry-After`, `410 Gone` and re-enabling, dead letters and admin retry, `kill -9` with
//! deliveries pending, and the SSRF guard.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-tests-0123456789";
/// `whsec_` + base64 of the key `tickgate-test-signing-key-32bytes`.
const SECRET: &str = "whsec_dGlja2dhdGUtdGVzdC1zaWduaW5nLWtleS0zMmJ5dGVz";

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
    answered: u16,
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(ts.abs_diff(now) < 300, "timestamp {ts} is not now ({now})");
    }
}

/// A tiny HTTP receiver: answers each request with the status `answer` gives for it (the
/// request's 0-based number) plus headers; one request per connection.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Answer = dyn Fn(usize) -> (u16, Vec<(String, String)>) + Send + Sync;

impl Receiver {
    fn start(
        answer: impl Fn(usize) -> (u16, Vec<(String, String)>) + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let answer: Arc<Answer> = Arc::new(answer);
        let thread = {
            let (got, stop) = (got.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = serve_one(stream, &got, answer.as_ref());
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

    fn wait_for(&self, n: usize) -> Vec<Got> {
        assert!(
            wait_until(|| self.got().len() >= n),
            "receiver got {} requests, expected {n}: {:?}",
            self.got().len(),
            self.got()
                .iter()
                .map(|g| String::from_utf8_lossy(&g.body).into_owned())
                .collect::<Vec<_>>()
        );
        self.got()
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

fn serve_one(stream: TcpStream, got: &Mutex<Vec<Got>>, answer: &Answer) -> std::io::Result<()> {
    let (headers, body) = read_request(&stream)?;
    let n = got.lock().unwrap().len();
    let (status, extra) = answer(n);
    got.lock().unwrap().push(Got {
        headers,
        body,
        at: Instant::now(),
        answered: status,
    });
    let mut resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n");
    for (k, v) in extra {
        resp.push_str(&format!("{k}: {v}\r\n"));
    }
    resp.push_str("\r\nok");
    let mut stream = stream;
    stream.write_all(resp.as_bytes())?;
    stream.flush()
}

fn ok(_: usize) -> (u16, Vec<(String, String)>) {
    (200, vec![])
}

fn notify(url: &str, extra: &str) -> String {
    format!(
        "[[agent.notify]]\nurl = \"{url}\"\nsecret_env = \"NOTIFY_SECRET\"\nallow_private = true\n{extra}\n"
    )
}

fn start(env: &Env, config: &str) -> Server {
    env.start_with(
        config,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN), ("NOTIFY_SECRET", SECRET)],
    )
}

fn trigger(server: &Server, agent: &str) -> String {
    let r = post_json(server.url(agent), &json!({"hello": "world"}));
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["task_id"].as_str().unwrap().to_string()
}

fn deliveries(server: &Server, query: &str) -> Vec<Value> {
    let r = send(
        client()
            .get(format!("{}/admin/deliveries?{query}", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["deliveries"].as_array().unwrap().clone()
}

fn wait_deliveries(server: &Server, query: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(|| {
        last = deliveries(server, query);
        cond(&last)
    });
    assert!(ok, "deliveries never matched; last {last:?}");
    last
}

fn admin_post(server: &Server, path: &str) -> Response {
    send(
        client()
            .post(format!("{}{path}", server.base))
            .bearer_auth(ADMIN),
    )
}

#[test]
fn started_succeeded_and_failed_arrive_signed_in_order() {
    let env = Env::new();
    env.script("fail.sh", "cat >/dev/null\necho boom >&2\nexit 1");
    let rx = Receiver::start(ok);
    let events = "events = [\"task.started\", \"task.succeeded\", \"task.failed\"]";
    let config = format!(
        "[[agent]]\nname = \"good\"\nrunner = {{ kind = \"echo\" }}\n{}\n[[agent]]\nname = \"bad\"\nrunner = {{ kind = \"command\", program = \"{{dir}}/fail.sh\" }}\n{}",
        notify(&rx.url(), events),
        notify(&rx.url(), events)
    );
    let server = start(&env, &config);
    let good = trigger(&server, "default/good");
    let bad = trigger(&server, "default/bad");
    // The echo runner has no side effects, so its start is not recorded and makes no event;
    // the command runner's start is (SPEC: events follow stored status changes).
    let got = rx.wait_for(3);
    for g in &got {
        g.verify();
        assert_eq!(g.header("content-type"), "application/json");
        assert!(g.header("user-agent").starts_with("tickgate/"));
        let body = g.json();
        let data = &body["data"];
        let kind = body["type"].as_str().unwrap();
        let expected_status = match kind {
            "task.started" => "STARTED",
            "task.succeeded" => "SUCCESS",
            "task.failed" => "FAILURE",
            other => panic!("unexpected event {other}"),
        };
        assert_eq!(data["status"], expected_status, "{body}");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            g.header("webhook-id"),
            format!(
                "{}.{kind}.{}",
                data["task_id"].as_str().unwrap(),
                data["tick"]
            )
        );
        assert!(data["poll_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/tasks/{}", data["task_id"].as_str().unwrap())));
    }
    let kinds_of = |id: &str| -> Vec<String> {
        got.iter()
            .filter(|g| g.json()["data"]["task_id"] == id)
            .map(|g| g.json()["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kinds_of(&good), ["task.succeeded"]);
    assert_eq!(kinds_of(&bad), ["task.started", "task.failed"]);
    let bad_failed = got
        .iter()
        .find(|g| g.json()["type"] == "task.failed")
        .unwrap()
        .json();
    assert!(bad_failed["data"]["error"].as_str().is_some());

    let listed = wait_deliveries(&server, "status=succeeded", |d| d.len() == 3);
    let first = &listed[0];
    for field in [
        "id",
        "agent",
        "endpoint",
        "task_id",
        "type",
        "webhook_id",
        "status",
        "attempts",
        "next_attempt_at",
        "last_error",
        "created_at",
    ] {
        assert!(first.get(field).is_some(), "{field} missing in {first}");
    }
    assert_eq!(first["endpoint"], 0);
    assert_eq!(first["attempts"], 1);
    let page = send(
        client()
            .get(format!(
                "{}/admin/deliveries?agent=default/bad&limit=1",
                server.base
            ))
            .bearer_auth(ADMIN),
    );
    assert_eq!(page.json["deliveries"].as_array().unwrap().len(), 1);
    let cursor = page.json["next_cursor"].as_str().unwrap().to_string();
    let rest = deliveries(&server, &format!("agent=default/bad&cursor={cursor}"));
    assert_eq!(rest.len(), 1);
    assert_eq!(page.json["deliveries"][0]["type"], "task.started");
    assert_eq!(rest[0]["type"], "task.failed");
    let bad_query = send(
        client()
            .get(format!("{}/admin/deliveries?status=lost", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(bad_query.status, 400);
    assert_eq!(bad_query.error_code(), "bad_request");
    let logs = server.logs();
    assert!(!logs.contains(SECRET.strip_prefix("whsec_").unwrap()));
    assert!(!logs.contains("v1,"), "a signature was logged");
    let metrics = server.get("/metrics").text;
    assert!(metrics.contains("tickgate_notify_deliveries_total{agent=\"default/good\",endpoint=\"0\",outcome=\"delivered\"} 1"), "{metrics}");
}

#[test]
fn retries_keep_the_webhook_id_and_retry_after_is_honoured() {
    let env = Env::new();
    let flaky = Receiver::start(|n| if n < 3 { (500, vec![]) } else { (200, vec![]) });
    let busy = Receiver::start(|n| {
        if n == 0 {
            (429, vec![("retry-after".into(), "2".into())])
        } else {
            (200, vec![])
        }
    });
    let schedule = "retry_schedule = [\"100ms\", \"100ms\", \"100ms\", \"100ms\"]";
    let config = format!(
        "[[agent]]\nname = \"flaky\"\nrunner = {{ kind = \"echo\" }}\n{}\n[[agent]]\nname = \"busy\"\nrunner = {{ kind = \"echo\" }}\n{}",
        notify(&flaky.url(), schedule),
        notify(&busy.url(), schedule)
    );
    let server = start(&env, &config);
    let task = trigger(&server, "default/flaky");
    let got = flaky.wait_for(4);
    let ids: Vec<&str> = got.iter().map(|g| g.header("webhook-id")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert!(ids[0].starts_with(&format!("{task}.task.succeeded.")));
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    for g in &got {
        g.verify();
    }
    let d = wait_deliveries(&server, "agent=default/flaky", |d| {
        d.len() == 1 && d[0]["status"] == "succeeded"
    });
    assert_eq!(d[0]["attempts"], 4);

    trigger(&server, "default/busy");
    let got = busy.wait_for(2);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 was not honoured (second attempt after {gap:?})"
    );
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
}

#[test]
fn gone_disables_the_endpoint_until_an_admin_enables_it() {
    let env = Env::new();
    let gone = Arc::new(AtomicU16::new(410));
    let rx = {
        let gone = gone.clone();
        Receiver::start(move |_| (gone.load(Ordering::SeqCst), vec![]))
    };
    let config = format!(
        "[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n{}",
        notify(&rx.url(), "retry_schedule = [\"100ms\"]")
    );
    let server = start(&env, &config);
    let first = trigger(&server, "default/a");
    rx.wait_for(1);
    wait_deliveries(&server, "", |d| {
        d.len() == 1
            && d[0]["attempts"] == 1
            && d[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("410"))
    });
    let second = trigger(&server, "default/a");
    server.finished(&second);
    let held = wait_deliveries(&server, "status=pending", |d| d.len() == 2);
    assert_eq!(held[1]["task_id"], second.as_str());
    assert_eq!(
        held[1]["attempts"], 0,
        "a disabled endpoint gets no attempts"
    );
    assert!(server
        .get("/metrics")
        .text
        .contains("tickgate_notify_disabled_endpoints 1"));
    assert_eq!(rx.got().len(), 1);

    // The endpoint stays disabled across a crash and restart.
    server.kill();
    let server = start(&env, &config);
    assert!(server
        .get("/metrics")
        .text
        .contains("tickgate_notify_disabled_endpoints 1"));
    let held = deliveries(&server, "status=pending");
    assert_eq!(held.len(), 2);
    assert_eq!(held[1]["attempts"], 0);
    assert_eq!(rx.got().len(), 1);

    assert_eq!(
        admin_post(&server, "/admin/agents/default/a/notify/7/enable").status,
        404
    );
    gone.store(200, Ordering::SeqCst);
    let enabled = admin_post(&server, "/admin/agents/default/a/notify/0/enable");
    assert_eq!(enabled.status, 200, "{}", enabled.text);
    let got = rx.wait_for(3);
    // Order is kept per task; the two tasks' deliveries may go out in either order.
    let mut tasks: Vec<String> = got[1..]
        .iter()
        .map(|g| g.json()["data"]["task_id"].as_str().unwrap().to_string())
        .collect();
    tasks.sort();
    let mut expected = [first, second];
    expected.sort();
    assert_eq!(tasks, expected);
    wait_deliveries(&server, "status=succeeded", |d| d.len() == 2);
}

#[test]
fn dead_letter_after_the_schedule_and_admin_retry_delivers_it() {
    let env = Env::new();
    let answer = Arc::new(AtomicU16::new(500));
    let rx = {
        let answer = answer.clone();
        Receiver::start(move |_| (answer.load(Ordering::SeqCst), vec![]))
    };
    let config = format!(
        "[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n{}",
        notify(&rx.url(), "retry_schedule = [\"100ms\", \"100ms\"]")
    );
    let server = start(&env, &config);
    trigger(&server, "default/a");
    let failed = wait_deliveries(&server, "status=failed", |d| d.len() == 1);
    assert_eq!(failed[0]["attempts"], 3);
    assert!(failed[0]["last_error"].as_str().unwrap().contains("500"));
    assert_eq!(rx.got().len(), 3);
    let id = failed[0]["id"].as_str().unwrap().to_string();

    answer.store(200, Ordering::SeqCst);
    let retried = admin_post(&server, &format!("/admin/deliveries/{id}/retry"));
    assert_eq!(retried.status, 202, "{}", retried.text);
    assert_eq!(retried.json["status"], "pending");
    let got = rx.wait_for(4);
    assert_eq!(got[3].answered, 200);
    assert_eq!(got[3].header("webhook-id"), got[0].header("webhook-id"));
    got[3].verify();
    let done = wait_deliveries(&server, "status=succeeded", |d| d.len() == 1);
    assert_eq!(done[0]["attempts"], 4);
    let again = admin_post(&server, &format!("/admin/deliveries/{id}/retry"));
    assert_eq!(again.status, 409);
    assert_eq!(again.error_code(), "conflict");
    assert_eq!(
        admin_post(&server, "/admin/deliveries/999999/retry").status,
        404
    );
}

#[test]
fn kill_9_with_deliveries_pending_and_a_restart_delivers_every_one() {
    let env = Env::new();
    let answer = Arc::new(AtomicU16::new(503));
    let rx = {
        let answer = answer.clone();
        Receiver::start(move |_| (answer.load(Ordering::SeqCst), vec![]))
    };
    let config = format!(
        "[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n{}",
        notify(&rx.url(), "retry_schedule = [\"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\", \"1s\"]")
    );
    let server = start(&env, &config);
    let tasks: Vec<String> = (0..3).map(|_| trigger(&server, "default/a")).collect();
    wait_deliveries(&server, "status=pending", |d| {
        d.len() == 3 && d.iter().all(|d| d["attempts"].as_u64() >= Some(1))
    });
    server.kill();
    answer.store(200, Ordering::SeqCst);
    let server = start(&env, &config);
    let delivered = wait_deliveries(&server, "status=succeeded", |d| d.len() == 3);
    let mut delivered: Vec<String> = delivered
        .iter()
        .map(|d| d["task_id"].as_str().unwrap().to_string())
        .collect();
    delivered.sort();
    let mut expected = tasks.clone();
    expected.sort();
    assert_eq!(delivered, expected);
    let ok: Vec<String> = rx
        .got()
        .iter()
        .filter(|g| g.answered == 200)
        .map(|g| g.json()["data"]["task_id"].as_str().unwrap().to_string())
        .collect();
    for t in &tasks {
        assert!(ok.contains(t), "{t} was not delivered after the restart");
    }
}

#[test]
fn the_guard_refuses_private_literals_at_start_and_names_that_resolve_to_loopback() {
    let env = Env::new();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://[::1]:9/hook",
    ] {
        let config = format!(
            "[[agent]]\nname = \"guarded\"\nrunner = {{ kind = \"echo\" }}\n[[agent.notify]]\nurl = \"{url}\"\nsecret_env = \"NOTIFY_SECRET\"\n"
        );
        let path = env.write_config(&config);
        let out = env.run(
            &["serve", "--config", path.to_str().unwrap()],
            &[
                ("NOTIFY_SECRET", SECRET),
                ("TICKGATE_SERVER_LISTEN", "127.0.0.1:0"),
            ],
        );
        assert!(!out.status.success(), "{url} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("default/guarded"), "{stderr}");
        assert!(stderr.contains("allow_private"), "{stderr}");
        assert!(!stderr.contains(SECRET), "{stderr}");
    }

    let rx = Receiver::start(ok);
    let config = format!(
        "[[agent]]\nname = \"a\"\nrunner = {{ kind = \"echo\" }}\n[[agent.notify]]\nurl = \"http://localhost:{}/hook\"\nsecret_env = \"NOTIFY_SECRET\"\n",
        rx.port
    );
    let server = start(&env, &config);
    trigger(&server, "default/a");
    let failed = wait_deliveries(&server, "status=failed", |d| d.len() == 1);
    let why = failed[0]["last_error"].as_str().unwrap();
    assert!(
        why.contains("refused") && why.contains("localhost"),
        "{why}"
    );
    assert_eq!(failed[0]["attempts"], 1);
    assert!(rx.got().is_empty());
}
