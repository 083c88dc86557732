//! The operator page (`GET /ui`) and the admin routes that feed it.
//!
//! The HTTP tests always run. The browser test drives the page in real headless Chromium
//! through chromedriver (WebDriver, with the `fantoccini` client): sign-in with a wrong token and
//! then the right one, an agent ticking live after a trigger, a task record, a breaker reset, and
//! an awaiting task resumed with a JSON answer. It takes screenshots and checks they are PNGs; with
//! `TICKGATE_SCREENSHOTS=1` it saves them into `docs/` (how the README's pictures are made), so a
//! plain test run leaves the work tree clean. When
//! `chromium` or `chromedriver` is missing it prints SKIPPED and passes, unless
//! `TICKGATE_REQUIRE_BROWSER=1` (CI sets it), which makes a missing browser a failure.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const ADMIN: &str = "ui-admin-token-0123456789abcdef";

/// How long the browser gets for anything on a loaded machine.
const BROWSER_DEADLINE: Duration = Duration::from_secs(60);

/// Four agents: one that echoes, one that always fails (its breaker opens on the first
/// failure), a scheduled-only one (a next slot to show), and the repository's tool-calling
/// agent that waits for answers.
fn start(env: &Env) -> Server {
    let failing = env.script("failing.sh", "cat >/dev/null\necho 'no luck' >&2\nexit 3");
    // A status callback receiver that is never there: the failure's callback dead-letters.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"
[admin]
token_env = "UI_TEST_ADMIN"

[[agent]]
name = "echo"
runner = {{ kind = "echo" }}

[[agent]]
name = "flaky"
namespace = "ops"
runner = {{ kind = "command", program = "{failing}", mode = "oneshot" }}
breaker = {{ failures = 1, open_for = "1h" }}

[[agent.notify]]
url = "http://127.0.0.1:{gone}/hook"
secret_env = "UI_TEST_NOTIFY"
events = ["task.failed"]
retry_schedule = ["100ms"]
timeout = "2s"
allow_private = true

[[agent]]
name = "nightly"
namespace = "ops"
runner = {{ kind = "echo" }}
webhook = {{ enabled = false }}
schedule = [{{ cron = "0 3 * * *" }}]

[[agent]]
name = "toolcall"
namespace = "demo"
runner = {{ kind = "command", program = "{root}/config/agents/toolcall.sh", mode = "oneshot" }}
tick_timeout = "20s"
"#,
        failing = failing.display(),
        gone = gone,
        root = env!("CARGO_MANIFEST_DIR"),
    );
    env.start_with(
        &config,
        &[
            ("UI_TEST_ADMIN", ADMIN),
            (
                "UI_TEST_NOTIFY",
                "whsec_dGlja2dhdGUtdGVzdC1zaWduaW5nLWtleS0zMmJ5dGVz",
            ),
        ],
    )
}

fn admin_get(server: &Server, path: &str) -> Response {
    send(
        client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(ADMIN),
    )
}

fn trigger(server: &Server, agent: &str, body: &Value) -> String {
    let r = post_json(server.url(agent), body);
    assert_eq!(r.status, 202, "{:?}", r.json);
    r.json["task_id"].as_str().unwrap().to_string()
}

#[test]
fn page_and_assets_allow_only_their_own_origin() {
    let env = Env::new();
    let server = start(&env);
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let r = send(client().get(format!("{}{path}", server.base)));
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        let csp = r.header("content-security-policy").unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    let html = client()
        .get(format!("{}/ui", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    // Nothing inline that the CSP would have to allow, and nothing from another origin.
    assert!(html.contains(r#"<script src="/ui/app.js" defer></script>"#));
    assert_eq!(html.matches("<script").count(), 1);
    assert!(!html.contains("<style") && !html.contains(" style=") && !html.contains(" onclick"));
    assert!(!html.contains("http://") && !html.contains("https://"));
    let js = client()
        .get(format!("{}/ui/app.js", server.base))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(!js.contains("innerHTML") && !js.contains("localStorage"));
    // The page asks for the token; the admin routes it reads refuse to answer without it.
    for path in ["/admin/events", "/admin/stats", "/admin/agents"] {
        assert_eq!(server.get(path).status, 401, "{path}");
    }
}

#[test]
fn page_exists_without_the_admin_api_whose_routes_do_not() {
    let env = Env::new();
    let server = env.start("[[agent]]\nname = \"echo\"\nrunner = { kind = \"echo\" }\n");
    assert_eq!(server.get("/ui").status, 200);
    for path in ["/admin/events", "/admin/stats", "/admin/agents"] {
        let r = admin_get(&server, path);
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.error_code(), "not_found");
    }
}

/// Reads an SSE body on a thread and hands over `(event, data)` frames.
fn sse_frames(server: &Server, token: &str) -> mpsc::Receiver<(String, Value)> {
    let resp = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
        .get(format!("{}/admin/events", server.base))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(resp).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let data: Value = serde_json::from_str(d).unwrap();
                if tx.send((std::mem::take(&mut event), data)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Takes frames until one satisfies `want`, within the deadline.
fn next_frame(rx: &mpsc::Receiver<(String, Value)>, want: impl Fn(&str, &Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (event, data) = rx
            .recv_timeout(left)
            .expect("the expected frame never came");
        if want(&event, &data) {
            return data;
        }
    }
}

#[test]
fn admin_feed_streams_task_changes_and_tick_history() {
    let env = Env::new();
    let server = start(&env);
    let wrong = send(
        client()
            .get(format!("{}/admin/events", server.base))
            .bearer_auth("not-the-admin-token"),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error_code(), "unauthorized");

    let rx = sse_frames(&server, ADMIN);
    // The first frame lists the agents before anything ticked.
    let first = next_frame(&rx, |e, _| e == "agents");
    let echo = first["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "default/echo")
        .unwrap();
    assert_eq!(echo["breaker"], "closed");
    assert_eq!(echo["history"]["ticks"].as_array().unwrap().len(), 180);

    let id = trigger(&server, "default/echo", &json!({"marker": "feed-1"}));
    // New tasks are announced when accepted, before their tick starts.
    let accepted = next_frame(&rx, |e, d| e == "task" && d["task_id"] == id.as_str());
    assert_eq!(accepted["status"], "PENDING");
    let done = next_frame(&rx, |e, d| {
        e == "task" && d["task_id"] == id.as_str() && d["status"] == "SUCCESS"
    });
    assert_eq!(done["response"]["marker"], "feed-1");
    let agents = next_frame(&rx, |e, d| {
        e == "agents"
            && d["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == "default/echo" && a["ticks"] == 1)
    });
    let echo = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "default/echo")
        .unwrap();
    // Frames after the first carry only the last seconds of the history.
    let tail = echo["history"]["ticks"].as_array().unwrap().len();
    assert!((2..180).contains(&tail), "{tail}");

    // The same history over plain HTTP, and the operator's view of the task with its inputs.
    let counted = |stats: &Response| -> u64 {
        stats.json["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "default/echo")
            .unwrap()["history"]["ticks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .sum()
    };
    // The tick counter moves when the tick ends; the history when its outcome is heard.
    assert!(wait_until(
        || counted(&admin_get(&server, "/admin/stats")) == 1
    ));
    let stats = admin_get(&server, "/admin/stats");
    assert_eq!(stats.status, 200);
    assert_eq!(stats.json["window_secs"], 180);
    assert_eq!(counted(&stats), 1);
    let echo = stats.json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "default/echo")
        .unwrap();
    assert!(echo["history"]["last_tick_at"].as_u64().unwrap() > 0);
    assert_eq!(echo["history"]["ticks"].as_array().unwrap().len(), 180);
    let record = admin_get(&server, &format!("/admin/tasks/{id}"));
    assert_eq!(record.status, 200);
    assert_eq!(record.json["inputs"], json!({"marker": "feed-1"}));
    assert_eq!(record.json["status"], "SUCCESS");
    assert_eq!(server.get(&format!("/admin/tasks/{id}")).status, 401);
    let missing = admin_get(&server, "/admin/tasks/not-a-task");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "not_found");
}

// ---------------------------------------------------------------------------------------------
// The browser.

/// `name` on the `PATH`, if it is there.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver in its own process group, with the browsers it starts; killed as a group on drop
/// so that a failing test leaves no browser behind.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(chromedriver: &Path) -> Driver {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _profile: tempfile::tempdir().unwrap(),
        };
        let ready = wait_until(|| {
            client()
                .get(format!("{}/status", driver.url))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|s| s["value"]["ready"] == true)
        });
        assert!(ready, "chromedriver never became ready on port {port}");
        driver
    }
}

/// A WebDriver session with blocking helpers: the test's HTTP calls are blocking, so the async
/// client runs on its own runtime, one command at a time.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
}

impl Browser {
    fn open(driver: &Driver, chromium: &Path) -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let profile = driver._profile.path().display().to_string();
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    "--window-size=1280,900", format!("--user-data-dir={profile}"),
                ],
            },
        });
        let caps = caps.as_object().unwrap().clone();
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&driver.url),
            )
            .expect("a browser session");
        Browser {
            rt,
            client: Some(client),
        }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).unwrap();
    }

    /// Runs a script in the page and returns its value.
    fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt.block_on(self.c().execute(script, args)).unwrap()
    }

    /// The text of the first element matching `css`, `None` if there is none.
    fn text(&self, css: &str) -> Option<String> {
        let v = self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        );
        v.as_str().map(str::to_string)
    }

    /// Whether an element matching `css` is rendered (present and not hidden).
    fn shown(&self, css: &str) -> bool {
        self.js(
            "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0;",
            vec![json!(css)],
        ) == json!(true)
    }

    fn count(&self, css: &str) -> u64 {
        self.js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .as_u64()
        .unwrap()
    }

    /// Waits until `css`'s text satisfies `want`; the page updates itself, nothing reloads it.
    fn wait_text(&self, css: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + BROWSER_DEADLINE;
        loop {
            let text = self.text(css);
            if let Some(t) = text.as_deref().filter(|t| want(t)) {
                return t.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed the expected text; last: {text:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_shown(&self, css: &str) {
        let deadline = Instant::now() + BROWSER_DEADLINE;
        while !self.shown(css) {
            assert!(Instant::now() < deadline, "{css} never appeared");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A real click (WebDriver element click) on the first match of `css`, retried while the
    /// element is being replaced.
    fn click(&self, css: &str) {
        let deadline = Instant::now() + BROWSER_DEADLINE;
        loop {
            let clicked = self.rt.block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.click().await
            });
            match clicked {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "cannot click {css}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn type_into(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(text).await
            })
            .unwrap();
    }

    /// Picks the option with `value` in the `<select>` matching `css`.
    fn select(&self, css: &str, value: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.select_by_value(value).await
            })
            .unwrap();
    }

    /// Waits until exactly the tasks `ids` are listed, in any order.
    fn wait_listed(&self, ids: &[&str]) {
        let deadline = Instant::now() + BROWSER_DEADLINE;
        let mut want: Vec<&str> = ids.to_vec();
        want.sort();
        loop {
            let listed = self.js(
                "return [...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.task).sort();",
                vec![],
            );
            if listed == json!(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "listed {listed}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Takes a PNG of the viewport; saves it into `docs/` when `TICKGATE_SCREENSHOTS=1`.
    fn screenshot(&self, name: &str) {
        let png = self.rt.block_on(self.c().screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        if std::env::var_os("TICKGATE_SCREENSHOTS").is_none_or(|v| v != "1") {
            return;
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name);
        std::fs::write(&path, &png).unwrap();
        eprintln!("saved {} ({} KB)", path.display(), png.len() / 1024);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(client.close());
        }
    }
}

#[test]
fn operator_page_in_headless_chromium() {
    let required = std::env::var("TICKGATE_REQUIRE_BROWSER").as_deref() == Ok("1");
    let chromium = on_path(&["chromium", "chromium-browser"]);
    let chromedriver = on_path(&["chromedriver"]);
    let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
        assert!(
            !required,
            "TICKGATE_REQUIRE_BROWSER=1 but chromium or chromedriver is not on the PATH"
        );
        eprintln!("SKIPPED: chromium and chromedriver are needed for the browser test");
        return;
    };
    let env = Env::new();
    let server = start(&env);
    let driver = Driver::start(&chromedriver);
    let page = Browser::open(&driver, &chromium);
    let ui = format!("{}/ui", server.base);
    assert!(
        server.logs().contains(&format!("dashboard: {ui} ")),
        "{}",
        server.logs()
    );
    page.goto(&ui);

    // A wrong token: an error, and no data anywhere on the page.
    page.wait_shown("#token");
    page.type_into("#token", "wrong-token-0123456789");
    page.click("#login-button");
    page.wait_text("#login-error", |t| t.contains("refused"));
    assert!(!page.shown("#app"));
    assert_eq!(page.count("#agents tbody tr"), 0);
    assert_eq!(page.count("#tasks tbody tr"), 0);
    assert_eq!(
        page.js("return sessionStorage.length;", vec![]),
        json!(0),
        "a refused token is not kept"
    );

    // The right token: the agents appear and the feed is live.
    page.type_into("#token", ADMIN);
    page.click("#login-button");
    page.wait_text(r#"tr[data-agent="default/echo"] td.ticks"#, |t| t == "0");
    page.wait_text("#conn", |t| t == "live");
    assert!(!page.shown("#login"));

    // A trigger ticks the agent; the page shows it without a reload.
    // Markup in a title or payload is shown as text, never interpreted.
    let markup = r#"<img src=x id=pwned onerror="document.title='pwned'"> & <b>bold</b>"#;
    let first = trigger(
        &server,
        "default/echo",
        &json!({"marker": "browser-1", "title": markup}),
    );
    server.finished(&first);
    let second = trigger(&server, "default/echo", &json!({"marker": "browser-2"}));
    server.finished(&second);
    page.wait_text(r#"tr[data-agent="default/echo"] td.ticks"#, |t| t == "2");
    page.wait_text(r#"tr[data-agent="default/echo"] td.last"#, |t| {
        t.contains("ago")
    });
    assert!(page.count(r#"tr[data-agent="default/echo"] svg.chart rect.bar"#) >= 1);
    page.wait_text(&format!(r#"tr[data-task="{second}"] td.status"#), |t| {
        t == "SUCCESS"
    });
    assert_eq!(
        page.text(&format!(r#"tr[data-task="{first}"] td.title"#)),
        Some(markup.to_string())
    );
    assert_eq!(
        page.js(
            "return [!!document.getElementById('pwned'), document.querySelectorAll('main b, main img').length, document.title];",
            vec![]
        ),
        json!([false, 0, "tickgate"])
    );
    assert_eq!(
        page.js(
            "return performance.getEntriesByType('navigation').length;",
            vec![]
        ),
        json!(1),
        "the page was never reloaded"
    );

    // Opening a task shows its record: inputs, response, attempts.
    page.click(&format!(r#"tr[data-task="{first}"]"#));
    page.wait_text("#detail-id", |t| t == first);
    page.wait_text("#detail-inputs", |t| t.contains("browser-1"));
    assert!(page.text("#detail-response").unwrap().contains("browser-1"));
    assert_eq!(page.count("#detail-attempts tbody tr"), 1);
    assert_eq!(page.text("#detail-status").unwrap(), "SUCCESS");
    assert!(page.text("#detail-fields").unwrap().contains(markup));

    // Replay from the record: a new task with the same inputs, which ticks live.
    page.click("#detail-replay");
    let notice = page.wait_text("#notice", |t| t.starts_with("Replayed as task "));
    let replay = notice
        .trim_start_matches("Replayed as task ")
        .trim_end_matches('.')
        .to_string();
    let replayed = server.finished(&replay);
    assert_eq!(replayed["replay_of"], first.as_str());
    assert_eq!(replayed["response"]["marker"], "browser-1");
    page.wait_text(r#"tr[data-agent="default/echo"] td.ticks"#, |t| t == "3");

    // A failing agent opens its breaker; the page shows it and resets it.
    let failed = trigger(&server, "ops/flaky", &json!({"marker": "fail"}));
    server.finished(&failed);
    let flaky_breaker = r#"tr[data-agent="ops/flaky"] td.breaker"#;
    page.wait_text(flaky_breaker, |t| t == "open");
    page.click(r#"tr[data-agent="ops/flaky"] button.reset-breaker"#);
    page.wait_text("#notice", |t| t.contains("reset"));
    page.wait_text(flaky_breaker, |t| t == "closed");
    let agents = admin_get(&server, "/admin/agents");
    let flaky = agents.json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "ops/flaky")
        .unwrap()
        .clone();
    assert_eq!(flaky["breaker"], "closed");

    // The task list filters by status and by agent.
    page.select("#filter-status", "FAILURE");
    page.wait_listed(&[&failed]);
    page.select("#filter-status", "");
    page.select("#filter-agent", "default/echo");
    page.wait_listed(&[&first, &second, &replay]);
    page.select("#filter-agent", "");
    page.wait_listed(&[&first, &second, &replay, &failed]);

    // Its failure's status callback could not be delivered: it shows among failed deliveries,
    // and the page sends it again.
    page.wait_text("#deliveries tbody tr td:nth-child(2)", |t| t == "ops/flaky");
    page.click("#deliveries tbody tr button.retry-delivery");
    page.wait_text("#notice", |t| t.contains("queued again"));

    // An awaiting task answered from the page with JSON.
    let asking = trigger(
        &server,
        "demo/toolcall",
        &json!({"query": "weather in Lyon"}),
    );
    server.wait_task(&asking, |t| t["status"] == "AWAITING_INPUT");
    page.click(&format!(r#"tr[data-task="{asking}"]"#));
    page.wait_text("#detail-id", |t| t == asking);
    page.wait_shown("#detail-awaiting");
    page.wait_text("#detail-request", |t| t.contains("lookup"));
    page.type_into("#resume-answer", r#"{"temperature": 21, "unit": "C"}"#);
    page.click("#resume-button");
    let parked_again = server.wait_task(&asking, |t| {
        t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["step"] == 2
    });
    assert_eq!(
        parked_again["awaiting"]["request"]["previous"],
        json!({"temperature": 21, "unit": "C"})
    );
    // The second question reaches the open record through the feed.
    page.wait_text("#detail-request", |t| t.contains("confirm"));
    page.js(
        "document.getElementById('task-detail').scrollIntoView();",
        vec![],
    );
    page.screenshot("ui-task.png");

    // The agents with live data: ticks, a failure, an awaiting task.
    page.js("window.scrollTo(0, 0);", vec![]);
    page.wait_text(r#"tr[data-agent="demo/toolcall"] td.ticks"#, |t| t == "2");
    page.wait_text(r#"tr[data-agent="ops/nightly"] td.next"#, |t| {
        t.ends_with("03:00:00Z")
    });
    page.wait_text(r#"tr[data-agent="default/echo"] td.chart"#, |t| {
        t.starts_with("3 ticks")
    });
    page.screenshot("ui-agents.png");

    // Cancel the parked task from its record.
    page.js(
        "document.getElementById('task-detail').scrollIntoView();",
        vec![],
    );
    page.click("#detail-cancel");
    server.wait_task(&asking, |t| t["status"] == "REVOKED");
    page.wait_text("#detail-status", |t| t == "REVOKED");
    assert!(!page.shown("#detail-awaiting"));

    // Rotating a token takes a second click and shows the new URL once.
    let old_url = server.url("default/echo").to_string();
    let rotate = r#"tr[data-agent="default/echo"] button.rotate-token"#;
    page.js("window.scrollTo(0, 0);", vec![]);
    page.click(rotate);
    page.wait_text(rotate, |t| t == "Confirm rotate");
    assert!(!page.shown("#secret"));
    page.click(rotate);
    page.wait_shown("#secret");
    let new_url = page.wait_text("#secret-url", |t| !t.is_empty());
    assert!(
        new_url.starts_with(&format!("{}/webhooks/", server.base)),
        "{new_url}"
    );
    assert_ne!(new_url, old_url);
    assert_eq!(post_json(&new_url, &json!({})).status, 202);
    assert_ne!(post_json(&old_url, &json!({})).status, 202);
    page.click("#secret-dismiss");
    assert!(!page.shown("#secret"));
    assert_eq!(page.text("#secret-url").as_deref(), Some(""));

    // Signing out forgets the token and the data.
    page.click("#logout");
    page.wait_shown("#login");
    assert_eq!(page.js("return sessionStorage.length;", vec![]), json!(0));
    assert_eq!(page.count("#agents tbody tr"), 0);
}
