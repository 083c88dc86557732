//! Store hardening, driven over real HTTP against the real binary: the nesting limit at ingress
//! (what is accepted can always be read back), records that cannot be decoded are reported
//! rather than skipped, `[store] sync = "fsync"` syncs every group commit, and a full disk is
//! recovered from without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;
use serde_json::{json, Value};

const ECHO: &str = r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }
"#;

/// The deepest body the ingress accepts (`tickgate::ingress::body::MAX_DEPTH`).
const MAX_DEPTH: usize = 64;

/// An object whose nesting of arrays and objects is exactly `levels` deep.
fn nested_object(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels - 1 {
        v = json!([v]);
    }
    json!({ "deep": v })
}

fn nested_array_text(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

fn post_form(url: &str, payload: &str) -> Response {
    send(
        client()
            .post(url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string([("payload", payload)]).unwrap()),
    )
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = server.get("/metrics").text;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not exported:\n{text}"))
}

#[test]
fn the_deepest_accepted_bodies_are_readable_run_and_survive_a_restart_one_deeper_is_400() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo").to_string();

    let deepest = nested_object(MAX_DEPTH);
    let json_ok = post_json(&url, &deepest);
    assert_eq!(json_ok.status, 202, "{}", json_ok.text);
    let form_payload = nested_array_text(MAX_DEPTH - 1);
    let form_ok = post_form(&url, &form_payload);
    assert_eq!(form_ok.status, 202, "{}", form_ok.text);

    let too_deep = post_json(&url, &nested_object(MAX_DEPTH + 1));
    assert_eq!(too_deep.status, 400, "{}", too_deep.text);
    assert_eq!(too_deep.error_code(), "invalid_json");
    let message = too_deep.json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("at most {MAX_DEPTH}")),
        "{message}"
    );
    let form_too_deep = post_form(&url, &nested_array_text(MAX_DEPTH));
    assert_eq!(form_too_deep.status, 400, "{}", form_too_deep.text);
    assert_eq!(form_too_deep.error_code(), "invalid_json");
    let message = form_too_deep.json["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("payload") && message.contains(&MAX_DEPTH.to_string()),
        "{message}"
    );
    // Just under serde_json's own limit, where the store used to accept what it could not read.
    let near_128 = post_json(&url, &nested_object(126));
    assert_eq!(near_128.status, 400, "{}", near_128.text);

    let ids: Vec<String> = [&json_ok, &form_ok]
        .iter()
        .map(|r| r.json["task_id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        let task = server.finished(id);
        assert_eq!(task["status"], "SUCCESS", "{task}");
    }
    let expected_form_inputs =
        json!({ "payload": serde_json::from_str::<Value>(&form_payload).unwrap() });
    assert_eq!(
        server.get(&format!("/tasks/{}", ids[0])).json["response"],
        deepest
    );
    assert_eq!(server.terminate().code(), Some(0));

    let again = env.start(ECHO);
    for (id, inputs) in ids.iter().zip([&deepest, &expected_form_inputs]) {
        let task = again.get(&format!("/tasks/{id}"));
        assert_eq!(task.status, 200, "{}", task.text);
        assert_eq!(task.json["status"], "SUCCESS");
        assert_eq!(
            &task.json["response"], inputs,
            "the echo runner answers with the inputs"
        );
    }
    assert_eq!(again.get("/ready").json["store"]["unreadable_records"], 0);
    assert_eq!(again.terminate().code(), Some(0));
}

#[test]
fn an_undecodable_record_is_logged_counted_and_shown_in_ready_never_skipped_silently() {
    let env = Env::new();
    let server = env.start(ECHO);
    let url = server.url("default/echo").to_string();
    let accepted = post_json(&url, &json!({"n": 1}));
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let id = accepted.json["task_id"].as_str().unwrap().to_string();
    server.finished(&id);
    assert_eq!(server.terminate().code(), Some(0));

    // Damage the record while no server runs.
    {
        let db = sled::open(env.path().join("store")).unwrap();
        let task_id: tickgate_actors::model::TaskId = id.parse().unwrap();
        let mut key = b"t/".to_vec();
        key.extend_from_slice(task_id.as_bytes());
        assert!(db.insert(key, b"{\"id\": [".to_vec()).unwrap().is_some());
        db.flush().unwrap();
    }

    let server = env.start(ECHO);
    for _ in 0..2 {
        let read = server.get(&format!("/tasks/{id}"));
        assert_eq!(read.status, 503, "{}", read.text);
        assert_eq!(read.error_code(), "store_unavailable");
        assert!(read.header("retry-after").is_some());
    }
    let ready = server.get("/ready");
    assert_eq!(
        ready.status, 200,
        "one bad record does not stop the service"
    );
    assert_eq!(
        ready.json["store"]["unreadable_records"], 1,
        "{}",
        ready.text
    );
    assert_eq!(
        metric(&server, "tickgate_store_unreadable_records_total"),
        1.0
    );
    assert!(
        wait_until(|| server.logs().contains(&format!("task {id}"))),
        "the record's key was not logged:\n{}",
        server.logs()
    );
    // Everything else still works.
    let url = server.rebase(&url);
    let next = post_json(&format!("{url}?wait=20"), &json!({"n": 2}));
    assert_eq!(next.status, 200, "{}", next.text);
    assert_eq!(server.terminate().code(), Some(0));
}

#[test]
fn fsync_mode_syncs_every_group_commit_and_flush_mode_shortly_after_writes() {
    for (mode, per_commit) in [("fsync", true), ("flush", false)] {
        let env = Env::new();
        let server = env.start_with(ECHO, &[("TICKGATE_STORE_SYNC", mode)]);
        let url = format!("{}?wait=20", server.url("default/echo"));
        let before = metric(&server, "tickgate_store_fsync_total");
        // Each waited trigger is at least three commits (accept, start, outcome), one at a time.
        for n in 0..3 {
            let r = post_json(&url, &json!({ "n": n }));
            assert_eq!(r.status, 200, "{}", r.text);
        }
        if per_commit {
            let after = metric(&server, "tickgate_store_fsync_total");
            assert!(after >= before + 3.0, "{mode}: {before} -> {after}");
        } else {
            // Flush mode: the writes are synced within the period (50 ms), without a new write.
            assert!(
                wait_until(|| metric(&server, "tickgate_store_fsync_total") > before),
                "{mode}: the writes were never synced"
            );
        }
        assert_eq!(server.terminate().code(), Some(0));
    }
}

#[test]
fn an_unknown_sync_mode_is_refused_at_start() {
    let env = Env::new();
    let config = env.write_config(&format!("[store]\nsync = \"always\"\n{ECHO}"));
    let out = env.run(&["serve", "--config", config.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sync"), "{stderr}");
}

/// A tmpfs mounted for one test and unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Self(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes to `path` until the filesystem refuses (`ENOSPC`).
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // Every last page, so that no sled write can slip into a partly free one.
    let small = [0u8; 512];
    while f.write_all(&small).and_then(|()| f.sync_data()).is_ok() {}
}

#[test]
fn a_full_disk_is_recovered_from_within_seconds_without_a_restart() {
    let env = Env::new();
    let store = env.path().join("store");
    let _tmpfs = match Tmpfs::mount(&store, "32m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED a_full_disk_is_recovered_from_within_seconds_without_a_restart: cannot mount a tmpfs here ({e}); run as root to exercise a real full disk");
            return;
        }
    };
    let server = env.start(ECHO);
    let url = format!("{}?wait=20", server.url("default/echo"));
    let first = post_json(&url, &json!({"n": 0}));
    assert_eq!(first.status, 200, "{}", first.text);

    let filler = store.join("filler");
    fill(&filler);
    // Commits land in sled's log until one needs a page the disk no longer has.
    let mut n = 1;
    let refused = loop {
        let r = post_json(&url, &json!({ "n": n, "pad": "x".repeat(2048) }));
        if r.status == 503 {
            break r;
        }
        assert!(r.status == 200 || r.status == 202, "{}", r.text);
        n += 1;
        assert!(n < 2000, "the full disk never refused a write");
    };
    assert_eq!(refused.error_code(), "store_unavailable");
    assert!(refused.header("retry-after").is_some());
    let ready = server.get("/ready");
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(ready.json["store"]["healthy"], false);
    assert_eq!(server.get("/healthz").status, 200);

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    assert!(
        wait_until(|| server.get("/ready").status == 200),
        "/ready did not recover after space was freed:\n{}",
        server.logs()
    );
    let recovered_in = freed.elapsed();
    eprintln!("store recovered {recovered_in:?} after space was freed");

    let accepted = post_json(server.url("default/echo"), &json!({"after": 1}));
    assert_eq!(accepted.status, 202, "{}", accepted.text);
    let id = accepted.json["task_id"].as_str().unwrap().to_string();
    let task = server.finished(&id);
    assert_eq!(task["status"], "SUCCESS", "{task}");
    assert_eq!(task["response"], json!({"after": 1}));
    let logs_before_stop = server.logs();
    assert!(
        logs_before_stop.contains("store reopened"),
        "{logs_before_stop}"
    );
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM after recovery must exit 0");

    // And the data written after recovery is there at the next start.
    let again = env.start(ECHO);
    let task = again.get(&format!("/tasks/{id}"));
    assert_eq!(task.status, 200, "{}", task.text);
    assert_eq!(task.json["status"], "SUCCESS");
    assert_eq!(again.terminate().code(), Some(0));
}
