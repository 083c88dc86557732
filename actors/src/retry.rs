//! Retries (SPEC section 8): a failed attempt with schedule left parks its task in `RETRY` behind
//! a durable timer instead of failing it.
//!
//! - **Attempts.** Every attempt gets an entry on the task when it starts ([`begin_attempt`]) and
//!   is closed when it ends ([`settle`]); the entry rides on whichever write records the start
//!   (or, for runners that record no start, the completion).
//! - **Deciding.** [`settle`] turns a failure into `RETRY` with `next_attempt_at` while the
//!   agent's [`RetryPolicy::schedule`] has delays left; the agent then writes [`Write::Retry`]
//!   (task record, queue removal, timer, memory and tick counter in one batch) and frees the
//!   task's mailbox slot: a waiting retry holds none.
//! - **Timers.** The [`RetryDriver`] actor owns the in-memory side of the timers. At a due time it
//!   asks the breaker (a retry never runs into an open breaker; it waits for the half-open trial
//!   and may be it), then writes [`Write::RetryDue`], which re-checks on the writer thread that
//!   the task is still waiting for this timer (a cancel needs to know nothing about timers),
//!   makes it `PENDING` and puts it back in the queue. The task goes to its agent with a forced
//!   slot (it was accepted already). Timers are loaded from the store at start, so they survive
//!   `kill -9`; an overdue one fires at once.
//! - **Order.** With `order = "block"` the agent holds later tasks in a local [`Gate`] while one
//!   of its tasks waits for a retry, and lets them through, in order, once that task succeeds or
//!   runs out of attempts. The actor never sleeps: held tasks are just kept, with their slots.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::prelude::*;
use serde::Deserialize;

use crate::agent::{Agent, AgentHandle, Lifecycle, MailboxSlot};
use crate::breaker::{Admission, Admit, BreakerActor, ClosedBreakers, TrialAbandoned};
use crate::events::TaskEvents;
use crate::model::{now_ms, AgentId, Attempt, Task, TaskId, TaskStatus};
use crate::store::{write_async, RetryTimer, Store, Write, Written};

/// What a retry may wait for at most when the store refuses the requeue; it is tried again then.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Whether later tasks run while one waits for its retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryOrder {
    /// Later tasks run meanwhile; the retry queues behind whatever is queued when it comes due.
    #[default]
    Requeue,
    /// The agent's queue is held until the retried task succeeds or runs out of attempts, for
    /// senders that need strict order.
    Block,
}

/// An agent's retry rules. The default (no delays) is no retry: a failed tick fails its task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before each retry: `n` delays allow `n + 1` attempts.
    pub schedule: Vec<Duration>,
    /// What later tasks do meanwhile.
    pub order: RetryOrder,
}

/// Opens the attempt entry of a tick that is starting (after `attempt`, `started_at` are set).
/// An entry left open by a crash is closed as interrupted: it never finished, and it does not
/// count as a failure for the schedule.
pub(crate) fn begin_attempt(task: &mut Task) {
    for open in task.attempts.iter_mut().filter(|a| a.finished_at.is_none()) {
        open.error
            .get_or_insert_with(|| "interrupted: the server stopped during this attempt".into());
    }
    task.error = None;
    task.attempts.push(Attempt {
        attempt: task.attempt,
        started_at: task.started_at.unwrap_or_else(now_ms),
        finished_at: None,
        error: None,
    });
}

/// Reopens the attempt of a continuation tick (a task answered after it parked): the answer
/// continues the same attempt, so its entry is open again rather than a new one added.
pub(crate) fn reopen_attempt(task: &mut Task) {
    let current = task.attempt;
    match task
        .attempts
        .iter_mut()
        .rev()
        .find(|a| a.attempt == current)
    {
        Some(entry) => entry.finished_at = None,
        None => begin_attempt(task),
    }
}

/// Attempts that ran to a failure; a crash-interrupted one is not counted.
fn failed_attempts(task: &Task) -> usize {
    task.attempts
        .iter()
        .filter(|a| a.finished_at.is_some() && a.error.is_some())
        .count()
}

/// The delay before the next attempt of a task that has failed `failed` times, if any is left.
pub fn next_delay(policy: &RetryPolicy, failed: usize) -> Option<Duration> {
    failed
        .checked_sub(1)
        .and_then(|i| policy.schedule.get(i))
        .copied()
}

/// Closes the current attempt of a finished tick (its status, `finished_at` and `error` set) and
/// applies the policy: a `FAILURE` with delays left becomes `RETRY` with `next_attempt_at`.
pub(crate) fn settle(policy: &RetryPolicy, task: &mut Task) {
    let finished = task.finished_at.unwrap_or_else(now_ms);
    let error = match task.status {
        TaskStatus::Failure => task.error.clone(),
        _ => None,
    };
    let current = task.attempt;
    match task
        .attempts
        .iter_mut()
        .rev()
        .find(|a| a.attempt == current && a.finished_at.is_none())
    {
        Some(open) => {
            open.finished_at = Some(finished);
            open.error = error;
        }
        None => task.attempts.push(Attempt {
            attempt: current,
            started_at: task.started_at.unwrap_or(finished),
            finished_at: Some(finished),
            error,
        }),
    }
    if task.status != TaskStatus::Failure {
        return;
    }
    if let Some(delay) = next_delay(policy, failed_attempts(task)) {
        task.status = TaskStatus::Retry;
        task.next_attempt_at = Some(finished.saturating_add(delay.as_millis() as u64));
    }
}

/// The timer a `RETRY` task needs.
pub(crate) fn timer_of(task: &Task) -> Option<RetryTimer> {
    (task.status == TaskStatus::Retry).then(|| RetryTimer {
        due_ms: task.next_attempt_at.unwrap_or_else(now_ms),
        task: task.id,
        agent: task.agent.clone(),
    })
}

/// What an agent shares with the retry driver: where to hand new timers, and how many retries it
/// scheduled (the `tickgate_task_retries_total` metric).
#[derive(Debug, Default)]
pub struct RetryLink {
    driver: OnceLock<Addr<RetryDriver>>,
    retries: AtomicU64,
}

impl RetryLink {
    /// Retries scheduled by the agent since start.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Hands a durable timer to the driver. Without a driver (in-process uses that start none)
    /// the timer stays on disk and fires after the next start.
    pub(crate) fn scheduled(&self, timer: RetryTimer) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        match self.driver.get() {
            Some(driver) => driver.do_send(Due(timer)),
            None => {
                tracing::warn!(task_id = %timer.task, "no retry driver running; the retry fires after the next start")
            }
        }
    }
}

impl RetryLink {
    /// Arms a timer read from the store after start-up (a node taking an agent over in a
    /// cluster arms the timers its former owner wrote); not counted as a new retry.
    pub fn rearm(&self, timer: RetryTimer) {
        if let Some(driver) = self.driver.get() {
            driver.do_send(Due(timer));
        }
    }
}

/// A task in an agent's queue, as the agent actor received it.
pub(crate) enum Queued {
    /// The task itself.
    Task(Arc<Task>, MailboxSlot),
    /// A task known by id, read when its turn comes.
    Stored(TaskId, MailboxSlot),
}

/// The agent-local hold for `order = "block"`: which task the queue waits for, and the tasks
/// that arrived meanwhile, in arrival order (each keeps its mailbox slot).
#[derive(Default)]
pub(crate) struct Gate {
    blocked_on: Option<TaskId>,
    held: VecDeque<Queued>,
}

impl Gate {
    /// Lets `queued` through (`Some`) unless the queue is held or earlier tasks are still held,
    /// in which case it is kept, behind them, and `None` is returned.
    pub(crate) fn admit(&mut self, queued: Queued) -> Option<Queued> {
        if self.blocked_on.is_none() && self.held.is_empty() {
            return Some(queued);
        }
        self.held.push_back(queued);
        None
    }

    /// Holds the queue for `task` (a block-ordered agent's task now waits in `RETRY`).
    pub(crate) fn block(&mut self, task: TaskId) {
        self.blocked_on.get_or_insert(task);
    }

    /// Whether the queue is held for `task`, so that its retry must not wait behind held tasks.
    pub(crate) fn is_blocked_on(&self, task: TaskId) -> bool {
        self.blocked_on == Some(task)
    }

    /// Releases the hold if it was for `task`; answers whether held tasks should now be drained.
    pub(crate) fn unblock(&mut self, task: TaskId) -> bool {
        if self.blocked_on == Some(task) {
            self.blocked_on = None;
            return !self.held.is_empty();
        }
        false
    }

    /// The next held task to run, unless the queue is held again.
    fn next(&mut self) -> Option<Queued> {
        if self.blocked_on.is_some() {
            return None;
        }
        self.held.pop_front()
    }
}

/// Runs a task whose retry came due. It skips the [`Gate`] when the queue is held for it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RunRetry(pub(crate) Arc<Task>, pub(crate) MailboxSlot);

/// Holds a block-ordered agent's queue for a task recovered in `RETRY` at start-up; sent before
/// the recovered queue so that no later task overtakes it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Block(pub(crate) TaskId);

/// The task the queue was held for will not be retried (cancelled, or gone): release the hold.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Unblock(pub(crate) TaskId);

/// Runs the next held task; sent by the agent to itself while held tasks remain.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Drain;

impl Handler<RunRetry> for Agent {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, RunRetry(task, slot): RunRetry, _ctx: &mut Self::Context) -> Self::Result {
        let queued = Queued::Task(task.clone(), slot);
        let runnable = if self.gate.is_blocked_on(task.id) {
            Some(queued)
        } else {
            self.gate.admit(queued)
        };
        AtomicResponse::new(match runnable {
            Some(queued) => self.dispatch(queued),
            None => Box::pin(actix::fut::ready(())),
        })
    }
}

impl Handler<Block> for Agent {
    type Result = ();

    fn handle(&mut self, Block(task): Block, _ctx: &mut Self::Context) {
        self.gate.block(task);
    }
}

impl Handler<Unblock> for Agent {
    type Result = ();

    fn handle(&mut self, Unblock(task): Unblock, ctx: &mut Self::Context) {
        if self.gate.unblock(task) {
            ctx.notify(Drain);
        }
    }
}

impl Handler<Drain> for Agent {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) -> Self::Result {
        let Some(next) = self.gate.next() else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        if !self.gate.held.is_empty() {
            // Handled after this tick: the agent runs one message at a time.
            ctx.notify(Drain);
        }
        AtomicResponse::new(self.dispatch(next))
    }
}

/// Start-up: holds a block-ordered agent's queue for its task waiting in `RETRY` (the earliest,
/// if a changed config left several). Call before [`AgentHandle::recover`].
pub fn hold_recovered(handle: &AgentHandle, timers: &[RetryTimer]) {
    if handle.spec.retry.order != RetryOrder::Block {
        return;
    }
    if let Some(first) = timers.iter().find(|t| t.agent == handle.spec.id) {
        handle.addr.do_send(Block(first.task));
    }
}

/// A retry timer handed to the driver.
#[derive(Message)]
#[rtype(result = "()")]
struct Due(RetryTimer);

/// Fires retry timers: waits for the due time and the breaker, requeues the task durably and
/// hands it to its agent.
pub struct RetryDriver {
    agents: HashMap<AgentId, AgentHandle>,
    store: Arc<dyn Store>,
    events: Arc<TaskEvents>,
    breaker: Addr<BreakerActor>,
    closed: Arc<ClosedBreakers>,
    lifecycle: Arc<Lifecycle>,
}

/// Starts the driver for `agents`, links them to it (their new timers come here) and arms the
/// `pending` timers read from the store at start-up; overdue ones fire at once.
pub fn start(
    agents: &[AgentHandle],
    store: Arc<dyn Store>,
    events: Arc<TaskEvents>,
    breaker: Addr<BreakerActor>,
    closed: Arc<ClosedBreakers>,
    lifecycle: Arc<Lifecycle>,
    pending: Vec<RetryTimer>,
) -> Addr<RetryDriver> {
    let driver = RetryDriver {
        agents: agents
            .iter()
            .map(|h| (h.spec.id.clone(), h.clone()))
            .collect(),
        store,
        events,
        breaker,
        closed,
        lifecycle,
    }
    .start();
    for handle in agents {
        let _ = handle.retry.driver.set(driver.clone());
    }
    for timer in pending {
        driver.do_send(Due(timer));
    }
    driver
}

impl Actor for RetryDriver {
    type Context = Context<Self>;
}

impl Handler<Due> for RetryDriver {
    type Result = ();

    fn handle(&mut self, Due(timer): Due, ctx: &mut Self::Context) {
        let wait = Duration::from_millis(timer.due_ms.saturating_sub(now_ms()));
        ctx.run_later(wait, move |driver, ctx| driver.fire(timer, ctx));
    }
}

impl RetryDriver {
    fn fire(&mut self, timer: RetryTimer, ctx: &mut Context<Self>) {
        if self.lifecycle.is_draining() {
            // Still on disk: the next start fires it.
            return;
        }
        let Some(handle) = self.agents.get(&timer.agent).cloned() else {
            tracing::warn!(agent = %timer.agent, task_id = %timer.task, "retry timer for an agent no longer configured; left in the store");
            return;
        };
        let (store, events) = (self.store.clone(), self.events.clone());
        let (breaker, closed) = (self.breaker.clone(), self.closed.clone());
        let me = ctx.address();
        actix::spawn(async move {
            let admission = if closed.is_closed(&timer.agent) {
                Admission::Allowed
            } else {
                breaker
                    .send(Admit(timer.agent.clone()))
                    .await
                    .unwrap_or(Admission::Allowed)
            };
            if let Admission::Refused { retry_after } = admission {
                tracing::info!(task_id = %timer.task, wait_ms = retry_after.as_millis() as u64, "retry due while the breaker is open; waiting for half-open");
                me.do_send(Later(timer, retry_after));
                return;
            }
            let due = Write::RetryDue {
                task: timer.task,
                due_ms: timer.due_ms,
            };
            match write_async(store.as_ref(), due).await {
                Ok(Written::Accepted(task)) => {
                    events.publish(&task);
                    // A store that dispatches itself queued the task for its agent's owner.
                    if !store.dispatches() {
                        handle
                            .addr
                            .do_send(RunRetry(task, handle.mailbox.force_reserve()));
                    }
                }
                Ok(_) => {
                    // Cancelled or otherwise moved on: nothing to run, the hold (if any) goes.
                    if admission == Admission::Trial {
                        breaker.do_send(TrialAbandoned(timer.agent.clone()));
                    }
                    handle.addr.do_send(Unblock(timer.task));
                }
                Err(e) => {
                    if admission == Admission::Trial {
                        breaker.do_send(TrialAbandoned(timer.agent.clone()));
                    }
                    tracing::error!(task_id = %timer.task, error = %e, "could not requeue a retry; trying again");
                    me.do_send(Later(timer, STORE_RETRY));
                }
            }
        });
    }
}

/// Fires a timer again after a wait (breaker open, store failing).
#[derive(Message)]
#[rtype(result = "()")]
struct Later(RetryTimer, Duration);

impl Handler<Later> for RetryDriver {
    type Result = ();

    fn handle(&mut self, Later(timer, wait): Later, ctx: &mut Self::Context) {
        ctx.run_later(wait, move |driver, ctx| driver.fire(timer, ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;
    use proptest::prelude::*;

    fn policy(n: usize) -> RetryPolicy {
        RetryPolicy {
            schedule: (1..=n as u64).map(Duration::from_secs).collect(),
            order: RetryOrder::Requeue,
        }
    }

    fn task() -> Task {
        Task::new(
            "default/a".parse().unwrap(),
            serde_json::json!({}),
            Source::default(),
        )
    }

    /// Runs one attempt of `task` the way the agent does, ending in `ok` or a failure.
    fn attempt(policy: &RetryPolicy, task: &mut Task, ok: bool) {
        task.status = TaskStatus::Started;
        task.attempt += 1;
        task.started_at = Some(now_ms());
        begin_attempt(task);
        task.finished_at = Some(now_ms());
        if ok {
            task.status = TaskStatus::Success;
        } else {
            task.status = TaskStatus::Failure;
            task.error = Some(format!("boom {}", task.attempt));
        }
        settle(policy, task);
    }

    #[test]
    fn no_schedule_means_no_retry() {
        let mut t = task();
        attempt(&RetryPolicy::default(), &mut t, false);
        assert_eq!(t.status, TaskStatus::Failure);
        assert_eq!(t.attempts.len(), 1);
        assert_eq!(t.attempts[0].error.as_deref(), Some("boom 1"));
    }

    #[test]
    fn a_crash_interrupted_attempt_is_closed_and_not_counted() {
        let p = policy(1);
        let mut t = task();
        t.attempt = 1;
        t.started_at = Some(1);
        begin_attempt(&mut t); // the server died here
        attempt(&p, &mut t, false);
        assert_eq!(t.status, TaskStatus::Retry, "{t:?}");
        assert!(t.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("interrupted"));
        assert_eq!(t.attempts[1].attempt, 2);
    }

    proptest! {
        /// However attempts go, `n` delays allow at most `n + 1` attempts, every attempt is
        /// recorded and closed, a failure with delays left is RETRY due after its delay, and the
        /// status after a success is SUCCESS.
        #[test]
        fn schedule_bounds_attempts(n in 0usize..5, outcomes in proptest::collection::vec(any::<bool>(), 1..10)) {
            let p = policy(n);
            let mut t = task();
            for ok in outcomes {
                if t.status.is_terminal() {
                    break;
                }
                attempt(&p, &mut t, ok);
                let failed = failed_attempts(&t);
                prop_assert!(t.attempts.len() <= n + 1);
                prop_assert!(t.attempts.iter().all(|a| a.finished_at.is_some()));
                match t.status {
                    TaskStatus::Success => prop_assert!(t.attempts.last().unwrap().error.is_none()),
                    TaskStatus::Retry => {
                        prop_assert!(failed <= n);
                        let delay = p.schedule[failed - 1].as_millis() as u64;
                        prop_assert_eq!(t.next_attempt_at, Some(t.finished_at.unwrap() + delay));
                    }
                    TaskStatus::Failure => prop_assert_eq!(failed, n + 1),
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn gate_holds_later_tasks_in_order_until_unblocked() {
        let mailbox = Arc::new(crate::agent::Mailbox::new(10));
        let mut g = Gate::default();
        let blocker = TaskId::random();
        assert!(g
            .admit(Queued::Stored(TaskId::random(), mailbox.force_reserve()))
            .is_some());
        g.block(blocker);
        let (a, b) = (TaskId::random(), TaskId::random());
        assert!(g
            .admit(Queued::Stored(a, mailbox.force_reserve()))
            .is_none());
        assert!(g
            .admit(Queued::Stored(b, mailbox.force_reserve()))
            .is_none());
        assert!(g.next().is_none(), "held while blocked");
        assert!(
            !g.unblock(TaskId::random()),
            "another task does not release the hold"
        );
        assert!(g.unblock(blocker));
        let Some(Queued::Stored(first, _)) = g.next() else {
            panic!("first held task")
        };
        assert_eq!(first, a);
        // Still draining: a new arrival queues behind the held ones.
        assert!(g
            .admit(Queued::Stored(TaskId::random(), mailbox.force_reserve()))
            .is_none());
        let Some(Queued::Stored(second, _)) = g.next() else {
            panic!("second held task")
        };
        assert_eq!(second, b);
    }
}
