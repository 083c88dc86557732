//! Durability: every 202 survives SIGKILL, and a tick interrupted by the kill runs again with
//! `attempt` 2.

mod common;

use common::*;
use serde_json::json;

#[test]
fn accepted_tasks_survive_sigkill_and_the_interrupted_tick_reruns() {
    let env = Env::new();
    let fast = env.path().join("fast");
    let pidfile = env.path().join("sleeper.pid");
    // Before the marker exists, the first tick hangs (so one task is STARTED and the rest stay
    // PENDING when the server is killed); afterwards every tick is instant.
    env.script(
        "work.sh",
        &format!(
            "cat >/dev/null\nif [ ! -e {fast} ]; then echo $$ > {pid}; exec sleep 60; fi\necho '{{\"response\":\"ok\"}}'",
            fast = fast.display(),
            pid = pidfile.display()
        ),
    );
    let config = r#"
[[agent]]
name = "work"
runner = { kind = "command", program = "{dir}/work.sh" }
mailbox = 500
tick_timeout = "120s"

[[agent]]
name = "echo"
runner = { kind = "echo" }
mailbox = 500
"#;
    let server = env.start(config);
    let work = server.url("default/work").to_string();
    let echo = server.url("default/echo").to_string();
    let mut work_ids = Vec::new();
    let mut echo_ids = Vec::new();
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            (0..120)
                .map(|i| {
                    let r = post_json(&work, &json!({"i": i}));
                    assert_eq!(r.status, 202, "{}", r.text);
                    r.json["task_id"].as_str().unwrap().to_string()
                })
                .collect::<Vec<_>>()
        });
        let b = s.spawn(|| {
            (0..120)
                .map(|i| {
                    let r = post_json(&echo, &json!({"i": i}));
                    assert_eq!(r.status, 202, "{}", r.text);
                    r.json["task_id"].as_str().unwrap().to_string()
                })
                .collect::<Vec<_>>()
        });
        work_ids = a.join().unwrap();
        echo_ids = b.join().unwrap();
    });
    let first = work_ids[0].clone();
    server.wait_task(&first, |t| t["status"] == "STARTED");
    assert!(wait_until(|| pidfile.exists()));
    server.kill();
    let sleeper: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe {
        libc::kill(sleeper, libc::SIGKILL);
    }

    std::fs::write(&fast, "").unwrap();
    let server = env.start(config);
    let rerun = server.finished(&first);
    assert_eq!(rerun["status"], "SUCCESS", "{rerun}");
    assert_eq!(rerun["attempt"], 2, "{rerun}");
    assert_eq!(rerun["tick"], 1);
    for (n, id) in work_ids.iter().enumerate() {
        let t = server.finished(id);
        assert_eq!(t["status"], "SUCCESS", "{t}");
        assert_eq!(
            t["tick"],
            n as u64 + 1,
            "recovered tasks keep their order: {t}"
        );
        if n > 0 {
            assert_eq!(t["attempt"], 1);
        }
    }
    for id in &echo_ids {
        assert_eq!(server.finished(id)["status"], "SUCCESS");
    }
}
