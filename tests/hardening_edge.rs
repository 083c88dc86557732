//! Edge hardening against the real binary: slow and oversized bodies, encoded bodies, caller
//! environment values, admin authentication, config refusals, log colours.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use common::*;
use serde_json::json;

const ADMIN: &str = "admin-token-0123456789abcdef";

/// The value of an unlabelled metric on `server`.
fn metric(server: &Server, name: &str) -> Option<f64> {
    let text = server.get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A raw connection to `server` that has sent a POST head declaring `declared` bytes for the
/// path of `url`, then `sent` bytes of body, and nothing more.
fn stalled_post(server: &Server, url: &str, declared: usize, sent: usize) -> TcpStream {
    let path = &url[server.base.len()..];
    let addr = server.base.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    )
    .unwrap();
    conn.write_all(&vec![b' '; sent]).unwrap();
    conn.flush().unwrap();
    conn
}

/// Everything the server sends until it closes the connection (or the deadline passes).
fn read_to_close(conn: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    while started.elapsed() < DEADLINE {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no answer and no close before the deadline: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn stalled_body_is_cut_off_and_its_memory_released() {
    let env = Env::new();
    let server = env.start(
        r#"
[server]
body_timeout = "2s"

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let url = server.url("default/echo").to_string();
    let mut conn = stalled_post(&server, &url, 1_000_000, 1000);
    assert!(
        wait_until(|| metric(&server, "tickgate_inflight_body_bytes") == Some(1000.0)),
        "the partial body never showed in the gauge"
    );
    let answer = read_to_close(&mut conn);
    // Either a 408 in the error shape or a plain close; never a hang.
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    }
    assert!(
        wait_until(|| metric(&server, "tickgate_inflight_body_bytes") == Some(0.0)),
        "bytes of the cut-off body are still held"
    );
    // A sender that trickles a byte at a time is cut off by the same deadline: the limit is on
    // the whole body, not on the gap between bytes.
    let mut trickle = stalled_post(&server, &url, 1_000_000, 1);
    let mut writer = trickle.try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < DEADLINE {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    let started = Instant::now();
    let answer = read_to_close(&mut trickle);
    assert!(
        started.elapsed() < DEADLINE,
        "the trickle was never cut off"
    );
    if !answer.is_empty() {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    drop(trickle);
    feeder.join().unwrap();
    assert!(wait_until(|| metric(
        &server,
        "tickgate_inflight_body_bytes"
    ) == Some(0.0)));
    // The server is unharmed.
    let ok = post_json(&url, &json!({"after": "stall"}));
    assert_eq!(ok.status, 202, "{}", ok.text);
}

#[test]
fn bodies_in_flight_share_a_budget() {
    let env = Env::new();
    let server = env.start(
        r#"
[server]
max_body_bytes = 2048
max_inflight_body_bytes = 2048

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let url = server.url("default/echo").to_string();
    let conn = stalled_post(&server, &url, 2000, 1500);
    assert!(wait_until(|| metric(
        &server,
        "tickgate_inflight_body_bytes"
    ) == Some(1500.0)));
    let body = json!({ "pad": "x".repeat(1000) });
    let refused = post_json(&url, &body);
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.error_code(), "overloaded");
    assert!(refused.header("retry-after").is_some());
    // A sender that gives up gives its bytes back.
    drop(conn);
    assert!(wait_until(|| metric(
        &server,
        "tickgate_inflight_body_bytes"
    ) == Some(0.0)));
    let accepted = post_json(&url, &body);
    assert_eq!(accepted.status, 202, "{}", accepted.text);
}

#[test]
fn encoded_bodies_and_bad_env_values_are_refused() {
    let env = Env::new();
    let server = env.start(
        r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }
allow_env = ["MODE"]
"#,
    );
    let url = server.url("default/echo").to_string();
    let gz = send(
        client()
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0]),
    );
    assert_eq!(gz.status, 415, "{}", gz.text);
    assert_eq!(gz.error_code(), "unsupported_media_type");
    assert!(gz.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gzip"));

    let huge = "v".repeat(200 * 1024);
    for (value, what) in [
        ("a\u{0}b", "NUL"),
        ("line\nbreak", "newline"),
        (huge.as_str(), "200 KB"),
    ] {
        let r = post_json(&url, &json!({"env": [{"name": "MODE", "value": value}]}));
        assert_eq!(r.status, 400, "{what}: {}", r.text);
        assert_eq!(r.error_code(), "bad_request", "{what}");
        assert!(!r.text.contains("vvvvvvvv"), "the value is echoed back");
    }
    let r = post_json(&url, &json!({"env": [{"name": "NOT=VALID", "value": "x"}]}));
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error_code(), "bad_request");
    let ok = post_json(&url, &json!({"env": [{"name": "MODE", "value": "a\tb"}]}));
    assert_eq!(ok.status, 202, "{}", ok.text);
}

#[test]
fn admin_auth_is_throttled_and_scheme_case_insensitive() {
    let env = Env::new();
    let server = env.start_with(
        r#"
[server]
auth_failures = { per_second = 0.01, burst = 3 }

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN)],
    );
    let admin = format!("{}/admin/agents", server.base);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = send(
            client()
                .get(&admin)
                .header("Authorization", format!("{scheme} {ADMIN}")),
        );
        assert_eq!(r.status, 200, "{scheme}: {}", r.text);
    }
    for _ in 0..3 {
        let r = send(
            client()
                .get(&admin)
                .header("Authorization", "Bearer wrong-wrong-wrong"),
        );
        assert_eq!(r.status, 401, "{}", r.text);
        assert_eq!(r.error_code(), "unauthorized");
    }
    let throttled = send(
        client()
            .get(&admin)
            .header("Authorization", "Bearer wrong-wrong-wrong"),
    );
    assert_eq!(throttled.status, 429, "{}", throttled.text);
    assert_eq!(throttled.error_code(), "rate_limited");
    assert!(throttled.header("retry-after").is_some());
    // The throttle holds even for the right token until the bucket refills.
    let r = send(
        client()
            .get(&admin)
            .header("Authorization", format!("Bearer {ADMIN}")),
    );
    assert_eq!(r.status, 429, "{}", r.text);
}

const TWO_PINNED: &str = r#"
[[agent]]
name = "a"
runner = { kind = "echo" }
[agent.webhook]
token_env = "TOKEN_A"

[[agent]]
name = "b"
runner = { kind = "echo" }
[agent.webhook]
token_env = "TOKEN_B"
"#;

fn refused(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "accepted: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_refuses_shared_and_unsafe_tokens_at_check_and_serve() {
    let env = Env::new();
    let token = "t".repeat(40);
    let shared_var = env.write_config(&TWO_PINNED.replace("TOKEN_B", "TOKEN_A"));
    let config = shared_var.display().to_string();
    for cmd in ["check", "serve"] {
        let err = refused(&env.run(
            &[cmd, "--config", &config],
            &[
                ("TOKEN_A", &token),
                ("TICKGATE_SERVER_LISTEN", "127.0.0.1:0"),
            ],
        ));
        assert!(
            err.contains("default/a") && err.contains("default/b") && err.contains("TOKEN_A"),
            "{cmd}: {err}"
        );
    }
    let same_value = env.write_config(TWO_PINNED).display().to_string();
    for cmd in ["check", "serve"] {
        let err = refused(&env.run(
            &[cmd, "--config", &same_value],
            &[
                ("TOKEN_A", &token),
                ("TOKEN_B", &token),
                ("TICKGATE_SERVER_LISTEN", "127.0.0.1:0"),
            ],
        ));
        assert!(
            err.contains("default/a") && err.contains("default/b"),
            "{cmd}: {err}"
        );
        assert!(!err.contains(&token), "the token leaked: {err}");
    }
    let percent = format!("{}%2F", "p".repeat(40));
    for cmd in ["check", "serve"] {
        let err = refused(&env.run(
            &[cmd, "--config", &same_value],
            &[
                ("TOKEN_A", &token),
                ("TOKEN_B", &percent),
                ("TICKGATE_SERVER_LISTEN", "127.0.0.1:0"),
            ],
        ));
        assert!(
            err.contains("TOKEN_B") && err.contains("A-Z"),
            "{cmd}: {err}"
        );
        assert!(!err.contains(&percent), "the token leaked: {err}");
    }
    let other = "u".repeat(40);
    let ok = env.run(
        &["check", "--config", &same_value],
        &[("TOKEN_A", &token), ("TOKEN_B", &other)],
    );
    assert!(ok.status.success(), "{ok:?}");
}

#[test]
fn bad_environment_overrides_name_the_variable() {
    let env = Env::new();
    let config = env
        .write_config("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n")
        .display()
        .to_string();
    for (var, value) in [
        ("TICKGATE_SERVER_WORKERS", "many"),
        ("TICKGATE_SERVER_MAX_WAIT", "soon"),
        ("TICKGATE_SERVER_LISTEN", "nowhere"),
        ("TICKGATE_SERVER_BODY_TIMEOUT", "forever"),
    ] {
        for cmd in ["check", "serve"] {
            let err = refused(&env.run(&[cmd, "--config", &config], &[(var, value)]));
            assert!(err.contains(var), "{cmd} {var}: {err}");
            assert!(!err.contains("tickgate.toml"), "{cmd} {var}: {err}");
        }
    }
}

#[test]
fn parser_errors_and_plain_logs() {
    let env = Env::new();
    let server = env.start("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n");
    // A request line actix cannot parse: 400 and a closed connection (actix writes this
    // response itself, before any middleware, so it has no body; see docs/api.md).
    let addr = server.base.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(DEADLINE)).unwrap();
    conn.write_all(b"NOT A REQUEST\r\n\r\n").unwrap();
    let answer = read_to_close(&mut conn);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Requests the parser accepts but the app refuses keep the error shape.
    let r = server.get("/no/such/route");
    assert_eq!(r.error_code(), "not_found");
    assert!(wait_until(|| server.logs().contains("request")));
    assert!(
        !server.logs().contains('\u{1b}'),
        "colour codes in logs written to a pipe"
    );
}
