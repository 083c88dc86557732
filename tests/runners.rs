//! Runners driven through real triggers: failures, timeouts, persistent processes, environment.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::*;
use serde_json::json;

#[test]
fn failing_garbage_and_hanging_ticks_fail_and_the_next_task_still_runs() {
    let env = Env::new();
    env.script(
        "fail.sh",
        "cat >/dev/null\necho 'something broke' >&2\nexit 3",
    );
    env.script("garbage.sh", "cat >/dev/null\necho 'this is not json'");
    env.script("hang.sh", "cat >/dev/null\nexec sleep 30");
    env.script(
        "error.sh",
        "cat >/dev/null\necho '{\"status\":\"error\",\"response\":\"nope\"}'",
    );
    let server = env.start(
        r#"
[[agent]]
name = "fail"
runner = { kind = "command", program = "{dir}/fail.sh" }

[[agent]]
name = "garbage"
runner = { kind = "command", program = "{dir}/garbage.sh" }

[[agent]]
name = "hang"
runner = { kind = "command", program = "{dir}/hang.sh" }
tick_timeout = "300ms"

[[agent]]
name = "error"
runner = { kind = "command", program = "{dir}/error.sh" }
"#,
    );
    for (agent, needle) in [
        ("default/fail", "something broke"),
        ("default/garbage", "not JSON"),
        ("default/hang", "timed out"),
        ("default/error", "error"),
    ] {
        let url = server.url(agent).to_string();
        let first = post_json(&url, &json!({"n": 1}));
        let second = post_json(&url, &json!({"n": 2}));
        assert_eq!((first.status, second.status), (202, 202));
        let a = server.finished(first.json["task_id"].as_str().unwrap());
        let b = server.finished(second.json["task_id"].as_str().unwrap());
        for t in [&a, &b] {
            assert_eq!(t["status"], "FAILURE", "{agent}: {t}");
            assert_eq!(t["phase"], "Error");
            let error = t["error"].as_str().unwrap();
            assert!(error.contains(needle), "{agent}: {error}");
        }
        assert_eq!(b["tick"], 2, "{agent}: the next task ran after the failure");
    }
}

#[test]
fn persistent_runner_keeps_one_process_and_comes_back_after_it_dies() {
    let env = Env::new();
    env.script(
        "persist.sh",
        "while read -r line; do printf '{\"response\":{\"pid\":%s}}\\n' \"$$\"; done",
    );
    let server = env.start(
        r#"
[[agent]]
name = "p"
runner = { kind = "command", program = "{dir}/persist.sh", mode = "persistent" }
"#,
    );
    let url = format!("{}?wait=10", server.url("default/p"));
    let pid = |r: &Response| {
        r.json["response"]["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("{}", r.text))
    };
    let first = post_json(&url, &json!({}));
    let second = post_json(&url, &json!({}));
    assert_eq!(first.json["status"], "SUCCESS", "{}", first.text);
    assert_eq!(pid(&first), pid(&second), "one process serves every tick");

    unsafe {
        libc::kill(pid(&first) as i32, libc::SIGKILL);
    }
    assert!(wait_until(|| unsafe { libc::kill(pid(&first) as i32, 0) }
        != 0
        || is_zombie(pid(&first))));
    let third = post_json(&url, &json!({}));
    assert_eq!(third.json["status"], "SUCCESS", "{}", third.text);
    assert_ne!(
        pid(&third),
        pid(&first),
        "a new process after the old one died"
    );
    let fourth = post_json(&url, &json!({}));
    assert_eq!(pid(&fourth), pid(&third));
}

fn is_zombie(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

#[test]
fn caller_env_is_checked_and_tickgate_secrets_never_reach_the_runner() {
    let env = Env::new();
    env.script("env.sh", "cat >/dev/null\nprintf '{\"response\":\"%s\"}\\n' \"$(env | tr '\\n' ' ' | tr -d '\"\\\\')\"");
    let server = env.start_with(
        r#"
[[agent]]
name = "env"
runner = { kind = "command", program = "{dir}/env.sh" }
env = { FIXED = "fixed-value" }
allow_env = ["BATCH_DATE"]
"#,
        &[
            ("TICKGATE_ADMIN_TOKEN", "admin-secret-value-0123456789"),
            ("SOME_PROCESS_SECRET", "process-secret-value"),
        ],
    );
    let url = server.url("default/env").to_string();
    let refused = post_json(&url, &json!({"env": [{"name": "PATH", "value": "/evil"}]}));
    assert_eq!(refused.status, 400);
    assert_eq!(refused.error_code(), "env_not_allowed");

    let r = post_json(
        &format!("{url}?wait=10"),
        &json!({"env": [{"name": "BATCH_DATE", "value": "2026-11-23"}]}),
    );
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    let seen = r.json["response"].as_str().unwrap();
    assert!(seen.contains("BATCH_DATE=2026-11-23"), "{seen}");
    assert!(seen.contains("FIXED=fixed-value"), "{seen}");
    assert!(seen.contains("TICKGATE_TASK_ID="), "{seen}");
    assert!(seen.contains("TICKGATE_AGENT=default/env"), "{seen}");
    assert!(!seen.contains("admin-secret-value"), "{seen}");
    assert!(!seen.contains("process-secret-value"), "{seen}");
    assert!(!seen.contains("SOME_PROCESS_SECRET"), "{seen}");
}

#[test]
fn http_runner_posts_the_tick_input() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server_thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = conn.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        let body = r#"{"response":{"ok":true},"memory":{"m":1}}"#;
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        String::from_utf8_lossy(&buf).to_string()
    });
    let env = Env::new();
    let server = env.start(&format!(
        r#"
[[agent]]
name = "web"
runner = {{ kind = "http", url = "http://127.0.0.1:{port}/tick", headers = {{ X-Api-Key = "k" }} }}
"#
    ));
    let r = post_json(
        &format!("{}?wait=10", server.url("default/web")),
        &json!({"q": 1}),
    );
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(r.json["response"], json!({"ok": true}));
    let request = server_thread.join().unwrap();
    assert!(request.starts_with("POST /tick"), "{request}");
    assert!(
        request.to_ascii_lowercase().contains("x-api-key: k"),
        "{request}"
    );
    assert!(request.contains("\"inputs\":{\"q\":1}"), "{request}");
    assert!(request.contains("\"agent\":\"default/web\""), "{request}");
}
