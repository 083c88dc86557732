//! Ingress protection over real HTTP: every signature scheme signed the way its provider
//! documents it, client addresses behind proxies, CIDR allowlists, rate limits, secret hygiene.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use serde_json::json;

const SECRETS: &[(&str, &str)] = &[
    ("GH_1", "It's a Secret to Everybody"),
    ("GH_2", "second-github-secret"),
    ("LIN_1", "linear-secret-1"),
    ("LIN_2", "linear-secret-2"),
    ("STRIPE_1", "whsec_stripe_one"),
    ("STRIPE_2", "whsec_stripe_two"),
    ("SLACK_1", "8f742231b10e8888abcd99yyyzzz85a5"),
    ("SLACK_2", "slack-second"),
    ("STD_1", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("STD_2", "whsec_c2Vjb25kLXN0YW5kYXJkLXNlY3JldA=="),
    ("GEN_1", "generic-one"),
    ("GEN_2", "generic-two"),
];

const SIGNED: &str = r#"
# Many deliberate signature failures from one address: keep them under the per-client limit.
[server]
auth_failures = { per_second = 100, burst = 1000 }

[[agent]]
name = "github"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "github", secret_env = ["GH_1", "GH_2"] }

[[agent]]
name = "linear"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "linear", secret_env = ["LIN_1", "LIN_2"] }

[[agent]]
name = "stripe"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "stripe", secret_env = ["STRIPE_1", "STRIPE_2"] }

[[agent]]
name = "slack"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "slack", secret_env = ["SLACK_1", "SLACK_2"] }

[[agent]]
name = "standard"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "standard", secret_env = ["STD_1", "STD_2"] }

[[agent]]
name = "generic"
runner = { kind = "echo" }
[agent.webhook]
signature = { scheme = "hmac-sha256", secret_env = ["GEN_1", "GEN_2"], header = "X-Body-Signature", prefix = "sha256=" }
"#;

/// Signs `body` for `scheme` with `secret` at time `ts`, returning the headers to send.
fn sign(scheme: &str, secret: &str, body: &[u8], ts: u64) -> Vec<(String, String)> {
    let h = |k: &str, v: String| (k.to_string(), v);
    match scheme {
        "github" => vec![h(
            "X-Hub-Signature-256",
            format!("sha256={}", hex(&hmac_bytes(secret.as_bytes(), body))),
        )],
        "linear" => vec![h(
            "Linear-Signature",
            hex(&hmac_bytes(secret.as_bytes(), body)),
        )],
        "stripe" => {
            let signed = [format!("{ts}.").as_bytes(), body].concat();
            vec![h(
                "Stripe-Signature",
                format!("t={ts},v1={}", hex(&hmac_bytes(secret.as_bytes(), &signed))),
            )]
        }
        "slack" => {
            let signed = [format!("v0:{ts}:").as_bytes(), body].concat();
            vec![
                h("X-Slack-Request-Timestamp", ts.to_string()),
                h(
                    "X-Slack-Signature",
                    format!("v0={}", hex(&hmac_bytes(secret.as_bytes(), &signed))),
                ),
            ]
        }
        "standard" => {
            let key = B64
                .decode(secret.trim_start_matches("whsec_"))
                .unwrap_or_else(|_| secret.as_bytes().to_vec());
            // One delivery id per secret: the id is also an idempotency key.
            let id = format!(
                "msg_{ts}_{}",
                &hex(&hmac_bytes(secret.as_bytes(), body))[..12]
            );
            let signed = [format!("{id}.{ts}.").as_bytes(), body].concat();
            vec![
                h("webhook-id", id),
                h("webhook-timestamp", ts.to_string()),
                h(
                    "webhook-signature",
                    format!("v1,{}", B64.encode(hmac_bytes(&key, &signed))),
                ),
            ]
        }
        "generic" => vec![h(
            "X-Body-Signature",
            format!("sha256={}", hex(&hmac_bytes(secret.as_bytes(), body))),
        )],
        _ => unreachable!(),
    }
}

fn post_signed(url: &str, body: &[u8], headers: &[(String, String)]) -> Response {
    let mut req = client()
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    send(req)
}

fn body_for(scheme: &str, ts_ms: u64) -> Vec<u8> {
    if scheme == "linear" {
        serde_json::to_vec(&json!({"type": "Project", "action": "create", "data": {"name": "WhatsApp Provider"}, "webhookTimestamp": ts_ms})).unwrap()
    } else {
        serde_json::to_vec(&json!({"object": "event", "type": "invoice.paid", "n": ts_ms})).unwrap()
    }
}

#[test]
fn every_scheme_accepts_valid_and_refuses_missing_wrong_truncated_and_stale() {
    let env = Env::new();
    let server = env.start_with(SIGNED, SECRETS);
    let secrets = |scheme: &str| -> (&str, &str) {
        let prefix = match scheme {
            "github" => "GH",
            "linear" => "LIN",
            "stripe" => "STRIPE",
            "slack" => "SLACK",
            "standard" => "STD",
            _ => "GEN",
        };
        let get = |n: &str| {
            SECRETS
                .iter()
                .find(|(k, _)| *k == format!("{prefix}_{n}"))
                .unwrap()
                .1
        };
        (get("1"), get("2"))
    };
    for scheme in ["github", "linear", "stripe", "slack", "standard", "generic"] {
        let url = server.url(&format!("default/{scheme}")).to_string();
        let (first, second) = secrets(scheme);
        let ts = now();
        let body = body_for(scheme, ts * 1000);

        for secret in [first, second] {
            let ok = post_signed(&url, &body, &sign(scheme, secret, &body, ts));
            assert_eq!(
                ok.status, 202,
                "{scheme} with a valid signature: {}",
                ok.text
            );
        }

        let missing = post_signed(&url, &body, &[]);
        assert_eq!(missing.status, 401, "{scheme} missing: {}", missing.text);
        assert_eq!(missing.error_code(), "invalid_signature");

        let wrong = post_signed(&url, &body, &sign(scheme, "not-the-secret", &body, ts));
        assert_eq!(wrong.status, 401, "{scheme} wrong: {}", wrong.text);
        assert_eq!(wrong.error_code(), "invalid_signature");

        let mut truncated = sign(scheme, first, &body, ts);
        let sig = truncated
            .iter_mut()
            .rev()
            .find(|(k, _)| k.to_lowercase().contains("signature"))
            .unwrap();
        sig.1.truncate(sig.1.len() - 6);
        let short = post_signed(&url, &body, &truncated);
        assert_eq!(short.status, 401, "{scheme} truncated: {}", short.text);

        let tampered = [body.clone(), b" ".to_vec()].concat();
        let t = post_signed(&url, &tampered, &sign(scheme, first, &body, ts));
        assert_eq!(t.status, 401, "{scheme} body changed after signing");

        if matches!(scheme, "linear" | "stripe" | "slack" | "standard") {
            let old = ts - 3600;
            let stale_body = body_for(scheme, old * 1000);
            let stale = post_signed(&url, &stale_body, &sign(scheme, first, &stale_body, old));
            assert_eq!(stale.status, 401, "{scheme} stale: {}", stale.text);
            assert_eq!(stale.error_code(), "invalid_signature");
        }
    }
}

#[test]
fn github_docs_example_verifies_and_titles_come_from_the_provider() {
    let env = Env::new();
    let server = env.start_with(SIGNED, SECRETS);
    let url = server.url("default/github").to_string();
    // The GitHub docs' example: the signature verifies, then the non-JSON body is refused by
    // type (415), not by signature (401).
    let docs = send(
        client()
            .post(&url)
            .header("Content-Type", "text/plain")
            .header(
                "X-Hub-Signature-256",
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            )
            .body("Hello, World!"),
    );
    assert_eq!(docs.status, 415, "{}", docs.text);
    let docs_wrong = send(
        client()
            .post(&url)
            .header("Content-Type", "text/plain")
            .header(
                "X-Hub-Signature-256",
                "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18",
            )
            .body("Hello, World!"),
    );
    assert_eq!(docs_wrong.status, 401);

    let body = serde_json::to_vec(
        &json!({"action": "opened", "number": 7, "repository": {"full_name": "owner/repo"}}),
    )
    .unwrap();
    let mut headers = sign("github", "It's a Secret to Everybody", &body, now());
    headers.push(("X-GitHub-Event".into(), "pull_request".into()));
    let r = post_signed(&format!("{url}?wait=10"), &body, &headers);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["title"], "pull_request opened: owner/repo#7");
    let input_source = &r.json["result"]["response"];
    assert_eq!(input_source["action"], "opened");

    let lin_url = server.url("default/linear").to_string();
    let ts = now();
    let body = body_for("linear", ts * 1000);
    let r = post_signed(
        &format!("{lin_url}?wait=10"),
        &body,
        &sign("linear", "linear-secret-1", &body, ts),
    );
    assert_eq!(
        r.json["title"], "Project created: WhatsApp Provider",
        "{}",
        r.text
    );

    let stripe_url = server.url("default/stripe").to_string();
    let body = body_for("stripe", 1);
    let r = post_signed(
        &format!("{stripe_url}?wait=10"),
        &body,
        &sign("stripe", "whsec_stripe_one", &body, ts),
    );
    assert_eq!(r.json["title"], "Stripe invoice.paid", "{}", r.text);
}

#[test]
fn a_scheme_without_its_secret_refuses_to_start() {
    let env = Env::new();
    let config = env.write_config(SIGNED);
    let without_linear: Vec<(&str, &str)> = SECRETS
        .iter()
        .copied()
        .filter(|(k, _)| *k != "LIN_2")
        .collect();
    let out = env.run(
        &["check", "--config", config.to_str().unwrap()],
        &without_linear,
    );
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("default/linear") && msg.contains("LIN_2"),
        "{msg}"
    );
    for (_, secret) in SECRETS {
        assert!(
            !msg.contains(secret),
            "a secret leaked into the error: {msg}"
        );
    }
    let out = env.run(
        &["serve", "--config", config.to_str().unwrap()],
        &without_linear,
    );
    assert!(!out.status.success());
}

const PROXIED: &str = r#"
[server]
trusted_proxies = ["127.0.0.1/32", "::1/128"]

[[agent]]
name = "v4"
runner = { kind = "echo" }
[agent.webhook]
allow_cidrs = ["203.0.113.0/24"]

[[agent]]
name = "v6"
runner = { kind = "echo" }
[agent.webhook]
allow_cidrs = ["2001:db8::/32"]
"#;

#[test]
fn forwarded_for_is_believed_only_from_trusted_proxies_and_never_from_the_left() {
    let env = Env::new();
    let server = env.start(PROXIED);
    let v4 = server.url("default/v4").to_string();
    let v6 = server.url("default/v6").to_string();
    let with_xff = |url: &str, xff: &str| {
        send(
            client()
                .post(format!("{url}?wait=10"))
                .header("X-Forwarded-For", xff)
                .json(&json!({})),
        )
    };

    let ok = with_xff(&v4, "203.0.113.9");
    assert_eq!(ok.status, 200, "{}", ok.text);
    // The tick sees the resolved client address.
    let task = server.get(&format!("/tasks/{}", ok.json["task_id"].as_str().unwrap()));
    assert_eq!(task.status, 200);

    // A forged left-most entry: the proxy appended the real client, which is not allowed.
    let forged = with_xff(&v4, "203.0.113.9, 198.51.100.7");
    assert_eq!(forged.status, 403, "{}", forged.text);
    assert_eq!(forged.error_code(), "forbidden");
    // Garbage between the real client and the proxy never grants access.
    assert_eq!(with_xff(&v4, "203.0.113.9, not-an-ip").status, 403);
    assert_eq!(
        send(client().post(&v4).json(&json!({}))).status,
        403,
        "no XFF: the peer 127.0.0.1 is the client"
    );

    assert_eq!(with_xff(&v6, "2001:db8::5").status, 200);
    assert_eq!(with_xff(&v6, "[2001:db8::6]:443").status, 200);
    assert_eq!(with_xff(&v6, "2001:db9::5").status, 403);

    // Without trusted proxies the same header is ignored.
    let env2 = Env::new();
    let plain = env2.start(&PROXIED.replace(
        r#"trusted_proxies = ["127.0.0.1/32", "::1/128"]"#,
        "trusted_proxies = []",
    ));
    let r = send(
        client()
            .post(plain.url("default/v4"))
            .header("X-Forwarded-For", "203.0.113.9")
            .json(&json!({})),
    );
    assert_eq!(r.status, 403);
}

#[test]
fn rate_limits_throttle_one_agent_and_token_guessing() {
    let env = Env::new();
    let server = env.start(
        r#"
[[agent]]
name = "limited"
runner = { kind = "echo" }
[agent.webhook]
rate_limit = { per_second = 0.01, burst = 3 }

[[agent]]
name = "free"
runner = { kind = "echo" }
"#,
    );
    let limited = server.url("default/limited").to_string();
    for _ in 0..3 {
        assert_eq!(post_json(&limited, &json!({})).status, 202);
    }
    let refused = post_json(&limited, &json!({}));
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_code(), "rate_limited");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
    assert_eq!(
        post_json(server.url("default/free"), &json!({})).status,
        202,
        "other agents are unaffected"
    );

    // Guessing tokens from one address ends in 429 for that address.
    let mut throttled = None;
    for i in 0..200 {
        let r = post_json(
            &format!("{}/webhooks/guess{i:040}", server.base),
            &json!({}),
        );
        if r.status == 429 {
            throttled = Some(r);
            break;
        }
        assert_eq!(r.status, 404);
    }
    let throttled = throttled.expect("token guessing was never throttled");
    assert_eq!(throttled.error_code(), "rate_limited");
    assert!(throttled.header("retry-after").is_some());
}

#[test]
fn logs_never_contain_tokens_or_secrets() {
    let env = Env::new();
    let admin = "admin-token-never-logged-0123456789";
    let pinned = "pinned-webhook-token-never-logged-abcdefgh";
    let config = r#"
[[agent]]
name = "gh"
runner = { kind = "echo" }
[agent.webhook]
token_env = "GH_TOKEN"
signature = { scheme = "github", secret_env = "GH_1" }
allow_get = true
"#;
    let vars = [
        ("TICKGATE_ADMIN_TOKEN", admin),
        ("GH_TOKEN", pinned),
        ("GH_1", "It's a Secret to Everybody"),
        ("RUST_LOG", "debug"),
    ];
    let server = env.start_with(config, &vars);
    let url = format!("{}/webhooks/{pinned}", server.base);
    let named = format!("{}/webhooks/default/gh/{pinned}", server.base);
    let body = br#"{"a":1}"#;
    let good = sign("github", "It's a Secret to Everybody", body, 0);
    assert_eq!(post_signed(&url, body, &good).status, 202);
    assert_eq!(post_signed(&named, body, &good).status, 202);
    assert_eq!(
        post_signed(&url, body, &sign("github", "wrong", body, 0)).status,
        401
    );
    assert_eq!(post_signed(&format!("{url}x"), body, &good).status, 404);
    // Mistyped URLs miss the webhook routes but still carry the token.
    for typo in [
        format!("{url}/"),
        format!("{url}/extra"),
        format!("{}/Webhooks/{pinned}", server.base),
        format!("{}/hooks/{pinned}", server.base),
    ] {
        assert_eq!(post_signed(&typo, body, &good).status, 404, "{typo}");
    }
    assert_eq!(
        send(client().get(format!("{url}?token={pinned}&q=1"))).status,
        401
    );
    let rotated = send(
        client()
            .post(format!("{}/admin/agents/default/gh/token", server.base))
            .bearer_auth(admin),
    );
    assert_eq!(rotated.status, 409, "pinned");
    let list = send(
        client()
            .get(format!("{}/admin/agents", server.base))
            .bearer_auth(admin),
    );
    assert_eq!(list.status, 200);
    assert_eq!(
        send(
            client()
                .get(format!("{}/admin/agents", server.base))
                .bearer_auth("wrong-admin-token")
        )
        .status,
        401
    );
    let metrics = server.get("/metrics");
    for secret in [admin, pinned, "It's a Secret to Everybody"] {
        assert!(!metrics.text.contains(secret));
    }
    let output = server.output.clone();
    assert!(server.terminate().success());
    assert!(
        wait_until(|| output.lock().unwrap().contains("bye")),
        "the server logs its exit"
    );
    let env_logs = output.lock().unwrap().clone();
    assert!(
        env_logs.contains("[redacted]"),
        "access log lines exist: {env_logs}"
    );
    for secret in [
        admin,
        pinned,
        "It's a Secret to Everybody",
        &hex(&hmac_bytes(b"It's a Secret to Everybody", body)),
    ] {
        assert!(
            !env_logs.contains(secret),
            "{secret:?} appeared in the logs:\n{env_logs}"
        );
    }
}
