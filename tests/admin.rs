//! Admin API and the command line: listing, token rotation (online and offline), `check`.

mod common;

use common::*;
use serde_json::json;

const ADMIN: &str = "admin-token-for-tests-0123456789";

const CONFIG: &str = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }

[[agent]]
name = "pinned"
namespace = "ops"
runner = { kind = "echo" }
[agent.webhook]
token_env = "PINNED_TOKEN"
"#;

const PINNED: &str = "pinned-token-abcdefghijklmnopqrstuvwxyz012345";

#[test]
fn admin_lists_agents_and_rotates_tokens() {
    let env = Env::new();
    let server = env.start_with(
        CONFIG,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN), ("PINNED_TOKEN", PINNED)],
    );
    let old = server.url("default/echo").to_string();
    assert!(
        !server.urls.contains_key("ops/pinned"),
        "a pinned token is never printed"
    );
    assert_eq!(
        post_json(&format!("{}/webhooks/{PINNED}", server.base), &json!({})).status,
        202
    );

    let list_url = format!("{}/admin/agents", server.base);
    let anonymous = send(client().get(&list_url));
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.error_code(), "unauthorized");
    let wrong = send(client().get(&list_url).bearer_auth("nope"));
    assert_eq!(wrong.status, 401);

    let list = send(client().get(&list_url).bearer_auth(ADMIN));
    assert_eq!(list.status, 200);
    let ids: Vec<&str> = list.json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["default/echo", "ops/pinned"]);
    assert!(!list.text.contains(old.rsplit('/').next().unwrap()));
    assert!(!list.text.contains(PINNED));

    let rotate_url = format!("{}/admin/agents/default/echo/token", server.base);
    assert_eq!(send(client().post(&rotate_url)).status, 401);
    let rotated = send(client().post(&rotate_url).bearer_auth(ADMIN));
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let new = rotated.json["webhook_url"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(rotated.json["token"].as_str().unwrap().len(), 43);
    assert_eq!(
        post_json(&old, &json!({})).status,
        404,
        "the old token stops working"
    );
    assert_eq!(post_json(&new, &json!({})).status, 202);

    let pinned = send(
        client()
            .post(format!("{}/admin/agents/ops/pinned/token", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(pinned.status, 409);
    let missing = send(
        client()
            .post(format!("{}/admin/agents/ops/none/token", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(missing.status, 404);

    // The rotated token survives a restart and is not printed again.
    server.terminate();
    let server = env.start_with(CONFIG, &[("PINNED_TOKEN", PINNED)]);
    assert!(server.urls.is_empty());
    assert_eq!(post_json(&server.rebase(&new), &json!({})).status, 202);
    // Without an admin token the admin API does not exist.
    assert_eq!(server.get("/admin/agents").status, 404);
}

#[test]
fn cli_rotates_offline_and_through_a_running_server() {
    let env = Env::new();
    let config = env.write_config(CONFIG);
    let config = config.to_str().unwrap();
    let pinned = [("PINNED_TOKEN", PINNED)];

    let server = env.start_with(CONFIG, &pinned);
    let first = server.url("default/echo").to_string();
    // Server running, no admin token: a clear message, nothing changed.
    let refused = env.run(
        &["token", "rotate", "default/echo", "--config", config],
        &pinned,
    );
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("locked") && msg.contains("TICKGATE_ADMIN_TOKEN"),
        "{msg}"
    );
    assert_eq!(post_json(&first, &json!({})).status, 202);
    server.terminate();

    // Offline: straight on the store.
    let out = env.run(
        &["token", "rotate", "default/echo", "--config", config],
        &pinned,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let offline_token = line.trim().rsplit('/').next().unwrap().to_string();
    assert_eq!(offline_token.len(), 43, "{line}");

    // Online: through the admin API of the running server.
    let with_admin = [("PINNED_TOKEN", PINNED), ("TICKGATE_ADMIN_TOKEN", ADMIN)];
    let server = env.start_with(CONFIG, &with_admin);
    let offline_url = format!("{}/webhooks/{offline_token}", server.base);
    assert_eq!(post_json(&offline_url, &json!({})).status, 202);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut online_env = with_admin.to_vec();
    online_env.push(("TICKGATE_SERVER_LISTEN", &listen));
    let out = env.run(
        &["token", "rotate", "default/echo", "--config", config],
        &online_env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let online_token = String::from_utf8_lossy(&out.stdout)
        .trim()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(post_json(&offline_url, &json!({})).status, 404);
    assert_eq!(
        post_json(
            &format!("{}/webhooks/{online_token}", server.base),
            &json!({})
        )
        .status,
        202
    );

    let pinned_rotate = env.run(
        &["token", "rotate", "ops/pinned", "--config", config],
        &with_admin,
    );
    assert!(!pinned_rotate.status.success());
}

#[test]
fn check_validates_and_names_the_problem() {
    let env = Env::new();
    let good = env.write_config("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n");
    let out = env.run(&["check", "--config", good.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad =
        env.write_config("[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\nmailbox = 0\n");
    let out = env.run(&["check", "--config", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("tickgate.toml") && msg.contains("mailbox") && msg.contains("default/a"),
        "{msg}"
    );

    let missing_env = env.write_config(
        "[[agent]]\nname = \"a\"\nrunner = { kind = \"echo\" }\n[agent.webhook]\ntoken_env = \"NOT_SET_ANYWHERE\"\n",
    );
    let out = env.run(&["check", "--config", missing_env.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_SET_ANYWHERE"));

    let out = env.run(&["serve", "--config", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "a bad config stops start-up");
}
