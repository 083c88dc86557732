//! Scheduled ticks: one task per schedule entry sleeps until the entry's next slot, fires it
//! through [`fire_slot`], and moves the entry's durable cursor on.
//!
//! Firing is a submission with the slot's idempotency key (`schedule:<index>:<slot>`), and the
//! cursor is advanced only after the submission is answered. A crash between the two leaves the
//! cursor behind, so the slot is due again at the next start; resubmitting it answers
//! "duplicate", which counts as already fired. That is why the two writes need not share a batch:
//! a slot never makes two tasks, and a slot whose task was not stored is not lost (with
//! `catch_up = "latest"`). Slot times are wall-clock Unix seconds; the pure rules are in
//! `tickgate_actors::schedule`.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tickgate_actors::agent::AgentHandle;
use tickgate_actors::intake::{Accepted, Intake, Refused};
use tickgate_actors::model::{now_ms, rfc3339, Source, Task, TaskId};
use tickgate_actors::schedule::{idempotency_key, plan, CatchUp, Entry};
use tickgate_actors::store::{
    write_async, IdempotencyKey, ScheduleCursor, ScheduleKey, Store, Write,
};

use crate::metrics::Metrics;

/// How long a scheduler waits before retrying a store read or write that failed.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// Longest single sleep: a sleeping scheduler looks up at least this often, so a shutdown or a
/// wall-clock step is noticed soon.
const MAX_NAP: Duration = Duration::from_secs(1);

/// What the schedulers share with the rest of the service.
#[derive(Clone)]
pub struct SchedulerDeps {
    /// Cursor reads and writes.
    pub store: Arc<dyn Store>,
    /// The one accept path: breaker admission, mailbox slot, idempotency, durable submit.
    pub intake: Arc<Intake>,
    /// `tickgate_schedule_skipped_total`.
    pub metrics: Arc<Metrics>,
}

/// What became of one slot.
#[derive(Debug)]
pub enum Fired {
    /// A task was created for the slot.
    Task(TaskId),
    /// The slot's idempotency key was used before: it already fired (possibly before a crash).
    Already(TaskId),
    /// No task was created; `reason` is the metric label.
    Skipped {
        /// `mailbox_full`, `breaker_open` or `store`.
        reason: &'static str,
        /// Words for the log.
        detail: String,
    },
    /// The service is draining; the slot stays due for the next start.
    ShuttingDown,
}

/// Fires one slot of one entry: the single place where a schedule becomes a task, through the
/// same intake as every other trigger source.
pub async fn fire_slot(
    deps: &SchedulerDeps,
    agent: &AgentHandle,
    index: usize,
    entry: &Entry,
    slot: u64,
) -> Fired {
    let id = &agent.spec.id;
    let source = Source {
        method: "SCHEDULE".into(),
        schedule: Some(entry.expression.clone()),
        scheduled_at: Some(rfc3339(slot * 1000)),
        ..Source::default()
    };
    let mut task = Task::new(id.clone(), entry.inputs.clone(), source);
    task.title = Some(format!("Scheduled tick — {id}"));
    let mut digest = Sha256::new();
    digest.update(entry.fingerprint().as_bytes());
    digest.update([0]);
    digest.update(entry.inputs.to_string().as_bytes());
    let idempotency = IdempotencyKey {
        key: idempotency_key(index, slot),
        body_sha256: digest.finalize().into(),
    };
    match deps.intake.accept_id(task, Some(idempotency)).await {
        Ok(Accepted::New(id)) => Fired::Task(id),
        Ok(Accepted::Duplicate(id)) => Fired::Already(id),
        // A conflict means an earlier version of this entry (same index) fired this very slot.
        Err(Refused::Conflict(id)) => Fired::Already(id),
        Err(Refused::ShuttingDown) => Fired::ShuttingDown,
        Err(Refused::BreakerOpen { retry_after }) => Fired::Skipped {
            reason: "breaker_open",
            detail: format!(
                "the breaker is open for another {}s",
                retry_after.as_secs_f64().ceil()
            ),
        },
        Err(Refused::MailboxFull) => Fired::Skipped {
            reason: "mailbox_full",
            detail: "the agent's mailbox is full".into(),
        },
        Err(e @ (Refused::StoreUnavailable(_) | Refused::UnknownAgent(_))) => Fired::Skipped {
            reason: "store",
            detail: e.to_string(),
        },
    }
}

/// Starts one scheduler per entry of `agent` on the current runtime. They stop when the
/// service drains.
pub fn start(deps: SchedulerDeps, agent: AgentHandle, entries: Vec<Entry>, catch_up: CatchUp) {
    for (index, entry) in entries.into_iter().enumerate() {
        let deps = deps.clone();
        let agent = agent.clone();
        actix_rt::spawn(async move { run_entry(deps, agent, index, entry, catch_up).await });
    }
}

async fn run_entry(
    deps: SchedulerDeps,
    agent: AgentHandle,
    index: usize,
    entry: Entry,
    catch_up: CatchUp,
) {
    let name = agent.spec.id.to_string();
    let key = ScheduleKey {
        agent: agent.spec.id.clone(),
        index,
        fingerprint: entry.fingerprint(),
    };
    let Some(mut cursor) = load_cursor(&deps, &key).await else {
        return;
    };
    // Only the first look after start-up sees slots missed while no server ran; later lateness
    // (a loaded machine) always fires the latest due slot.
    let mut mode = catch_up;
    loop {
        if deps.intake.is_draining() {
            return;
        }
        let now = now_ms() / 1000;
        let plan = plan(&entry, cursor.considered, now, mode);
        mode = CatchUp::Latest;
        if plan.passed_over {
            tracing::info!(agent = %name, schedule = %entry.expression, fired = ?plan.fire, "missed slots passed over");
            if plan.fire.is_none() {
                deps.metrics.schedule_skipped(&name, "missed");
            }
        }
        if let Some(slot) = plan.fire {
            match fire_slot(&deps, &agent, index, &entry, slot).await {
                Fired::Task(id) => {
                    tracing::info!(agent = %name, schedule = %entry.expression, slot, task_id = %id, "scheduled tick queued")
                }
                Fired::Already(id) => {
                    tracing::info!(agent = %name, schedule = %entry.expression, slot, task_id = %id, "slot had already fired")
                }
                Fired::Skipped { reason, detail } => {
                    tracing::warn!(agent = %name, schedule = %entry.expression, slot, reason, "schedule slot skipped: {detail}");
                    deps.metrics.schedule_skipped(&name, reason);
                }
                Fired::ShuttingDown => return,
            }
        }
        if plan.considered != cursor.considered {
            cursor.considered = plan.considered;
            let write = Write::SetScheduleCursor {
                key: key.clone(),
                cursor,
            };
            if let Err(e) = write_async(deps.store.as_ref(), write).await {
                // The slot's idempotency key still keeps it from firing twice.
                tracing::warn!(agent = %name, schedule = %entry.expression, error = %e, "schedule cursor not stored");
            }
        }
        let Some(next) = plan.next else {
            tracing::info!(agent = %name, schedule = %entry.expression, "schedule has no further slot");
            return;
        };
        sleep_until(next, &deps.intake).await;
    }
}

/// Reads the entry's cursor, or records now as the moment it was first seen. Retries store
/// failures until it succeeds or the service drains (`None`).
async fn load_cursor(deps: &SchedulerDeps, key: &ScheduleKey) -> Option<ScheduleCursor> {
    loop {
        if deps.intake.is_draining() {
            return None;
        }
        let read = deps.store.schedule_cursor(key).await;
        let result = match read {
            Ok(Some(cursor)) => return Some(cursor),
            Ok(None) => {
                let now = now_ms() / 1000;
                let cursor = ScheduleCursor {
                    first_seen: now,
                    considered: now,
                };
                let write = Write::SetScheduleCursor {
                    key: key.clone(),
                    cursor,
                };
                write_async(deps.store.as_ref(), write)
                    .await
                    .map(|_| cursor)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(cursor) => return Some(cursor),
            Err(e) => {
                tracing::warn!(agent = %key.agent, index = key.index, error = %e, "cannot read schedule cursor; retrying");
                tokio::time::sleep(STORE_RETRY).await;
            }
        }
    }
}

/// Sleeps until the wall clock reaches `slot` (Unix seconds) or the service drains.
async fn sleep_until(slot: u64, intake: &Intake) {
    let target = slot.saturating_mul(1000);
    loop {
        let now = now_ms();
        if now >= target || intake.is_draining() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(target - now).min(MAX_NAP)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::Actor;
    use tickgate_actors::agent::{self, AgentDeps, AgentSpec, Lifecycle};
    use tickgate_actors::breaker::{BreakerActor, BreakerPolicy};
    use tickgate_actors::events::TaskEvents;
    use tickgate_actors::runner::RunnerSpec;
    use tickgate_actors::store::sled::SledStore;
    use tickgate_actors::store::AgentState;

    #[actix_rt::test]
    async fn a_slot_fires_once_and_open_breakers_and_draining_fire_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = SledStore::open(dir.path()).unwrap();
        let id: tickgate_actors::model::AgentId = "sched".parse().unwrap();
        let breaker = BreakerActor::new(vec![(
            id.clone(),
            BreakerPolicy {
                failures: 5,
                open_for: Duration::from_secs(30),
            },
        )]);
        let closed_breakers = breaker.closed();
        let breaker = breaker.start();
        let lifecycle = Arc::new(Lifecycle::default());
        let handle = agent::start(
            AgentSpec {
                id: id.clone(),
                runner: RunnerSpec::Echo,
                tick_timeout: Duration::from_secs(10),
                mailbox: 8,
                env: Default::default(),
                allow_env: Default::default(),
                retry: Default::default(),
                approvals: Default::default(),
            },
            AgentState::default(),
            AgentDeps {
                store: store.clone(),
                events: Arc::new(TaskEvents::default()),
                outcomes: vec![],
                lifecycle: lifecycle.clone(),
            },
            &actix::Arbiter::current(),
        );
        let intake = Arc::new(Intake::new(
            [handle.clone()],
            breaker.clone(),
            closed_breakers,
            lifecycle.clone(),
            store.clone(),
        ));
        let deps = SchedulerDeps {
            store: store.clone(),
            intake,
            metrics: Arc::new(Metrics::new()),
        };
        let entry = Entry::every("2s", serde_json::json!({"k": 1})).unwrap();

        let Fired::Task(first) = fire_slot(&deps, &handle, 0, &entry, 1_000).await else {
            panic!("the slot did not fire");
        };
        let task = store.task(first).await.unwrap().unwrap();
        assert_eq!(task.source.method, "SCHEDULE");
        assert_eq!(task.source.schedule.as_deref(), Some("2s"));
        assert_eq!(task.idempotency_key.as_deref(), Some("schedule:0:1000"));
        assert_eq!(task.inputs, serde_json::json!({"k": 1}));
        // The same slot again (a cursor advance lost in a crash): already fired, no new task.
        match fire_slot(&deps, &handle, 0, &entry, 1_000).await {
            Fired::Already(again) => assert_eq!(again, first),
            other => panic!("fired twice: {other:?}"),
        }
        // An edited entry at the same index meeting the same slot: also already fired.
        let edited = Entry::every("4s", serde_json::json!({})).unwrap();
        assert!(matches!(
            fire_slot(&deps, &handle, 0, &edited, 1_000).await,
            Fired::Already(_)
        ));
        assert!(matches!(
            fire_slot(&deps, &handle, 1, &entry, 1_000).await,
            Fired::Task(_)
        ));
        // An open breaker skips the slot.
        for _ in 0..5 {
            breaker
                .send(agent::TickOutcome {
                    agent: id.clone(),
                    task_id: first,
                    success: false,
                    duration: Duration::ZERO,
                })
                .await
                .unwrap();
        }
        match fire_slot(&deps, &handle, 0, &entry, 1_004).await {
            Fired::Skipped { reason, .. } => assert_eq!(reason, "breaker_open"),
            other => panic!("fired through an open breaker: {other:?}"),
        }
        lifecycle.drain();
        assert!(matches!(
            fire_slot(&deps, &handle, 0, &entry, 1_002).await,
            Fired::ShuttingDown
        ));
    }
}
