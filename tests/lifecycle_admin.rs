//! Admin task lifecycle routes against the real binary: the listing (filters, cursors),
//! replay of one task and of an agent's matching tasks (refusals reported), and cancel.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "admin-token-for-lifecycle-tests-0123";

fn admin_get(server: &Server, path: &str) -> Response {
    send(
        client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(ADMIN),
    )
}

fn admin_post(server: &Server, path: &str, body: Option<&Value>) -> Response {
    let req = client()
        .post(format!("{}{path}", server.base))
        .bearer_auth(ADMIN);
    send(match body {
        Some(b) => req.json(b),
        None => req,
    })
}

fn ids(list: &Response) -> Vec<String> {
    assert_eq!(list.status, 200, "{}", list.text);
    list.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until an agent holds no mailbox slot (a finished task's slot is freed just after its
/// completion is announced).
fn wait_idle(server: &Server, agent: &str) {
    assert!(
        wait_until(|| {
            admin_get(server, "/admin/agents").json["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == agent && a["queued"] == 0)
        }),
        "{agent} never became idle"
    );
}

fn submit(url: &str, body: &Value) -> String {
    let r = post_json(url, body);
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["task_id"].as_str().unwrap().to_string()
}

#[test]
fn listing_filters_and_a_cursor_walk_that_sees_every_task_once() {
    let env = Env::new();
    env.script("fail.sh", "cat >/dev/null\necho 'no' >&2\nexit 1");
    let server = env.start_with(
        r#"
[[agent]]
name = "a"
runner = { kind = "echo" }

[[agent]]
name = "b"
namespace = "ops"
runner = { kind = "echo" }

[[agent]]
name = "fail"
runner = { kind = "command", program = "{dir}/fail.sh" }
breaker = { failures = 100, open_for = "1s" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN)],
    );
    let (a, b, fail) = (
        server.url("default/a").to_string(),
        server.url("ops/b").to_string(),
        server.url("default/fail").to_string(),
    );
    let mut all = Vec::new();
    let mut a_ids = Vec::new();
    let mut b_ids = Vec::new();
    let mut fail_ids = Vec::new();
    for i in 0..9 {
        let id = submit(&a, &json!({ "i": i }));
        a_ids.push(id.clone());
        all.push(id);
        if i % 3 == 0 {
            let id = submit(&b, &json!({ "i": i }));
            b_ids.push(id.clone());
            all.push(id);
            let id = submit(&fail, &json!({ "i": i }));
            fail_ids.push(id.clone());
            all.push(id);
        }
    }
    for id in &all {
        server.finished(id);
    }

    // The admin token is required.
    let anonymous = send(client().get(format!("{}/admin/tasks", server.base)));
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.error_code(), "unauthorized");

    // Everything, newest first.
    let list = admin_get(&server, "/admin/tasks");
    let listed = ids(&list);
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>(),
        all.iter().collect::<BTreeSet<_>>()
    );
    assert_eq!(list.json["next_cursor"], Value::Null);
    let created: Vec<String> = list.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["created_at"].as_str().unwrap().to_string())
        .collect();
    assert!(
        created.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {created:?}"
    );

    // Agent filter.
    let of_b = ids(&admin_get(&server, "/admin/tasks?agent=ops/b"));
    assert_eq!(
        of_b.iter().collect::<BTreeSet<_>>(),
        b_ids.iter().collect::<BTreeSet<_>>()
    );
    let of_a = ids(&admin_get(&server, "/admin/tasks?agent=a"));
    assert_eq!(of_a.len(), a_ids.len(), "a bare name is in `default`");

    // Status filter, alone and with the agent.
    let failed = ids(&admin_get(&server, "/admin/tasks?status=FAILURE"));
    assert_eq!(
        failed.iter().collect::<BTreeSet<_>>(),
        fail_ids.iter().collect::<BTreeSet<_>>()
    );
    assert!(ids(&admin_get(
        &server,
        "/admin/tasks?status=FAILURE&agent=default/a"
    ))
    .is_empty());
    assert_eq!(
        ids(&admin_get(
            &server,
            "/admin/tasks?status=SUCCESS&agent=default/a"
        ))
        .len(),
        a_ids.len()
    );

    // Time filters: `since` inclusive, `until` exclusive, on created_at.
    let pivot = created[created.len() / 2].clone();
    let since = admin_get(&server, &format!("/admin/tasks?since={pivot}"));
    let until = admin_get(&server, &format!("/admin/tasks?until={pivot}"));
    let since_times: Vec<&str> = since.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["created_at"].as_str().unwrap())
        .collect();
    let until_times: Vec<&str> = until.json["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["created_at"].as_str().unwrap())
        .collect();
    assert!(since_times.iter().all(|t| *t >= pivot.as_str()));
    assert!(since_times.contains(&pivot.as_str()), "since is inclusive");
    assert!(until_times.iter().all(|t| *t < pivot.as_str()));
    assert_eq!(
        since_times.len() + until_times.len(),
        all.len(),
        "the two halves cover everything"
    );

    // Bad filters: 400 in the error shape.
    for bad in [
        "status=DONE",
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "limit=0",
        "limit=1001",
        "limit=ten",
        "cursor=abc",
        "agent=Not_A_Label",
    ] {
        let r = admin_get(&server, &format!("/admin/tasks?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert_eq!(r.error_code(), "bad_request", "{bad}");
    }

    // A cursor walk, with new tasks arriving between pages, sees every task that existed when
    // it began exactly once.
    let before: BTreeSet<String> = all.iter().cloned().collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/tasks?limit=4&cursor={c}"),
            None => "/admin/tasks?limit=4".to_string(),
        };
        let page = admin_get(&server, &path);
        seen.extend(ids(&page));
        pages += 1;
        submit(&a, &json!({ "arrived_during_walk": pages }));
        match page.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 100, "the walk ends");
    }
    assert_eq!(seen.len(), before.len(), "no task twice: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), before);
    assert!(pages >= before.len() / 4);
}

#[test]
fn replay_and_bulk_replay_go_through_the_intake_and_report_refusals() {
    let env = Env::new();
    let go = env.path().join("go");
    let ok = env.path().join("ok");
    env.script(
        "flaky.sh",
        &format!(
            "cat >/dev/null\nwhile [ ! -e {go} ]; do sleep 0.05; done\nif [ -e {ok} ]; then echo '{{\"response\":\"ok\"}}'; else echo 'down' >&2; exit 1; fi",
            go = go.display(),
            ok = ok.display()
        ),
    );
    std::fs::write(&go, "").unwrap();
    let server = env.start_with(
        r#"
[[agent]]
name = "echo"
runner = { kind = "echo" }
allow_env = ["MODE"]

[[agent]]
name = "flaky"
runner = { kind = "command", program = "{dir}/flaky.sh" }
mailbox = 3
breaker = { failures = 100, open_for = "1s" }
"#,
        &[("TICKGATE_ADMIN_TOKEN", ADMIN)],
    );

    // One task replayed: same inputs, title and env; marked as a replay.
    let echo = server.url("default/echo").to_string();
    let original = submit(
        &echo,
        &json!({"x": 1, "title": "first", "env": [{"name": "MODE", "value": "fast"}]}),
    );
    let original_record = server.finished(&original);
    let replay = admin_post(&server, &format!("/admin/tasks/{original}/replay"), None);
    assert_eq!(replay.status, 202, "{}", replay.text);
    let replay_id = replay.json["task_id"].as_str().unwrap().to_string();
    assert_ne!(replay_id, original);
    assert_eq!(replay.json["replay_of"], original.as_str());
    assert_eq!(replay.json["source"]["method"], "REPLAY");
    assert_eq!(replay.json["title"], "first");
    assert!(replay
        .header("location")
        .is_some_and(|l| l.ends_with(&replay_id)));
    let replayed = server.finished(&replay_id);
    assert_eq!(replayed["status"], "SUCCESS");
    assert_eq!(replayed["response"], original_record["response"]);
    assert_eq!(replayed["replay_of"], original.as_str());

    let unknown = admin_post(
        &server,
        "/admin/tasks/00000000-0000-4000-8000-000000000000/replay",
        None,
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "not_found");
    assert_eq!(
        admin_post(&server, "/admin/tasks/not-an-id/replay", None).status,
        404
    );
    assert_eq!(
        send(client().post(format!("{}/admin/tasks/{original}/replay", server.base))).status,
        401
    );

    // Four failures of the flaky agent.
    let flaky = server.url("default/flaky").to_string();
    let failures: Vec<String> = (0..4)
        .map(|i| {
            let id = submit(&flaky, &json!({ "n": i }));
            assert_eq!(server.finished(&id)["status"], "FAILURE");
            id
        })
        .collect();

    // Bulk replay while the runner is held: the first replay runs (and waits), the next two
    // queue, the mailbox (3) is then full and the last one is refused and reported.
    wait_idle(&server, "default/flaky");
    std::fs::remove_file(&go).unwrap();
    let bulk = admin_post(
        &server,
        "/admin/agents/default/flaky/replay",
        Some(&json!({"status": "FAILURE"})),
    );
    assert_eq!(bulk.status, 200, "{}", bulk.text);
    assert_eq!(bulk.json["replayed"], 3, "{}", bulk.text);
    let replay_ids: Vec<String> = bulk.json["task_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(replay_ids.len(), 3);
    let refused = bulk.json["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{}", bulk.text);
    // Replays go oldest first, so the newest failure is the one left over.
    assert_eq!(refused[0]["task_id"], failures[3].as_str());
    assert_eq!(refused[0]["error"], "mailbox_full");

    std::fs::write(&ok, "").unwrap();
    std::fs::write(&go, "").unwrap();
    let replayed_of: Vec<String> = replay_ids
        .iter()
        .map(|id| {
            let t = server.wait_task(id, |t| t["status"] == "SUCCESS");
            assert_eq!(t["source"]["method"], "REPLAY");
            t["replay_of"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(replayed_of, failures[..3].to_vec(), "in original order");

    // Bad requests.
    let missing = admin_post(
        &server,
        "/admin/agents/default/nope/replay",
        Some(&json!({})),
    );
    assert_eq!(missing.status, 404);
    let bad = admin_post(
        &server,
        "/admin/agents/default/flaky/replay",
        Some(&json!({"status": "BROKEN"})),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_code(), "bad_request");
    let extra = admin_post(
        &server,
        "/admin/agents/default/flaky/replay",
        Some(&json!({"stauts": "FAILURE"})),
    );
    assert_eq!(extra.status, 400, "{}", extra.text);
}

#[test]
fn cancel_revokes_a_queued_task_that_then_never_runs_even_after_a_crash() {
    let env = Env::new();
    let go = env.path().join("go");
    let ran = env.path().join("ran");
    env.script(
        "slow.sh",
        &format!(
            "cat >/dev/null\necho \"$TICKGATE_TASK_ID\" >> {ran}\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho '{{\"response\":\"done\"}}'",
            go = go.display(),
            ran = ran.display()
        ),
    );
    let config = r#"
[[agent]]
name = "slow"
runner = { kind = "command", program = "{dir}/slow.sh" }
tick_timeout = "120s"
"#;
    let server = env.start_with(config, &[("TICKGATE_ADMIN_TOKEN", ADMIN)]);
    let url = server.url("default/slow").to_string();
    let running = submit(&url, &json!({"n": 1}));
    server.wait_task(&running, |t| t["status"] == "STARTED");

    // A caller waiting on the queued task hears it was revoked.
    let waiter = {
        let url = format!("{url}?wait=60");
        std::thread::spawn(move || post_json(&url, &json!({"n": 2})))
    };
    let mut queued = String::new();
    assert!(wait_until(|| {
        let list = admin_get(&server, "/admin/tasks?agent=default/slow&status=PENDING");
        match ids(&list).first() {
            Some(id) => {
                queued = id.clone();
                true
            }
            None => false,
        }
    }));

    assert_eq!(
        send(client().post(format!("{}/admin/tasks/{queued}/cancel", server.base))).status,
        401,
        "the admin token is required"
    );
    let cancel = admin_post(&server, &format!("/admin/tasks/{queued}/cancel"), None);
    assert_eq!(cancel.status, 200, "{}", cancel.text);
    assert_eq!(cancel.json["status"], "REVOKED");
    assert_eq!(cancel.json["phase"], "Canceled");
    assert!(cancel.json["finished_at"].is_string());
    let waited = waiter.join().unwrap();
    assert_eq!(waited.status, 200, "{}", waited.text);
    assert_eq!(waited.json["status"], "REVOKED");

    let again = admin_post(&server, &format!("/admin/tasks/{queued}/cancel"), None);
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.error_code(), "conflict");
    let started = admin_post(&server, &format!("/admin/tasks/{running}/cancel"), None);
    assert_eq!(started.status, 409, "a running tick is not interrupted");
    let unknown = admin_post(
        &server,
        "/admin/tasks/00000000-0000-4000-8000-000000000000/cancel",
        None,
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.error_code(), "not_found");

    // A second queued task is revoked, then the server dies mid-tick.
    let second = submit(&url, &json!({"n": 3}));
    let cancel = admin_post(&server, &format!("/admin/tasks/{second}/cancel"), None);
    assert_eq!(cancel.status, 200, "{}", cancel.text);
    let after = submit(&url, &json!({"n": 4}));
    server.kill();

    std::fs::write(&go, "").unwrap();
    let server = env.start_with(config, &[("TICKGATE_ADMIN_TOKEN", ADMIN)]);
    let url = server.rebase(&url);
    // The interrupted tick runs again and the task queued after the revoked ones runs.
    assert_eq!(server.finished(&running)["status"], "SUCCESS");
    assert_eq!(server.finished(&after)["status"], "SUCCESS");
    let last = submit(&url, &json!({"n": 5}));
    assert_eq!(server.finished(&last)["status"], "SUCCESS");
    wait_idle(&server, "default/slow");
    for id in [&queued, &second] {
        let t = server.get(&format!("/tasks/{id}"));
        assert_eq!(t.json["status"], "REVOKED", "{}", t.text);
        assert_eq!(t.json["phase"], "Canceled");
        assert_eq!(t.json["tick"], Value::Null, "never ticked");
    }
    let ran = std::fs::read_to_string(&ran).unwrap();
    assert!(!ran.contains(queued.as_str()) && !ran.contains(second.as_str()));
    assert!(ran.contains(after.as_str()));

    let finished = admin_post(&server, &format!("/admin/tasks/{running}/cancel"), None);
    assert_eq!(finished.status, 409, "a finished task is not cancelled");
    assert_eq!(finished.error_code(), "conflict");
}
