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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::agent::{AgentHandle, Lifecycle, RunStored, RunTask};
use crate::breaker::{Admission, Admit, BreakerActor, ClosedBreakers, TrialAbandoned};
use crate::model::{AgentId, Task, TaskId};
use crate::store::{IdempotencyKey, Store, StoreError, Write, Written};

/// Queued tasks an agent keeps in memory; beyond this its queue holds ids and each task is read
/// from the store when its turn comes, so a big mailbox does not hold a big backlog in memory.
const QUEUED_IN_MEMORY: usize = 1024;

/// A task that was taken: either new, or the task an idempotency key already names.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    /// Stored and queued for its agent; a `202` may be sent.
    New(Arc<Task>),
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
            agents: agents
                .into_iter()
                .map(|h| (h.spec.id.clone(), h))
                .collect(),
            breaker,
            closed,
            lifecycle,
            store,
        }
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
        if self.lifecycle.is_draining() {
            return Err(Refused::ShuttingDown);
        }
        let agent = self
            .agents
            .get(&task.agent)
            .ok_or_else(|| Refused::UnknownAgent(task.agent.clone()))?;
        let trial = self.admit(&task.agent).await?;
        // Refused here, the permit's drop gives the trial back.
        let slot = agent.mailbox.try_reserve().ok_or(Refused::MailboxFull)?;

        let (tx, rx) = tokio::sync::oneshot::channel();
        let addr = agent.addr.clone();
        let mailbox = agent.mailbox.clone();
        self.store.write(
            Write::Submit {
                task: Box::new(task),
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
                        // Shared with the caller rather than copied.
                        let task: Arc<Task> = Arc::from(task);
                        if mailbox.queued() > QUEUED_IN_MEMORY {
                            addr.do_send(RunStored(task.id, slot));
                        } else {
                            addr.do_send(RunTask(task.clone(), slot));
                        }
                        Ok(Accepted::New(task))
                    }
                    Ok(Written::Duplicate(id)) => Ok(Accepted::Duplicate(id)),
                    Ok(Written::Conflict(id)) => Err(Refused::Conflict(id)),
                    Ok(other @ (Written::Done | Written::Purged(_))) => {
                        Err(Refused::StoreUnavailable(StoreError::Backend(format!(
                            "store answered a submission with {other:?}"
                        ))))
                    }
                    Err(e) => Err(Refused::StoreUnavailable(e)),
                };
                let _ = tx.send(reply);
            }),
        );
        rx.await
            .unwrap_or(Err(Refused::StoreUnavailable(StoreError::Closed)))
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
