//! Runner hardening through real triggers on the real binary: persistent output correlation,
//! processes that escape their process group with `setsid`, and bounded stderr logging.

mod common;

use common::*;
use serde_json::json;

/// Whether `pid` has died (a zombie counts: it no longer runs).
fn dead(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .is_some_and(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn read_pid(path: &std::path::Path) -> i32 {
    let mut text = String::new();
    assert!(
        wait_until(|| {
            text = std::fs::read_to_string(path).unwrap_or_default();
            !text.trim().is_empty()
        }),
        "{path:?} was never written"
    );
    text.trim().parse().expect("a pid")
}

#[test]
fn a_persistent_runner_printing_two_lines_never_answers_the_next_task_with_the_leftover() {
    let env = Env::new();
    // Answers every input with its own `n`, then a second line in the same write.
    env.script(
        "twice.sh",
        r#"while IFS= read -r line; do
  n=$(printf '%s' "$line" | sed 's/.*"inputs":{"n":\([0-9]*\)}.*/\1/')
  printf '{"response":{"n":%s,"pid":%s}}\n{"response":{"n":"leftover","pid":%s}}\n' "$n" "$$" "$$"
done"#,
    );
    let server = env.start(
        r#"
[[agent]]
name = "twice"
runner = { kind = "command", program = "{dir}/twice.sh", mode = "persistent" }
"#,
    );
    let url = format!("{}?wait=20", server.url("default/twice"));
    let mut pids = Vec::new();
    for n in 1..=3 {
        let r = post_json(&url, &json!({ "n": n }));
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
        assert_eq!(r.json["response"]["n"], json!(n), "task {n}: {}", r.text);
        pids.push(r.json["response"]["pid"].as_i64().unwrap());
    }
    assert!(
        pids.windows(2).all(|w| w[0] != w[1]),
        "the process is restarted after each violation: {pids:?}"
    );
    assert!(
        wait_until(|| server.logs().contains("no tick asked for")),
        "the violation is logged"
    );
}

#[test]
fn a_persistent_answer_echoing_another_task_id_fails_the_task() {
    let env = Env::new();
    env.script(
        "stale.sh",
        r#"while IFS= read -r line; do
  case "$line" in
    *'"stale"'*) id="not-this-task" ;;
    *) id=$(printf '%s' "$line" | sed 's/.*"task_id":"\([^"]*\)".*/\1/') ;;
  esac
  printf '{"task_id":"%s","response":"ok"}\n' "$id"
done"#,
    );
    let server = env.start(
        r#"
[[agent]]
name = "stale"
runner = { kind = "command", program = "{dir}/stale.sh", mode = "persistent" }
"#,
    );
    let url = format!("{}?wait=20", server.url("default/stale"));
    let good = post_json(&url, &json!({}));
    assert_eq!(good.json["status"], "SUCCESS", "{}", good.text);
    let bad = post_json(&url, &json!({"stale": true}));
    assert_eq!(bad.json["status"], "FAILURE", "{}", bad.text);
    let error = bad.json["error"].as_str().unwrap();
    assert!(error.contains("not-this-task"), "{error}");
    let again = post_json(&url, &json!({}));
    assert_eq!(again.json["status"], "SUCCESS", "{}", again.text);
}

#[test]
fn a_setsid_child_holding_stdout_fails_the_task_at_tick_timeout_and_dies() {
    let env = Env::new();
    // The script waits for its child, which left the process group and holds stdout.
    env.script(
        "escape.sh",
        r#"cat >/dev/null
setsid sh -c 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; exec sleep 60' "$PIDFILE" &
wait"#,
    );
    let pidfile = env.path().join("escaped.pid");
    let server = env.start(&format!(
        r#"
[[agent]]
name = "escape"
runner = {{ kind = "command", program = "{{dir}}/escape.sh" }}
tick_timeout = "1500ms"
env = {{ PIDFILE = "{}" }}
"#,
        pidfile.display()
    ));
    let r = post_json(server.url("default/escape"), &json!({}));
    assert_eq!(r.status, 202, "{}", r.text);
    let task = server.finished(r.json["task_id"].as_str().unwrap());
    assert_eq!(task["status"], "FAILURE", "{task}");
    assert!(
        task["error"].as_str().unwrap().contains("timed out"),
        "{task}"
    );
    let escaped = read_pid(&pidfile);
    assert!(
        wait_until(|| dead(escaped)),
        "the setsid child {escaped} survived the timeout"
    );
}

#[test]
fn a_setsid_orphan_holding_stdout_is_killed_when_its_tick_ends() {
    let env = Env::new();
    // The script exits at once; its setsid child is re-parented and still holds stdout.
    env.script(
        "orphan.sh",
        r#"cat >/dev/null
setsid sh -c 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; exec sleep 60' "$PIDFILE" &
while [ ! -e "$PIDFILE" ]; do sleep 0.05; done
printf '{"response":"answered"}'"#,
    );
    let pidfile = env.path().join("orphan.pid");
    let server = env.start(&format!(
        r#"
[[agent]]
name = "orphan"
runner = {{ kind = "command", program = "{{dir}}/orphan.sh" }}
tick_timeout = "60s"
env = {{ PIDFILE = "{}" }}
"#,
        pidfile.display()
    ));
    let started = std::time::Instant::now();
    let r = post_json(
        &format!("{}?wait=30", server.url("default/orphan")),
        &json!({}),
    );
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert_eq!(r.json["response"], "answered");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the tick did not wait for the orphan's stdout"
    );
    let orphan = read_pid(&pidfile);
    assert!(
        wait_until(|| dead(orphan)),
        "the setsid orphan {orphan} survived its tick"
    );
    // tickgate is the orphan's subreaper and reaps it: no zombie is left behind for long.
    assert!(
        wait_until(|| {
            // A later tick's sweep reaps any zombie the first sweep found still dying.
            let _ = post_json(
                &format!("{}?wait=30", server.url("default/orphan")),
                &json!({}),
            );
            !std::path::Path::new(&format!("/proc/{orphan}")).exists()
        }),
        "the orphan {orphan} was never reaped"
    );
}

#[test]
fn a_runner_flooding_stderr_leaves_the_server_log_bounded() {
    let env = Env::new();
    // 4 MB of stderr in 100-byte lines, then a normal answer.
    env.script(
        "noisy.sh",
        r#"cat >/dev/null
head -c 4000000 /dev/zero | tr '\0' 'e' | fold -w 100 >&2
printf '{"response":"done"}'"#,
    );
    let server = env.start(
        r#"
[[agent]]
name = "noisy"
runner = { kind = "command", program = "{dir}/noisy.sh" }
"#,
    );
    let before = server.logs().len();
    let r = post_json(
        &format!("{}?wait=60", server.url("default/noisy")),
        &json!({}),
    );
    assert_eq!(r.json["status"], "SUCCESS", "{}", r.text);
    assert!(
        wait_until(|| server.logs().contains("bytes not logged")),
        "the dropped byte count is logged"
    );
    let logged = server.logs().len() - before;
    assert!(
        logged < 512 * 1024,
        "4 MB of stderr produced {logged} bytes of log"
    );
    let metrics = server.get("/metrics");
    let dropped: u64 = metrics
        .text
        .lines()
        .find_map(|l| l.strip_prefix("tickgate_runner_stderr_dropped_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stderr metric in {}", metrics.text));
    assert!(dropped > 3_500_000, "{dropped}");
}
