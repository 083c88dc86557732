//! Provider handshakes, body delivery ids, Svix header names and fixed acks over real HTTP
//! against the real binary.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use serde_json::json;

const SLACK_SECRET: &str = "slack-signing-secret-0123";
const STRIPE_SECRET: &str = "whsec_stripe_handshake";
const SVIX_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const CONFIG: &str = r#"
[[agent]]
name = "slack"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "slack", secret_env = "SLACK_SECRET" }

[[agent]]
name = "stripe"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "stripe", secret_env = "STRIPE_SECRET" }

[[agent]]
name = "svix"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "standard", secret_env = "SVIX_SECRET" }

[[agent]]
name = "pointer"
runner = { kind = "echo" }
[agent.webhook]
delivery_id = "/meta/delivery"

[[agent]]
name = "header"
runner = { kind = "echo" }
[agent.webhook]
delivery_id = "header:X-Request-Id"

[[agent]]
name = "acked"
runner = { kind = "echo" }
[agent.webhook]
ack = { status = 200, body = "ok", content_type = "text/plain" }
"#;

fn start(env: &Env) -> Server {
    env.start_with(
        CONFIG,
        &[
            ("SLACK_SECRET", SLACK_SECRET),
            ("STRIPE_SECRET", STRIPE_SECRET),
            ("SVIX_SECRET", SVIX_SECRET),
        ],
    )
}

fn slack_headers(body: &[u8], ts: u64) -> Vec<(String, String)> {
    let signed = [format!("v0:{ts}:").as_bytes(), body].concat();
    vec![
        ("X-Slack-Request-Timestamp".into(), ts.to_string()),
        (
            "X-Slack-Signature".into(),
            format!("v0={}", hex(&hmac_bytes(SLACK_SECRET.as_bytes(), &signed))),
        ),
    ]
}

fn stripe_headers(body: &[u8], ts: u64) -> Vec<(String, String)> {
    let signed = [format!("{ts}.").as_bytes(), body].concat();
    vec![(
        "Stripe-Signature".into(),
        format!(
            "t={ts},v1={}",
            hex(&hmac_bytes(STRIPE_SECRET.as_bytes(), &signed))
        ),
    )]
}

fn svix_headers(id: &str, body: &[u8], ts: u64) -> Vec<(String, String)> {
    let key = B64
        .decode(SVIX_SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let signed = [format!("{id}.{ts}.").as_bytes(), body].concat();
    vec![
        ("svix-id".into(), id.to_string()),
        ("svix-timestamp".into(), ts.to_string()),
        (
            "svix-signature".into(),
            format!("v1,{}", B64.encode(hmac_bytes(&key, &signed))),
        ),
    ]
}

fn post(url: &str, body: &[u8], headers: &[(String, String)]) -> Response {
    let mut req = client()
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    send(req)
}

/// Successful ticks the server has counted for `agent`, once the count is at least `at_least`.
fn ticks(server: &Server, agent: &str, at_least: u64) -> u64 {
    let prefix = format!("tickgate_ticks_total{{agent=\"{agent}\",outcome=\"success\"}} ");
    let mut seen = 0;
    assert!(
        wait_until(|| {
            let text = server.get("/metrics").text;
            seen = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            seen >= at_least
        }),
        "fewer than {at_least} ticks of {agent}: {seen}"
    );
    seen
}

#[test]
fn slack_url_verification_is_answered_with_the_challenge_and_creates_no_task() {
    let env = Env::new();
    let server = start(&env);
    let url = server.url("default/slack").to_string();
    let body = br#"{"token":"legacy","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;

    let r = post(&url, body, &slack_headers(body, now()));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json,
        json!({"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"})
    );

    let unsigned = post(&url, body, &[]);
    assert_eq!(unsigned.status, 401, "{}", unsigned.text);
    assert_eq!(unsigned.error_code(), "invalid_signature");
    let mut forged = slack_headers(body, now());
    forged[1].1 = format!("v0={}", "0".repeat(64));
    let bad = post(&url, body, &forged);
    assert_eq!(bad.status, 401, "{}", bad.text);

    // A real event afterwards is the agent's first and only tick.
    let event = br#"{"type":"event_callback","event_id":"Ev0001","event":{"type":"app_mention"}}"#;
    let r = post(
        &format!("{url}?wait=10"),
        event,
        &slack_headers(event, now()),
    );
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(ticks(&server, "default/slack", 1), 1);
}

#[test]
fn stripe_and_slack_redeliveries_are_duplicates_by_body_id() {
    let env = Env::new();
    let server = start(&env);

    let stripe = server.url("default/stripe").to_string();
    let body = br#"{"id":"evt_1NG8Du2eZvKYlo2CUI79vXWy","type":"invoice.paid","data":{}}"#;
    let first = post(&stripe, body, &stripe_headers(body, now()));
    assert_eq!(first.status, 202, "{}", first.text);
    // A redelivery is signed afresh (new timestamp), with the same body.
    let again = post(&stripe, body, &stripe_headers(body, now() + 1));
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    assert_eq!(again.json["task_id"], first.json["task_id"]);
    let other = br#"{"id":"evt_1NG8Du2eZvKYlo2CUI79vXWy","type":"invoice.paid","data":{"x":1}}"#;
    let conflict = post(&stripe, other, &stripe_headers(other, now()));
    assert_eq!(conflict.status, 422, "{}", conflict.text);
    assert_eq!(conflict.error_code(), "idempotency_conflict");

    let slack = server.url("default/slack").to_string();
    let body = br#"{"type":"event_callback","event_id":"Ev08MFMKH6","event":{"type":"message"}}"#;
    let first = post(&slack, body, &slack_headers(body, now()));
    assert_eq!(first.status, 202, "{}", first.text);
    let again = post(&slack, body, &slack_headers(body, now()));
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    assert_eq!(again.json["task_id"], first.json["task_id"]);
}

#[test]
fn svix_header_names_are_accepted_and_svix_id_is_a_delivery_id() {
    let env = Env::new();
    let server = start(&env);
    let url = server.url("default/svix").to_string();
    let body = br#"{"type":"user.created","data":{"id":"u1"}}"#;
    let first = post(
        &url,
        body,
        &svix_headers("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", body, now()),
    );
    assert_eq!(first.status, 202, "{}", first.text);
    let again = post(
        &url,
        body,
        &svix_headers("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", body, now()),
    );
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    assert_eq!(again.json["task_id"], first.json["task_id"]);

    let mut forged = svix_headers("msg_other", body, now());
    forged[2].1 = format!("v1,{}", B64.encode([0u8; 32]));
    let bad = post(&url, body, &forged);
    assert_eq!(bad.status, 401, "{}", bad.text);
    let task = server.finished(first.json["task_id"].as_str().unwrap());
    assert_eq!(task["status"], "SUCCESS", "{task}");
}

#[test]
fn a_json_pointer_delivery_id_deduplicates() {
    let env = Env::new();
    let server = start(&env);
    let url = server.url("default/pointer").to_string();
    let body = json!({"meta": {"delivery": "d-42"}, "n": 1});
    let first = post_json(&url, &body);
    assert_eq!(first.status, 202, "{}", first.text);
    let again = post_json(&url, &body);
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    assert_eq!(again.json["task_id"], first.json["task_id"]);
    let conflict = post_json(&url, &json!({"meta": {"delivery": "d-42"}, "n": 2}));
    assert_eq!(conflict.status, 422, "{}", conflict.text);
    // Without the id in the body, nothing deduplicates.
    let a = post_json(&url, &json!({"n": 3}));
    let b = post_json(&url, &json!({"n": 3}));
    assert_eq!((a.status, b.status), (202, 202));
    assert_ne!(a.json["task_id"], b.json["task_id"]);
}

#[test]
fn a_header_delivery_id_deduplicates() {
    let env = Env::new();
    let server = start(&env);
    let url = server.url("default/header").to_string();
    let body = br#"{"n":1}"#;
    let with_id = [("X-Request-Id".to_string(), "req-7".to_string())];
    let first = post(&url, body, &with_id);
    assert_eq!(first.status, 202, "{}", first.text);
    let again = post(&url, body, &with_id);
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json["duplicate"], true, "{}", again.text);
    assert_eq!(again.json["task_id"], first.json["task_id"]);
    let long = [("X-Request-Id".to_string(), "x".repeat(256))];
    let refused = post(&url, body, &long);
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.error_code(), "bad_request");
}

#[test]
fn ack_replaces_the_fire_and_forget_answer_but_not_a_sync_wait() {
    let env = Env::new();
    let server = start(&env);
    let url = server.url("default/acked").to_string();
    let body = br#"{"hello":"world"}"#;
    let key = [("Idempotency-Key".to_string(), "ack-1".to_string())];
    let first = post(&url, body, &key);
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.text, "ok");
    assert_eq!(first.header("content-type"), Some("text/plain"));
    // A duplicate gets the same fixed answer.
    let again = post(&url, body, &key);
    assert_eq!((again.status, again.text.as_str()), (200, "ok"));
    // The task was stored and runs: a waiting duplicate sees its record.
    let waited = post(&format!("{url}?wait=10"), body, &key);
    assert_eq!(waited.status, 200, "{}", waited.text);
    assert_eq!(waited.json["duplicate"], true, "{}", waited.text);
    assert_eq!(waited.json["status"], "SUCCESS", "{}", waited.text);
    assert_eq!(waited.json["response"], json!({"hello": "world"}));
    // A sync wait on a new trigger answers with the task record, not the ack.
    let sync = post_json(&format!("{url}?wait=10"), &json!({"n": 2}));
    assert_eq!(sync.json["status"], "SUCCESS", "{}", sync.text);
    assert!(sync.json["task_id"].is_string(), "{}", sync.text);
    assert_eq!(sync.json["response"], json!({"n": 2}));
}

#[test]
fn bad_delivery_settings_stop_start_up_naming_the_key() {
    let env = Env::new();
    for (setting, needle) in [
        (
            r#"delivery_id = "event.id""#,
            "agent default/bad: webhook.delivery_id",
        ),
        (
            r#"ack = { status = 500, body = "no" }"#,
            "agent default/bad: webhook.ack.status",
        ),
    ] {
        let config = env.write_config(&format!(
            "[[agent]]\nname = \"bad\"\nrunner = {{ kind = \"echo\" }}\n[agent.webhook]\n{setting}\n"
        ));
        let out = env.run(&["check", "--config", config.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{setting}: {stderr}");
        assert!(stderr.contains(needle), "{setting}: {stderr}");
    }
}
