//! Durable state behind a small trait, so that actors and the HTTP edge never see sled and another
//! backend can be added without touching them.
//!
//! Writes are requests to a single writer that batches them (group commit): every write made while
//! the previous flush ran lands in the next one, and each caller is answered only once its write
//! is on disk. Reads that happen while serving are async at the trait: a backend that blocks
//! (sled) moves them to a blocking pool itself, so no caller can stall an actix arbiter by
//! forgetting to. Start-up reads (`token_digest`) and the retention `purge` stay blocking and say so.

#[cfg(any(test, feature = "test-util"))]
pub mod faulty;
mod listing;
pub mod nats;
mod queue;
mod record;
pub mod sled;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{AgentId, Task, TaskId, TaskStatus};
use crate::outbox::{Delivery, DeliveryStatus, Outbox};

/// A store failure. Callers turn it into 503s and an unready `/ready`; it is never a panic.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend refused an operation (disk full, I/O error, corruption).
    #[error("store failure: {0}")]
    Backend(String),
    /// The writer thread is gone, which only happens during shutdown.
    #[error("store is closed")]
    Closed,
    /// The store directory is held by another process.
    #[error("store {path} is locked by another process (is a tickgate server running?)")]
    Locked {
        /// The directory that could not be locked.
        path: String,
    },
}

/// The idempotency key of a submission, with a digest of the body it came with so that a reused
/// key with a different body can be refused instead of silently answered with the old task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The caller's key or the provider's delivery id.
    pub key: String,
    /// SHA-256 of the raw request body.
    pub body_sha256: [u8; 32],
}

/// One durable write. Each is applied atomically with everything else in its batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new task: checked against its idempotency key, given its queue position, stored PENDING.
    Submit {
        /// The task to accept (boxed: it is moved, not copied, into the answer).
        task: Arc<Task>,
        /// Deduplication key, if the caller or provider sent one.
        idempotency: Option<IdempotencyKey>,
    },
    /// A task's tick is starting; stored before the runner runs so a crash shows as `attempt` + 1.
    /// Shared, so the agent keeps its copy without a deep clone.
    Start(Arc<Task>),
    /// A task finished: its record, its removal from the queue and the agent's new memory and
    /// tick counter land together.
    Complete {
        /// The finished task, shared with whoever announces it once it is durable.
        task: Arc<Task>,
        /// The agent's state after the tick.
        state: AgentState,
    },
    /// Up to `limit` tasks that finished before `finished_before_ms` are removed, with their
    /// idempotency keys. Goes through the writer like every other write, so the store has one
    /// flusher and a purge is ordered with the submissions that might reuse a key.
    Purge {
        /// Unix milliseconds; tasks finished earlier go.
        finished_before_ms: u64,
        /// Most tasks removed by this write, so one purge never holds the writer for long.
        limit: usize,
    },
    /// An agent's webhook token changed: the old digest stops resolving in the same write.
    SetToken {
        /// Whose token.
        agent: AgentId,
        /// SHA-256 of the new token.
        digest: [u8; 32],
    },
    /// A tick failed with retries left: the task is stored `RETRY` (with `next_attempt_at`), leaves
    /// the agent's queue, and its durable retry timer is set, with the agent's new memory and tick
    /// counter, all in one batch.
    Retry {
        /// The task, status `RETRY`, `next_attempt_at` set (the timer's due time).
        task: Arc<Task>,
        /// The agent's state after the tick.
        state: AgentState,
    },
    /// A retry timer came due: the timer goes, and if the task is still `RETRY` for that due
    /// time it becomes `PENDING` again and re-enters its agent's queue (answered with
    /// [`Written::Accepted`]); otherwise (cancelled, already requeued) only the timer goes
    /// ([`Written::Done`]). Decided on the writer thread, so it is ordered with other changes.
    RetryDue {
        /// The task the timer is for.
        task: TaskId,
        /// The timer's due time, Unix milliseconds.
        due_ms: u64,
    },
    /// A schedule entry's cursor moved (or the entry was seen for the first time).
    SetScheduleCursor {
        /// Which entry.
        key: ScheduleKey,
        /// Its new cursor.
        cursor: ScheduleCursor,
    },
    /// A tick parked its task as `AWAITING_INPUT`: the record, the removal from the queue, the
    /// agent's new memory and tick counter, and the task's expiry timer land together. The
    /// task is not finished, so it gets no retention index record.
    Park {
        /// The parked task (with `awaiting` set), shared with whoever announces it.
        task: Arc<Task>,
        /// The agent's state after the tick.
        state: AgentState,
    },
    /// An answer for a parked task. Conditional: applied only if the stored task is
    /// `AWAITING_INPUT`; it then becomes PENDING with `resume` set, is queued behind what its
    /// agent has queued (a new `seq`) and its expiry timer goes. Answers [`Written::Updated`]
    /// or, when the task is missing or not awaiting, [`Written::Unchanged`].
    Resume {
        /// Which task.
        id: TaskId,
        /// The answer the continuation tick receives.
        response: serde_json::Value,
    },
    /// An await timer fired. Conditional: the task fails with "awaiting input timed out" only
    /// if it is still parked on this timer; the timer record goes either way.
    Expire {
        /// Which task.
        id: TaskId,
        /// The expiry the timer was written for.
        expires_at: u64,
    },
    /// A status callback delivery changed (attempted, finished, retried by an admin).
    Delivery(Box<Delivery>),
    /// A callback endpoint was disabled (its receiver answered 410) or re-enabled by an admin;
    /// durable so that a restart does not resume hammering a receiver that said it is gone.
    NotifyEndpoint {
        /// Whose endpoint.
        agent: AgentId,
        /// 0-based index in the agent's `notify` list.
        endpoint: usize,
        /// Whether deliveries to it are held.
        disabled: bool,
    },
    /// An operator cancels a task. The writer reads the task's current status and revokes it
    /// only from `PENDING`, `RETRY` or `AWAITING_INPUT`, so a cancel racing the task's start is
    /// ordered by the writer: whichever is written first wins. Answered with
    /// [`Written::Cancel`].
    Cancel {
        /// The task to revoke.
        id: TaskId,
        /// Unix milliseconds, its `finished_at`.
        at_ms: u64,
    },
}

/// Which deliveries a listing wants, in id (creation) order.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    /// Only this agent's.
    pub agent: Option<AgentId>,
    /// Only in this state.
    pub status: Option<DeliveryStatus>,
    /// Only ids above this one (the cursor).
    pub after: Option<u64>,
    /// At most this many.
    pub limit: usize,
}

/// What a [`Write::Cancel`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The task is now `REVOKED`; this is its record.
    Revoked(Box<Task>),
    /// The task is in a status that cannot be cancelled (running or finished); nothing written.
    NotCancellable(TaskStatus),
    /// No such task.
    Unknown,
}

/// A page of the task listing (`GET /admin/tasks`), newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListQuery {
    /// Only this agent's tasks.
    pub agent: Option<AgentId>,
    /// Only tasks in this status.
    pub status: Option<TaskStatus>,
    /// Only tasks created at or after this time (Unix milliseconds).
    pub since_ms: Option<u64>,
    /// Only tasks created before this time (Unix milliseconds).
    pub until_ms: Option<u64>,
    /// Where the previous page stopped: an opaque value from [`TaskPage::next_cursor`].
    pub cursor: Option<ListCursor>,
    /// Most tasks on the page.
    pub limit: usize,
    /// Most index entries examined for this page; bounds the work of a filtered page whose
    /// matches are sparse (the page may then be short, with a cursor to continue).
    pub scan_limit: usize,
}

/// A position in the listing: the `created_at` and id of the last task examined. Tasks created
/// later than the walk's start sort above every cursor of the walk, so a walk sees each task
/// that existed when it began exactly once.
/// Ordered as the index is: by `created_ms`, then by the id's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListCursor {
    /// `created_at` of the last examined task, Unix milliseconds.
    pub created_ms: u64,
    /// Its id (ties on `created_at` are ordered by id).
    pub id: TaskId,
}

impl ListCursor {
    /// The opaque form handed to clients: 48 hex digits.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(48);
        for b in self
            .created_ms
            .to_be_bytes()
            .iter()
            .chain(self.id.as_bytes())
        {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Reads a cursor produced by [`ListCursor::encode`]; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        if s.len() != 48 || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 24];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
        }
        let created_ms = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let id = TaskId::from_bytes(bytes[8..].try_into().ok()?);
        Some(Self { created_ms, id })
    }
}

/// One page of tasks, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskPage {
    /// The matching tasks.
    pub tasks: Vec<Task>,
    /// Where to continue, or `None` when the listing is exhausted.
    pub next_cursor: Option<ListCursor>,
}

/// Identifies one schedule entry's cursor: the agent, the entry's index and its fingerprint
/// (expression and zone), so that an edited entry counts as new and its earlier slots never fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleKey {
    /// Whose schedule.
    pub agent: AgentId,
    /// 0-based index in the agent's `schedule` list.
    pub index: usize,
    /// What the entry says, see `schedule::Entry::fingerprint`.
    pub fingerprint: String,
}

/// How far a schedule entry has got, in Unix seconds. Slots at or before `considered` have been
/// fired or skipped; `first_seen` is kept for operators reading the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleCursor {
    /// When a running server first saw the entry.
    pub first_seen: u64,
    /// Every slot at or before this time has been dealt with.
    pub considered: u64,
}

/// A durable retry timer: `task` (of `agent`) re-enters its agent's queue at `due_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTimer {
    /// Unix milliseconds.
    pub due_ms: u64,
    /// The task waiting in `RETRY`.
    pub task: TaskId,
    /// Its agent, so start-up can hold a `block`-ordered agent's queue before reading the task.
    pub agent: AgentId,
}

/// What a write achieved, beyond being on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The submitted task was accepted; `seq` is now set.
    Accepted(Arc<Task>),
    /// The idempotency key was seen before with the same body: nothing was written.
    Duplicate(TaskId),
    /// The idempotency key was seen before with a different body: nothing was written.
    Conflict(TaskId),
    /// A purge removed this many tasks.
    Purged(usize),
    /// The task was revoked before this `Start` or `Complete`: nothing about it was written and
    /// its tick must not run (or its outcome is discarded).
    Revoked,
    /// What a [`Write::Cancel`] did.
    Cancel(CancelOutcome),
    /// Any other write is done.
    Done,
    /// A conditional write changed the task; this is its new record.
    Updated(Box<Task>),
    /// A conditional write found the task missing (`None`) or not in the state it was for:
    /// nothing was written (but a stale timer record).
    Unchanged(Option<Box<Task>>),
}

/// Called on the writer thread once a write is durable (or failed). It must be quick and must not
/// block: it typically sends on a channel or to an actor mailbox.
pub type OnWritten = Box<dyn FnOnce(Result<Written, StoreError>) + Send>;

/// An async store read. Boxed so that `dyn Store` keeps working; `Send` so it can be awaited on
/// any thread; `'static` because the backend owns what it needs to finish the read.
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// What an agent keeps between ticks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    /// The JSON object the next tick receives as `memory`.
    pub memory: Value,
    /// How many ticks the agent has run; the next tick is `ticks + 1`.
    pub ticks: u64,
}

/// Counts returned by a retention purge, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Finished task records removed.
    pub tasks: usize,
}

/// The persistence the rest of tickgate relies on.
pub trait Store: Send + Sync + 'static {
    /// Queues a durable write; `done` runs once it is on disk. Writes are applied in the order
    /// they are queued, which is what makes acceptance order the tick order.
    fn write(&self, write: Write, done: OnWritten);

    /// Reads one task, off the calling thread.
    fn task(&self, id: TaskId) -> StoreFuture<Option<Task>>;

    /// An agent's memory and tick counter; defaults for an agent that never ticked.
    fn agent_state(&self, agent: &AgentId) -> StoreFuture<AgentState>;

    /// Ids of the tasks still in an agent's queue (PENDING, or STARTED when a crash interrupted
    /// them), in acceptance order. Ids only: a backlog can be large, and each task is read when
    /// its turn comes.
    fn queued(&self, agent: &AgentId) -> StoreFuture<Vec<TaskId>>;

    /// The digest of an agent's current webhook token, if it has one. Blocking: only start-up
    /// and the CLI read it, before anything is served.
    fn token_digest(&self, agent: &AgentId) -> Result<Option<[u8; 32]>, StoreError>;

    /// A schedule entry's cursor, if a running server has seen the entry before.
    fn schedule_cursor(&self, key: &ScheduleKey) -> StoreFuture<Option<ScheduleCursor>>;

    /// Every pending retry timer, earliest first; read once at start-up so retries survive
    /// restarts.
    fn retry_timers(&self) -> StoreFuture<Vec<RetryTimer>>;
    /// Await timers due at `now_ms` (expiry time, task id), earliest first, at most `limit`.
    fn due_awaits(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<(u64, TaskId)>>;
    /// Deliveries matching `query`, oldest first.
    fn deliveries(&self, query: DeliveryQuery) -> StoreFuture<Vec<Delivery>>;

    /// One delivery by id.
    fn delivery(&self, id: u64) -> StoreFuture<Option<Delivery>>;

    /// Callback endpoints disabled by a 410 and not re-enabled yet: `(agent, index)`.
    fn disabled_endpoints(&self) -> StoreFuture<Vec<(AgentId, usize)>>;

    /// The outbox this store plans deliveries with, if callbacks are configured; the delivery
    /// worker takes its channel from it.
    fn outbox(&self) -> Option<Arc<Outbox>> {
        None
    }

    /// One page of the task listing, newest first, read off the calling thread from the
    /// listing index (written with each submission), so its cost depends on the page, not on
    /// how many tasks are stored.
    fn list_tasks(&self, query: ListQuery) -> StoreFuture<TaskPage>;

    /// Removes finished tasks (and their idempotency keys) that finished more than `older_than` ago.
    /// Blocking: the retention job runs it on the blocking pool.
    fn purge(&self, older_than: Duration) -> Result<Purged, StoreError>;

    /// Whether the store itself hands queued tasks to the agent that owns them (the NATS store,
    /// where another node may own the agent). Then the intake, the retry driver and resumes
    /// must not hand a task they made durable to the local agent: it reaches its owner from the
    /// store. False for the single-node sled store.
    fn dispatches(&self) -> bool {
        false
    }

    /// The node that owns `agent` (runs its ticks), for `/admin/agents`; `None` on a single
    /// node, where this node owns everything.
    fn owner(&self, _agent: &AgentId) -> Option<String> {
        None
    }

    /// Tasks waiting in `agent`'s queue across the cluster, as of the store's last look (the
    /// NATS store counts them every lease round); `None` where the local mailbox is exact.
    fn backlog(&self, _agent: &AgentId) -> Option<usize> {
        None
    }

    /// This store as `Any`, so start-up can find the NATS store behind `dyn Store` (and start
    /// the cluster's lease rounds) without this trait naming any backend.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;

    /// Whether the last write succeeded; feeds readiness.
    fn healthy(&self) -> bool;

    /// Flushes everything and waits for it; used on shutdown.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Revokes `task`, whose status as the backend sees it now is `status`, at `at_ms`: allowed only
/// from `PENDING`, `RETRY` or `AWAITING_INPUT` (a running or finished task cannot be cancelled).
/// Shared by the backends so that both decide a cancel the same way.
pub(crate) fn revoke(task: &mut Task, status: TaskStatus, at_ms: u64) -> Result<(), CancelOutcome> {
    if !matches!(
        status,
        TaskStatus::Pending | TaskStatus::Retry | TaskStatus::AwaitingInput
    ) {
        return Err(CancelOutcome::NotCancellable(status));
    }
    task.status = TaskStatus::Revoked;
    task.finished_at = Some(at_ms);
    task.next_attempt_at = None;
    task.awaiting = None;
    Ok(())
}

/// Waits for a write from async code. The future is `Send` so it can be awaited anywhere.
pub async fn write_async(store: &dyn Store, write: Write) -> Result<Written, StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.write(
        write,
        Box::new(move |res| {
            let _ = tx.send(res);
        }),
    );
    rx.await.unwrap_or(Err(StoreError::Closed))
}

/// Waits for a write from blocking code (start-up, the CLI); never call it on an async runtime.
pub fn write_blocking(store: &dyn Store, write: Write) -> Result<Written, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    store.write(
        write,
        Box::new(move |res| {
            let _ = tx.send(res);
        }),
    );
    rx.recv().unwrap_or(Err(StoreError::Closed))
}
