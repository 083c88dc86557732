//! The sled backend. Everything lives in one tree under short key prefixes so that one
//! `apply_batch` covers every record of a request (task, queue entry, idempotency key) and they
//! land together or not at all. One writer thread owns all writes: it blocks for the first
//! request, takes whatever else is queued, applies one batch and flushes once for all of them.
//! sled 0.34's concurrent `flush_async` stalls (sled issue 1308), so a single flusher is the
//! design rather than an optimisation.
//!
//! Three things this module does beyond storing, each because sled alone gets it wrong:
//! - **Recovery from a failed write.** sled 0.34 keeps the first I/O error (e.g. `ENOSPC`) as a
//!   "global error" and fails every later write with it until the `Db` is reopened. After a
//!   failed group commit the writer probes on a backoff (a small file written and synced in the
//!   store directory, so a full disk is detected without touching sled), then reopens the `Db`
//!   and proves it with a probe write + flush; only then is the store healthy again.
//! - **Durability modes.** [`SyncMode::Fsync`] adds an `fdatasync` of sled's data file (and of any
//!   new blob file) to every group commit, on the writer thread; [`SyncMode::Flush`] has the
//!   writer do the same at most every [`PERIODIC_SYNC`], in place of sled's periodic flusher,
//!   whose `fsync` stalled the group commits running beside it.
//! - **Records that cannot be decoded** are never skipped silently: each is logged with its key
//!   once, and reported to the [`Observer`] (a metric, the `/ready` body).
//!
//! The code is split by responsibility and record kind; every part stays private to this module:
//! - this file: the handle ([`SledStore`], [`Options`], what it shares with the writer), opening,
//!   the [`Store`] impl, the key prefixes and key builders of the records without a file of
//!   their own, and the helpers every part uses (`key`, `encode`, `decode`, `backend`, `hex`);
//! - `writer`: the writer thread: group commits, durability (`fdatasync`), and recovery after a
//!   failed commit (space probe, reopen);
//! - `stage`: what each [`Write`] puts into the batch of a group commit (`stage`), idempotency
//!   keys, the retention purge and cancellation;
//! - `staged`: the state of a batch in progress (`Staged`), which every staging part reads and
//!   none owns;
//! - `tasks`: task records (and the state records earlier layouts kept beside them), the outbox
//!   hook that rides on them, revoked markers, and the task reader;
//! - `queued`: the agents' queues as stored (segments under `q/`): staging and reading;
//! - `listed`: the per-agent listing index (`la/`): staging and the listing reader;
//! - `reads`: the readers of the other records (agent state, retry and await timers, schedule
//!   cursors, deliveries, disabled endpoints);
//! - `tests`: the store's tests, through the handle and, where a batch must be staged by hand,
//!   through `stage`.

mod listed;
mod queued;
mod reads;
mod stage;
mod staged;
mod tasks;
mod writer;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    AgentState, DeliveryQuery, ListQuery, OnWritten, Purged, RetryTimer, ScheduleCursor,
    ScheduleKey, Store, StoreError, StoreFuture, TaskPage, Write, Written,
};
use crate::model::{now_ms, AgentId, Task, TaskId};
use crate::outbox::{Delivery, Outbox};

use listed::read_list;
use queued::read_queued;
use reads::{
    read_agent_state, read_deliveries, read_delivery, read_disabled_endpoints, read_due_awaits,
    read_retry_timers, read_schedule_cursor,
};
use staged::Staged;
use tasks::{load_revoked, read_task};
use writer::{Durable, Job, Writer};

/// Task records: `t/<task id>` → the task as it is now, rewritten by every change (a whole head,
/// see `record`), or for a task not changed since an earlier layout wrote it, the head it was
/// accepted with.
const TASK: &[u8] = b"t/";
/// State records of the first binary layout: `u/<created_at ms BE><task id>` (and before that
/// `u/<task id>`) → a task's state since its last change, read over a head of that layout. No
/// longer written: a second key per task cost the single writer more than rewriting the head
/// (#16). Reads of such a task fall back to both keys; its next change makes them stale; the
/// purge removes them with the task.
const STATE: &[u8] = b"u/";
/// Queue entries: `q/<agent>\0<position BE>`, in queue order. A key holds the tasks one group
/// commit queued for the agent (a segment, see `queue`), or for positions handed out by earlier
/// releases a single task id.
const QUEUE: &[u8] = b"q/";
const IDEM: &[u8] = b"i/";
const AGENT_TOKEN: &[u8] = b"d/";
const AGENT: &[u8] = b"a/";
/// Finished entries, `f/<finished_at ms BE>\0<task id>` → task id, written by earlier releases
/// beside every finished task for the retention purge. No longer written: the purge walks the
/// per-agent listing index, which is in creation order, and reads `finished_at` from the head,
/// so a finished task costs one key less (#16: about 8 % of the instructions of a
/// fire-and-forget request). The purge still reads and removes the entries it finds.
const FINISHED: &[u8] = b"f/";
const SCHEDULE: &[u8] = b"s/";
/// Retry timers: `r/<due ms big-endian>\0<task id>` → agent id; earliest first in a scan.
const RETRY: &[u8] = b"r/";
/// Await expiry timers: `w/<expires_at ms, big-endian>\0<task id>`, one per parked task.
const AWAIT_TIMER: &[u8] = b"w/";
/// Status callback deliveries (the outbox), keyed by their increasing id.
const OUTBOX: &[u8] = b"o/";
/// Callback endpoints disabled by a 410, keyed by agent and endpoint index.
const NOTIFY_OFF: &[u8] = b"n/";
/// Listing index over every task: `l/<created_at ms BE><task id>`, empty value. Written with the
/// task's submission, removed with its purge.
const LIST: &[u8] = b"l/";
/// Listing index per agent: `la/<agent>\0<created_at ms BE><task id>`; the value holds the
/// entries of the tasks accepted with it in one group commit, or nothing (see `listing`).
const LIST_AGENT: &[u8] = b"la/";
/// Marks a revoked task: `rv/<task id>`, empty value. A point lookup lets `Start` and `Complete`
/// refuse a revoked task without decoding its record.
const REVOKED: &[u8] = b"rv/";
/// The record the writer rewrites to prove a reopened store takes writes again.
const PROBE: &[u8] = b"p/probe";

/// Most finished tasks one purge write removes; a purge of more takes several writes, so
/// submissions are never held behind a long one.
const PURGE_CHUNK: usize = if cfg!(test) { 50 } else { 1000 };

/// How many tasks one purge write looks at, in [`PURGE_CHUNK`]s: a bound on the write
/// when many tasks created before the cutoff are not due (still running, parked, retrying).
const PURGE_LOOK_FACTOR: usize = 4;

/// In [`SyncMode::Flush`], the longest a flushed write waits for its `fdatasync`: what power loss
/// or an OS crash can take. sled's own periodic flusher did this with a full `fsync` every 500 ms;
/// it is switched off because that `fsync`, carrying half a second of writes, stalled the group
/// commits beside it (fire-and-forget p99 25 ms). A short period keeps each `fdatasync` small:
/// same run, p99 11–13 ms at 20–100 ms, 16–21 ms at 200 ms, 26–29 ms at 500 ms; in sequence with
/// the commits (on the writer) or beside them (another thread) made no difference.
const PERIODIC_SYNC: Duration = Duration::from_millis(50);

/// How long a reopen waits for readers to drop their handles on the old `Db` (sled holds an
/// exclusive file lock until the last handle is gone).
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// Called by the writer after each group commit with its duration and how many requests it
/// carried; metrics hang off it without the store knowing about them.
pub type FlushHook = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// When a group commit counts as durable (`[store] sync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// sled's flush (write + `sync_file_range`): survives the process being killed (`kill -9`);
    /// power loss or an OS crash can lose what was acknowledged since the writer's last
    /// `fdatasync`, which follows any flushed write within 50 ms (the writer's periodic sync).
    #[default]
    Flush,
    /// sled's flush followed by `fdatasync` of its data file (and new blob files): an
    /// acknowledged write also survives power loss and OS crashes.
    Fsync,
}

/// Receives what the store wants counted, so metrics live in the binary and the store does not
/// depend on them. Every method runs on the thread where the event happened and must be quick.
pub trait Observer: Send + Sync {
    /// A group commit ended (successfully or not) after `took`, carrying `requests` writes.
    fn flushed(&self, _took: Duration, _requests: usize) {}
    /// The store was made durable with `fdatasync`: every group commit in [`SyncMode::Fsync`],
    /// at most every 50 ms (the writer's periodic sync) in [`SyncMode::Flush`].
    fn fsynced(&self) {}
    /// A record was found that cannot be decoded; reported once per record per process.
    fn unreadable(&self, _record: &str) {}
}

/// How to open a [`SledStore`].
#[derive(Clone, Default)]
pub struct Options {
    /// Durability of each group commit.
    pub sync: SyncMode,
    /// Where counts go.
    pub observer: Option<Arc<dyn Observer>>,
    /// Plans status callback deliveries for every task record the writer stages.
    pub outbox: Option<Arc<Outbox>>,
}

struct FlushOnly(FlushHook);

impl Observer for FlushOnly {
    fn flushed(&self, took: Duration, requests: usize) {
        (self.0)(took, requests)
    }
}

/// What the store handle and its writer thread share.
struct Shared {
    /// The open `Db`; `None` only while the writer reopens it after a failure.
    db: RwLock<Option<sled::Db>>,
    healthy: AtomicBool,
    /// Records already reported as undecodable, so each is logged and counted once.
    unreadable: Mutex<BTreeSet<String>>,
    observer: Option<Arc<dyn Observer>>,
    outbox: Option<Arc<Outbox>>,
    /// Where the retention purge in progress resumes its walk of the listing index: set by
    /// [`SledStore::purge`] when it starts, moved on by each of its writes, `None` once the walk
    /// is done.
    purge_cursor: Mutex<Option<Vec<u8>>>,
    /// Held by a purge for its whole run, so that two never share the cursor.
    purging: Mutex<()>,
}

impl Shared {
    fn db(&self) -> Result<sled::Db, StoreError> {
        self.db
            .read()
            .ok()
            .and_then(|db| db.clone())
            .ok_or_else(|| {
                StoreError::Backend("the store is being reopened after a write failure".into())
            })
    }

    /// Decodes a stored record, reporting (once) and refusing one that cannot be decoded.
    fn decode<T: DeserializeOwned>(
        &self,
        record: impl FnOnce() -> String,
        raw: &[u8],
    ) -> Result<T, StoreError> {
        decode(raw).map_err(|e| {
            let record = record();
            self.report_unreadable(record.clone(), &e);
            StoreError::Backend(format!("the stored {record} cannot be decoded: {e}"))
        })
    }

    fn report_unreadable(&self, record: String, error: &serde_json::Error) {
        let new = self
            .unreadable
            .lock()
            .map(|mut seen| seen.insert(record.clone()))
            .unwrap_or(true);
        if new {
            tracing::error!(record = %record, error = %error, "a stored record cannot be decoded; it is left as it is");
            if let Some(o) = &self.observer {
                o.unreadable(&record);
            }
        }
    }
}

/// sled-backed [`Store`].
pub struct SledStore {
    path: PathBuf,
    sync: SyncMode,
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SledStore {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_opts(path, Options::default())
    }

    /// Like [`SledStore::open`], reporting every group commit to `on_flush`.
    pub fn open_with(path: &Path, on_flush: Option<FlushHook>) -> Result<Arc<Self>, StoreError> {
        Self::open_opts(
            path,
            Options {
                observer: on_flush.map(|f| Arc::new(FlushOnly(f)) as Arc<dyn Observer>),
                ..Options::default()
            },
        )
    }

    /// Opens the store with a durability mode and an observer for its counts.
    pub fn open_opts(path: &Path, options: Options) -> Result<Arc<Self>, StoreError> {
        let db = open_db(path)?;
        let durable = Durable::new(path).map_err(|e| {
            StoreError::Backend(format!("cannot fsync the store at {}: {e}", path.display()))
        })?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db.clone())),
            healthy: AtomicBool::new(true),
            unreadable: Mutex::new(BTreeSet::new()),
            observer: options.observer,
            outbox: options.outbox,
            purge_cursor: Mutex::new(None),
            purging: Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let writer = Writer {
            path: path.to_path_buf(),
            shared: shared.clone(),
            revoked: load_revoked(&db)?,
            db: Some(db),
            durable: Some(durable),
            unsynced_since: None,
            sync: options.sync,
            staged: Staged::default(),
            broken: false,
            last_error: None,
        };
        let writer = std::thread::Builder::new()
            .name("tickgate-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            sync: options.sync,
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Stops the writer after it has written everything queued, then flushes. Later writes fail
    /// with [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.flush()
    }

    /// Records found undecodable so far (by key), for operators and tests.
    pub fn unreadable_records(&self) -> Vec<String> {
        self.shared
            .unreadable
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        // The writer syncs instead (PERIODIC_SYNC): the `fsync` of sled's flusher thread, every
        // 500 ms, stalled the group commits running beside it.
        .flush_every_ms(None)
        .open()
        .map_err(|e| open_error(path, e))
}

/// Runs `open` until it stops reporting [`StoreError::Locked`] or `wait` has passed. sled's file
/// lock goes with the last handle on a `Db`: a reader's clone, or the one an I/O thread holds a
/// moment past the flush it serves (it wakes the flusher first), so an open in the same process
/// right after the old handle was given up can find the lock still held.
fn open_waiting<T>(
    wait: Duration,
    mut open: impl FnMut() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + wait;
    loop {
        match open() {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    let text = e.to_string();
    let locked = matches!(&e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock)
        || text.contains("lock");
    if locked {
        StoreError::Locked {
            path: path.display().to_string(),
        }
    } else {
        StoreError::Backend(format!("cannot open store at {}: {text}", path.display()))
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Decodes a record without serde_json's nesting limit of 128. What the store wrote it must read
/// back: a task wraps its `inputs` one level deeper than they arrived, so an input that passed
/// the parser's limit could otherwise be stored and never read again. The depth of what is
/// written is bounded by the parsers in front of the store, so the recursion here is too.
fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // Sized once: growing from the prefix reallocated on almost every key (#16).
    let len = prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(prefix);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// `prefix` then `namespace/name`, written straight into the key (no intermediate string: these
/// keys are built several times per request on the writer thread). `extra` is the room the
/// caller will append.
fn agent_key(prefix: &[u8], agent: &AgentId, extra: usize) -> Vec<u8> {
    let mut k =
        Vec::with_capacity(prefix.len() + agent.namespace().len() + 1 + agent.name().len() + extra);
    k.extend_from_slice(prefix);
    k.extend_from_slice(agent.namespace().as_bytes());
    k.push(b'/');
    k.extend_from_slice(agent.name().as_bytes());
    k
}

/// The agent state record `a/<agent>`.
fn agent_state_key(agent: &AgentId) -> Vec<u8> {
    agent_key(AGENT, agent, 0)
}

/// A finished entry as earlier releases wrote them (see [`FINISHED`]).
#[cfg(test)]
fn finished_key(at_ms: u64, id: &TaskId) -> Vec<u8> {
    key(FINISHED, &[&at_ms.to_be_bytes(), id.as_bytes()])
}

fn retry_key(due_ms: u64, id: &TaskId) -> Vec<u8> {
    key(RETRY, &[&due_ms.to_be_bytes(), id.as_bytes()])
}

fn await_timer_key(expires_at: u64, id: &TaskId) -> Vec<u8> {
    key(AWAIT_TIMER, &[&expires_at.to_be_bytes(), id.as_bytes()])
}

fn schedule_key(k: &ScheduleKey) -> Vec<u8> {
    key(
        SCHEDULE,
        &[
            k.agent.to_string().as_bytes(),
            &(k.index as u64).to_be_bytes(),
            k.fingerprint.as_bytes(),
        ],
    )
}

fn outbox_key(id: u64) -> Vec<u8> {
    key(OUTBOX, &[&id.to_be_bytes()])
}

fn notify_off_key(agent: &AgentId, endpoint: usize) -> Vec<u8> {
    key(
        NOTIFY_OFF,
        &[
            agent.to_string().as_bytes(),
            &(endpoint as u64).to_be_bytes(),
        ],
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(backend)
}

/// Runs a sled read on tokio's blocking pool: a read can touch the disk, and callers of the
/// [`Store`] trait are async code on actix arbiters, which must never block.
fn off_thread<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> StoreFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(read)
            .await
            .unwrap_or_else(|e| Err(StoreError::Backend(format!("store read failed: {e}"))))
    })
}

/// Blocking reads for code that runs outside any async runtime (tests, tools); async code uses
/// the [`Store`] trait's reads, which run these off the calling thread.
impl SledStore {
    /// Reads one task, blocking the calling thread.
    pub fn task_blocking(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        read_task(&self.shared, id)
    }

    /// An agent's memory and tick counter, blocking the calling thread.
    pub fn agent_state_blocking(&self, agent: &AgentId) -> Result<AgentState, StoreError> {
        read_agent_state(&self.shared, agent)
    }

    /// The ids queued for an agent, blocking the calling thread.
    pub fn queued_blocking(&self, agent: &AgentId) -> Result<Vec<TaskId>, StoreError> {
        read_queued(&self.shared, agent)
    }

    /// Pending retry timers, blocking the calling thread.
    pub fn retry_timers_blocking(&self) -> Result<Vec<RetryTimer>, StoreError> {
        read_retry_timers(&self.shared)
    }

    /// A listing page, blocking the calling thread.
    pub fn list_tasks_blocking(&self, query: &ListQuery) -> Result<TaskPage, StoreError> {
        read_list(&self.shared, query)
    }

    /// A schedule entry's cursor, blocking the calling thread.
    pub fn schedule_cursor_blocking(
        &self,
        k: &ScheduleKey,
    ) -> Result<Option<ScheduleCursor>, StoreError> {
        read_schedule_cursor(&self.shared, k)
    }
}

impl Store for SledStore {
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn write(&self, write: Write, done: OnWritten) {
        let sender = self.jobs.lock().ok().and_then(|jobs| jobs.clone());
        let rejected = match sender {
            Some(tx) => tx.send(Job { write, done }).err().map(|e| e.0.done),
            None => Some(done),
        };
        if let Some(done) = rejected {
            done(Err(StoreError::Closed));
        }
    }

    fn task(&self, id: TaskId) -> StoreFuture<Option<Task>> {
        let shared = self.shared.clone();
        off_thread(move || read_task(&shared, id))
    }

    fn agent_state(&self, agent: &AgentId) -> StoreFuture<AgentState> {
        let (shared, agent) = (self.shared.clone(), agent.clone());
        off_thread(move || read_agent_state(&shared, &agent))
    }

    fn queued(&self, agent: &AgentId) -> StoreFuture<Vec<TaskId>> {
        let (shared, agent) = (self.shared.clone(), agent.clone());
        off_thread(move || read_queued(&shared, &agent))
    }

    fn token_digest(&self, agent: &AgentId) -> Result<Option<[u8; 32]>, StoreError> {
        let raw = self
            .shared
            .db()?
            .get(key(AGENT_TOKEN, &[agent.to_string().as_bytes()]))
            .map_err(backend)?;
        Ok(raw.and_then(|r| <[u8; 32]>::try_from(r.as_ref()).ok()))
    }

    fn schedule_cursor(&self, k: &ScheduleKey) -> StoreFuture<Option<ScheduleCursor>> {
        let (shared, k) = (self.shared.clone(), k.clone());
        off_thread(move || read_schedule_cursor(&shared, &k))
    }

    fn retry_timers(&self) -> StoreFuture<Vec<RetryTimer>> {
        let shared = self.shared.clone();
        off_thread(move || read_retry_timers(&shared))
    }

    fn due_awaits(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<(u64, TaskId)>> {
        let shared = self.shared.clone();
        off_thread(move || read_due_awaits(&shared, now_ms, limit))
    }

    fn deliveries(&self, query: DeliveryQuery) -> StoreFuture<Vec<Delivery>> {
        let shared = self.shared.clone();
        off_thread(move || read_deliveries(&shared, &query))
    }

    fn delivery(&self, id: u64) -> StoreFuture<Option<Delivery>> {
        let shared = self.shared.clone();
        off_thread(move || read_delivery(&shared, id))
    }

    fn disabled_endpoints(&self) -> StoreFuture<Vec<(AgentId, usize)>> {
        let shared = self.shared.clone();
        off_thread(move || read_disabled_endpoints(&shared))
    }

    fn outbox(&self) -> Option<Arc<Outbox>> {
        self.shared.outbox.clone()
    }

    fn list_tasks(&self, query: ListQuery) -> StoreFuture<TaskPage> {
        let shared = self.shared.clone();
        off_thread(move || read_list(&shared, &query))
    }

    fn purge(&self, older_than: Duration) -> Result<Purged, StoreError> {
        let finished_before_ms = now_ms().saturating_sub(older_than.as_millis() as u64);
        let mut purged = Purged::default();
        let _one_at_a_time = self
            .shared
            .purging
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *self
            .shared
            .purge_cursor
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(LIST_AGENT.to_vec());
        loop {
            let write = Write::Purge {
                finished_before_ms,
                limit: PURGE_CHUNK,
            };
            match super::write_blocking(self, write)? {
                Written::Purged(n) => {
                    purged.tasks += n;
                    let walked = self
                        .shared
                        .purge_cursor
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_none();
                    if n < PURGE_CHUNK && walked {
                        return Ok(purged);
                    }
                }
                other => {
                    return Err(StoreError::Backend(format!(
                        "store answered a purge with {other:?}"
                    )))
                }
            }
        }
    }

    fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.shared.db()?.flush().map_err(backend)?;
        if self.sync == SyncMode::Fsync {
            File::open(self.path.join("db"))
                .and_then(|f| f.sync_data())
                .map_err(|e| StoreError::Backend(format!("fdatasync of the store failed: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
