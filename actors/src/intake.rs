//! The one way a new task enters tickgate. Every trigger source (webhooks today; schedules,
//! replays, A2A and queue consumers later) builds a [`Task`] and calls [`Intake::accept`], which
//! owns the accept protocol so that no caller can get it subtly wrong:
//!
//! 1. refuse while shutting down, and tasks for unknown agents;
//! 2. breaker admission: the breaker actor's published "closed" flag first, the actor itself only
//!    when the breaker is not closed (admitting a trial changes its state);
//! 3. a [`MailboxSlot`] from the agent's exact queue bound, before anything is stored;
//! 4. one durable submit through the store's writer (idempotency is decided there, in order);
//! 5. on the writer thread, after the flush and in store order, the task and its slot go to the
//!    agent as a [`RunTask`] (or a [`RunStored`] id for deep queues).
//!
//! Everything taken on the way is a guard: the slot frees itself when dropped, and a breaker
//! trial is a [`TrialPermit`] that reports [`TrialAbandoned`] when dropped unless the task it
//! admitted was accepted. A refusal at any step therefore undoes exactly what was taken.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use foldhash::HashMap;

use crate::agent::{AgentHandle, Lifecycle, RunStored, RunTask};
use crate::breaker::{Admission, Admit, BreakerActor, ClosedBreakers, TrialAbandoned};
use crate::events::TaskEvents;
use crate::model::{AgentId, Task, TaskId, TaskStatus};
use crate::store::{IdempotencyKey, Store, StoreError, Write, Written};

/// Queued tasks an agent keeps in memory; beyond this its queue holds ids and each task is read
/// from the store when its turn comes, so a big mailbox does not hold a big backlog in memory.
const QUEUED_IN_MEMORY: usize = 1024;

/// A task that was taken: either new, or the task an idempotency key already names. `T` is what
/// the caller keeps of a new task: the task itself ([`Intake::accept`]) or only its id
/// ([`Intake::accept_id`]), for callers that answer without it and so leave the agent the only
/// reference, which it can then take over without copying the task (#16).
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted<T = Arc<Task>> {
    /// Stored and queued for its agent; a `202` may be sent.
    New(T),
    /// The idempotency key was used before with the same body; nothing new was stored.
    Duplicate(TaskId),
}

/// Why a task was not taken. Nothing was stored and nothing stays reserved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    /// No agent has this id.
    #[error("no agent {0}")]
    UnknownAgent(AgentId),
    /// Shutdown has begun; no new task is taken.
    #[error("tickgate is shutting down")]
    ShuttingDown,
    /// The agent's breaker is open (or half-open with its trial in flight).
    #[error("the agent's circuit breaker is open")]
    BreakerOpen {
        /// When a retry could be admitted.
        retry_after: Duration,
    },
    /// The agent's queue is at capacity.
    #[error("the agent's mailbox is full")]
    MailboxFull,
    /// The idempotency key was used before with a different body; names the earlier task.
    #[error("the idempotency key was used for task {0} with a different body")]
    Conflict(TaskId),
    /// The store could not make the task durable.
    #[error(transparent)]
    StoreUnavailable(#[from] StoreError),
}

/// Why an answer to a parked task was not taken. Nothing was changed and nothing stays reserved.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResumeRefused {
    /// No task has this id.
    #[error("no task {0}")]
    UnknownTask(TaskId),
    /// The task is not awaiting input (never was, already answered, finished or expired).
    #[error("task {id} is not awaiting input (it is {status:?})")]
    NotAwaiting {
        /// Which task.
        id: TaskId,
        /// Its status when the answer came.
        status: TaskStatus,
    },
    /// The task's agent is not configured (any more).
    #[error("no agent {0}")]
    UnknownAgent(AgentId),
    /// Shutdown has begun; the answer can be sent again after the restart.
    #[error("tickgate is shutting down")]
    ShuttingDown,
    /// The agent's queue is at capacity; the continuation would not fit.
    #[error("the agent's mailbox is full")]
    MailboxFull,
    /// The store could not read or write.
    #[error(transparent)]
    StoreUnavailable(#[from] StoreError),
}

/// The breaker's trial admission, held until the task it admitted is accepted. Dropped without
/// [`TrialPermit::consume`], it tells the breaker the trial was not queued, so that the next
/// trigger can be the trial instead of waiting out the trial timeout.
struct TrialPermit {
    breaker: Addr<BreakerActor>,
    agent: Option<AgentId>,
}

impl TrialPermit {
    /// The trial's task is queued: its tick's outcome will decide the breaker.
    fn consume(mut self) {
        self.agent = None;
    }
}

impl Drop for TrialPermit {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            self.breaker.do_send(TrialAbandoned(agent));
        }
    }
}

/// The accept path shared by every trigger source. Cheap to share (`Arc`), never mutated.
pub struct Intake {
    agents: HashMap<AgentId, AgentHandle>,
    breaker: Addr<BreakerActor>,
    closed: Arc<ClosedBreakers>,
    lifecycle: Arc<Lifecycle>,
    store: Arc<dyn Store>,
    events: Arc<TaskEvents>,
}

impl Intake {
    /// The intake for these agents, deciding admission with `breaker` (whose lock-free
    /// [`ClosedBreakers`] view is `closed`), refusing once `lifecycle` drains, storing in `store`.
    pub fn new(
        agents: impl IntoIterator<Item = AgentHandle>,
        breaker: Addr<BreakerActor>,
        closed: Arc<ClosedBreakers>,
        lifecycle: Arc<Lifecycle>,
        store: Arc<dyn Store>,
    ) -> Self {
        Self {
            agents: agents.into_iter().map(|h| (h.spec.id.clone(), h)).collect(),
            breaker,
            closed,
            lifecycle,
            store,
            events: Arc::new(TaskEvents::default()),
        }
    }

    /// Announces the status changes the intake makes itself (a resumed task turning PENDING)
    /// through `events`, the hub that waiters and SSE streams listen on.
    pub fn with_events(mut self, events: Arc<TaskEvents>) -> Self {
        self.events = events;
        self
    }

    /// An agent by id, for edges that name agents directly (admin, readiness, A2A).
    pub fn agent(&self, id: &AgentId) -> Option<&AgentHandle> {
        self.agents.get(id)
    }

    /// Whether new tasks are refused because shutdown has begun; edges that check their own
    /// rules first (the webhook ingress) ask this before them so a draining service says so.
    pub fn is_draining(&self) -> bool {
        self.lifecycle.is_draining()
    }

    /// Takes `task` for `task.agent`: admission, mailbox slot, durable submit, hand-off. Answers
    /// once the task is on disk (or was refused); the hand-off to the agent happens on the
    /// store's writer thread in store order, so it does not depend on the caller still waiting:
    /// a client that hangs up never loses or cancels its task.
    pub async fn accept(
        &self,
        task: Task,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Accepted, Refused> {
        self.take(task, idempotency, Arc::clone).await
    }

    /// [`Intake::accept`] for a caller that needs only the new task's id (a fire-and-forget
    /// answer, a schedule slot, a queue message): the task is not shared with the caller, so
    /// the agent owns it outright when it runs.
    pub async fn accept_id(
        &self,
        task: Task,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Accepted<TaskId>, Refused> {
        self.take(task, idempotency, |task| task.id).await
    }

    /// The one path of both: `keep` picks, on the writer thread and before the hand-off to the
    /// agent, what of a new task the caller gets back.
    async fn take<T: Send + 'static>(
        &self,
        task: Task,
        idempotency: Option<IdempotencyKey>,
        keep: fn(&Arc<Task>) -> T,
    ) -> Result<Accepted<T>, Refused> {
        if self.lifecycle.is_draining() {
            return Err(Refused::ShuttingDown);
        }
        let agent = self
            .agents
            .get(&task.agent)
            .ok_or_else(|| Refused::UnknownAgent(task.agent.clone()))?;
        let trial = self.admit(&task.agent).await?;
        // In a cluster the queue lives in the store: its backlog (counted every lease round)
        // bounds it, approximately by up to a round's arrivals; the local mailbox then only
        // counts the few tasks the owner's feeder holds, so it must not refuse triggers.
        let slot = match self.store.backlog(&task.agent) {
            Some(waiting) if waiting >= agent.mailbox.capacity() => {
                return Err(Refused::MailboxFull)
            }
            Some(_) => None,
            // Refused here, the permit's drop gives the trial back.
            None => Some(agent.mailbox.try_reserve().ok_or(Refused::MailboxFull)?),
        };

        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr = agent.addr.clone();
        let mailbox = agent.mailbox.clone();
        // New tasks reach the operator page's feed only while one is open.
        let feed = self.events.feed();
        let dispatches = self.store.dispatches();
        self.store.write(
            Write::Submit {
                task: Arc::new(task),
                idempotency,
            },
            Box::new(move |res| {
                // Runs on the writer thread, after the flush. Every early end of this closure
                // drops the slot and the permit, which undoes them.
                let reply = match res {
                    Ok(Written::Accepted(task)) => {
                        if let Some(trial) = trial {
                            trial.consume();
                        }
                        // Taken before the hand-off: if the caller keeps only the id, the
                        // agent receives the last reference and runs the task without a copy.
                        let kept = keep(&task);
                        if let Some(feed) = &feed {
                            // Before the agent can start it, so PENDING precedes STARTED.
                            let _ = feed.send(task.clone());
                        }
                        match slot {
                            // The store hands it to the agent's owner (maybe another node).
                            _ if dispatches => {}
                            None => {}
                            Some(slot) if mailbox.queued() > QUEUED_IN_MEMORY => {
                                addr.do_send(RunStored(task.id, slot))
                            }
                            Some(slot) => addr.do_send(RunTask(task, slot)),
                        }
                        Ok(Accepted::New(kept))
                    }
                    Ok(Written::Duplicate(id)) => Ok(Accepted::Duplicate(id)),
                    Ok(Written::Conflict(id)) => Err(Refused::Conflict(id)),
                    Ok(other) => Err(Refused::StoreUnavailable(StoreError::Backend(format!(
                        "store answered a submission with {other:?}"
                    )))),
                    Err(e) => Err(Refused::StoreUnavailable(e)),
                };
                let _ = tx.send(reply);
            }),
        );
        rx.await
            .unwrap_or(Err(Refused::StoreUnavailable(StoreError::Closed)))
    }

    /// Answers a task parked in `AWAITING_INPUT` (SPEC section 8): the answer is made durable
    /// (the task turns PENDING with `resume = {request, response}`) by one conditional write
    /// that the store writer applies only if the task is still awaiting, so of two concurrent
    /// answers exactly one wins. The continuation takes a mailbox slot like any submission
    /// (reserved first, so a full mailbox refuses with nothing changed) and is handed to the
    /// agent on the writer thread, behind what was queued. The breaker is not asked: the task
    /// was admitted when it was accepted, and a parked tick counted as a success.
    pub async fn resume(
        &self,
        id: TaskId,
        response: serde_json::Value,
    ) -> Result<Arc<Task>, ResumeRefused> {
        if self.lifecycle.is_draining() {
            return Err(ResumeRefused::ShuttingDown);
        }
        let task = self
            .store
            .task(id)
            .await?
            .ok_or(ResumeRefused::UnknownTask(id))?;
        if task.status != TaskStatus::AwaitingInput {
            return Err(ResumeRefused::NotAwaiting {
                id,
                status: task.status,
            });
        }
        let agent = self
            .agents
            .get(&task.agent)
            .ok_or_else(|| ResumeRefused::UnknownAgent(task.agent.clone()))?;
        let slot = agent
            .mailbox
            .try_reserve()
            .ok_or(ResumeRefused::MailboxFull)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr = agent.addr.clone();
        let mailbox = agent.mailbox.clone();
        let events = self.events.clone();
        let dispatches = self.store.dispatches();
        self.store.write(
            Write::Resume { id, response },
            Box::new(move |res| {
                // On the writer thread, after the flush; an early end drops the slot.
                let reply = match res {
                    Ok(Written::Updated(task)) => {
                        let task: Arc<Task> = Arc::from(task);
                        events.publish_shared(&task);
                        if dispatches {
                            drop(slot);
                        } else if mailbox.queued() > QUEUED_IN_MEMORY {
                            addr.do_send(RunStored(task.id, slot));
                        } else {
                            addr.do_send(RunTask(task.clone(), slot));
                        }
                        Ok(task)
                    }
                    Ok(Written::Unchanged(Some(task))) => Err(ResumeRefused::NotAwaiting {
                        id,
                        status: task.status,
                    }),
                    Ok(Written::Unchanged(None)) => Err(ResumeRefused::UnknownTask(id)),
                    Ok(other) => Err(ResumeRefused::StoreUnavailable(StoreError::Backend(
                        format!("store answered a resume with {other:?}"),
                    ))),
                    Err(e) => Err(ResumeRefused::StoreUnavailable(e)),
                };
                let _ = tx.send(reply);
            }),
        );
        rx.await
            .unwrap_or(Err(ResumeRefused::StoreUnavailable(StoreError::Closed)))
    }

    /// Breaker admission: `None` for an ordinary admission, a permit for the trial.
    async fn admit(&self, agent: &AgentId) -> Result<Option<TrialPermit>, Refused> {
        if self.closed.is_closed(agent) {
            return Ok(None);
        }
        // The breaker actor only goes away at shutdown.
        let admission = self
            .breaker
            .send(Admit(agent.clone()))
            .await
            .map_err(|_| Refused::ShuttingDown)?;
        match admission {
            Admission::Allowed => Ok(None),
            Admission::Trial => Ok(Some(TrialPermit {
                breaker: self.breaker.clone(),
                agent: Some(agent.clone()),
            })),
            Admission::Refused { retry_after } => Err(Refused::BreakerOpen { retry_after }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! A model test: random interleavings of accepts (fresh, repeated and conflicting keys,
    //! concurrent bursts into a small mailbox), store failures, breaker openings (and the trials
    //! that follow) and waits for the ticks to complete, against a real sled store. Whatever
    //! happened, every refusal matches the model, and once the agent is idle no mailbox slot,
    //! running tick or breaker trial is left behind.

    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;
    use crate::agent::{self, AgentDeps, AgentSpec, TickOutcome};
    use crate::breaker::BreakerPolicy;
    use crate::events::TaskEvents;
    use crate::model::{Source, TaskStatus};
    use crate::runner::RunnerSpec;
    use crate::store::faulty::FaultyStore;
    use crate::store::sled::SledStore;

    const MAILBOX: usize = 2;

    #[derive(Debug, Clone)]
    enum Op {
        /// One accept; `key` (from a small set, so keys repeat) with one of two bodies.
        Accept(Option<(u8, u8)>),
        /// Several keyless accepts at once, more than the mailbox holds.
        Burst(usize),
        /// Store writes fail (`true`) or work again.
        StoreFails(bool),
        /// A failed tick outcome reaches the breaker: it opens, then goes half-open after 1 ms.
        BreakerFails,
        /// Waits until every accepted tick has completed.
        Settle,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::option::of((0u8..3, 0u8..2)).prop_map(Op::Accept),
            2 => (2usize..5).prop_map(Op::Burst),
            1 => any::<bool>().prop_map(Op::StoreFails),
            1 => Just(Op::BreakerFails),
            1 => Just(Op::Settle),
        ]
    }

    fn key(k: u8, body: u8) -> IdempotencyKey {
        IdempotencyKey {
            key: format!("k{k}"),
            body_sha256: [body; 32],
        }
    }

    struct Rig {
        intake: Intake,
        handle: AgentHandle,
        lifecycle: Arc<Lifecycle>,
        faulty: Arc<FaultyStore>,
        breaker: Addr<BreakerActor>,
        id: AgentId,
    }

    impl Rig {
        fn task(&self) -> Task {
            Task::new(self.id.clone(), serde_json::json!({}), Source::default())
        }

        async fn settle(&self) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.handle.mailbox.queued() > 0 || self.lifecycle.running() > 0 {
                assert!(
                    Instant::now() < deadline,
                    "not idle: {} queued, {} running",
                    self.handle.mailbox.queued(),
                    self.lifecycle.running()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// A refusal any accept may meet, depending on timing; recorded as "nothing stored".
    fn transient(r: &Refused, store_failing: bool) -> bool {
        match r {
            Refused::MailboxFull | Refused::BreakerOpen { .. } => true,
            Refused::StoreUnavailable(_) => store_failing,
            _ => false,
        }
    }

    async fn run(ops: Vec<Op>) {
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open(dir.path()).unwrap();
        let faulty = FaultyStore::new(sled.clone());
        let store: Arc<dyn Store> = faulty.clone();
        let id: AgentId = "model".parse().unwrap();
        let breaker = BreakerActor::with_trial_timeout(
            vec![(
                id.clone(),
                BreakerPolicy {
                    failures: 1,
                    open_for: Duration::from_millis(1),
                },
            )],
            // Long enough that a leaked trial would block the final accept.
            Duration::from_secs(3600),
        );
        let closed = breaker.closed();
        let breaker = breaker.start();
        let lifecycle = Arc::new(Lifecycle::default());
        let deps = AgentDeps {
            store: store.clone(),
            events: Arc::new(TaskEvents::default()),
            outcomes: vec![breaker.clone().recipient()],
            lifecycle: lifecycle.clone(),
        };
        let spec = AgentSpec {
            id: id.clone(),
            runner: RunnerSpec::Echo,
            tick_timeout: Duration::from_secs(30),
            mailbox: MAILBOX,
            env: BTreeMap::new(),
            allow_env: BTreeSet::new(),
            retry: Default::default(),
            approvals: Default::default(),
        };
        let handle = agent::start(spec, Default::default(), deps, &Arbiter::current());
        let rig = Rig {
            intake: Intake::new(
                [handle.clone()],
                breaker.clone(),
                closed,
                lifecycle.clone(),
                store,
            ),
            handle,
            lifecycle,
            faulty,
            breaker,
            id,
        };

        let mut failing = false;
        let mut ever_failed = false;
        let mut keys: HashMap<u8, (u8, TaskId)> = HashMap::new();
        let mut accepted: Vec<TaskId> = Vec::new();
        for op in ops {
            match op {
                Op::Accept(k) => {
                    let res = rig
                        .intake
                        .accept(rig.task(), k.map(|(k, b)| key(k, b)))
                        .await;
                    let known = k.and_then(|(k, _)| keys.get(&k).copied());
                    match (res, k, known) {
                        (Ok(Accepted::New(task)), _, None) => {
                            if let Some((k, b)) = k {
                                keys.insert(k, (b, task.id));
                            }
                            accepted.push(task.id);
                        }
                        (Ok(Accepted::Duplicate(dup)), Some((_, b)), Some((kb, kid))) => {
                            assert_eq!((b, dup), (kb, kid), "duplicate of the wrong task");
                        }
                        (Err(Refused::Conflict(c)), Some((_, b)), Some((kb, kid))) => {
                            assert!(b != kb && c == kid, "conflict with the wrong task");
                        }
                        (Err(r), _, _) if transient(&r, failing) => {}
                        (res, k, known) => panic!("{res:?} for key {k:?} known as {known:?}"),
                    }
                }
                Op::Burst(n) => {
                    let all = futures_util::future::join_all(
                        (0..n).map(|_| rig.intake.accept(rig.task(), None)),
                    )
                    .await;
                    for res in all {
                        match res {
                            Ok(Accepted::New(task)) => accepted.push(task.id),
                            Err(r) if transient(&r, failing) => {}
                            other => panic!("burst accept: {other:?}"),
                        }
                    }
                }
                Op::StoreFails(f) => {
                    failing = f;
                    ever_failed |= f;
                    rig.faulty.fail_writes(f);
                }
                Op::BreakerFails => rig.breaker.do_send(TickOutcome {
                    agent: rig.id.clone(),
                    task_id: TaskId::random(),
                    success: false,
                    duration: Duration::ZERO,
                }),
                Op::Settle => rig.settle().await,
            }
            assert!(
                rig.handle.mailbox.queued() <= MAILBOX,
                "the mailbox bound held"
            );
        }

        rig.faulty.fail_writes(false);
        rig.settle().await;
        assert_eq!(rig.handle.mailbox.queued(), 0);
        assert_eq!(rig.lifecycle.running(), 0);
        // Nothing left reserved: a fresh accept goes through (as the breaker's trial if it was
        // left open; a trial leaked by an earlier refusal would block it for an hour).
        tokio::time::sleep(Duration::from_millis(2)).await;
        match rig.intake.accept(rig.task(), Some(key(9, 0))).await {
            Ok(Accepted::New(task)) => accepted.push(task.id),
            other => panic!("final accept: {other:?}"),
        }
        rig.settle().await;
        for id in accepted {
            let task = sled
                .task_blocking(id)
                .unwrap()
                .expect("an accepted task is stored");
            // A completion the failing store refused leaves the task PENDING for the next start.
            if !ever_failed {
                assert_eq!(task.status, TaskStatus::Success, "every accepted task ran");
            }
        }
        sled.close().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn slots_running_ticks_and_trials_always_return(
            ops in prop::collection::vec(op(), 1..40),
        ) {
            actix::System::new().block_on(run(ops));
        }
    }
}
