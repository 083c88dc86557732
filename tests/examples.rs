//! The configs in `config/examples/` are real: `tickgate check` accepts every one of them (a
//! new file in the directory is checked without being listed here), every program they name
//! exists, and the two examples with scripts (the persistent Python runner and the tool-call
//! agent) run against a real server.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-example-tests-0123456789";

/// The secrets the examples read, with values of the right shape.
const SECRETS: [(&str, &str); 5] = [
    ("GITHUB_WEBHOOK_SECRET", "github-example-secret"),
    ("LINEAR_WEBHOOK_SECRET", "linear-example-secret"),
    ("STRIPE_WEBHOOK_SECRET", "whsec_stripe-example-secret"),
    ("SLACK_SIGNING_SECRET", "slack-example-secret"),
    (
        "SENDER_WEBHOOK_SECRET",
        "whsec_ZXhhbXBsZSBzZWNyZXQgZm9yIHRlc3Rz",
    ),
];

/// The examples the documentation promises.
const PROMISED: [&str; 9] = [
    "github.toml",
    "linear.toml",
    "stripe.toml",
    "slack.toml",
    "standard_webhooks.toml",
    "scheduled.toml",
    "python_runner.toml",
    "toolcall.toml",
    "queue.toml",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn examples() -> PathBuf {
    repo().join("config/examples")
}

/// `tickgate check --config FILE` from the repository root, with the given secrets only.
fn check(file: &Path, secrets: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickgate"));
    cmd.arg("check")
        .arg("--config")
        .arg(file)
        .current_dir(repo());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TICKGATE_")) {
        cmd.env_remove(k);
    }
    for (k, _) in SECRETS {
        cmd.env_remove(k);
    }
    for (k, v) in secrets {
        cmd.env(k, v);
    }
    cmd.output().expect("run tickgate check")
}

/// Every `*.toml` in the directory, and a failure for anything else but the scripts' folder.
fn example_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(examples()).expect("config/examples") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            assert_eq!(name, "agents", "unexpected directory {}", path.display());
        } else {
            assert!(
                name.ends_with(".toml"),
                "{name}: config/examples holds configs (*.toml) and agents/ only"
            );
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_passes_check() {
    let files = example_files();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for promised in PROMISED {
        assert!(names.contains(promised), "{promised} is missing");
    }
    for file in &files {
        let out = check(file, &SECRETS);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": OK ("),
            "{}: {stdout}{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The signed examples really read their secret: without it, check names the variable.
    for (file, var) in [
        ("github.toml", "GITHUB_WEBHOOK_SECRET"),
        ("stripe.toml", "STRIPE_WEBHOOK_SECRET"),
        ("standard_webhooks.toml", "SENDER_WEBHOOK_SECRET"),
    ] {
        let out = check(&examples().join(file), &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} passed without {var}");
        assert!(stderr.contains(var), "{file}: {stderr}");
    }
}

#[test]
fn every_program_exists_and_every_script_is_used() {
    use std::os::unix::fs::PermissionsExt;
    let mut used = BTreeSet::new();
    for file in example_files() {
        let config: toml::Value = toml::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for agent in config["agent"].as_array().unwrap() {
            if let Some(program) = agent["runner"].get("program").and_then(|p| p.as_str()) {
                let path = repo().join(program);
                let meta = std::fs::metadata(&path)
                    .unwrap_or_else(|e| panic!("{}: {program}: {e}", file.display()));
                assert!(
                    meta.permissions().mode() & 0o111 != 0,
                    "{program} is not executable"
                );
                used.insert(path.canonicalize().unwrap());
            }
        }
    }
    for entry in std::fs::read_dir(examples().join("agents")).unwrap() {
        let path = entry.unwrap().path().canonicalize().unwrap();
        assert!(
            used.contains(&path),
            "{} is used by no example",
            path.display()
        );
    }
}

/// Starts a server on an example, with its relative program paths made absolute (the harness
/// runs the server in a temporary directory, not the repository root).
fn start_example(env: &Env, file: &str) -> Server {
    let text = std::fs::read_to_string(examples().join(file)).unwrap();
    let text = text.replace(
        "\"config/examples/",
        &format!("\"{}/", examples().display()),
    );
    env.start_with(&text, &[("TICKGATE_ADMIN_TOKEN", ADMIN)])
}

#[test]
fn python_runner_example_keeps_one_process_and_durable_memory() {
    let env = Env::new();
    let server = start_example(&env, "python_runner.toml");
    let url = format!("{}?wait=60", server.url("py/wordcount"));
    let r = post_json(&url, &json!({"text": "Hello hello tickgate"}));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(
        r.json["response"],
        json!({"words": 3, "distinct": 2, "total_words": 3, "seen_by_this_process": 1})
    );
    let r = post_json(&url, &json!({"text": "two words"}));
    assert_eq!(
        r.json["response"],
        json!({"words": 2, "distinct": 2, "total_words": 5, "seen_by_this_process": 2}),
        "{}",
        r.text
    );
    // A bad input is a failed tick, and the process keeps answering.
    let r = post_json(&url, &json!({"text": 5}));
    assert_eq!(r.json["status"], "FAILURE", "{}", r.text);
    let r = post_json(&url, &json!({"text": "again"}));
    assert_eq!(r.json["response"]["total_words"], 6, "{}", r.text);
}

#[test]
fn toolcall_example_asks_once_per_city_then_succeeds() {
    let env = Env::new();
    let server = start_example(&env, "toolcall.toml");
    let r = post_json(
        &format!("{}?wait=60", server.url("tools/weather")),
        &json!({"cities": ["Paris", "Oslo"]}),
    );
    assert_eq!(r.json["status"], "AWAITING_INPUT", "{}", r.text);
    let id = r.json["task_id"].as_str().unwrap().to_string();
    assert_eq!(
        r.json["awaiting"]["request"],
        json!({"tool": "get_weather", "args": {"city": "Paris"}, "collected": {}})
    );
    // The answers go through the operator CLI, as the example's comments show.
    let resume = |answer: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tickgate"))
            .args(["tasks", "resume", &id, "--answer", answer])
            .env("TICKGATE_URL", &server.base)
            .env("TICKGATE_ADMIN_TOKEN", ADMIN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    resume(r#"{"temp_c": 21}"#);
    let second = server.wait_task(&id, |t| {
        t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["args"]["city"] == "Oslo"
    });
    assert_eq!(
        second["awaiting"]["request"]["collected"],
        json!({"Paris": {"temp_c": 21}})
    );
    resume(r#"{"temp_c": 4}"#);
    let done: Value = server.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(
        done["response"],
        json!({"weather": {"Paris": {"temp_c": 21}, "Oslo": {"temp_c": 4}}})
    );
    assert_eq!(done["tick"], 3);
}

#[test]
fn contrib_config_passes_check_and_its_store_is_in_the_state_directory() {
    let file = repo().join("contrib/tickgate.toml");
    let out = check(&file, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let unit = std::fs::read_to_string(repo().join("contrib/tickgate.service")).unwrap();
    assert!(unit.contains("StateDirectory=tickgate\n"));
    assert!(
        config["store"]["path"]
            .as_str()
            .unwrap()
            .starts_with("/var/lib/tickgate/"),
        "the store must live in the unit's state directory, the only writable place"
    );
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/tickgate serve --config /etc/tickgate/tickgate.toml\n"
    ));
}

/// `systemd-analyze verify` on the unit, with `ExecStart` pointed at the binary under test
/// (verify checks that the program exists). Hosts without systemd's tools skip the check.
#[test]
fn systemd_unit_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed; unit not verified");
        return;
    };
    assert!(probe.status.success());
    let unit = std::fs::read_to_string(repo().join("contrib/tickgate.service"))
        .unwrap()
        .replace("/usr/local/bin/tickgate", env!("CARGO_BIN_EXE_tickgate"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tickgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
