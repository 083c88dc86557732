//! Ticks that wait for input (SPEC section 8): a tick may park its task as `AWAITING_INPUT`
//! (its output's `await`, or a non-empty `pending_approvals` for an agent with
//! `approvals = "await"`), someone answers with `POST /tasks/{id}/resume`, and a continuation
//! tick of the same task runs with the question and the answer in its input.
//!
//! The pieces live here so that the agent and the store only call them:
//! - [`parking`] decides from a tick's output whether (and how long) the task parks;
//! - [`park`] / [`resume`] / [`expire`] are the state transitions, applied by the store writer
//!   inside the batch that also moves the queue entry and the expiry timer;
//! - [`spawn_expiry`] is the timer driver: the timers are durable index records (one per parked
//!   task, keyed by its expiry time), so the driver simply asks the store for the ones that are
//!   due; nothing is kept in memory and a restart loses nothing.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::events::TaskEvents;
use crate::model::{now_ms, Awaiting, Resume, Task, TaskId, TaskStatus, TickOutput};
use crate::store::{write_async, Store, Write, Written};

/// How long a parked task waits when its `await` names no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The error a task gets when nobody answered in time.
pub const TIMED_OUT: &str = "awaiting input timed out";

/// How often the expiry driver looks for due timers. Expiry is therefore up to this late,
/// which is far below any sensible await timeout.
const EXPIRY_POLL: Duration = Duration::from_millis(500);

/// Most due timers one poll handles, so that a large backlog (after a long downtime) is worked
/// off in bounded steps instead of one huge read.
const EXPIRY_BATCH: usize = 256;

/// What an agent does with `pending_approvals` in a tick's output (`approvals` in its config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approvals {
    /// Passed through to the caller in `result`; the task succeeds (the default).
    #[default]
    Pass,
    /// A non-empty list parks the task like an `await` with the default timeout.
    Await,
}

/// Whether a tick's output parks its task: `None` when it does not, else the request to show
/// and how long to wait, or an error (an unreadable `await.timeout`) that fails the tick.
pub fn parking(
    out: &TickOutput,
    approvals: Approvals,
) -> Option<Result<(Value, Duration), String>> {
    if let Some(wait) = &out.await_input {
        let timeout = match wait.timeout.as_deref() {
            None => DEFAULT_TIMEOUT,
            Some(raw) => match humantime::parse_duration(raw) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => return Some(Err("await.timeout must be more than zero".into())),
                Err(e) => {
                    return Some(Err(format!(
                        "await.timeout {raw:?} is not a duration (like \"90s\" or \"1h\"): {e}"
                    )))
                }
            },
        };
        return Some(Ok((wait.request.clone(), timeout)));
    }
    match (&out.pending_approvals, approvals) {
        (Some(list), Approvals::Await) if !list.is_empty() => {
            Some(Ok((json!({ "pending_approvals": list }), DEFAULT_TIMEOUT)))
        }
        _ => None,
    }
}

/// Parks `task` (whose tick just ended, at `now` ms) until an answer comes or `timeout` runs out.
/// The answer it was resumed with, if any, has been used and goes.
pub fn park(task: &mut Task, request: Value, timeout: Duration, now: u64) {
    task.status = TaskStatus::AwaitingInput;
    task.finished_at = None;
    task.resume = None;
    task.awaiting = Some(Awaiting {
        request,
        since: now,
        expires_at: now.saturating_add(timeout.as_millis() as u64),
    });
}

/// Whether a task about to tick is the continuation of a resumed task: it keeps its `attempt`.
/// A continuation interrupted by a crash is STARTED on disk, and counts as a new attempt.
pub fn is_continuation(task: &Task) -> bool {
    task.status == TaskStatus::Pending && task.resume.is_some()
}

/// The answer to a parked task: it becomes PENDING with `resume` set for its continuation.
/// `None` (nothing changes) when the task is not awaiting input.
pub fn resume(task: &Task, response: Value) -> Option<Task> {
    let awaiting = task.awaiting.as_ref()?;
    if task.status != TaskStatus::AwaitingInput {
        return None;
    }
    let mut next = task.clone();
    next.status = TaskStatus::Pending;
    next.resume = Some(Resume {
        request: awaiting.request.clone(),
        response,
    });
    next.awaiting = None;
    Some(next)
}

/// The timer for a task parked until `expires_at` fired at `now`: FAILURE, unless the task is no
/// longer parked on that same timer (answered, cancelled, parked again), then `None`.
pub fn expire(task: &Task, expires_at: u64, now: u64) -> Option<Task> {
    let parked_on_it = task.status == TaskStatus::AwaitingInput
        && task.awaiting.as_ref().map(|a| a.expires_at) == Some(expires_at);
    if !parked_on_it {
        return None;
    }
    let mut failed = task.clone();
    failed.status = TaskStatus::Failure;
    failed.error = Some(TIMED_OUT.into());
    failed.finished_at = Some(now);
    failed.awaiting = None;
    failed.resume = None;
    Some(failed)
}

/// Starts the expiry driver on the current actix/tokio runtime. Every [`EXPIRY_POLL`] it reads
/// the due timers from the store and fails each task still parked on its timer; a failure is
/// announced through `events` once it is durable. Timers written before a restart are simply
/// found due by the next poll.
pub fn spawn_expiry(store: Arc<dyn Store>, events: Arc<TaskEvents>) {
    actix::spawn(async move {
        let mut poll = tokio::time::interval(EXPIRY_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            poll.tick().await;
            let due = match store.due_awaits(now_ms(), EXPIRY_BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read await timers; retrying");
                    continue;
                }
            };
            for (expires_at, id) in due {
                expire_one(store.as_ref(), &events, id, expires_at).await;
            }
        }
    });
}

async fn expire_one(store: &dyn Store, events: &TaskEvents, id: TaskId, expires_at: u64) {
    match write_async(store, Write::Expire { id, expires_at }).await {
        Ok(Written::Updated(task)) => {
            tracing::info!(task_id = %id, "awaiting input timed out");
            events.publish(&task);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(task_id = %id, error = %e, "could not expire an awaiting task; retrying")
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{AwaitRequest, Source};

    fn task() -> Task {
        Task::new("a".parse().unwrap(), json!({}), Source::default())
    }

    #[test]
    fn await_parks_with_its_timeout_or_a_day() {
        let mut out = TickOutput {
            await_input: Some(AwaitRequest {
                request: json!({"q": 1}),
                timeout: Some("2s".into()),
            }),
            ..Default::default()
        };
        assert_eq!(
            parking(&out, Approvals::Pass),
            Some(Ok((json!({"q": 1}), Duration::from_secs(2))))
        );
        out.await_input.as_mut().unwrap().timeout = None;
        assert_eq!(
            parking(&out, Approvals::Pass),
            Some(Ok((json!({"q": 1}), DEFAULT_TIMEOUT)))
        );
        out.await_input.as_mut().unwrap().timeout = Some("soon".into());
        assert!(matches!(parking(&out, Approvals::Pass), Some(Err(_))));
    }

    #[test]
    fn approvals_park_only_when_configured_and_non_empty() {
        let out = TickOutput {
            pending_approvals: Some(vec![json!("deploy")]),
            ..Default::default()
        };
        assert_eq!(parking(&out, Approvals::Pass), None);
        assert_eq!(
            parking(&out, Approvals::Await),
            Some(Ok((
                json!({"pending_approvals": ["deploy"]}),
                DEFAULT_TIMEOUT
            )))
        );
        let empty = TickOutput {
            pending_approvals: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(parking(&empty, Approvals::Await), None);
    }

    /// A transition the model allows, applied to the task.
    #[derive(Debug, Clone)]
    enum Op {
        Park(u64),
        Resume(u8),
        Expire(bool),
        Finish,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..10_000).prop_map(Op::Park),
            any::<u8>().prop_map(Op::Resume),
            any::<bool>().prop_map(Op::Expire),
            Just(Op::Finish),
        ]
    }

    proptest! {
        /// Whatever order parks, answers, expiries and finishes come in: an answer is taken
        /// exactly once per parking, only a parked task's own timer expires it, a resumed task
        /// carries the question it parked with, and `awaiting` is set exactly while parked.
        #[test]
        fn the_await_state_machine_holds(ops in prop::collection::vec(op(), 1..40)) {
            let mut t = task();
            let mut now = 1_000u64;
            for op in ops {
                now += 1;
                match op {
                    Op::Park(ms) => {
                        if t.status.is_terminal() || t.status == TaskStatus::AwaitingInput { continue; }
                        park(&mut t, json!({"n": ms}), Duration::from_millis(ms), now);
                        prop_assert!(t.resume.is_none());
                    }
                    Op::Resume(n) => {
                        let before = t.clone();
                        match resume(&t, json!(n)) {
                            Some(next) => {
                                prop_assert_eq!(before.status, TaskStatus::AwaitingInput);
                                let r = next.resume.clone().unwrap();
                                prop_assert_eq!(&r.request, &before.awaiting.unwrap().request);
                                prop_assert!(is_continuation(&next));
                                t = next;
                                prop_assert!(resume(&t, json!(0)).is_none(), "a second answer is refused");
                            }
                            None => prop_assert!(before.status != TaskStatus::AwaitingInput),
                        }
                    }
                    Op::Expire(own) => {
                        let at = t.awaiting.as_ref().map(|a| a.expires_at).unwrap_or(7);
                        let at = if own { at } else { at + 1 };
                        match expire(&t, at, now) {
                            Some(next) => {
                                prop_assert!(own);
                                prop_assert_eq!(next.status, TaskStatus::Failure);
                                prop_assert_eq!(next.error.as_deref(), Some(TIMED_OUT));
                                t = next;
                            }
                            None => prop_assert!(!own || t.status != TaskStatus::AwaitingInput),
                        }
                    }
                    Op::Finish => {
                        if t.status == TaskStatus::Pending {
                            t.status = TaskStatus::Success;
                            t.resume = None;
                        }
                    }
                }
                prop_assert_eq!(t.awaiting.is_some(), t.status == TaskStatus::AwaitingInput);
            }
        }
    }
}
