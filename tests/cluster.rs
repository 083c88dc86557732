//! Several tickgate nodes on one real `nats-server -js` (SPEC section 11): the real binary,
//! ephemeral ports, a temporary JetStream directory. Skipped with a note when nats-server is
//! not installed, unless `TICKGATE_REQUIRE_NATS=1` (CI) makes that a failure.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "cluster-admin-token-0123456789";
const TOKEN: &str = "cluster-webhook-token-0123456789abcdef";

/// The tick: logs `<node pid> <inputs.i> <attempt>` to `ticks.log`, counts ticks in memory,
/// and blocks on the first attempt of a task with `hold` until `release` exists (a tick that
/// is running when its node dies).
const TICK: &str = r#"
input=$(cat)
exec python3 -c '
import json, os, sys, time
d = json.loads(sys.argv[1]); dir = sys.argv[2]
i = d["inputs"].get("i")
if d["inputs"].get("hold") and d["attempt"] == 1:
    open(os.path.join(dir, "held"), "w").write(str(os.getppid()))
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(dir, "release")) and time.time() < deadline:
        time.sleep(0.05)
with open(os.path.join(dir, "ticks.log"), "a") as f:
    f.write("%d %s %d\n" % (os.getppid(), i, d["attempt"]))
n = (d.get("memory") or {}).get("n", 0) + 1
print(json.dumps({"response": {"n": n, "i": i, "attempt": d["attempt"]}, "memory": {"n": n}}))
' "$input" "$DIR"
"#;

fn config(env: &Env, nats: &NatsServer, lease: &str) -> std::path::PathBuf {
    let script = env.script("tick.sh", TICK);
    env.write_config(&format!(
        r#"
[store]
kind = "nats"
# A server list, as a cluster's config has one (here the same server twice).
url = "{url}, {url}"
lease = "{lease}"

[[agent]]
name = "worker"
runner = {{ kind = "command", program = "{script}", mode = "oneshot" }}
env = {{ DIR = "{dir}" }}
tick_timeout = "90s"
mailbox = 1000
webhook = {{ token_env = "WORKER_TOKEN" }}
"#,
        url = nats.url(),
        script = script.display(),
        dir = env.path().display(),
    ))
}

/// Two nodes, `n1` and `n2`, on the worker config with this lease.
fn two_nodes(env: &Env, nats: &NatsServer, lease: &str) -> (Server, Server) {
    let config = config(env, nats, lease);
    (node(env, &config, "n1"), node(env, &config, "n2"))
}

/// Rewrites the config file at `path` through `f`.
fn edit(path: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

fn node(env: &Env, config: &Path, name: &str) -> Server {
    Server::start(
        config,
        &env.path().join(format!("unused-{name}")),
        &[
            ("TICKGATE_ADMIN_TOKEN", ADMIN),
            ("WORKER_TOKEN", TOKEN),
            ("TICKGATE_SERVER_NODE_ID", name),
        ],
    )
}

fn hook(server: &Server) -> String {
    format!("{}/webhooks/{TOKEN}", server.base)
}

fn admin_get(server: &Server, path: &str) -> Response {
    send(
        client()
            .get(format!("{}{path}", server.base))
            .bearer_auth(ADMIN),
    )
}

/// The node owning the agent, as `/admin/agents` on `server` reports it.
fn owner(server: &Server) -> String {
    let r = admin_get(server, "/admin/agents");
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["agents"][0]["owner"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Waits until every node names the same owner, and returns it.
fn settled_owner(nodes: &[(&str, &Server)]) -> String {
    let mut seen = String::new();
    assert!(
        wait_until(|| {
            let owners: HashSet<_> = nodes.iter().map(|(_, s)| owner(s)).collect();
            seen = owners.iter().next().cloned().unwrap_or_default();
            owners.len() == 1 && nodes.iter().any(|(n, _)| *n == seen)
        }),
        "the nodes never agreed on an owner"
    );
    seen
}

fn ticks_log(env: &Env) -> Vec<(i32, i64, u32)> {
    let Ok(file) = std::fs::File::open(env.path().join("ticks.log")) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            Some((
                p.next()?.parse().ok()?,
                p.next()?.parse().ok()?,
                p.next()?.parse().ok()?,
            ))
        })
        .collect()
}

fn accept(url: &str, body: Value) -> String {
    let r = post_json(url, &body);
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["task_id"].as_str().unwrap().to_string()
}

#[test]
fn triggers_on_every_node_run_once_each_in_acceptance_order_on_one_node() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let config = config(&env, &nats, "3s");
    let nodes = [
        node(&env, &config, "n1"),
        node(&env, &config, "n2"),
        node(&env, &config, "n3"),
    ];
    let named: Vec<_> = ["n1", "n2", "n3"].into_iter().zip(nodes.iter()).collect();
    settled_owner(&named);

    // Sequential triggers, each on the next node: acceptance order is the request order.
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(accept(&hook(&nodes[i % 3]), json!({ "i": i })));
    }
    // Concurrent triggers on all nodes at once: each runs exactly once.
    let concurrent: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|n| {
                let url = hook(&nodes[n]);
                s.spawn(move || {
                    (0..10)
                        .map(|k| accept(&url, json!({ "i": 100 + n * 10 + k })))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    // Every node answers for every task.
    for (k, id) in ids.iter().chain(&concurrent).enumerate() {
        let task = nodes[k % 3].finished(id);
        assert_eq!(task["status"], "SUCCESS", "{task}");
        assert_eq!(task["attempt"], 1);
    }
    let log = ticks_log(&env);
    assert_eq!(log.len(), 60, "each task ran exactly once: {log:?}");
    let sequential: Vec<i64> = log
        .iter()
        .map(|(_, i, _)| *i)
        .filter(|i| *i < 100)
        .collect();
    assert_eq!(sequential, (0..30).collect::<Vec<_>>(), "acceptance order");
    let distinct: HashSet<i64> = log.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(distinct.len(), 60);
    let pids: HashSet<i32> = log.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(pids.len(), 1, "all ticks ran on one node");
    // Tick numbers follow the order the ticks ran in, with memory carried across them.
    let mut by_tick = BTreeMap::new();
    for id in ids.iter().chain(&concurrent) {
        let t = nodes[0].finished(id);
        by_tick.insert(
            t["tick"].as_u64().unwrap(),
            t["response"]["n"].as_u64().unwrap(),
        );
    }
    assert_eq!(
        by_tick.keys().copied().collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
    assert!(by_tick.iter().all(|(tick, n)| tick == n), "{by_tick:?}");

    // A full restart of the cluster keeps the agent's memory and tick counter.
    for n in nodes {
        assert!(n.terminate().success());
    }
    let again = node(&env, &config, "n4");
    let task = again.finished(&accept(&hook(&again), json!({ "i": 1000 })));
    assert_eq!(task["tick"], 61, "{task}");
    assert_eq!(task["response"]["n"], 61, "{task}");
    assert_eq!(owner(&again), "n4");
}

#[test]
fn kill_9_of_the_owner_under_load_loses_no_task_and_reruns_the_interrupted_one() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let lease = Duration::from_secs(2);
    let (n1, n2) = two_nodes(&env, &nats, "2s");
    let owner_name = settled_owner(&[("n1", &n1), ("n2", &n2)]);
    let (owner_node, survivor, survivor_name) = if owner_name == "n1" {
        (n1, n2, "n2")
    } else {
        (n2, n1, "n1")
    };

    // A task that is running when its node dies.
    let held = accept(&hook(&survivor), json!({ "i": 0, "hold": true }));
    assert!(wait_until(|| env.path().join("held").exists()));
    survivor.wait_task(&held, |t| t["status"] == "STARTED");
    // Load on both nodes, then the owner dies in the middle of it.
    let mut accepted = vec![held.clone()];
    for i in 1..=20 {
        let target = if i % 2 == 0 { &owner_node } else { &survivor };
        accepted.push(accept(&hook(target), json!({ "i": i })));
    }
    let killed_at = Instant::now();
    owner_node.kill();
    // Acknowledged while the agent has no owner: queued, not lost.
    for i in 21..=30 {
        accepted.push(accept(&hook(&survivor), json!({ "i": i })));
    }
    let mut moved = None;
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if owner(&survivor) == survivor_name {
            moved = Some(killed_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved = moved.expect("the survivor took the agent over");
    assert!(
        moved <= lease * 2 + Duration::from_millis(500),
        "takeover took {moved:?} with a {lease:?} lease"
    );
    eprintln!("takeover after kill -9: {moved:?} (lease {lease:?})");

    std::fs::write(env.path().join("release"), "").unwrap();
    for id in &accepted {
        let task = survivor.finished(id);
        assert_eq!(task["status"], "SUCCESS", "{task}");
    }
    let rerun = survivor.finished(&held);
    assert_eq!(
        rerun["attempt"], 2,
        "the interrupted task ran again: {rerun}"
    );
    // The interrupted tick's process outlived its node (kill -9 leaves the runner's process
    // group alone) and logs its line once released: that is attempt 1 of task 0. Everything
    // the cluster ran is the rest: the re-run first, then each task once, in acceptance order.
    let log: Vec<_> = ticks_log(&env)
        .into_iter()
        .filter(|(_, i, attempt)| !(*i == 0 && *attempt == 1))
        .collect();
    let order: Vec<i64> = log.iter().map(|(_, i, _)| *i).collect();
    assert_eq!(order, (0..=30).collect::<Vec<_>>(), "{log:?}");
    assert_eq!(log[0].2, 2, "the interrupted task's second attempt");
}

#[test]
fn concurrent_duplicate_deliveries_on_two_nodes_make_one_task() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let (n1, n2) = two_nodes(&env, &nats, "3s");
    for round in 0..10 {
        let key = format!("delivery-{round}");
        let body = json!({ "i": round });
        let answers: Vec<Response> = std::thread::scope(|s| {
            let handles: Vec<_> = [&n1, &n2, &n1, &n2]
                .into_iter()
                .map(|n| {
                    let (url, key, body) = (hook(n), key.clone(), body.clone());
                    s.spawn(move || {
                        send(
                            client()
                                .post(url)
                                .header("Idempotency-Key", key)
                                .json(&body),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ids: HashSet<String> = answers
            .iter()
            .map(|r| {
                assert!(r.status == 202 || r.status == 200, "{}", r.text);
                r.json["task_id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(ids.len(), 1, "round {round}: {answers:?}");
        let id = ids.into_iter().next().unwrap();
        assert_eq!(n2.finished(&id)["status"], "SUCCESS");
    }
    assert!(wait_until(|| ticks_log(&env).len() >= 10));
    let listed = admin_get(&n1, "/admin/tasks?limit=100");
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(
        listed.json["tasks"].as_array().unwrap().len(),
        10,
        "{}",
        listed.text
    );
    assert_eq!(ticks_log(&env).len(), 10);
}

#[test]
fn sync_wait_and_sse_work_when_the_trigger_and_the_tick_are_on_different_nodes() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let (n1, n2) = two_nodes(&env, &nats, "3s");
    let other = if settled_owner(&[("n1", &n1), ("n2", &n2)]) == "n1" {
        &n2
    } else {
        &n1
    };
    // A message tickgate did not write, on the agent's queue subject, is passed over.
    let subject = format!("tg.q.{}", hex(b"default/worker"));
    common::nats::Nats::connect(&nats.url()).publish_js(&subject, None, b"not a task");
    // A sync wait on the node that does not tick.
    let r = post_json(&format!("{}?wait=20", hook(other)), &json!({ "i": 1 }));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "SUCCESS");
    assert_eq!(r.json["response"]["i"], 1);

    // SSE on the node that does not tick, for a task that waits until released.
    let id = accept(&hook(other), json!({ "i": 2, "hold": true }));
    let resp = client()
        .get(format!("{}/tasks/{id}/events", other.base))
        .send()
        .expect("sse");
    assert_eq!(resp.status(), 200);
    let mut lines = BufReader::new(resp).lines();
    let mut statuses = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let event: Value = serde_json::from_str(data.trim()).unwrap();
        let status = event["status"].as_str().unwrap().to_string();
        if status == "STARTED" {
            std::fs::write(env.path().join("release"), "").unwrap();
        }
        let done = status == "SUCCESS";
        statuses.push(status);
        if done {
            break;
        }
    }
    assert!(statuses.contains(&"STARTED".to_string()), "{statuses:?}");
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("SUCCESS"),
        "{statuses:?}"
    );
}

#[test]
fn nats_outage_gives_503_and_service_resumes_when_it_returns() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let config = config(&env, &nats, "2s");
    let n1 = node(&env, &config, "n1");
    let first = accept(&hook(&n1), json!({ "i": 1 }));
    assert_eq!(n1.finished(&first)["status"], "SUCCESS");

    nats.stop();
    let mut refused = None;
    assert!(wait_until(|| {
        let r = post_json(&hook(&n1), &json!({ "i": 2 }));
        assert_ne!(r.status, 202, "no 202 while NATS is down: {}", r.text);
        let done = r.status == 503;
        refused = Some(r);
        done
    }));
    let refused = refused.unwrap();
    assert_eq!(refused.error_code(), "store_unavailable");
    assert!(refused.header("retry-after").is_some());
    assert!(wait_until(|| n1.get("/ready").status == 503));

    nats.restart();
    assert!(wait_until(|| n1.get("/ready").status == 200));
    let mut id = None;
    assert!(wait_until(|| {
        let r = post_json(&hook(&n1), &json!({ "i": 3 }));
        if r.status == 202 {
            id = r.json["task_id"].as_str().map(String::from);
        }
        r.status == 202
    }));
    let task = n1.finished(&id.unwrap());
    assert_eq!(task["status"], "SUCCESS", "{task}");
    assert!(n1.logs().lines().all(|l| !l.contains("panicked")));
}

const FLAKY: &str = r#"
input=$(cat)
exec python3 -c '
import json, sys
d = json.loads(sys.argv[1])
if d["attempt"] == 1:
    sys.stderr.write("first attempts fail\n")
    sys.exit(3)
print(json.dumps({"response": {"attempt": d["attempt"]}}))
' "$input"
"#;

fn lifecycle_config(env: &Env, nats: &NatsServer) -> std::path::PathBuf {
    let flaky = env.script("flaky.sh", FLAKY);
    env.write_config(&format!(
        r#"
[store]
kind = "nats"
url = "{url}"
lease = "2s"

[[agent]]
name = "toolcall"
runner = {{ kind = "command", program = "{toolcall}", mode = "oneshot" }}
webhook = {{ token_env = "TOOLCALL_TOKEN" }}

[[agent]]
name = "flaky"
runner = {{ kind = "command", program = "{flaky}", mode = "oneshot" }}
retry = {{ schedule = ["3s"] }}
webhook = {{ token_env = "FLAKY_TOKEN" }}

[[agent]]
name = "patient"
runner = {{ kind = "command", program = "{flaky}", mode = "oneshot" }}
retry = {{ schedule = ["1h"] }}
webhook = {{ token_env = "PATIENT_TOKEN" }}
"#,
        url = nats.url(),
        toolcall = concat!(env!("CARGO_MANIFEST_DIR"), "/config/agents/toolcall.sh"),
        flaky = flaky.display(),
    ))
}

const TOOLCALL: &str = "cluster-toolcall-token-0123456789abcdef";
const FLAKY_TOKEN: &str = "cluster-flaky-token-0123456789abcdefgh";
const PATIENT: &str = "cluster-patient-token-0123456789abcdefg";

fn lifecycle_node(env: &Env, config: &Path, name: &str) -> Server {
    Server::start(
        config,
        &env.path().join(format!("unused-{name}")),
        &[
            ("TICKGATE_ADMIN_TOKEN", ADMIN),
            ("TOOLCALL_TOKEN", TOOLCALL),
            ("FLAKY_TOKEN", FLAKY_TOKEN),
            ("PATIENT_TOKEN", PATIENT),
            ("TICKGATE_SERVER_NODE_ID", name),
        ],
    )
}

fn owner_of(server: &Server, agent: &str) -> String {
    let r = admin_get(server, "/admin/agents");
    r.json["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent)
        .and_then(|a| a["owner"].as_str())
        .unwrap_or("")
        .to_string()
}

#[test]
fn answers_retries_expiry_and_cancel_work_across_nodes_and_a_takeover() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let config = lifecycle_config(&env, &nats);
    let n1 = lifecycle_node(&env, &config, "n1");
    let n2 = lifecycle_node(&env, &config, "n2");
    let nodes = [&n1, &n2];

    // A task that waits for input, answered twice, each time through the other node.
    let id = accept(
        &format!("{}/webhooks/{TOOLCALL}", n1.base),
        json!({"query": "q"}),
    );
    for (step, answering) in [(1, &n2), (2, &n1)] {
        let parked = answering.wait_task(&id, |t| {
            t["status"] == "AWAITING_INPUT" && t["awaiting"]["request"]["step"] == step
        });
        assert_eq!(parked["awaiting"]["request"]["step"], step);
        let r = send(
            client()
                .post(format!("{}/tasks/{id}/resume", answering.base))
                .bearer_auth(TOOLCALL)
                .json(&json!({"response": {"answer": step}})),
        );
        assert_eq!(r.status, 202, "{}", r.text);
        // Taken once, cluster-wide: the same answer on the other node is refused.
        let other = if std::ptr::eq(answering, &n1) {
            &n2
        } else {
            &n1
        };
        let again = send(
            client()
                .post(format!("{}/tasks/{id}/resume", other.base))
                .bearer_auth(TOOLCALL)
                .json(&json!({"response": {"answer": step}})),
        );
        assert_eq!(again.status, 409, "{}", again.text);
    }
    let done = n2.finished(&id);
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert_eq!(
        done["response"]["answers"],
        json!([{"answer": 1}, {"answer": 2}])
    );

    // An unanswered question expires on whichever node polls first.
    let expiring = accept(
        &format!("{}/webhooks/{TOOLCALL}", n2.base),
        json!({"timeout": "1s"}),
    );
    let expired = n1.wait_task(&expiring, |t| t["status"] == "FAILURE");
    assert!(
        expired["error"]
            .as_str()
            .unwrap_or("")
            .contains("timed out"),
        "{expired}"
    );

    // A task waiting in RETRY is cancelled through the node that does not own its agent.
    let patient = accept(&format!("{}/webhooks/{PATIENT}", n1.base), json!({}));
    n1.wait_task(&patient, |t| t["status"] == "RETRY");
    let owner = owner_of(&n1, "default/patient");
    let other = nodes
        .iter()
        .find(|n| owner_of(n, "default/patient") != owner || owner.is_empty());
    let canceller = other.copied().unwrap_or(&n2);
    let cancel = send(
        client()
            .post(format!("{}/admin/tasks/{patient}/cancel", canceller.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(cancel.status, 200, "{}", cancel.text);
    assert_eq!(cancel.json["status"], "REVOKED");
    assert_eq!(
        n2.get(&format!("/tasks/{patient}")).json["status"],
        "REVOKED"
    );

    // A retry timer written by an owner that then dies fires on the node that takes over.
    let flaky = accept(&format!("{}/webhooks/{FLAKY_TOKEN}", n1.base), json!({}));
    n1.wait_task(&flaky, |t| t["status"] == "RETRY");
    let owner = owner_of(&n1, "default/flaky");
    let (dead, survivor) = if owner == "n1" { (n1, n2) } else { (n2, n1) };
    dead.kill();
    let retried = survivor.wait_task(&flaky, |t| t["status"] == "SUCCESS");
    assert_eq!(retried["attempt"], 2, "{retried}");
    assert_eq!(
        retried["attempts"].as_array().map(Vec::len),
        Some(2),
        "{retried}"
    );
}

#[test]
fn the_mailbox_bound_holds_across_nodes() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let path = config(&env, &nats, "1s");
    edit(&path, |c| c.replace("mailbox = 1000", "mailbox = 3"));
    let n1 = node(&env, &path, "n1");
    let n2 = node(&env, &path, "n2");
    let held = accept(&hook(&n1), json!({ "i": 0, "hold": true }));
    n2.wait_task(&held, |t| t["status"] == "STARTED");
    // The backlog is counted every third of a lease: keep offering until both nodes refuse.
    let mut accepted = vec![held];
    for n in [&n1, &n2] {
        let mut refused = None;
        assert!(wait_until(|| {
            let r = post_json(&hook(n), &json!({ "i": accepted.len() }));
            match r.status {
                202 => {
                    accepted.push(r.json["task_id"].as_str().unwrap().to_string());
                    false
                }
                _ => {
                    refused = Some(r);
                    true
                }
            }
        }));
        let refused = refused.unwrap();
        assert_eq!(refused.status, 429, "{}", refused.text);
        assert_eq!(refused.error_code(), "mailbox_full");
    }
    // Approximate by the arrivals of one count (every third of the 1 s lease), not unbounded.
    assert!(accepted.len() < 40, "{} accepted", accepted.len());
    std::fs::write(env.path().join("release"), "").unwrap();
    for id in &accepted {
        assert_eq!(n1.finished(id)["status"], "SUCCESS");
    }
    // Drained (and trimmed from the stream): triggers are taken again.
    assert!(wait_until(|| post_json(&hook(&n2), &json!({ "i": 99 }))
        .status
        == 202));
}

#[test]
fn a_cluster_config_needs_pinned_webhook_tokens() {
    let env = Env::new();
    let path = env.write_config(
        r#"
[store]
kind = "nats"
url = "nats://127.0.0.1:4222"

[[agent]]
name = "echo"
runner = { kind = "echo" }
"#,
    );
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("webhook.token_env") && stderr.contains("nats"),
        "{stderr}"
    );
    let path = env.write_config("[store]\nkind = \"nats\"\n");
    let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.url"));
}

#[test]
fn finished_tasks_and_their_keys_go_after_the_retention() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let path = config(&env, &nats, "2s");
    edit(&path, |c| {
        c.replace("lease = \"2s\"", "lease = \"2s\"\ntask_retention = \"2s\"")
    });
    let n1 = node(&env, &path, "n1");
    let keyed = |key: &str| {
        send(
            client()
                .post(hook(&n1))
                .header("Idempotency-Key", key)
                .json(&json!({ "i": 1 })),
        )
    };
    let first = keyed("once");
    assert_eq!(first.status, 202, "{}", first.text);
    let id = first.json["task_id"].as_str().unwrap().to_string();
    assert_eq!(n1.finished(&id)["status"], "SUCCESS");
    let repeat = keyed("once");
    assert_eq!(
        repeat.json["task_id"], first.json["task_id"],
        "{}",
        repeat.text
    );
    // Purged by the retention job; the key expires with it and names a new task.
    assert!(wait_until(|| n1.get(&format!("/tasks/{id}")).status == 404));
    let mut fresh = None;
    assert!(wait_until(|| {
        let r = keyed("once");
        let new = r.status == 202 && r.json["task_id"] != first.json["task_id"];
        if new {
            fresh = r.json["task_id"].as_str().map(String::from);
        }
        new
    }));
    assert_eq!(n1.finished(&fresh.unwrap())["status"], "SUCCESS");
}

#[test]
fn queue_triggers_on_the_nats_store_run_once_and_publish_each_result_once() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let env = Env::new();
    let path = config(&env, &nats, "2s");
    edit(&path, |c| {
        c + "\n[[agent.queue]]\nsubject = \"jobs.in\"\nreply_subject = \"jobs.out\"\n"
    });
    // No `[queue] url`: queue triggers use the store's NATS server.
    let n1 = node(&env, &path, "n1");
    let n2 = node(&env, &path, "n2");
    let results = common::nats::Collector::subscribe(&nats.url(), "jobs.out");
    let client = common::nats::Nats::connect(&nats.url());
    for i in 0..10 {
        client.publish_js(
            "jobs.in",
            Some(&format!("job-{i}")),
            format!("{{\"i\":{i}}}").as_bytes(),
        );
    }
    // A redelivered message (same Nats-Msg-Id) does not make a second task.
    client.publish_js("jobs.in", Some("job-3"), b"{\"i\":3}");
    assert!(wait_until(|| results.json().len() >= 10));
    let got = results.json();
    let ids: HashSet<&str> = got.iter().filter_map(|r| r["task_id"].as_str()).collect();
    assert_eq!(ids.len(), 10, "{got:#?}");
    for r in &got {
        assert_eq!(r["status"], "SUCCESS", "{r}");
        assert_eq!(r["source"]["method"], "QUEUE");
        let id = r["task_id"].as_str().unwrap();
        // Readable on either node.
        assert_eq!(n2.finished(id)["status"], "SUCCESS");
        assert_eq!(n1.finished(id)["response"]["i"], r["response"]["i"]);
    }
    let log: Vec<i64> = ticks_log(&env).iter().map(|(_, i, _)| *i).collect();
    let mut sorted = log.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..10).collect::<Vec<_>>(),
        "each message ran once: {log:?}"
    );
    // Nothing more arrives: each result was published by one node only.
    // (Absence can only be watched for a while: two seconds, many times a round trip.)
    let settled = got.len();
    let quiet = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet && results.json().len() == settled {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(results.json().len(), settled, "{:#?}", results.json());
}
