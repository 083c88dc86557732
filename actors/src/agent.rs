//! One actor per configured agent. Its mailbox *is* the agent's queue: a task reaches it as a
//! [`RunTask`] message (or, for recovered tasks and deep queues, a [`RunStored`] id) only once the
//! task is on disk, and each message is handled atomically, so ticks never overlap and run in the
//! order the store accepted them.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use tracing::Instrument;

use crate::events::TaskEvents;
use crate::model::{now_ms, AgentId, Task, TaskId, TaskStatus, TickInput, TickOutput};
use crate::retry::Queued;
use crate::runner::{Runner, RunnerError, RunnerSpec};
use crate::store::{write_async, AgentState, Store, Write, Written};

/// An agent's configuration, as the actors need it (the config layer builds it from TOML).
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// `namespace/name`.
    pub id: AgentId,
    /// What a tick executes.
    pub runner: RunnerSpec,
    /// A tick running longer fails and its runner is killed.
    pub tick_timeout: Duration,
    /// How many tasks may wait (or run) at once before triggers get 429.
    pub mailbox: usize,
    /// Fixed environment for the runner.
    pub env: BTreeMap<String, String>,
    /// Variable names a caller may set per request.
    pub allow_env: BTreeSet<String>,
    /// Retry delays and order; the default retries nothing.
    pub retry: crate::retry::RetryPolicy,
    /// Whether a non-empty `pending_approvals` parks the task (`approvals = "await"`).
    pub approvals: crate::awaiting::Approvals,
}

/// The bound on an agent's queue. actix's own bounded mailbox gives every `Addr` clone an extra
/// slot, so with one clone per request it would not bound anything; this counter is exact and
/// is reserved *before* anything is stored, so a refused trigger leaves no trace.
#[derive(Debug)]
pub struct Mailbox {
    queued: AtomicUsize,
    capacity: usize,
}

impl Mailbox {
    /// An empty mailbox holding at most `capacity` tasks.
    pub fn new(capacity: usize) -> Self {
        Self {
            queued: AtomicUsize::new(0),
            capacity,
        }
    }

    /// Takes a slot if one is free. The slot is given back when the returned guard drops, so
    /// no path (refusal, failed store, skipped tick, completion) can leak or double-free it.
    pub(crate) fn try_reserve(self: &Arc<Self>) -> Option<MailboxSlot> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.capacity).then_some(q + 1)
            })
            .ok()
            .map(|_| MailboxSlot(self.clone()))
    }

    /// Takes a slot even past capacity: recovered tasks were accepted already and must run.
    pub(crate) fn force_reserve(self: &Arc<Self>) -> MailboxSlot {
        self.queued.fetch_add(1, Ordering::AcqRel);
        MailboxSlot(self.clone())
    }

    /// Tasks waiting or running now; reported by `/ready` and the admin API.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The configured bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// One task's place in an agent's [`Mailbox`]. It travels with the task (inside [`RunTask`] or
/// [`RunStored`], then into the completion write) and frees the place when dropped, which is
/// once the task's completion is durable, or as soon as the task is refused or skipped.
#[derive(Debug)]
pub struct MailboxSlot(Arc<Mailbox>);

impl Drop for MailboxSlot {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a tick's turn ended, with the agent's memory handed back either way.
enum Ran {
    /// The runner ran; `memory` is what it was given.
    Ticked {
        task: Box<Task>,
        result: Box<std::thread::Result<Result<TickOutput, RunnerError>>>,
        elapsed: Duration,
        memory: serde_json::Value,
    },
    /// The runner never ran: its start could not be recorded and shutdown began, or the task was
    /// revoked while it waited.
    NotStarted { memory: serde_json::Value },
}

/// First and longest wait between attempts to record a tick's start while the store fails.
const START_RETRY_MIN: Duration = Duration::from_millis(100);
const START_RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs the next task of the agent. Sent only once the task is durable, always with `do_send`,
/// which queues past actix's mailbox capacity: the real bound is [`Mailbox`], and a task that
/// is already stored must never be refused.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunTask(pub(crate) Arc<Task>, pub(crate) MailboxSlot);

/// Runs a task that is known only by id (recovered from the store at start-up): it is read from
/// the store when its turn comes. Shares the agent's mailbox with [`RunTask`], so order holds.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunStored(pub(crate) TaskId, pub(crate) MailboxSlot);

/// Re-exported: the agent is what emits it.
pub use crate::events::TickOutcome;

/// Everything the HTTP edge and the registry need to talk to one agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentHandle {
    /// The agent's configuration.
    pub spec: Arc<AgentSpec>,
    /// The agent actor.
    pub addr: Addr<Agent>,
    /// The agent's queue bound and depth.
    pub mailbox: Arc<Mailbox>,
    /// Tick counter shared with the actor, for listings that must not wait behind a tick.
    pub ticks: Arc<AtomicUsize>,
    /// The agent's link to the retry driver, and its retry count.
    pub retry: Arc<crate::retry::RetryLink>,
}

impl AgentHandle {
    /// Re-queues tasks found in the store at start-up, in their stored order. Only their ids are
    /// queued; each task is read from the store when its turn comes, so a large backlog costs
    /// little memory. A task that was STARTED when the process died runs again; its `attempt`
    /// goes up when it starts.
    pub fn recover(&self, tasks: Vec<TaskId>) {
        for id in tasks {
            self.addr
                .do_send(RunStored(id, self.mailbox.force_reserve()));
        }
    }
}

/// Shared services an agent needs besides its own spec and state.
#[derive(Clone)]
pub struct AgentDeps {
    /// Where tasks and memory live.
    pub store: Arc<dyn Store>,
    /// Where task status changes are announced.
    pub events: Arc<TaskEvents>,
    /// Who hears about every tick's outcome (the breaker, metrics).
    pub outcomes: Vec<Recipient<TickOutcome>>,
    /// Shutdown state shared by all agents.
    pub lifecycle: Arc<Lifecycle>,
}

/// What graceful shutdown needs from the agents: a switch that stops them from starting new
/// ticks (queued tasks stay PENDING on disk for the next start) and a count of ticks still
/// running, so shutdown can wait for exactly those.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: std::sync::atomic::AtomicBool,
    running: AtomicUsize,
}

impl Lifecycle {
    /// Stops agents from starting new ticks; the ones running finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun; triggers are refused with 503 from then on.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ticks started and not yet recorded as finished.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Counts a tick as running until the returned guard drops, which is once its outcome is
    /// durable (or as soon as it turns out it will not run), so shutdown never waits for a tick
    /// that is gone nor misses one still running.
    fn start_tick(self: &Arc<Self>) -> RunningTick {
        self.running.fetch_add(1, Ordering::AcqRel);
        RunningTick(self.clone())
    }
}

/// A tick counted in [`Lifecycle::running`]; dropping it stops counting it.
struct RunningTick(Arc<Lifecycle>);

impl Drop for RunningTick {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The agent actor. Its state (memory and tick counter) is loaded before it starts and written
/// atomically with each task's completion.
pub struct Agent {
    spec: Arc<AgentSpec>,
    runner: Rc<Runner>,
    state: AgentState,
    ticks: Arc<AtomicUsize>,
    deps: AgentDeps,
    /// Tasks held while a `block`-ordered retry waits.
    pub(crate) gate: crate::retry::Gate,
    retry: Arc<crate::retry::RetryLink>,
    /// Finished tasks kept alive for [`RELEASE_AFTER`] so that, once their completion is durable,
    /// the last reference (and the freeing of their inputs and output) goes here, on the agent's
    /// arbiter, rather than on the store's single writer thread, which every request waits for.
    released: Vec<Arc<Task>>,
}

/// How long a finished task is kept for [`Agent::released`]: well past a group commit, so the
/// writer's references are normally gone first; a burst of ticks shares one timer.
const RELEASE_AFTER: Duration = Duration::from_millis(100);

/// Starts an agent under a supervisor on `arbiter` and returns its handle.
pub fn start(
    spec: AgentSpec,
    state: AgentState,
    deps: AgentDeps,
    arbiter: &ArbiterHandle,
) -> AgentHandle {
    let spec = Arc::new(spec);
    let mailbox = Arc::new(Mailbox::new(spec.mailbox));
    let ticks = Arc::new(AtomicUsize::new(state.ticks as usize));
    let retry = Arc::new(crate::retry::RetryLink::default());
    let addr = {
        let spec = spec.clone();
        let ticks = ticks.clone();
        let retry = retry.clone();
        Supervisor::start_in_arbiter(arbiter, move |_| Agent {
            runner: Rc::new(Runner::new(&spec.runner, &spec.id, &spec.env)),
            spec,
            state,
            ticks,
            deps,
            gate: Default::default(),
            retry,
            released: Vec::new(),
        })
    };
    AgentHandle {
        spec,
        addr,
        mailbox,
        ticks,
        retry,
    }
}

impl Actor for Agent {
    type Context = Context<Self>;

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let runner = self.runner.clone();
        actix::spawn(async move { runner.shutdown().await });
    }
}

impl Supervised for Agent {
    fn restarting(&mut self, ctx: &mut Self::Context) {
        tracing::warn!(agent = %self.spec.id, "agent actor restarting with a fresh runner; its queue is kept");
        // A drain of held tasks notified before the stop may be gone with the old context.
        ctx.notify(crate::retry::Drain);
        self.runner = Rc::new(Runner::new(
            &self.spec.runner,
            &self.spec.id,
            &self.spec.env,
        ));
    }
}

/// This node just took the agent over (NATS store): its memory and tick counter become the
/// stored ones, and whatever a former ownership left held here is dropped (the queue is read
/// again from the store's cursor). Sent before the first task of the new ownership.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Adopt(pub(crate) AgentState);

impl Handler<Adopt> for Agent {
    type Result = ();
    fn handle(&mut self, Adopt(state): Adopt, _ctx: &mut Self::Context) {
        self.ticks.store(state.ticks as usize, Ordering::Release);
        self.state = state;
        self.gate = Default::default();
    }
}

/// Stops the agent actor after the ticks queued before this message; its supervisor restarts it
/// at once with a fresh runner (a new persistent process) and the rest of its queue intact.
/// Operators use it for a wedged runner; the agent uses it on itself after a runner panic.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restart;

impl Handler<Restart> for Agent {
    type Result = ();
    fn handle(&mut self, _: Restart, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<RunTask> for Agent {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, RunTask(task, slot): RunTask, _ctx: &mut Self::Context) -> Self::Result {
        AtomicResponse::new(match self.gate.admit(Queued::Task(task, slot)) {
            Some(queued) => self.dispatch(queued),
            None => Box::pin(actix::fut::ready(())),
        })
    }
}

impl Handler<RunStored> for Agent {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, RunStored(id, slot): RunStored, _ctx: &mut Self::Context) -> Self::Result {
        AtomicResponse::new(match self.gate.admit(Queued::Stored(id, slot)) {
            Some(queued) => self.dispatch(queued),
            None => Box::pin(actix::fut::ready(())),
        })
    }
}

impl Agent {
    /// Runs a queued task (read from the store first if only its id is known).
    pub(crate) fn dispatch(&mut self, queued: Queued) -> ResponseActFuture<Self, ()> {
        match queued {
            Queued::Task(task, slot) => self.tick(Arc::unwrap_or_clone(task), slot),
            Queued::Stored(id, slot) => self.run_stored(id, slot),
        }
    }

    fn run_stored(&mut self, id: TaskId, slot: MailboxSlot) -> ResponseActFuture<Self, ()> {
        // The store runs the read off the arbiter thread.
        let load = self.deps.store.task(id);
        Box::pin(load.into_actor(self).then(
            move |loaded, agent, _ctx| -> ResponseActFuture<Self, ()> {
                match loaded {
                    Ok(Some(task)) => agent.tick(task, slot),
                    Ok(None) => {
                        tracing::warn!(agent = %agent.spec.id, task_id = %id, "queued task has no record; skipped");
                        Box::pin(actix::fut::ready(()))
                    }
                    Err(e) => {
                        // Left on disk as it is; the next start tries again.
                        tracing::error!(agent = %agent.spec.id, task_id = %id, error = %e, "could not read a queued task; skipped until the next start");
                        Box::pin(actix::fut::ready(()))
                    }
                }
            },
        ))
    }
}

impl Agent {
    /// Runs one task's tick: records its start when the runner can have effects, runs the
    /// runner, then records the outcome. The returned future is the whole of the agent's turn.
    /// The slot and the running count are guards: they are released when the completion is
    /// durable, or at once on any path where the tick does not run.
    fn tick(&mut self, mut task: Task, slot: MailboxSlot) -> ResponseActFuture<Self, ()> {
        if self.deps.lifecycle.is_draining() {
            // Left PENDING (or STARTED) on disk: the next start runs it; the slot drops here.
            return Box::pin(actix::fut::ready(()));
        }
        if task.status.is_terminal() {
            // Revoked while queued (read back by `RunStored`): skipped, the slot drops here.
            return Box::pin(actix::fut::ready(()));
        }
        let running = self.deps.lifecycle.start_tick();
        // A continuation (an answered task) is part of the attempt that parked; a retry of a
        // failed continuation is a new attempt, like any retry.
        let continuation = crate::awaiting::is_continuation(&task)
            && task.attempts.last().is_none_or(|a| a.error.is_none());
        if !continuation {
            task.attempt += 1;
        }
        task.status = TaskStatus::Started;
        task.tick = self.state.ticks + 1;
        task.started_at = Some(now_ms());
        task.finished_at = None;
        if continuation {
            crate::retry::reopen_attempt(&mut task);
        } else {
            crate::retry::begin_attempt(&mut task);
        }
        let mut env = self.spec.env.clone();
        env.extend(task.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let agent_name = self.spec.id.to_string();
        // Lent to the tick and given back in `finish` (unless the tick replaces it), so the
        // memory is never copied; nothing reads it while the tick runs.
        let memory = std::mem::take(&mut self.state.memory);
        let span = tracing::info_span!("tick", agent = %self.spec.id, task_id = %task.id, tick = task.tick);
        let store = self.deps.store.clone();
        let events = self.deps.events.clone();
        let runner = self.runner.clone();
        let timeout = self.spec.tick_timeout;
        let side_effects = runner.has_side_effects();
        let lifecycle = self.deps.lifecycle.clone();
        let run = async move {
            if side_effects {
                // A tick that could have effects must not run unrecorded: while the store
                // refuses the write, the agent waits (keeping its order) instead of running it.
                let mut backoff = START_RETRY_MIN;
                let shared = Arc::new(task);
                loop {
                    match write_async(store.as_ref(), Write::Start(shared.clone())).await {
                        // Cancelled while queued: the store refused the start; never runs.
                        Ok(Written::Revoked) => return Ran::NotStarted { memory },
                        Ok(_) => {
                            events.publish_shared(&shared);
                            break;
                        }
                        Err(e) if lifecycle.is_draining() => {
                            tracing::warn!(error = %e, "tick not started: its start could not be recorded and shutdown has begun");
                            return Ran::NotStarted { memory };
                        }
                        Err(e) => {
                            tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "could not record the tick's start; waiting for the store");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(START_RETRY_MAX);
                        }
                    }
                }
                // The writer has dropped its reference by now, so this is not a copy.
                task = Arc::unwrap_or_clone(shared);
            } else {
                // Nothing outside can tell this tick ran until its outcome is stored, so its
                // start needs no record: after a crash it simply runs as if for the first time.
                events.publish(&task);
            }
            // The payload and source move into the tick input and back, rather than being
            // copied: the task's record was already written above when it had to be.
            let mut input = TickInput {
                agent: agent_name,
                task_id: task.id.to_string(),
                tick: task.tick,
                attempt: task.attempt,
                title: task.title.clone(),
                inputs: std::mem::take(&mut task.inputs),
                source: std::mem::take(&mut task.source),
                env,
                memory,
                resume: task.resume.clone(),
            };
            let started = Instant::now();
            let result = AssertUnwindSafe(runner.tick(&input, timeout))
                .catch_unwind()
                .await;
            let elapsed = started.elapsed();
            task.inputs = std::mem::take(&mut input.inputs);
            task.source = std::mem::take(&mut input.source);
            Ran::Ticked {
                task: Box::new(task),
                result: Box::new(result),
                elapsed,
                memory: input.memory,
            }
        }
        .instrument(span.clone());
        Box::pin(run.into_actor(self).map(move |ran, agent, ctx| {
            let _entered = span.enter();
            let (task, result, elapsed) = match ran {
                Ran::Ticked {
                    task,
                    result,
                    elapsed,
                    memory,
                } => {
                    agent.state.memory = memory;
                    (*task, *result, elapsed)
                }
                Ran::NotStarted { memory } => {
                    // Left as it is on disk (PENDING) for the next start; the slot and the
                    // running count drop here.
                    agent.state.memory = memory;
                    return;
                }
            };
            let result = result.unwrap_or_else(|_| {
                // A bug in a runner must not take the agent down for good: fail this
                // tick and let the supervisor restart the actor with a fresh runner.
                tracing::error!("runner panicked; restarting the agent");
                ctx.notify(Restart);
                Err(RunnerError::Exit("the runner panicked".into()))
            });
            agent.finish(task, result, elapsed, (slot, running), ctx)
        }))
    }

    /// Records a tick's outcome: task record, memory and tick counter in one durable write, then
    /// the announcement to waiters, then the mailbox slot is freed.
    fn finish(
        &mut self,
        mut task: Task,
        result: Result<TickOutput, RunnerError>,
        elapsed: Duration,
        held: (MailboxSlot, RunningTick),
        ctx: &mut Context<Self>,
    ) {
        task.finished_at = Some(now_ms());
        match result {
            Ok(out) => match crate::awaiting::parking(&out, self.spec.approvals) {
                Some(Err(e)) => {
                    task.status = TaskStatus::Failure;
                    task.error = Some(e);
                    tracing::warn!(
                        elapsed_ms = elapsed.as_millis() as u64,
                        "tick asked for input with an unusable await"
                    );
                }
                parked => {
                    task.status = TaskStatus::Success;
                    if let Some(memory) = &out.memory {
                        self.state.memory = memory.clone();
                    }
                    // Moved into `result`, which is where `response` is read from: the answer,
                    // often as large as the payload, is not copied.
                    task.result = Some(out.into_result());
                    if let Some(Ok((request, timeout))) = parked {
                        crate::awaiting::park(&mut task, request, timeout, now_ms());
                        tracing::info!(
                            elapsed_ms = elapsed.as_millis() as u64,
                            "tick parked its task awaiting input"
                        );
                    } else {
                        tracing::info!(elapsed_ms = elapsed.as_millis() as u64, "tick succeeded");
                    }
                }
            },
            Err(e) => {
                task.status = TaskStatus::Failure;
                task.error = Some(e.to_string());
                tracing::warn!(elapsed_ms = elapsed.as_millis() as u64, error = %e, "tick failed");
            }
        }
        crate::retry::settle(&self.spec.retry, &mut task);
        let timer = crate::retry::timer_of(&task);
        if timer.is_some() && self.spec.retry.order == crate::retry::RetryOrder::Block {
            self.gate.block(task.id);
        } else if task.status.is_terminal() && self.gate.unblock(task.id) {
            ctx.notify(crate::retry::Drain);
        }
        self.state.ticks = task.tick;
        self.ticks.store(task.tick as usize, Ordering::Release);
        let outcome = TickOutcome {
            agent: self.spec.id.clone(),
            task_id: task.id,
            // A parked tick did its work: for the breaker it is a success.
            success: matches!(task.status, TaskStatus::Success | TaskStatus::AwaitingInput),
            duration: elapsed,
        };
        for recipient in &self.deps.outcomes {
            recipient.do_send(outcome.clone());
        }
        if task.status.is_terminal() {
            // The answer of a continuation is used up once the task ends (a retry keeps it).
            task.resume = None;
        }
        let events = self.deps.events.clone();
        let task = Arc::new(task);
        if self.released.is_empty() {
            ctx.run_later(RELEASE_AFTER, |agent, _| agent.released.clear());
        }
        self.released.push(task.clone());
        let write = if task.status == TaskStatus::AwaitingInput {
            Write::Park {
                task: task.clone(),
                state: self.state.clone(),
            }
        } else {
            match timer {
                Some(_) => Write::Retry {
                    task: task.clone(),
                    state: self.state.clone(),
                },
                None => Write::Complete {
                    task: task.clone(),
                    state: self.state.clone(),
                },
            }
        };
        let retry = self.retry.clone();
        // The next tick does not wait for this write: the writer applies writes in queue order,
        // so the next task's Start lands in the same group commit or a later one, never before.
        // Waiters hear of the result, and the slot is freed, only once it is on disk.
        self.deps.store.write(
            write,
            Box::new(move |res| {
                match res {
                    // Revoked meanwhile: the REVOKED record stays and was announced already.
                    Ok(Written::Revoked) => {}
                    Ok(_) => {
                        events.publish_shared(&task);
                        if let Some(timer) = timer {
                            retry.scheduled(timer);
                        }
                    }
                    Err(e) => tracing::error!(task_id = %task.id, error = %e, "could not record the tick's outcome"),
                }
                // Only now, with the completion on disk, does the task leave the queue.
                drop(held);
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_slots_are_freed_by_dropping_them() {
        let m = Arc::new(Mailbox::new(2));
        let a = m.try_reserve().expect("free");
        let b = m.try_reserve().expect("free");
        assert!(m.try_reserve().is_none());
        drop(a);
        let c = m.try_reserve().expect("freed by the drop");
        let forced = m.force_reserve();
        assert_eq!(m.queued(), 3);
        drop((b, c, forced));
        assert_eq!(m.queued(), 0);
    }

    #[test]
    fn running_ticks_are_counted_while_their_guard_lives() {
        let l = Arc::new(Lifecycle::default());
        let t = l.start_tick();
        assert_eq!(l.running(), 1);
        drop(t);
        assert_eq!(l.running(), 0);
    }
}
