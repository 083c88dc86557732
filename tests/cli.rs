//! The operator commands (`tickgate tasks …`, `tickgate agents`) run as the real binary against
//! a real server: tables for people, `--json` for scripts, the server's message and a non-zero
//! exit status on refusals, and the admin token never printed.

mod common;

use std::process::{Command, Output};

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-cli-tests-0123456789";

const CONFIG: &str = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }

[[agent]]
name = "fail"
runner = { kind = "command", program = "{dir}/fail.sh" }
breaker = { failures = 100, open_for = "1s" }

[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/fail.sh" }
breaker = { failures = 1, open_for = "1h" }

[[agent]]
name = "ask"
namespace = "ops"
runner = { kind = "command", program = "{dir}/ask.sh" }

[[agent]]
name = "nightly"
runner = { kind = "echo" }
schedule = [{ every = "24h" }]
catch_up = "none"
[agent.webhook]
enabled = false
"#;

/// The finished output of one CLI run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }

    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `tickgate ARGS` with the given URL and token in the environment; asserts the token
/// appears in no output.
fn run_with(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickgate"));
    cmd.args(args)
        .env_remove("TICKGATE_ADMIN_TOKEN")
        .env_remove("TICKGATE_URL")
        .env("RUST_LOG", "debug");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run tickgate");
    let run = Run {
        code: status.code().expect("exit code"),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    };
    for (_, v) in env.iter().filter(|(k, _)| *k == "TICKGATE_ADMIN_TOKEN") {
        assert!(
            !run.stdout.contains(v) && !run.stderr.contains(v),
            "the token was printed by {args:?}"
        );
    }
    run
}

fn cli(server: &Server, args: &[&str]) -> Run {
    run_with(
        &[
            ("TICKGATE_URL", &server.base),
            ("TICKGATE_ADMIN_TOKEN", ADMIN),
        ],
        args,
    )
}

fn start(env: &Env) -> Server {
    env.script("fail.sh", "cat >/dev/null\necho 'boom' >&2\nexit 1");
    // Parks the first tick with a question; the continuation answers with its whole input.
    env.script(
        "ask.sh",
        r#"input=$(cat)
case "$input" in
  *'"resume"'*) printf '{"response":%s}\n' "$input" ;;
  *) echo '{"await":{"request":{"question":"proceed?"}}}' ;;
esac"#,
    );
    env.start_with(CONFIG, &[("TICKGATE_ADMIN_TOKEN", ADMIN)])
}

fn submit(url: &str, body: &Value) -> String {
    let r = post_json(url, body);
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["task_id"].as_str().unwrap().to_string()
}

/// The table row whose first column is `key`, split on runs of spaces.
fn row<'a>(table: &'a str, key: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no row {key} in\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn agents_shows_breakers_queues_and_schedules() {
    let env = Env::new();
    let server = start(&env);
    let id = submit(server.url("default/flaky"), &json!({}));
    server.finished(&id);
    // One failed tick opens this breaker for an hour.
    assert!(wait_until(|| {
        cli(&server, &["agents", "--json"]).ok().json()["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == "default/flaky" && a["breaker"] == "open")
    }));

    let table = cli(&server, &["agents"]).ok().stdout;
    assert!(
        table.starts_with("AGENT") && table.contains("BREAKER") && table.contains("NEXT SCHEDULED"),
        "{table}"
    );
    assert_eq!(
        row(&table, "default/echo"),
        ["default/echo", "closed", "0/64", "0", "-"]
    );
    assert_eq!(row(&table, "default/flaky")[1], "open");
    let nightly = row(&table, "default/nightly");
    assert!(
        nightly[4].ends_with('Z') && nightly[4].contains('T'),
        "next slot of the scheduled agent: {table}"
    );

    let json = cli(&server, &["agents", "--json"]).ok().json();
    assert_eq!(json["agents"].as_array().unwrap().len(), 5, "{json}");

    // Flags override the environment; a wrong token is the server's 401 message, exit 1.
    let r = run_with(
        &[("TICKGATE_ADMIN_TOKEN", "wrong-token-value")],
        &["agents", "--url", &server.base],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("401") && r.stderr.contains("a valid admin bearer token is required"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.is_empty(),
        "no data without the token: {}",
        r.stdout
    );
    let r = run_with(&[], &["agents", "--url", &server.base, "--token", ADMIN]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains(ADMIN) && !r.stderr.contains(ADMIN));

    // No token at all, or no server: clear messages, no panic.
    let r = run_with(&[("TICKGATE_URL", &server.base)], &["agents"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("TICKGATE_ADMIN_TOKEN"), "{}", r.stderr);
    let r = run_with(
        &[("TICKGATE_ADMIN_TOKEN", ADMIN)],
        &["agents", "--url", "http://127.0.0.1:1"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("cannot reach http://127.0.0.1:1/admin/agents"),
        "{}",
        r.stderr
    );
}

#[test]
fn tasks_list_show_replay_and_bulk_replay() {
    let env = Env::new();
    let server = start(&env);
    let echo = submit(server.url("default/echo"), &json!({"hello": "world"}));
    server.finished(&echo);
    let failed: Vec<String> = (0..2)
        .map(|i| submit(server.url("default/fail"), &json!({ "n": i })))
        .collect();
    for id in &failed {
        assert_eq!(server.finished(id)["status"], "FAILURE");
    }

    // The table: a header, one row per task, newest first.
    let table = cli(&server, &["tasks", "list"]).ok().stdout;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["TASK", "AGENT", "STATUS", "ATTEMPT", "CREATED", "TITLE"]
    );
    assert_eq!(row(&table, &echo)[1..4], ["default/echo", "SUCCESS", "1"]);
    assert_eq!(row(&table, &failed[0])[2], "FAILURE");
    assert_eq!(table.lines().count(), 4, "{table}");

    // Filters, in the JSON the server answered; the status is accepted in any case.
    let page = cli(
        &server,
        &[
            "tasks", "list", "--agent", "fail", "--status", "failure", "--json",
        ],
    )
    .ok()
    .json();
    let mut ids: Vec<&str> = page["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut expected: Vec<&str> = failed.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "{page}");

    // Paging: the table ends with the cursor of the next page.
    let first = cli(&server, &["tasks", "list", "--limit", "2"]).ok().stdout;
    let cursor = first
        .lines()
        .find_map(|l| l.strip_prefix("more: --cursor "))
        .unwrap_or_else(|| panic!("no cursor line in\n{first}"))
        .to_string();
    let rest = cli(
        &server,
        &[
            "tasks", "list", "--limit", "2", "--cursor", &cursor, "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(rest["tasks"][0]["task_id"], echo.as_str(), "{rest}");
    assert!(rest["next_cursor"].is_null());

    // show: the record for people, and verbatim with --json.
    let shown = cli(&server, &["tasks", "show", &echo]).ok().stdout;
    assert!(shown.contains(&format!("task         {echo}")), "{shown}");
    assert!(
        shown.contains("status       SUCCESS (tick 1, attempt 1)"),
        "{shown}"
    );
    assert!(
        shown.contains("\"hello\": \"world\""),
        "the response, pretty: {shown}"
    );
    let shown = cli(&server, &["tasks", "show", &failed[0]]).ok().stdout;
    assert!(
        shown.contains("attempts") && shown.contains("ATTEMPT"),
        "{shown}"
    );
    let record = cli(&server, &["tasks", "show", &echo, "--json"])
        .ok()
        .json();
    assert_eq!(record, server.get(&format!("/tasks/{echo}")).json);

    // replay of one task: a new task marked as its replay.
    let replayed = cli(&server, &["tasks", "replay", &echo]).ok().stdout;
    let new_id = replayed
        .strip_prefix(&format!("replayed {echo} as task "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{replayed}"))
        .to_string();
    let done = server.finished(&new_id);
    assert_eq!(done["replay_of"], echo.as_str());
    assert_eq!(done["source"]["method"], "REPLAY");
    let again = cli(&server, &["tasks", "replay", &echo, "--json"])
        .ok()
        .json();
    assert_eq!(again["replay_of"], echo.as_str(), "{again}");
    server.finished(again["task_id"].as_str().unwrap());

    // Bulk replay of an agent's failures, oldest first.
    let bulk = cli(
        &server,
        &[
            "tasks",
            "replay",
            "--agent",
            "default/fail",
            "--status",
            "FAILURE",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(bulk["replayed"], 2, "{bulk}");
    for id in bulk["task_ids"].as_array().unwrap() {
        server.finished(id.as_str().unwrap());
    }
    let text = cli(
        &server,
        &[
            "tasks",
            "replay",
            "--agent",
            "default/fail",
            "--until",
            "1970-01-02T00:00:00Z",
        ],
    )
    .ok()
    .stdout;
    assert_eq!(text, "replayed 0 task(s) of default/fail\n");

    // Refusals are the server's message with exit status 1; usage mistakes exit 2.
    let r = cli(
        &server,
        &["tasks", "show", "5676e39f-4c30-4628-8368-61e91f909049"],
    );
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("404 not_found") && r.stderr.contains("no task with id"),
        "{}",
        r.stderr
    );
    let r = cli(&server, &["tasks", "list", "--since", "yesterday"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("is not an RFC 3339 time"), "{}", r.stderr);
    let r = cli(&server, &["tasks", "replay", "--agent", "nobody/here"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("404"), "{}", r.stderr);
    let r = cli(&server, &["tasks", "replay"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = cli(&server, &["tasks", "list", "--agent", "Not Valid"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn tasks_resume_and_cancel() {
    let env = Env::new();
    let server = start(&env);
    let parked = |server: &Server| {
        let id = submit(server.url("ops/ask"), &json!({"q": 1}));
        server.wait_task(&id, |t| t["status"] == "AWAITING_INPUT");
        id
    };

    // show names what the task waits for and how to answer it.
    let asked = parked(&server);
    let shown = cli(&server, &["tasks", "show", &asked]).ok().stdout;
    assert!(shown.contains("AWAITING_INPUT"), "{shown}");
    assert!(shown.contains("\"question\": \"proceed?\""), "{shown}");
    assert!(
        shown.contains(&format!("tickgate tasks resume {asked} --answer JSON")),
        "{shown}"
    );
    let listed = cli(
        &server,
        &["tasks", "list", "--status", "AWAITING_INPUT", "--json"],
    )
    .ok()
    .json();
    assert_eq!(listed["tasks"][0]["task_id"], asked.as_str());

    // resume with the answer in a file; the continuation receives it.
    let answer = env.path().join("answer.json");
    std::fs::write(&answer, r#"{"approved": true, "by": "ops"}"#).unwrap();
    let out = cli(
        &server,
        &[
            "tasks",
            "resume",
            &asked,
            "--answer",
            &format!("@{}", answer.display()),
        ],
    )
    .ok()
    .stdout;
    assert_eq!(
        out,
        format!("resumed {asked}: PENDING (a continuation tick is queued)\n")
    );
    let done = server.finished(&asked);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(
        done["response"]["resume"]["response"],
        json!({"approved": true, "by": "ops"}),
        "{done}"
    );
    // A second answer: the server's 409, exit 1.
    let r = cli(&server, &["tasks", "resume", &asked, "--answer", "true"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("409 conflict"), "{}", r.stderr);
    // An answer that is not JSON never reaches the server.
    let other = parked(&server);
    let r = cli(&server, &["tasks", "resume", &other, "--answer", "{yes"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not valid JSON"), "{}", r.stderr);
    assert_eq!(
        server.get(&format!("/tasks/{other}")).json["status"],
        "AWAITING_INPUT"
    );
    // A literal answer, with --json.
    let resumed = cli(
        &server,
        &["tasks", "resume", &other, "--answer", "\"yes\"", "--json"],
    )
    .ok()
    .json();
    assert_eq!(resumed["status"], "PENDING", "{resumed}");
    assert_eq!(
        server.finished(&other)["response"]["resume"]["response"],
        "yes"
    );

    // cancel a parked task; a second cancel is refused with the server's reason.
    let third = parked(&server);
    let out = cli(&server, &["tasks", "cancel", &third]).ok().stdout;
    assert_eq!(out, format!("cancelled {third} (REVOKED)\n"));
    assert_eq!(
        server.get(&format!("/tasks/{third}")).json["status"],
        "REVOKED"
    );
    let r = cli(&server, &["tasks", "cancel", &third, "--json"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(
        r.stderr.contains("409 conflict") && r.stderr.contains("can no longer be cancelled"),
        "{}",
        r.stderr
    );
    let fourth = parked(&server);
    let revoked = cli(&server, &["tasks", "cancel", &fourth, "--json"])
        .ok()
        .json();
    assert_eq!(revoked["status"], "REVOKED", "{revoked}");
}

#[test]
fn a_bulk_replay_with_refusals_lists_them_and_exits_1() {
    let env = Env::new();
    let block = env.path().join("block");
    let go = env.path().join("go");
    // Fails at once until `block` exists; then holds its tick until `go` exists.
    env.script(
        "gate.sh",
        &format!(
            "cat >/dev/null\nif [ ! -e {block} ]; then exit 1; fi\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho '{{}}'",
            block = block.display(),
            go = go.display()
        ),
    );
    let server = env.start_with(
        r#"
[[agent]]
name = "gate"
runner = { kind = "command", program = "{dir}/gate.sh" }
mailbox = 1
breaker = { failures = 100, open_for = "1s" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN)],
    );
    let url = server.url("default/gate").to_string();
    // A finished task's slot is freed just after its completion is announced.
    let idle = || {
        assert!(wait_until(|| {
            cli(&server, &["agents", "--json"]).ok().json()["agents"][0]["queued"] == 0
        }))
    };
    let mut failed = Vec::new();
    for _ in 0..2 {
        idle();
        let id = submit(&url, &json!({}));
        assert_eq!(server.finished(&id)["status"], "FAILURE");
        failed.push(id);
    }
    idle();
    std::fs::write(&block, "").unwrap();
    let running = submit(&url, &json!({}));
    server.wait_task(&running, |t| t["status"] == "STARTED");

    // The one slot is taken: every replay is refused, reported, and the exit status says so.
    let r = cli(
        &server,
        &["tasks", "replay", "--agent", "gate", "--status", "FAILURE"],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.starts_with("replayed 0 task(s) of default/gate\n"),
        "{}",
        r.stdout
    );
    for id in &failed {
        assert!(
            r.stdout
                .contains(&format!("  refused {id}: mailbox_full\n")),
            "{}",
            r.stdout
        );
    }
    assert!(r.stderr.contains("2 task(s) were refused"), "{}", r.stderr);
    let r = cli(
        &server,
        &[
            "tasks", "replay", "--agent", "gate", "--status", "FAILURE", "--json",
        ],
    );
    assert_eq!(r.code, 1);
    assert_eq!(r.json()["refused"].as_array().unwrap().len(), 2);

    std::fs::write(&go, "").unwrap();
    server.finished(&running);
}
