//! Scheduled ticks against the real binary: `every` and cron-with-seconds entries create tasks
//! whose source says `SCHEDULE`; a restart never fires a slot twice; after downtime
//! `catch_up = "latest"` fires the latest missed slot once and `"none"` fires none; a full
//! mailbox skips a slot and counts it; scheduled-only agents have no webhook; bad entries stop
//! `tickgate check` naming `schedule[i]`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

const ADMIN: &str = "admin-token-for-tests-0123456789";

/// A runner that appends its whole tick input as one line to `{dir}/<file>` and answers `{}`.
fn recorder(env: &Env, file: &str) {
    env.script(
        &format!("{file}.sh"),
        &format!(
            "line=$(cat)\nprintf '%s\\n' \"$line\" >> '{}'\necho '{{}}'",
            env.path().join(file).display()
        ),
    );
}

/// Every tick input the recorder wrote so far.
fn ticks(env: &Env, file: &str) -> Vec<Value> {
    std::fs::read_to_string(env.path().join(file))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The slot (Unix seconds) of a recorded tick.
fn slot(tick: &Value) -> u64 {
    let at = tick["source"]["scheduled_at"]
        .as_str()
        .expect("scheduled_at");
    humantime::parse_rfc3339(at)
        .expect("RFC 3339")
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Slot → the distinct task ids that ran for it, for one agent's entry. A re-run of the same
/// task after a crash is the same id; two ids for one slot would be a slot fired twice.
fn slots_of(env: &Env, file: &str, agent: &str, expr: &str) -> BTreeMap<u64, BTreeSet<String>> {
    let mut slots: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let ours = |t: &&Value| t["agent"] == agent && t["source"]["schedule"] == expr;
    for t in ticks(env, file).iter().filter(ours) {
        slots
            .entry(slot(t))
            .or_default()
            .insert(t["task_id"].as_str().unwrap().to_string());
    }
    slots
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn assert_each_slot_fired_once(slots: &BTreeMap<u64, BTreeSet<String>>) {
    for (slot, ids) in slots {
        assert_eq!(ids.len(), 1, "slot {slot} fired more than once: {ids:?}");
    }
}

#[test]
fn every_and_cron_entries_fire_scheduled_tasks() {
    let env = Env::new();
    recorder(&env, "ticks");
    env.script("slow.sh", "cat > /dev/null\nsleep 3\necho '{}'");
    let config = r#"
[[agent]]
name = "hooked"
runner = { kind = "echo" }

[[agent]]
name = "sched"
runner = { kind = "command", program = "{dir}/ticks.sh" }
schedule = [
  { every = "2s", inputs = { kind = "every" } },
  { cron = "*/3 * * * * *", timezone = "Europe/Berlin" },
]
[agent.webhook]
enabled = false

[[agent]]
name = "slow"
runner = { kind = "command", program = "{dir}/slow.sh" }
mailbox = 1
schedule = [{ every = "1s" }]
"#;
    let server = env.start_with(config, &[("TICKGATE_ADMIN_TOKEN", ADMIN)]);
    // Only the agents with a webhook get a URL.
    assert!(server.urls.contains_key("default/hooked"));
    assert!(server.urls.contains_key("default/slow"));
    assert!(
        !server.urls.contains_key("default/sched"),
        "{:?}",
        server.urls
    );
    assert!(server.logs().contains("agent default/sched: no webhook"));
    let named = send(client().post(format!(
        "{}/webhooks/default/sched/{}",
        server.base,
        "x".repeat(43)
    )));
    assert_eq!(named.status, 404, "{}", named.text);

    // Two ticks of each entry.
    let limit = Duration::from_secs(60);
    let enough = wait_for(limit, || {
        let t = ticks(&env, "ticks");
        let count = |expr: &str| t.iter().filter(|t| t["source"]["schedule"] == expr).count();
        count("2s") >= 2 && count("*/3 * * * * *") >= 2
    });
    assert!(enough, "ticks so far: {:?}", ticks(&env, "ticks"));
    let all = ticks(&env, "ticks");
    for t in &all {
        assert_eq!(t["source"]["method"], "SCHEDULE", "{t}");
        assert_eq!(t["title"], "Scheduled tick — default/sched");
        match t["source"]["schedule"].as_str().unwrap() {
            "2s" => {
                assert_eq!(t["inputs"], serde_json::json!({"kind": "every"}));
                assert_eq!(slot(t) % 2, 0, "every slots are aligned to the epoch: {t}");
            }
            "*/3 * * * * *" => {
                assert_eq!(t["inputs"], serde_json::json!({}));
                assert_eq!(slot(t) % 3, 0, "{t}");
            }
            other => panic!("unexpected schedule {other}"),
        }
    }
    assert_each_slot_fired_once(&slots_of(&env, "ticks", "default/sched", "2s"));
    assert_each_slot_fired_once(&slots_of(&env, "ticks", "default/sched", "*/3 * * * * *"));

    // The task record shows the source without headers or addresses.
    let id = all[0]["task_id"].as_str().unwrap();
    let task = server.finished(id);
    let source = task["source"].as_object().unwrap();
    assert_eq!(source.len(), 3, "{task}");
    assert_eq!(source["method"], "SCHEDULE");
    assert_eq!(source["event"], Value::Null);
    assert_eq!(source["schedule"], all[0]["source"]["schedule"]);

    // Webhook tasks show their source the same way, with no schedule.
    let posted = post_json(
        &format!("{}?wait=30", server.url("default/hooked")),
        &serde_json::json!({"x": 1}),
    );
    assert_eq!(posted.status, 200, "{}", posted.text);
    assert_eq!(
        posted.json["source"],
        serde_json::json!({"method": "POST", "event": null, "schedule": null})
    );

    // /admin/agents lists the entries with their next slot.
    let list = send(
        client()
            .get(format!("{}/admin/agents", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(list.status, 200);
    let agents = list.json["agents"].as_array().unwrap();
    let sched = agents.iter().find(|a| a["id"] == "default/sched").unwrap();
    let schedules = sched["schedules"].as_array().unwrap();
    assert_eq!(schedules.len(), 2, "{sched}");
    assert_eq!(schedules[0]["expression"], "2s");
    assert_eq!(schedules[1]["expression"], "*/3 * * * * *");
    for s in schedules {
        let next = humantime::parse_rfc3339(s["next_at"].as_str().unwrap()).unwrap();
        assert!(next > SystemTime::now() - Duration::from_secs(5), "{s}");
    }
    // A scheduled-only agent has no token to rotate, through the API or the CLI.
    let rotate = send(
        client()
            .post(format!("{}/admin/agents/default/sched/token", server.base))
            .bearer_auth(ADMIN),
    );
    assert_eq!(rotate.status, 409, "{}", rotate.text);
    assert_eq!(rotate.error_code(), "conflict");
    let config_path = env.path().join("tickgate.toml");
    let cli = env.run(
        &[
            "token",
            "rotate",
            "default/sched",
            "--config",
            config_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("no webhook"));
    let hooked = agents.iter().find(|a| a["id"] == "default/hooked").unwrap();
    assert_eq!(hooked["schedules"], serde_json::json!([]));

    // A slot that finds the mailbox full (one slow tick running, mailbox 1) is skipped and counted.
    let counted = wait_for(limit, || {
        server.get("/metrics").text.contains(
            r#"tickgate_schedule_skipped_total{agent="default/slow",reason="mailbox_full"}"#,
        )
    });
    assert!(counted, "{}", server.get("/metrics").text);
    assert!(server.logs().contains("schedule slot skipped"));
}

/// Waits (without a server) until at least `slots` slots of `period` seconds passed after
/// `after`, and the clock is just past a slot boundary, so that the next start happens well
/// before the following slot.
fn wait_out_downtime(after: u64, period: u64, slots: u64) -> u64 {
    let period_ms = period * 1000;
    let ok = wait_for(Duration::from_secs(period * (slots + 3)), || {
        let now = now_ms();
        now / 1000 > after + period * slots && now % period_ms >= 100 && now % period_ms < 800
    });
    assert!(ok, "the clock did not move on");
    now_ms() / 1000
}

#[test]
fn restarts_never_fire_a_slot_twice_and_catch_up_as_configured() {
    let env = Env::new();
    recorder(&env, "ticks");
    let config = r#"
[[agent]]
name = "latest"
runner = { kind = "command", program = "{dir}/ticks.sh" }
schedule = [{ every = "4s" }]
[agent.webhook]
enabled = false

[[agent]]
name = "skip"
runner = { kind = "command", program = "{dir}/ticks.sh" }
schedule = [{ every = "4s" }]
catch_up = "none"
[agent.webhook]
enabled = false
"#;
    let store = env.path().join("store");
    let config_path = env.write_config(config);
    let limit = Duration::from_secs(60);
    let fired = |agent: &str| slots_of(&env, "ticks", agent, "4s");

    // First run: a couple of on-time slots for both agents, then SIGKILL (no goodbye).
    let first = Server::start(&config_path, &store, &[]);
    assert!(wait_for(limit, || fired("default/latest").len() >= 2
        && fired("default/skip").len() >= 2));
    first.kill();
    let last_latest = *fired("default/latest").keys().last().unwrap();
    let last_skip = *fired("default/skip").keys().last().unwrap();

    // Downtime over several slots; restart just after a slot boundary.
    let restart = wait_out_downtime(last_latest.max(last_skip), 4, 3);
    let second = Server::start(&config_path, &store, &[]);
    // Normally the same as `restart`; if the start crossed a slot boundary, that slot was
    // already due at the scheduler's first look, so it is the one caught up.
    let restart = restart.max(now_ms() / 1000);
    let missed_latest = restart / 4 * 4;
    // Wait for an on-time slot after the restart for both agents.
    assert!(wait_for(limit, || {
        fired("default/latest").keys().any(|s| *s > restart)
            && fired("default/skip").keys().any(|s| *s > restart)
    }));
    second.terminate();

    // No slot fired twice, across the kill and the restart.
    let latest = fired("default/latest");
    let skip = fired("default/skip");
    assert_each_slot_fired_once(&latest);
    assert_each_slot_fired_once(&skip);

    // "latest": of the slots missed while down, exactly one fired: the most recent.
    let caught_up: Vec<u64> = latest
        .keys()
        .copied()
        .filter(|s| *s > last_latest && *s <= restart)
        .collect();
    assert!(
        missed_latest >= last_latest + 8,
        "several slots were missed"
    );
    assert_eq!(caught_up, vec![missed_latest], "fired: {latest:?}");

    // "none": nothing missed fired.
    let caught_up: Vec<u64> = skip
        .keys()
        .copied()
        .filter(|s| *s > last_skip && *s <= restart)
        .collect();
    assert!(caught_up.is_empty(), "fired: {skip:?}");

    // Every tick after the restart is a scheduled one with the entry's expression.
    for t in ticks(&env, "ticks") {
        assert_eq!(t["source"]["method"], "SCHEDULE");
        assert_eq!(t["source"]["schedule"], "4s");
    }
}

#[test]
fn bad_entries_stop_check_naming_the_entry() {
    let env = Env::new();
    for (entry, needle) in [
        (r#"{ cron = "0 25 * * *" }"#, "cron"),
        (
            r#"{ cron = "0 9 * * 1-5", timezone = "Europe/Atlantis" }"#,
            "timezone",
        ),
        (r#"{ every = "sometimes" }"#, "every"),
    ] {
        let config = format!(
            "[[agent]]\nname = \"digest\"\nrunner = {{ kind = \"echo\" }}\nschedule = [{{ every = \"5m\" }}, {entry}]\n"
        );
        let path = env.write_config(&config);
        let out = env.run(&["check", "--config", path.to_str().unwrap()], &[]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{entry} was accepted: {text}");
        assert!(
            text.contains("default/digest")
                && text.contains("schedule[1]")
                && text.contains(needle),
            "{text}"
        );
    }
    let good = env.write_config(
        "[[agent]]\nname = \"digest\"\nrunner = { kind = \"echo\" }\nschedule = [{ cron = \"0 9 * * 1-5\", timezone = \"Europe/Berlin\" }, { every = \"5m\" }]\n[agent.webhook]\nenabled = false\n",
    );
    let out = env.run(&["check", "--config", good.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
