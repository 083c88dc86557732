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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::listing::{self, Entry};
use super::queue::{self, Segment};
use super::record;
use super::{
    AgentState, CancelOutcome, DeliveryQuery, ListCursor, ListQuery, OnWritten, Purged, RetryTimer,
    ScheduleCursor, ScheduleKey, Store, StoreError, StoreFuture, TaskPage, Write, Written,
};
use crate::model::{now_ms, AgentId, Task, TaskId, TaskStatus};
use crate::outbox::{Delivery, Outbox};

/// Task head records: `t/<task id>` → what the task was accepted with (see `record`).
const TASK: &[u8] = b"t/";
/// Task state records: `u/<created_at ms BE><task id>` → the task's state since its last change
/// after acceptance, read over its head. Keyed by creation time so that completions, which come
/// in roughly acceptance order, are written next to each other at the end of the range rather
/// than at random places in the tree (5 % less writer CPU per task, #16). Stores written before
/// keyed them `u/<task id>`: reads fall back to that key, purges remove both.
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
/// state records, which are in creation order and hold `finished_at`, so a finished task costs
/// one key less (#16: about 8 % of the instructions of a fire-and-forget request). The purge
/// still reads and removes the entries it finds.
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

/// How many state records one purge write looks at, in [`PURGE_CHUNK`]s: a bound on the write
/// when many tasks created before the cutoff are not due (still running, parked, retrying).
const PURGE_LOOK_FACTOR: usize = 4;

/// In [`SyncMode::Flush`], the longest a flushed write waits for its `fdatasync`: what power loss
/// or an OS crash can take. sled's own periodic flusher did this with a full `fsync` every 500 ms;
/// it is switched off because that `fsync`, carrying half a second of writes, stalled the group
/// commits beside it (fire-and-forget p99 25 ms). A short period keeps each `fdatasync` small:
/// same run, p99 11–13 ms at 20–100 ms, 16–21 ms at 200 ms, 26–29 ms at 500 ms; in sequence with
/// the commits (on the writer) or beside them (another thread) made no difference.
const PERIODIC_SYNC: Duration = Duration::from_millis(50);

/// Largest number of requests folded into one batch; bounds the latency of the first of them.
const MAX_BATCH: usize = 4096;

/// First and longest wait between recovery probes after a failed write: recovery is noticed
/// within a fraction of a second, and a disk that stays full costs one small probe every 2 s.
const PROBE_MIN: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

/// Size of the file written to check that the disk takes writes again. It is larger than what
/// one small group commit needs, so a disk with a few free bytes is not mistaken for a healthy
/// one, and small enough to cost nothing.
const PROBE_FILE_BYTES: usize = 256 * 1024;
const PROBE_FILE: &str = "tickgate-probe.tmp";

/// How long a reopen waits for readers to drop their handles on the old `Db` (sled holds an
/// exclusive file lock until the last handle is gone).
const REOPEN_WAIT: Duration = Duration::from_secs(2);

struct Job {
    write: Write,
    done: OnWritten,
}

/// What is kept under an idempotency key.
#[derive(Serialize, Deserialize)]
struct IdemRecord {
    task: TaskId,
    body_sha256: String,
}

/// Called by the writer after each group commit with its duration and how many requests it
/// carried; metrics hang off it without the store knowing about them.
pub type FlushHook = Arc<dyn Fn(Duration, usize) + Send + Sync>;

/// When a group commit counts as durable (`[store] sync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// sled's flush (write + `sync_file_range`): survives the process being killed (`kill -9`);
    /// power loss or an OS crash can lose what was acknowledged since the writer's last
    /// `fdatasync`, which follows any flushed write within [`PERIODIC_SYNC`] (50 ms).
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
    /// at most every [`PERIODIC_SYNC`] in [`SyncMode::Flush`].
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
    /// Where the retention purge in progress resumes its walk of the state records: set by
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

    /// Reads a task: its head record and, if it changed since acceptance, its state record over
    /// it. `None` when there is no head (never accepted, or purged).
    fn load_task(&self, db: &sled::Db, id: TaskId) -> Result<Option<Task>, StoreError> {
        let Some(head) = db.get(task_key(&id)).map_err(backend)? else {
            return Ok(None);
        };
        let unreadable = |e: record::RecordError| {
            let what = format!("task {id}");
            self.report_unreadable(what.clone(), &e.into_json());
            StoreError::Backend(format!("the stored {what} cannot be decoded"))
        };
        let mut task = record::decode_task(id, &head).map_err(unreadable)?;
        if let Some(state) = get_state(db, &task)? {
            record::apply_state(&mut task, &state).map_err(unreadable)?;
        }
        Ok(Some(task))
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

fn task_key(id: &TaskId) -> Vec<u8> {
    key(TASK, &[id.as_bytes()])
}

fn state_key(task: &Task) -> Vec<u8> {
    key(STATE, &[&task.created_at.to_be_bytes(), task.id.as_bytes()])
}

/// Where the release before this one kept a task's state record.
fn legacy_state_key(id: &TaskId) -> Vec<u8> {
    key(STATE, &[id.as_bytes()])
}

/// The task id in a state key of the current layout (`u/<created_at>\0<id>`, see [`state_key`]);
/// `None` for the earlier layout (`u/<id>`).
fn state_key_id(key: &[u8]) -> Option<TaskId> {
    let rest = key.strip_prefix(STATE)?;
    if rest.len() != 8 + 1 + 16 || rest[8] != 0 {
        return None;
    }
    Some(TaskId::from_bytes(rest[9..].try_into().ok()?))
}

/// A task's state record: under its key, or for a task last changed by an older release, under
/// the legacy one.
fn get_state(db: &sled::Db, task: &Task) -> Result<Option<sled::IVec>, StoreError> {
    match db.get(state_key(task)).map_err(backend)? {
        Some(state) => Ok(Some(state)),
        None => db.get(legacy_state_key(&task.id)).map_err(backend),
    }
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

fn queue_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = agent_key(QUEUE, agent, 1 + 8);
    k.push(0);
    k
}

fn queue_key(agent: &AgentId, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(agent);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn idem_key(agent: &AgentId, idem_key: &str) -> Vec<u8> {
    let mut k = agent_key(IDEM, agent, 1 + idem_key.len());
    k.push(0);
    k.extend_from_slice(idem_key.as_bytes());
    k
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

fn list_key(task: &Task) -> Vec<u8> {
    let mut k = LIST.to_vec();
    k.extend_from_slice(&task.created_at.to_be_bytes());
    k.extend_from_slice(task.id.as_bytes());
    k
}

fn list_agent_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = agent_key(LIST_AGENT, agent, 1 + 8 + 16);
    k.push(0);
    k
}

/// The listing key whose own entry is `e`, under an agent's `prefix`.
fn listing_key(prefix: &[u8], e: &Entry) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + e.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(e);
    k
}

fn revoked_key(id: &TaskId) -> Vec<u8> {
    key(REVOKED, &[id.as_bytes()])
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

/// `fdatasync` of sled's files for [`SyncMode::Fsync`]. sled keeps everything but large values
/// in its `db` file; values above its blob threshold go to files under `blobs/`, which sled
/// writes without syncing, so new ones are synced here (with their directory).
struct Durable {
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl Durable {
    fn new(path: &Path) -> std::io::Result<Self> {
        let db_file = File::open(path.join("db"))?;
        // The files sled just created must be reachable after a crash too.
        File::open(path)?.sync_all()?;
        let mut durable = Self {
            db_file,
            blobs_dir: path.join("blobs"),
            synced_blobs: HashSet::new(),
        };
        durable.sync()?;
        Ok(durable)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.db_file.sync_data()?;
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new_blob = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                File::open(entry.path())?.sync_data()?;
                new_blob = true;
            }
            present.insert(name);
        }
        if new_blob {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

/// Checks that the disk under `dir` takes a write again, without touching sled: a file of
/// [`PROBE_FILE_BYTES`] is written, synced and removed.
fn probe_space(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(PROBE_FILE);
    let written = File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; PROBE_FILE_BYTES])?;
        f.sync_data()
    });
    let removed = std::fs::remove_file(&path);
    written?;
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The single writer: group commits, durability, and recovery after a failed commit.
struct Writer {
    path: PathBuf,
    shared: Arc<Shared>,
    /// The writer's handle; `None` after a failure until a reopen succeeds.
    db: Option<sled::Db>,
    /// Every revoked task still stored (its `rv/` marker), so `Start` and `Complete` check it
    /// without a tree read; loaded at open and at every reopen, updated after each commit.
    revoked: HashSet<TaskId>,
    /// `fdatasync` of sled's files: after every group commit in [`SyncMode::Fsync`], at most every
    /// [`PERIODIC_SYNC`] in [`SyncMode::Flush`]. `None` after a failure until a reopen succeeds.
    durable: Option<Durable>,
    /// When the oldest flushed write not yet covered by an `fdatasync` was flushed.
    unsynced_since: Option<Instant>,
    sync: SyncMode,
    /// The staging state of the group commit in progress, kept between commits for its
    /// capacity.
    staged: Staged,
    /// A commit failed: sled holds a global error and must be reopened before writing again.
    broken: bool,
    last_error: Option<StoreError>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut jobs = Vec::new();
        let mut backoff = PROBE_MIN;
        loop {
            let first = if self.healthy() {
                let received = match self.sync_due_in() {
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(wait) => rx.recv_timeout(wait),
                };
                match received {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Quiet since the last flush: its fdatasync is due now.
                        if let Err(e) = self.sync_now() {
                            tracing::error!(error = %e, "store sync failed; retrying on a backoff");
                            self.fail(e);
                        }
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv_timeout(backoff) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        backoff = if self.recover() {
                            PROBE_MIN
                        } else {
                            (backoff * 2).min(PROBE_MAX)
                        };
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            if !self.healthy() && !self.recover() {
                let error = self.last_error.clone().unwrap_or_else(|| {
                    StoreError::Backend("the store is recovering from a write failure".into())
                });
                for job in jobs.drain(..) {
                    (job.done)(Err(error.clone()));
                }
                continue;
            }
            backoff = PROBE_MIN;
            self.commit(&mut jobs);
        }
        // Shutting down: a store that never recovered is tried once more, so that a clean stop
        // after the disk was freed does not fail on a stale error.
        if !self.healthy() {
            self.recover();
        }
        if self.unsynced_since.is_some() {
            if let Err(e) = self.sync_now() {
                tracing::error!(error = %e, "store sync at shutdown failed");
            }
        }
    }

    /// How long until the flushed writes not yet synced are due for their `fdatasync`.
    fn sync_due_in(&self) -> Option<Duration> {
        self.unsynced_since
            .map(|since| PERIODIC_SYNC.saturating_sub(since.elapsed()))
    }

    fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    fn commit(&mut self, jobs: &mut Vec<Job>) {
        let Some(db) = self.db.clone() else {
            // Only healthy stores commit, and a healthy store has a handle; answer anyway.
            for job in jobs.drain(..) {
                (job.done)(Err(StoreError::Backend("the store is not open".into())));
            }
            return;
        };
        let mut batch = sled::Batch::default();
        // Reused from the previous commit with its capacity, so that its maps do not grow (and
        // rehash) from empty in every group commit (#16).
        let mut staged = std::mem::take(&mut self.staged);
        staged.clear();
        // Each write is consumed by staging: an accepted task moves into its answer rather than
        // being copied, which matters on this one thread every write goes through.
        let staged_jobs: Vec<(OnWritten, Result<Written, StoreError>)> = jobs
            .drain(..)
            .map(|job| {
                let outcome = stage(
                    &db,
                    &self.shared,
                    &self.revoked,
                    &mut batch,
                    &mut staged,
                    job.write,
                );
                (job.done, outcome)
            })
            .collect();
        staged.write_queue(&mut batch);
        staged.write_listing(&mut batch);
        let requests = staged_jobs.len();
        let started = Instant::now();
        let committed = db
            .apply_batch(batch)
            .and_then(|()| db.flush().map(|_| ()))
            .map_err(backend)
            .and_then(|()| self.make_durable());
        if let Some(o) = &self.shared.observer {
            o.flushed(started.elapsed(), requests);
        }
        if let Err(e) = &committed {
            tracing::error!(error = %e, requests, "store write failed; retrying on a backoff");
            self.fail(e.clone());
            // It may hold entries of the batch that did not land.
            staged.list_tail.clear();
        } else {
            self.revoked.extend(staged.revoked.drain());
            for id in &staged.unrevoked {
                self.revoked.remove(id);
            }
            if let Some(outbox) = &self.shared.outbox {
                if !staged.deliveries.is_empty() {
                    outbox.committed(std::mem::take(&mut staged.deliveries));
                }
            }
        }
        for (done, outcome) in staged_jobs {
            let result = match &committed {
                Ok(()) => outcome,
                Err(e) => Err(e.clone()),
            };
            done(result);
        }
        self.staged = staged;
    }

    /// What follows each flush: `fdatasync` at once in [`SyncMode::Fsync`]; in
    /// [`SyncMode::Flush`] only once the oldest unsynced flush is [`PERIODIC_SYNC`] old (a quiet
    /// store gets it from the timed wait in `run`).
    fn make_durable(&mut self) -> Result<(), StoreError> {
        match self.sync {
            SyncMode::Fsync => self.sync_now(),
            SyncMode::Flush => {
                let since = *self.unsynced_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= PERIODIC_SYNC {
                    self.sync_now()
                } else {
                    Ok(())
                }
            }
        }
    }

    /// `fdatasync` of everything flushed so far.
    fn sync_now(&mut self) -> Result<(), StoreError> {
        let Some(durable) = &mut self.durable else {
            return Ok(());
        };
        durable
            .sync()
            .map_err(|e| StoreError::Backend(format!("fdatasync of the store failed: {e}")))?;
        self.unsynced_since = None;
        if let Some(o) = &self.shared.observer {
            o.fsynced();
        }
        Ok(())
    }

    fn fail(&mut self, e: StoreError) {
        self.broken = true;
        self.last_error = Some(e);
        self.shared.healthy.store(false, Ordering::Relaxed);
    }

    /// One recovery attempt: is there space again, then reopen sled (dropping its global error)
    /// and prove it with a probe write. Returns whether the store is healthy.
    fn recover(&mut self) -> bool {
        if let Err(e) = probe_space(&self.path) {
            self.last_error = Some(StoreError::Backend(format!(
                "the store's disk does not take writes: {e}"
            )));
            return false;
        }
        if self.broken {
            if let Err(e) = self.reopen() {
                tracing::warn!(error = %e, "store reopen failed; retrying");
                self.last_error = Some(e);
                return false;
            }
            self.broken = false;
        }
        let Some(db) = self.db.clone() else {
            self.broken = true;
            return false;
        };
        let probed = db
            .insert(PROBE, now_ms().to_be_bytes().to_vec())
            .and_then(|_| db.flush().map(|_| ()))
            .map_err(backend)
            .and_then(|()| self.sync_now());
        match probed {
            Ok(()) => {
                self.last_error = None;
                self.shared.healthy.store(true, Ordering::Relaxed);
                tracing::info!("store writes work again");
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    /// Drops every handle on the failed `Db` (readers get a 503 meanwhile) and opens it again;
    /// sled's recovery discards whatever the failed commit left half-written.
    fn reopen(&mut self) -> Result<(), StoreError> {
        self.db = None;
        self.durable = None;
        let old = self.shared.db.write().ok().and_then(|mut db| db.take());
        drop(old);
        // A reader still holds a clone of the old handle for a moment.
        let db = open_waiting(REOPEN_WAIT, || open_db(&self.path))?;
        self.durable = Some(
            Durable::new(&self.path)
                .map_err(|e| StoreError::Backend(format!("fdatasync of the store failed: {e}")))?,
        );
        self.unsynced_since = None;
        // What a failed commit staged never landed: the set is read again from the store.
        self.revoked = load_revoked(&db)?;
        if let Ok(mut shared) = self.shared.db.write() {
            *shared = Some(db.clone());
        }
        self.db = Some(db);
        tracing::info!(path = %self.path.display(), "store reopened after a write failure");
        Ok(())
    }
}

/// Keys written earlier in the same batch, which `db.get` cannot see yet.
#[derive(Default)]
struct Staged {
    idem: HashMap<Vec<u8>, (TaskId, [u8; 32])>,
    /// Tasks written by conditional writes earlier in the batch, so that a second condition
    /// (a second answer, an expiry) sees the first one's result.
    tasks: HashMap<TaskId, Task>,
    /// Status of each task record staged in this batch, for the outbox's previous-status check.
    statuses: HashMap<TaskId, TaskStatus>,
    /// Deliveries staged in this batch, handed to the outbox once the batch is durable.
    deliveries: Vec<Delivery>,
    /// Tasks revoked in this batch, for `Start` and `Complete`; added to the writer's set once
    /// the batch is durable.
    revoked: HashSet<TaskId>,
    /// Revoked tasks purged in this batch; leave the writer's set once the batch is durable.
    unrevoked: Vec<TaskId>,
    /// Queue segments this batch changes, by key, as it leaves them (empty: removed); written
    /// into the batch by [`Staged::write_queue`] once every write is staged.
    queue: HashMap<Vec<u8>, Segment>,
    /// Per agent, the next position in the segment this batch queues new tasks in.
    open: HashMap<AgentId, u64>,
    /// Listing keys of earlier commits this batch changes (an entry joins or leaves), by the key
    /// they are stored under, with all their entries as the batch leaves them.
    listing: HashMap<Vec<u8>, BTreeSet<Entry>>,
    /// Per agent, this batch's entries newer than everything listed before: one new key.
    list_new: HashMap<AgentId, BTreeSet<Entry>>,
    /// Per agent, the newest entry of its listing as of the last commit (`None`: no entry). A
    /// cache of what the store holds, read on a miss; unlike the rest it outlives the batch,
    /// and it is dropped when a commit fails.
    list_tail: HashMap<AgentId, Option<Entry>>,
}

impl Staged {
    /// Empties it for the next batch, keeping the capacity of its maps (up to a bound, so that
    /// one very large batch does not pin its memory).
    fn clear(&mut self) {
        const KEEP: usize = 1024;
        let kept = [
            self.statuses.capacity(),
            self.tasks.capacity(),
            self.idem.capacity(),
            self.queue.capacity(),
            self.open.capacity(),
        ];
        if kept.into_iter().any(|c| c > KEEP) {
            *self = Self::default();
            return;
        }
        self.idem.clear();
        self.tasks.clear();
        self.statuses.clear();
        self.deliveries.clear();
        self.revoked.clear();
        self.unrevoked.clear();
        self.queue.clear();
        self.open.clear();
        self.listing.clear();
        self.list_new.clear();
        if self.list_tail.len() > LIST_TAILS_KEPT {
            self.list_tail = HashMap::new();
        }
    }

    /// Puts the listing keys the batch changed into it. A key that lost its own entry moves to
    /// its oldest remaining one (nothing else lies in its range, so the move keeps the rule of
    /// `listing`), and a key left without entries goes.
    fn write_listing(&mut self, batch: &mut sled::Batch) {
        for (agent, entries) in self.list_new.drain() {
            let prefix = list_agent_prefix(&agent);
            let mut all = entries.iter();
            let first = all.next().expect("a new listing key has an entry");
            batch.insert(listing_key(&prefix, first), listing::encode(all));
            self.list_tail.insert(agent, entries.last().copied());
        }
        for (key, entries) in self.listing.drain() {
            let prefix = &key[..key.len() - 24];
            let mut all = entries.iter();
            let Some(first) = all.next() else {
                batch.remove(key);
                continue;
            };
            let moved = listing_key(prefix, first);
            if moved != key {
                batch.remove(key);
            }
            batch.insert(moved, listing::encode(all));
        }
    }

    /// Puts the queue segments the batch changed into it: each once, however many of its tasks
    /// the batch queued or took out.
    fn write_queue(&mut self, batch: &mut sled::Batch) {
        for (key, segment) in self.queue.drain() {
            if segment.is_empty() {
                batch.remove(key);
            } else {
                batch.insert(key, queue::encode(&segment));
            }
        }
        self.open.clear();
    }
}

/// Queues a task behind everything its agent has queued so far and returns its position: in
/// the segment this batch opened for the agent, or in a new one on a fresh sled id (which no
/// stored key can have yet, so nothing is read).
fn enqueue_fresh(
    db: &sled::Db,
    staged: &mut Staged,
    agent: &AgentId,
    id: TaskId,
) -> Result<u64, StoreError> {
    let seq = match staged.open.get(agent) {
        Some(&next) => next,
        None => queue::base(db.generate_id().map_err(backend)?).ok_or_else(|| {
            StoreError::Backend("the store has handed out every queue position".into())
        })?,
    };
    let (base, slot) = queue::locate(seq).expect("a fresh position is in a segment");
    if u64::from(slot) + 1 < queue::SLOTS {
        staged.open.insert(agent.clone(), seq + 1);
    } else {
        staged.open.remove(agent);
    }
    staged
        .queue
        .entry(queue_key(agent, base))
        .or_default()
        .insert(slot, id);
    Ok(seq)
}

/// Takes a task out of its agent's queue.
fn dequeue(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    agent: &AgentId,
    seq: u64,
) -> Result<(), StoreError> {
    set_queued(db, shared, batch, staged, agent, seq, None)
}

/// Puts a task back into its agent's queue at the position it had (a retry that came due).
fn requeue(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    agent: &AgentId,
    seq: u64,
    id: TaskId,
) -> Result<(), StoreError> {
    set_queued(db, shared, batch, staged, agent, seq, Some(id))
}

/// Puts `id` at position `seq` of an agent's queue, or takes what is there out (`None`): in its
/// segment, or under its own key for a position of an earlier release.
fn set_queued(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    agent: &AgentId,
    seq: u64,
    id: Option<TaskId>,
) -> Result<(), StoreError> {
    match (queue::locate(seq), id) {
        (None, None) => batch.remove(queue_key(agent, seq)),
        (None, Some(id)) => batch.insert(queue_key(agent, seq), id.as_bytes().to_vec()),
        (Some((base, slot)), id) => {
            if let Some(segment) = staged_segment(db, shared, staged, agent, base)? {
                match id {
                    Some(id) => segment.insert(slot, id),
                    None => segment.remove(&slot),
                };
            }
        }
    }
    Ok(())
}

/// The segment at position `base` as this batch leaves it, read from the store the first time
/// the batch touches it. `None` when the stored value cannot be read: that is reported, and the
/// key is left as it is rather than rewritten without the tasks it may hold.
fn staged_segment<'s>(
    db: &sled::Db,
    shared: &Shared,
    staged: &'s mut Staged,
    agent: &AgentId,
    base: u64,
) -> Result<Option<&'s mut Segment>, StoreError> {
    let key = queue_key(agent, base);
    if !staged.queue.contains_key(&key) {
        let segment = match db.get(&key).map_err(backend)? {
            None => Segment::new(),
            Some(raw) => match queue::decode_segment(base, &raw) {
                Ok(segment) => segment,
                Err(e) => {
                    let e = <serde_json::Error as serde::de::Error>::custom(e);
                    let record = format!("queue entry {} of agent {agent}", hex(&key));
                    shared.report_unreadable(record, &e);
                    return Ok(None);
                }
            },
        };
        staged.queue.insert(key.clone(), segment);
    }
    Ok(staged.queue.get_mut(&key))
}

/// Most agents whose newest listing entry the writer keeps between commits; past it the cache
/// starts again empty (a miss costs one read).
const LIST_TAILS_KEPT: usize = 100_000;

/// Adds a task to its agent's listing index (see `listing` for the rule this keeps): with the
/// batch's other tasks of the agent that are newer than everything listed before, under one
/// key; an older one into the key whose range holds it, or under a key of its own.
fn list(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    task: &Task,
) -> Result<(), StoreError> {
    let e = listing::entry(task.created_at, &task.id);
    let tail = match staged.list_tail.get(&task.agent) {
        Some(tail) => *tail,
        None => {
            let tail = stored_list_tail(db, shared, &task.agent)?;
            staged.list_tail.insert(task.agent.clone(), tail);
            tail
        }
    };
    if tail.is_none_or(|t| e > t) {
        // An id clone is a reference count.
        staged
            .list_new
            .entry(task.agent.clone())
            .or_default()
            .insert(e);
        return Ok(());
    }
    let prefix = list_agent_prefix(&task.agent);
    match holding_key(db, shared, staged, &prefix, &e)? {
        Some(entries) => {
            entries.insert(e);
        }
        None => batch.insert(listing_key(&prefix, &e), Vec::new()),
    }
    Ok(())
}

/// Takes a task out of its agent's listing index.
fn unlist(
    db: &sled::Db,
    shared: &Shared,
    staged: &mut Staged,
    task: &Task,
) -> Result<(), StoreError> {
    let e = listing::entry(task.created_at, &task.id);
    if let Some(entries) = holding_key(db, shared, staged, &list_agent_prefix(&task.agent), &e)? {
        entries.remove(&e);
    }
    Ok(())
}

/// The entries of the stored listing key whose range holds `e` (from its own entry to its
/// last), as this batch leaves them, read from the store the first time the batch touches the
/// key. `None` when no range holds it, or when the key that would cannot be read (reported,
/// and left as it is).
fn holding_key<'s>(
    db: &sled::Db,
    shared: &Shared,
    staged: &'s mut Staged,
    prefix: &[u8],
    e: &Entry,
) -> Result<Option<&'s mut BTreeSet<Entry>>, StoreError> {
    let Some(found) = db
        .range(prefix.to_vec()..=listing_key(prefix, e))
        .next_back()
    else {
        return Ok(None);
    };
    let (key, value) = found.map_err(backend)?;
    let key = key.to_vec();
    if !staged.listing.contains_key(&key) {
        match listed_entries(shared, prefix, &key, &value) {
            Some(entries) => {
                staged
                    .listing
                    .insert(key.clone(), entries.into_iter().collect());
            }
            None => return Ok(None),
        }
    }
    let entries = staged.listing.get_mut(&key).expect("staged above");
    Ok(entries
        .last()
        .is_some_and(|last| last >= e)
        .then_some(entries))
}

/// The newest entry of an agent's listing in the store.
fn stored_list_tail(
    db: &sled::Db,
    shared: &Shared,
    agent: &AgentId,
) -> Result<Option<Entry>, StoreError> {
    let prefix = list_agent_prefix(agent);
    for found in db.scan_prefix(&prefix).rev() {
        let (key, value) = found.map_err(backend)?;
        if let Some(entries) = listed_entries(shared, &prefix, &key, &value) {
            return Ok(entries.last().copied());
        }
    }
    Ok(None)
}

/// Every entry of one listing key, ascending; `None` (reported once) for a key or value that
/// cannot be read.
fn listed_entries(shared: &Shared, prefix: &[u8], key: &[u8], value: &[u8]) -> Option<Vec<Entry>> {
    let decoded = <Entry>::try_from(&key[prefix.len()..])
        .map_err(|_| "a listing key ends in a 24-byte entry".to_string())
        .and_then(|first| listing::decode(&first, value));
    match decoded {
        Ok(entries) => Some(entries),
        Err(e) => {
            let e = <serde_json::Error as serde::de::Error>::custom(e);
            shared.report_unreadable(format!("listing entry {}", hex(key)), &e);
            None
        }
    }
}

/// Keeps [`Staged::tasks`] current when an unconditional write of a task follows a conditional
/// one in the same batch.
fn restage(staged: &mut Staged, task: &Task) {
    if let Some(t) = staged.tasks.get_mut(&task.id) {
        *t = task.clone();
    }
}

/// The task as the batch so far leaves it.
fn staged_task(
    db: &sled::Db,
    shared: &Shared,
    staged: &Staged,
    id: TaskId,
) -> Result<Option<Task>, StoreError> {
    if let Some(task) = staged.tasks.get(&id) {
        return Ok(Some(task.clone()));
    }
    shared.load_task(db, id)
}

thread_local! {
    /// The buffer task records are encoded into. Only the writer thread stages writes, so this
    /// is the writer's own buffer, reused for every record instead of one allocation each.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(SCRATCH_KEEP));
}

/// Largest capacity the record buffer keeps between records; a larger one (a task with a large
/// payload) is given back.
const SCRATCH_KEEP: usize = 64 * 1024;

/// Whether [`put_task`] writes a task's head (a newly accepted task) or only its state (any later
/// change: the head already holds what never changes).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Head,
    State,
}

/// Stages a task record, and with it the status callbacks its status change causes (the outbox
/// hook): when the task is new or its status differs from the stored (or earlier staged) one,
/// the outbox plans deliveries, which go into the same batch under [`OUTBOX`].
fn put_task(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    task: &Task,
    part: Part,
) -> Result<(), StoreError> {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        let key = match part {
            Part::Head => {
                record::encode_task_into(&mut buf, task);
                task_key(&task.id)
            }
            Part::State => {
                record::encode_state_into(&mut buf, task);
                state_key(task)
            }
        };
        // sled copies the value into a shared slice of its own either way; from a borrowed
        // buffer that is the only allocation.
        batch.insert(key, &buf[..]);
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::with_capacity(SCRATCH_KEEP);
        }
    });
    restage(staged, task);
    let staged_before = staged.statuses.insert(task.id, task.status);
    let Some(outbox) = shared.outbox.as_ref().filter(|o| o.wants(&task.agent)) else {
        return Ok(());
    };
    let previous = match (staged_before, part) {
        (Some(status), _) => Some(status),
        (None, Part::Head) => None,
        (None, Part::State) => stored_status(db, task)?,
    };
    for mut d in outbox.plan(previous, task, now_ms()) {
        d.id = db.generate_id().map_err(backend)?;
        batch.insert(outbox_key(d.id), encode(&d)?);
        staged.deliveries.push(d);
    }
    Ok(())
}

/// A stored task's status, read from the second byte of its state (or head) record; only a
/// head in the previous release's JSON is decoded whole. An unreadable record has none.
fn stored_status(db: &sled::Db, task: &Task) -> Result<Option<TaskStatus>, StoreError> {
    let id = task.id;
    if let Some(raw) = get_state(db, task)? {
        return Ok(record::stored_status(&raw));
    }
    let Some(raw) = db.get(task_key(&id)).map_err(backend)? else {
        return Ok(None);
    };
    Ok(
        record::stored_status(&raw)
            .or_else(|| record::decode_task(id, &raw).ok().map(|t| t.status)),
    )
}

/// Whether `id` was revoked, in this batch or before: answered from memory (the writer's set of
/// revoked tasks, loaded from the `rv/` markers at open), never from a tree read.
fn is_revoked(revoked: &HashSet<TaskId>, staged: &Staged, id: &TaskId) -> bool {
    staged.revoked.contains(id) || revoked.contains(id)
}

/// Every revoked marker in the store, for the writer's in-memory set.
fn load_revoked(db: &sled::Db) -> Result<HashSet<TaskId>, StoreError> {
    let mut set = HashSet::new();
    for entry in db.scan_prefix(REVOKED) {
        let (k, _) = entry.map_err(backend)?;
        if let Ok(bytes) = <[u8; 16]>::try_from(&k[REVOKED.len()..]) {
            set.insert(TaskId::from_bytes(bytes));
        }
    }
    Ok(set)
}

fn stage(
    db: &sled::Db,
    shared: &Shared,
    revoked: &HashSet<TaskId>,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    write: Write,
) -> Result<Written, StoreError> {
    match write {
        Write::Submit {
            task: mut accepted,
            idempotency,
        } => {
            // The intake's Arc is the only one: this borrows it mutably without a copy, and the
            // answer hands the same allocation back (no conversion on the writer thread).
            let task = Arc::make_mut(&mut accepted);
            if let Some(idem) = &idempotency {
                let k = idem_key(&task.agent, &idem.key);
                if let Some(seen) = seen_key(db, staged, &k)? {
                    return Ok(if seen.1 == idem.body_sha256 {
                        Written::Duplicate(seen.0)
                    } else {
                        Written::Conflict(seen.0)
                    });
                }
                let record = IdemRecord {
                    task: task.id,
                    body_sha256: hex(&idem.body_sha256),
                };
                batch.insert(k.clone(), encode(&record)?);
                staged.idem.insert(k, (task.id, idem.body_sha256));
                task.idempotency_key = Some(idem.key.clone());
            }
            task.seq = enqueue_fresh(db, staged, &task.agent, task.id)?;
            put_task(db, shared, batch, staged, task, Part::Head)?;
            list(db, shared, batch, staged, task)?;
            Ok(Written::Accepted(accepted))
        }
        Write::Start(task) => {
            if is_revoked(revoked, staged, &task.id) {
                return Ok(Written::Revoked);
            }
            put_task(db, shared, batch, staged, &task, Part::State)?;
            Ok(Written::Done)
        }
        Write::Complete { task, state } => {
            if is_revoked(revoked, staged, &task.id) {
                // Only a tick with no start record (a runner without side effects) can reach
                // here: its outcome is discarded and the record stays REVOKED. The agent's
                // memory and tick counter did move, so they are kept.
                batch.insert(agent_state_key(&task.agent), encode(&state)?);
                return Ok(Written::Revoked);
            }
            put_task(db, shared, batch, staged, &task, Part::State)?;
            dequeue(db, shared, batch, staged, &task.agent, task.seq)?;
            batch.insert(agent_state_key(&task.agent), encode(&state)?);
            Ok(Written::Done)
        }
        Write::Purge {
            finished_before_ms,
            limit,
        } => {
            let mut purged = 0;
            // Tasks purged by this write: a task of the release before this one can have both
            // a finished entry and a state record, and the batch does not hide it from the
            // second walk.
            let mut gone = HashSet::new();
            // First the finished entries (`f/`) that earlier releases wrote, oldest first.
            let mut end = FINISHED.to_vec();
            end.extend_from_slice(&finished_before_ms.to_be_bytes());
            for entry in db.range(FINISHED.to_vec()..end).take(limit) {
                let (k, id) = entry.map_err(backend)?;
                batch.remove(k);
                let Ok(bytes) = <[u8; 16]>::try_from(id.as_ref()) else {
                    continue;
                };
                let id = TaskId::from_bytes(bytes);
                if purge_task(db, shared, revoked, batch, staged, id, finished_before_ms)? {
                    gone.insert(id);
                    purged += 1;
                }
            }
            // Then the state records, in creation order: a task that finished before the cutoff
            // was created before it, so the walk ends there. It resumes where the previous write
            // of this purge stopped, and looks at a bounded number of records per write, so that
            // tasks still running (or parked) before the cutoff cannot make one write long.
            if purged < limit {
                let mut cursor = shared
                    .purge_cursor
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(from) = cursor.take() {
                    let mut end = STATE.to_vec();
                    end.extend_from_slice(&finished_before_ms.to_be_bytes());
                    for (looked, entry) in db.range(from..end).enumerate() {
                        let (k, raw) = entry.map_err(backend)?;
                        if purged == limit || looked == limit * PURGE_LOOK_FACTOR {
                            *cursor = Some(k.to_vec());
                            break;
                        }
                        // Keys of the earlier layout (`u/<id>`) are not in creation order; the
                        // finished entries written beside them cover those tasks.
                        let Some(id) = state_key_id(&k) else {
                            continue;
                        };
                        let due = match record::state_finished(&raw) {
                            // As for the finished entries, which were written with the time
                            // of writing when a task had no `finished_at`.
                            Ok((status, finished)) => {
                                status.is_terminal()
                                    && finished.is_none_or(|f| f < finished_before_ms)
                            }
                            // Left as it is (reported once): its task may still be running.
                            Err(e) => {
                                shared.report_unreadable(format!("task {id}"), &e.into_json());
                                false
                            }
                        };
                        if due
                            && !gone.contains(&id)
                            && purge_task(
                                db,
                                shared,
                                revoked,
                                batch,
                                staged,
                                id,
                                finished_before_ms,
                            )?
                        {
                            // Also when the head is gone or unreadable, so no state outlives it.
                            batch.remove(k);
                            gone.insert(id);
                            purged += 1;
                        }
                    }
                }
            }
            // Finished callback deliveries go with the same retention (ids grow with creation
            // time, so the oldest come first); pending ones stay whatever their age.
            for entry in db.scan_prefix(OUTBOX).take(limit) {
                let (k, raw) = entry.map_err(backend)?;
                match decode::<Delivery>(&raw) {
                    Ok(d) if d.created_at >= finished_before_ms => break,
                    Ok(d) if d.status == crate::outbox::DeliveryStatus::Pending => {}
                    Ok(_) => batch.remove(k),
                    Err(e) => shared.report_unreadable(format!("delivery {}", hex(&k)), &e),
                }
            }
            Ok(Written::Purged(purged))
        }
        Write::SetToken { agent, digest } => {
            batch.insert(
                key(AGENT_TOKEN, &[agent.to_string().as_bytes()]),
                digest.to_vec(),
            );
            Ok(Written::Done)
        }
        Write::SetScheduleCursor { key, cursor } => {
            batch.insert(schedule_key(&key), encode(&cursor)?);
            Ok(Written::Done)
        }
        Write::Retry { task, state } => {
            let due = task.next_attempt_at.unwrap_or_else(now_ms);
            put_task(db, shared, batch, staged, &task, Part::State)?;
            dequeue(db, shared, batch, staged, &task.agent, task.seq)?;
            batch.insert(
                retry_key(due, &task.id),
                task.agent.to_string().into_bytes(),
            );
            batch.insert(agent_state_key(&task.agent), encode(&state)?);
            Ok(Written::Done)
        }
        Write::RetryDue { task: id, due_ms } => {
            batch.remove(retry_key(due_ms, &id));
            let Some(mut task) = staged_task(db, shared, staged, id)? else {
                return Ok(Written::Done);
            };
            if task.status != TaskStatus::Retry || task.next_attempt_at != Some(due_ms) {
                return Ok(Written::Done);
            }
            task.status = TaskStatus::Pending;
            task.next_attempt_at = None;
            put_task(db, shared, batch, staged, &task, Part::State)?;
            requeue(db, shared, batch, staged, &task.agent, task.seq, task.id)?;
            Ok(Written::Accepted(Arc::new(task)))
        }
        Write::Park { task, state } => {
            put_task(db, shared, batch, staged, &task, Part::State)?;
            dequeue(db, shared, batch, staged, &task.agent, task.seq)?;
            batch.insert(agent_state_key(&task.agent), encode(&state)?);
            if let Some(awaiting) = &task.awaiting {
                batch.insert(
                    await_timer_key(awaiting.expires_at, &task.id),
                    task.id.as_bytes().to_vec(),
                );
            }
            staged.tasks.insert(task.id, (*task).clone());
            Ok(Written::Done)
        }
        Write::Resume { id, response } => {
            let Some(task) = staged_task(db, shared, staged, id)? else {
                return Ok(Written::Unchanged(None));
            };
            let expires_at = task.awaiting.as_ref().map(|a| a.expires_at);
            let Some(mut next) = crate::awaiting::resume(&task, response) else {
                return Ok(Written::Unchanged(Some(Box::new(task))));
            };
            // Behind everything its agent has queued so far.
            next.seq = enqueue_fresh(db, staged, &next.agent, id)?;
            put_task(db, shared, batch, staged, &next, Part::State)?;
            if let Some(at) = expires_at {
                batch.remove(await_timer_key(at, &id));
            }
            staged.tasks.insert(id, next.clone());
            Ok(Written::Updated(Box::new(next)))
        }
        Write::Expire { id, expires_at } => {
            batch.remove(await_timer_key(expires_at, &id));
            let Some(task) = staged_task(db, shared, staged, id)? else {
                return Ok(Written::Unchanged(None));
            };
            let Some(failed) = crate::awaiting::expire(&task, expires_at, now_ms()) else {
                return Ok(Written::Unchanged(Some(Box::new(task))));
            };
            put_task(db, shared, batch, staged, &failed, Part::State)?;
            staged.tasks.insert(id, failed.clone());
            Ok(Written::Updated(Box::new(failed)))
        }
        Write::Delivery(d) => {
            batch.insert(outbox_key(d.id), encode(&*d)?);
            Ok(Written::Done)
        }
        Write::NotifyEndpoint {
            agent,
            endpoint,
            disabled,
        } => {
            let k = notify_off_key(&agent, endpoint);
            if disabled {
                batch.insert(k, Vec::new());
            } else {
                batch.remove(k);
            }
            Ok(Written::Done)
        }
        Write::Cancel { id, at_ms } => stage_cancel(db, shared, batch, staged, id, at_ms),
    }
}

/// Stages the removal of a task and of every key that belongs to it, if it is due: terminal
/// and finished before `finished_before_ms`. Returns whether it was removed. A task whose head
/// is gone counts as removed (its leftover keys go), and so does one whose record cannot be
/// decoded: the purge reaches it only through an entry that says it finished, and a finished
/// record that cannot be decoded is past its retention all the same.
fn purge_task(
    db: &sled::Db,
    shared: &Shared,
    revoked: &HashSet<TaskId>,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    id: TaskId,
    finished_before_ms: u64,
) -> Result<bool, StoreError> {
    // Changed by a write earlier in this batch, which the tree does not show yet (a re-run, a
    // cancel): what was read above may be stale, so the task is left to a later purge.
    if staged.statuses.contains_key(&id) {
        return Ok(false);
    }
    let key = task_key(&id);
    if db.contains_key(&key).map_err(backend)? {
        match shared.load_task(db, id) {
            Ok(None) => {}
            Ok(Some(task)) => {
                // A task that left its terminal status again (resumed, retried) or finished
                // again later is not due.
                let due = task.status.is_terminal()
                    && task.finished_at.is_none_or(|f| f < finished_before_ms);
                if !due {
                    return Ok(false);
                }
                if let Some(idem) = &task.idempotency_key {
                    batch.remove(idem_key(&task.agent, idem));
                }
                // `l/` keys exist only in stores written before the per-agent index became the
                // only one.
                batch.remove(list_key(&task));
                unlist(db, shared, staged, &task)?;
                batch.remove(state_key(&task));
            }
            // Reported (once) by the read. The head may still name the state key (when the
            // state record is the unreadable one); the idempotency key and listing entries
            // (unknown) stay behind, and the listing skips entries whose record is gone.
            Err(_) => {
                let head = db.get(&key).map_err(backend)?;
                if let Some(task) = head.and_then(|h| record::decode_task(id, &h).ok()) {
                    batch.remove(state_key(&task));
                }
            }
        }
    }
    if revoked.contains(&id) || staged.revoked.contains(&id) {
        staged.unrevoked.push(id);
    }
    batch.remove(revoked_key(&id));
    batch.remove(legacy_state_key(&id));
    batch.remove(key);
    Ok(true)
}

/// Revokes a task if its status (as of this point in the batch) allows it: the record becomes
/// REVOKED with `finished_at` (which the retention purge reads from its state record), it
/// leaves its agent's queue, and it gets a revoked marker (so a later `Start` or `Complete`
/// of it is refused). Timers of other states (retry, await expiry) are left: they re-read the
/// task when they fire and ignore a task no longer in their state.
fn stage_cancel(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    id: TaskId,
    at_ms: u64,
) -> Result<Written, StoreError> {
    // The task as this batch leaves it, so a cancel is ordered with an answer, an expiry or a
    // start staged just before it.
    let Some(mut task) = staged_task(db, shared, staged, id)? else {
        return Ok(Written::Cancel(CancelOutcome::Unknown));
    };
    let status = staged.statuses.get(&id).copied().unwrap_or(task.status);
    if let Err(refused) = super::revoke(&mut task, status, at_ms) {
        return Ok(Written::Cancel(refused));
    }
    put_task(db, shared, batch, staged, &task, Part::State)?;
    dequeue(db, shared, batch, staged, &task.agent, task.seq)?;
    batch.insert(revoked_key(&id), Vec::new());
    staged.tasks.insert(id, task.clone());
    staged.revoked.insert(id);
    Ok(Written::Cancel(CancelOutcome::Revoked(Box::new(task))))
}

fn seen_key(
    db: &sled::Db,
    staged: &Staged,
    k: &[u8],
) -> Result<Option<(TaskId, [u8; 32])>, StoreError> {
    if let Some(seen) = staged.idem.get(k) {
        return Ok(Some(*seen));
    }
    let Some(raw) = db.get(k).map_err(backend)? else {
        return Ok(None);
    };
    let record: IdemRecord = decode(&raw).map_err(backend)?;
    let mut digest = [0u8; 32];
    for (i, d) in digest.iter_mut().enumerate() {
        *d = record
            .body_sha256
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    Ok(Some((record.task, digest)))
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

fn read_task(shared: &Shared, id: TaskId) -> Result<Option<Task>, StoreError> {
    shared.load_task(&shared.db()?, id)
}

fn read_agent_state(shared: &Shared, agent: &AgentId) -> Result<AgentState, StoreError> {
    match shared.db()?.get(agent_state_key(agent)).map_err(backend)? {
        Some(raw) => shared.decode(|| format!("state of agent {agent}"), &raw),
        None => Ok(AgentState {
            memory: serde_json::json!({}),
            ticks: 0,
        }),
    }
}

fn read_queued(shared: &Shared, agent: &AgentId) -> Result<Vec<TaskId>, StoreError> {
    let mut ids = Vec::new();
    let prefix = queue_prefix(agent);
    for entry in shared.db()?.scan_prefix(&prefix) {
        let (k, value) = entry.map_err(backend)?;
        let seq = <[u8; 8]>::try_from(&k[prefix.len()..])
            .map(u64::from_be_bytes)
            .map_err(|_| "a queue key ends in an 8-byte position".to_string());
        match seq.and_then(|seq| queue::decode(seq, &value)) {
            Ok(queued) => ids.extend(queued.into_iter().map(|(_, id)| id)),
            Err(e) => {
                let record = format!("queue entry {} of agent {agent}", hex(&k));
                let e = <serde_json::Error as serde::de::Error>::custom(e);
                shared.report_unreadable(record, &e);
            }
        }
    }
    Ok(ids)
}

fn read_retry_timers(shared: &Shared) -> Result<Vec<RetryTimer>, StoreError> {
    let mut timers = Vec::new();
    for entry in shared.db()?.scan_prefix(RETRY) {
        let (k, agent) = entry.map_err(backend)?;
        let rest = &k[RETRY.len()..];
        let parsed = (rest.len() == 8 + 1 + 16)
            .then(|| {
                let due = u64::from_be_bytes(rest[..8].try_into().ok()?);
                let id = TaskId::from_bytes(rest[9..].try_into().ok()?);
                let agent: AgentId = std::str::from_utf8(&agent).ok()?.parse().ok()?;
                Some(RetryTimer {
                    due_ms: due,
                    task: id,
                    agent,
                })
            })
            .flatten();
        match parsed {
            Some(timer) => timers.push(timer),
            None => {
                let e = <serde_json::Error as serde::de::Error>::custom(
                    "a retry timer is a due time, a task id and an agent id",
                );
                shared.report_unreadable(format!("retry timer {}", hex(&k)), &e);
            }
        }
    }
    Ok(timers)
}

/// One listing page, newest first: a reverse range scan of each agent's listing index between
/// the filters' bounds (below the cursor), merged by `(created_at, id)` when no agent is given,
/// reading each examined task's record, stopping at `limit` matches or `scan_limit` examined
/// entries, whichever comes first.
///
/// There is no global index: a submission inserts one listing key (`la/<agent>\0<created><id>`),
/// not two, because the accept path runs on the single writer and every key costs it (issue #11).
/// An unfiltered page pays instead: one seek per agent that has tasks, then a k-way merge. Stores
/// written before this change also hold `l/` keys; they are no longer read and go with the purge.
fn read_list(shared: &Shared, q: &ListQuery) -> Result<TaskPage, StoreError> {
    let db = shared.db()?;
    let mut page = TaskPage::default();
    if q.limit == 0 {
        return Ok(page);
    }
    let prefixes = match &q.agent {
        Some(agent) => vec![list_agent_prefix(agent)],
        None => listed_agent_prefixes(&db)?,
    };
    // One reader per agent, each with its next entry, merged through a max-heap.
    let (lo, hi) = list_bounds(q);
    if hi.is_some_and(|hi| hi <= lo) {
        return Ok(page);
    }
    let mut sources = Vec::with_capacity(prefixes.len());
    let mut heads = std::collections::BinaryHeap::new();
    for prefix in prefixes {
        let mut listed = Listed::new(&db, prefix, lo, hi);
        if let Some(head) = listed.next(shared)? {
            heads.push((head, sources.len()));
        }
        sources.push(listed);
    }
    let mut scanned = 0;
    let mut last = None;
    while scanned < q.scan_limit.max(1) && page.tasks.len() < q.limit {
        let Some((cursor, i)) = heads.pop() else {
            return Ok(page);
        };
        if let Some(head) = sources[i].next(shared)? {
            heads.push((head, i));
        }
        scanned += 1;
        last = Some(cursor);
        // A record gone between the index read and here was purged: skipped. One that cannot
        // be decoded is reported (once) and skipped so the listing still works.
        let Ok(Some(task)) = shared.load_task(&db, cursor.id) else {
            continue;
        };
        if q.status.is_none_or(|s| s == task.status) {
            page.tasks.push(task);
        }
    }
    // Stopped by a bound: continue from the last examined entry if anything is left.
    if !heads.is_empty() {
        page.next_cursor = last;
    }
    Ok(page)
}

/// The entries a query covers: from `lo` (its `since`), below `hi` (its `until` and cursor).
fn list_bounds(q: &ListQuery) -> (Entry, Option<Entry>) {
    let at = |ms: u64| listing::entry(ms, &TaskId::from_bytes([0; 16]));
    let lo = at(q.since_ms.unwrap_or(0));
    let until = q.until_ms.map(at);
    let cursor = q.cursor.as_ref().map(listing::of_cursor);
    let hi = match (until, cursor) {
        (Some(u), Some(c)) => Some(u.min(c)),
        (u, c) => u.or(c),
    };
    (lo, hi)
}

/// One agent's listing entries in `[lo, hi)`, newest first. No key lies inside another's range
/// (see `listing`), so the keys below `hi` read backwards, each key's entries backwards, give
/// the entries in order. The first key below `lo` is read too: its range may reach above `lo`.
struct Listed {
    prefix: Vec<u8>,
    keys: std::iter::Rev<sled::Iter>,
    lo: Entry,
    hi: Option<Entry>,
    /// The current key's entries in range not yet handed out, ascending.
    pending: Vec<Entry>,
    done: bool,
}

impl Listed {
    fn new(db: &sled::Db, prefix: Vec<u8>, lo: Entry, hi: Option<Entry>) -> Self {
        let end = match &hi {
            Some(hi) => listing_key(&prefix, hi),
            None => {
                // Past every key under the prefix, which ends in its NUL.
                let mut end = prefix.clone();
                *end.last_mut().expect("ends with the NUL") = 1;
                end
            }
        };
        let keys = db.range(prefix.clone()..end).rev();
        Self {
            prefix,
            keys,
            lo,
            hi,
            pending: Vec::new(),
            done: false,
        }
    }

    /// The next entry, newest first; keys that cannot be read are reported and skipped.
    fn next(&mut self, shared: &Shared) -> Result<Option<ListCursor>, StoreError> {
        loop {
            if let Some(e) = self.pending.pop() {
                return Ok(Some(listing::cursor(&e)));
            }
            if self.done {
                return Ok(None);
            }
            let Some(found) = self.keys.next() else {
                self.done = true;
                continue;
            };
            let (key, value) = found.map_err(backend)?;
            let Some(entries) = listed_entries(shared, &self.prefix, &key, &value) else {
                continue;
            };
            if entries[0] < self.lo {
                self.done = true;
            }
            let (lo, hi) = (self.lo, self.hi);
            self.pending.extend(
                entries
                    .into_iter()
                    .filter(|e| *e >= lo && hi.is_none_or(|hi| *e < hi)),
            );
        }
    }
}

/// Every `la/<agent>\0` prefix that has entries, found by seeking past each agent's keys (one
/// seek per agent, whatever its number of tasks).
fn listed_agent_prefixes(db: &sled::Db) -> Result<Vec<Vec<u8>>, StoreError> {
    let mut prefixes = Vec::new();
    let mut from = LIST_AGENT.to_vec();
    loop {
        let Some(entry) = db.range(from.clone()..).next() else {
            break;
        };
        let (k, _) = entry.map_err(backend)?;
        if !k.starts_with(LIST_AGENT) {
            break;
        }
        // Agent names are URL-safe, so the first NUL after the tag ends the agent's prefix.
        let Some(nul) = k[LIST_AGENT.len()..].iter().position(|&b| b == 0) else {
            break;
        };
        let prefix = k[..LIST_AGENT.len() + nul + 1].to_vec();
        from = prefix.clone();
        *from.last_mut().expect("ends with the NUL") = 1;
        prefixes.push(prefix);
    }
    Ok(prefixes)
}

fn read_schedule_cursor(
    shared: &Shared,
    k: &ScheduleKey,
) -> Result<Option<ScheduleCursor>, StoreError> {
    match shared.db()?.get(schedule_key(k)).map_err(backend)? {
        Some(raw) => shared
            .decode(|| format!("schedule cursor of agent {}", k.agent), &raw)
            .map(Some),
        None => Ok(None),
    }
}

fn read_due_awaits(
    shared: &Shared,
    now_ms: u64,
    limit: usize,
) -> Result<Vec<(u64, TaskId)>, StoreError> {
    // Keys are `w/<8-byte expiry>\0<16-byte id>`; everything below `w/<now + 1>` is due.
    let mut end = AWAIT_TIMER.to_vec();
    end.extend_from_slice(&now_ms.saturating_add(1).to_be_bytes());
    let mut due = Vec::new();
    for entry in shared.db()?.range(AWAIT_TIMER.to_vec()..end).take(limit) {
        let (k, id) = entry.map_err(backend)?;
        let at = k
            .get(AWAIT_TIMER.len()..AWAIT_TIMER.len() + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        match (at, <[u8; 16]>::try_from(id.as_ref())) {
            (Some(at), Ok(bytes)) => due.push((at, TaskId::from_bytes(bytes))),
            _ => {
                let e = <serde_json::Error as serde::de::Error>::custom(
                    "an await timer is an 8-byte time and a 16-byte task id",
                );
                shared.report_unreadable(format!("await timer {}", hex(&k)), &e);
            }
        }
    }
    Ok(due)
}

fn read_deliveries(shared: &Shared, q: &DeliveryQuery) -> Result<Vec<Delivery>, StoreError> {
    let db = shared.db()?;
    let start = match q.after {
        Some(after) => outbox_key(after.saturating_add(1)),
        None => OUTBOX.to_vec(),
    };
    let mut out = Vec::new();
    if q.after == Some(u64::MAX) {
        return Ok(out);
    }
    for entry in db.range(start..) {
        if out.len() >= q.limit {
            break;
        }
        let (k, raw) = entry.map_err(backend)?;
        if !k.starts_with(OUTBOX) {
            break;
        }
        let Ok(d) = shared.decode::<Delivery>(|| format!("delivery {}", hex(&k)), &raw) else {
            continue;
        };
        if q.agent.as_ref().is_some_and(|a| *a != d.agent)
            || q.status.is_some_and(|s| s != d.status)
        {
            continue;
        }
        out.push(d);
    }
    Ok(out)
}

fn read_delivery(shared: &Shared, id: u64) -> Result<Option<Delivery>, StoreError> {
    match shared.db()?.get(outbox_key(id)).map_err(backend)? {
        Some(raw) => shared.decode(|| format!("delivery {id}"), &raw).map(Some),
        None => Ok(None),
    }
}

fn read_disabled_endpoints(shared: &Shared) -> Result<Vec<(AgentId, usize)>, StoreError> {
    let mut out = Vec::new();
    for entry in shared.db()?.scan_prefix(NOTIFY_OFF) {
        let (k, _) = entry.map_err(backend)?;
        let rest = &k[NOTIFY_OFF.len()..];
        if rest.len() < 9 {
            continue;
        }
        let (agent, index) = rest.split_at(rest.len() - 9);
        let Ok(index) = <[u8; 8]>::try_from(&index[1..]) else {
            continue;
        };
        if let Some(agent) = std::str::from_utf8(agent)
            .ok()
            .and_then(|a| a.parse::<AgentId>().ok())
        {
            out.push((agent, u64::from_be_bytes(index) as usize));
        }
    }
    Ok(out)
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
            .unwrap_or_else(PoisonError::into_inner) = Some(STATE.to_vec());
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
mod tests {
    use super::*;
    use crate::model::{Source, TaskStatus};
    use crate::store::{write_async, IdempotencyKey};

    /// Opens a store again in the same process, right after `close`: waits out the file lock
    /// like the writer's own reopen does (see [`open_waiting`]).
    fn reopen_opts(path: &Path, options: impl Fn() -> Options) -> Arc<SledStore> {
        open_waiting(REOPEN_WAIT, || SledStore::open_opts(path, options())).expect("reopen")
    }

    fn reopen(path: &Path) -> Arc<SledStore> {
        reopen_opts(path, Options::default)
    }

    fn blocking(store: &SledStore, write: Write) -> Result<Written, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        store.write(
            write,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap()
    }

    fn task(agent: &AgentId) -> Task {
        Task::new(
            agent.clone(),
            serde_json::json!({"n": 1}),
            Source::default(),
        )
    }

    #[test]
    fn submit_assigns_increasing_seq_and_queues_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let mut ids = Vec::new();
        for _ in 0..5 {
            match blocking(
                &store,
                Write::Submit {
                    task: Arc::new(task(&agent)),
                    idempotency: None,
                },
            )
            .unwrap()
            {
                Written::Accepted(t) => ids.push((t.seq, t.id)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(ids.windows(2).all(|w| w[0].0 < w[1].0));
        let queued: Vec<TaskId> = store.queued_blocking(&agent).unwrap();
        assert_eq!(queued, ids.iter().map(|x| x.1).collect::<Vec<_>>());
    }

    #[test]
    fn retry_parks_the_task_behind_a_timer_that_requeues_it_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let Written::Accepted(t) = blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        )
        .unwrap() else {
            panic!("accepted")
        };
        let mut t = Arc::unwrap_or_clone(t);
        t.status = TaskStatus::Retry;
        t.next_attempt_at = Some(1234);
        let state = AgentState {
            memory: serde_json::json!({}),
            ticks: 1,
        };
        blocking(
            &store,
            Write::Retry {
                task: Arc::new(t.clone()),
                state: state.clone(),
            },
        )
        .unwrap();
        assert!(
            store.queued_blocking(&agent).unwrap().is_empty(),
            "a waiting retry is not queued"
        );
        assert_eq!(store.agent_state_blocking(&agent).unwrap(), state);
        store.close().unwrap();
        drop(store);
        let store = reopen(dir.path());
        let timers = store.retry_timers_blocking().unwrap();
        assert_eq!(
            timers,
            vec![RetryTimer {
                due_ms: 1234,
                task: t.id,
                agent: agent.clone()
            }]
        );
        // A timer for another due time is stale: it only goes.
        let stale = Write::RetryDue {
            task: t.id,
            due_ms: 99,
        };
        assert_eq!(blocking(&store, stale).unwrap(), Written::Done);
        let due = Write::RetryDue {
            task: t.id,
            due_ms: 1234,
        };
        let Written::Accepted(requeued) = blocking(&store, due.clone()).unwrap() else {
            panic!("requeued")
        };
        assert_eq!(requeued.status, TaskStatus::Pending);
        assert_eq!(requeued.next_attempt_at, None);
        assert_eq!(store.queued_blocking(&agent).unwrap(), vec![t.id]);
        assert!(store.retry_timers_blocking().unwrap().is_empty());
        // Firing twice requeues once.
        assert_eq!(blocking(&store, due).unwrap(), Written::Done);
        assert_eq!(store.queued_blocking(&agent).unwrap(), vec![t.id]);
    }

    #[test]
    fn park_resume_and_expire_are_conditional_and_move_queue_and_timer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let accepted = match blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        )
        .unwrap()
        {
            Written::Accepted(t) => Arc::unwrap_or_clone(t),
            other => panic!("unexpected {other:?}"),
        };
        let id = accepted.id;
        let mut parked = accepted.clone();
        crate::awaiting::park(
            &mut parked,
            serde_json::json!("q"),
            Duration::from_millis(10),
            1_000,
        );
        blocking(
            &store,
            Write::Park {
                task: Arc::new(parked.clone()),
                state: AgentState::default(),
            },
        )
        .unwrap();
        assert!(store.queued_blocking(&agent).unwrap().is_empty());
        assert_eq!(
            read_due_awaits(&store.shared, 1_010, 10).unwrap(),
            vec![(1_010, id)]
        );
        assert!(read_due_awaits(&store.shared, 1_009, 10)
            .unwrap()
            .is_empty());

        // Two answers queued back to back (usually one batch): the first wins, the second
        // sees its result.
        let (tx, rx) = std::sync::mpsc::channel();
        for n in 0..2 {
            let tx = tx.clone();
            store.write(
                Write::Resume {
                    id,
                    response: serde_json::json!(n),
                },
                Box::new(move |r| tx.send(r).unwrap()),
            );
        }
        let first = rx.recv().unwrap().unwrap();
        let second = rx.recv().unwrap().unwrap();
        let Written::Updated(resumed) = first else {
            panic!("{first:?}")
        };
        assert_eq!(resumed.status, TaskStatus::Pending);
        assert_eq!(
            resumed.resume.as_ref().unwrap().response,
            serde_json::json!(0)
        );
        assert!(resumed.seq > accepted.seq, "queued behind what was queued");
        assert!(matches!(second, Written::Unchanged(Some(t)) if t.status == TaskStatus::Pending));
        assert_eq!(store.queued_blocking(&agent).unwrap(), vec![id]);
        assert!(read_due_awaits(&store.shared, u64::MAX - 1, 10)
            .unwrap()
            .is_empty());

        // A stale timer changes nothing; the answered task stays PENDING.
        let stale = blocking(
            &store,
            Write::Expire {
                id,
                expires_at: 1_010,
            },
        )
        .unwrap();
        assert!(matches!(stale, Written::Unchanged(Some(_))), "{stale:?}");
        assert_eq!(
            store.task_blocking(id).unwrap().unwrap().status,
            TaskStatus::Pending
        );
        let unknown = TaskId::random();
        assert_eq!(
            blocking(
                &store,
                Write::Expire {
                    id: unknown,
                    expires_at: 1
                }
            )
            .unwrap(),
            Written::Unchanged(None)
        );

        // Parked again, its own timer fails it and files it for retention.
        let mut again = resumed.as_ref().clone();
        crate::awaiting::park(
            &mut again,
            serde_json::json!("q2"),
            Duration::from_millis(5),
            2_000,
        );
        blocking(
            &store,
            Write::Park {
                task: Arc::new(again),
                state: AgentState::default(),
            },
        )
        .unwrap();
        let expired = blocking(
            &store,
            Write::Expire {
                id,
                expires_at: 2_005,
            },
        )
        .unwrap();
        let Written::Updated(failed) = expired else {
            panic!("{expired:?}")
        };
        assert_eq!(failed.status, TaskStatus::Failure);
        assert_eq!(failed.error.as_deref(), Some(crate::awaiting::TIMED_OUT));
        assert!(read_due_awaits(&store.shared, u64::MAX - 1, 10)
            .unwrap()
            .is_empty());
        assert!(matches!(
            blocking(
                &store,
                Write::Resume {
                    id,
                    response: serde_json::json!(1)
                }
            )
            .unwrap(),
            Written::Unchanged(Some(_))
        ));
    }

    #[test]
    fn idempotency_detects_duplicates_and_conflicts_even_within_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let idem = |body: u8| IdempotencyKey {
            key: "k1".into(),
            body_sha256: [body; 32],
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for body in [1u8, 1, 2] {
            let tx = tx.clone();
            store.write(
                Write::Submit {
                    task: Arc::new(task(&agent)),
                    idempotency: Some(idem(body)),
                },
                Box::new(move |r| tx.send(r).unwrap()),
            );
        }
        let results: Vec<Written> = (0..3).map(|_| rx.recv().unwrap().unwrap()).collect();
        let Written::Accepted(first) = &results[0] else {
            panic!("{results:?}")
        };
        assert_eq!(results[1], Written::Duplicate(first.id));
        assert_eq!(results[2], Written::Conflict(first.id));
        assert_eq!(store.queued_blocking(&agent).unwrap().len(), 1);
    }

    #[test]
    fn completion_moves_task_out_of_queue_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let id;
        {
            let store = SledStore::open(dir.path()).unwrap();
            let Written::Accepted(t) = blocking(
                &store,
                Write::Submit {
                    task: Arc::new(task(&agent)),
                    idempotency: None,
                },
            )
            .unwrap() else {
                panic!()
            };
            let mut t = Arc::unwrap_or_clone(t);
            id = t.id;
            t.status = TaskStatus::Success;
            t.finished_at = Some(now_ms());
            let state = AgentState {
                memory: serde_json::json!({"x": 1}),
                ticks: 1,
            };
            blocking(
                &store,
                Write::Complete {
                    task: Arc::new(t),
                    state,
                },
            )
            .unwrap();
            blocking(
                &store,
                Write::SetToken {
                    agent: agent.clone(),
                    digest: [7; 32],
                },
            )
            .unwrap();
            store.close().unwrap();
        }
        let store = reopen(dir.path());
        assert!(store.queued_blocking(&agent).unwrap().is_empty());
        assert_eq!(
            store.task_blocking(id).unwrap().unwrap().status,
            TaskStatus::Success
        );
        assert_eq!(store.agent_state_blocking(&agent).unwrap().ticks, 1);
        assert_eq!(store.token_digest(&agent).unwrap(), Some([7; 32]));
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
        assert!(store.task_blocking(id).unwrap().is_none());
    }

    #[test]
    fn purge_removes_old_tasks_and_their_keys_in_chunks_and_keeps_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let key = |n: usize| IdempotencyKey {
            key: format!("k{n}"),
            body_sha256: [1; 32],
        };
        let finish = |n: usize, finished_at: u64| {
            // Created just before it finished: the purge walks tasks in creation order.
            let mut created = task(&agent);
            created.created_at = finished_at - 1;
            let Written::Accepted(t) = blocking(
                &store,
                Write::Submit {
                    task: Arc::new(created),
                    idempotency: Some(key(n)),
                },
            )
            .unwrap() else {
                panic!("not accepted")
            };
            let mut t = Arc::unwrap_or_clone(t);
            t.status = TaskStatus::Success;
            t.finished_at = Some(finished_at);
            let id = t.id;
            let state = AgentState::default();
            blocking(
                &store,
                Write::Complete {
                    task: Arc::new(t),
                    state,
                },
            )
            .unwrap();
            id
        };
        let old = now_ms() - 3_600_000;
        let total = PURGE_CHUNK * 2 + 500;
        let first_old = finish(0, old);
        for n in 1..total {
            finish(n, old);
        }
        let recent = finish(total, now_ms());

        let purged = store.purge(Duration::from_secs(60)).unwrap();
        assert_eq!(purged.tasks, total);
        assert!(store.task_blocking(first_old).unwrap().is_none());
        assert!(store.task_blocking(recent).unwrap().is_some());
        // The purged keys are free again; the recent one still deduplicates.
        let again = |n: usize| {
            blocking(
                &store,
                Write::Submit {
                    task: Arc::new(task(&agent)),
                    idempotency: Some(key(n)),
                },
            )
            .unwrap()
        };
        assert!(matches!(again(0), Written::Accepted(_)));
        assert_eq!(again(total), Written::Duplicate(recent));
    }

    #[derive(Default)]
    struct Counts {
        fsyncs: std::sync::atomic::AtomicUsize,
        unreadable: Mutex<Vec<String>>,
    }

    impl Observer for Counts {
        fn fsynced(&self) {
            self.fsyncs.fetch_add(1, Ordering::SeqCst);
        }
        fn unreadable(&self, record: &str) {
            self.unreadable.lock().unwrap().push(record.to_string());
        }
    }

    fn open_counting(path: &Path, sync: SyncMode) -> (Arc<SledStore>, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let store = SledStore::open_opts(
            path,
            Options {
                sync,
                observer: Some(counts.clone()),
                outbox: None,
            },
        )
        .unwrap();
        (store, counts)
    }

    #[test]
    fn fsync_mode_syncs_every_group_commit_and_flush_mode_within_the_period() {
        let agent: AgentId = "a".parse().unwrap();
        let submit = |store: &SledStore| {
            let w = Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            };
            assert!(matches!(blocking(store, w), Ok(Written::Accepted(_))));
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, counts) = open_counting(dir.path(), SyncMode::Fsync);
        for _ in 0..3 {
            submit(&store);
        }
        // The sync at open is not a commit and is not counted.
        assert_eq!(counts.fsyncs.load(Ordering::SeqCst), 3);
        store.close().unwrap();

        // Flush mode: commits in a row share one sync per period, and a write followed by
        // silence is still synced once the period has passed.
        let dir = tempfile::tempdir().unwrap();
        let (store, counts) = open_counting(dir.path(), SyncMode::Flush);
        let started = Instant::now();
        for _ in 0..20 {
            submit(&store);
        }
        // Each sync needs a flush and a full period after it, so k syncs take k periods.
        let synced = counts.fsyncs.load(Ordering::SeqCst) as u128;
        let periods = started.elapsed().as_millis() / PERIODIC_SYNC.as_millis();
        assert!(synced <= periods + 1, "{synced} syncs in {periods} periods");
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts.fsyncs.load(Ordering::SeqCst) as u128 == synced {
            assert!(Instant::now() < deadline, "the last write was never synced");
            std::thread::sleep(Duration::from_millis(20));
        }
        store.close().unwrap();
    }

    #[test]
    fn inputs_deeper_than_serde_json_default_limit_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let mut inputs = serde_json::json!(1);
        for _ in 0..127 {
            inputs = serde_json::json!([inputs]);
        }
        let t = Task::new(agent.clone(), inputs.clone(), Source::default());
        let Written::Accepted(t) = blocking(
            &store,
            Write::Submit {
                task: Arc::new(t),
                idempotency: None,
            },
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap().inputs, inputs);
    }

    #[test]
    fn undecodable_records_are_reported_once_and_purge_still_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (store, counts) = open_counting(dir.path(), SyncMode::Flush);
        let agent: AgentId = "a".parse().unwrap();
        let id = TaskId::from_bytes([9; 16]);
        let db = store.shared.db().unwrap();
        db.insert(task_key(&id), b"{not json".to_vec()).unwrap();
        db.insert(finished_key(1, &id), id.as_bytes().to_vec())
            .unwrap();
        db.insert(key(AGENT, &[agent.to_string().as_bytes()]), b"[".to_vec())
            .unwrap();
        drop(db);
        for _ in 0..2 {
            assert!(
                matches!(store.task_blocking(id), Err(StoreError::Backend(m)) if m.contains(&id.to_string()))
            );
        }
        assert!(store.agent_state_blocking(&agent).is_err());
        let reported = counts.unreadable.lock().unwrap().clone();
        assert_eq!(reported.len(), 2, "{reported:?}");
        assert!(reported.contains(&format!("task {id}")));
        assert_eq!(store.unreadable_records().len(), 2);
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
        assert!(store.task_blocking(id).unwrap().is_none());
        assert!(store.healthy());
    }

    #[test]
    fn schedule_cursors_are_keyed_by_entry_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let k = |index: usize, fingerprint: &str| ScheduleKey {
            agent: agent.clone(),
            index,
            fingerprint: fingerprint.into(),
        };
        let cursor = ScheduleCursor {
            first_seen: 10,
            considered: 20,
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            assert_eq!(
                store.schedule_cursor_blocking(&k(0, "every 5s")).unwrap(),
                None
            );
            blocking(
                &store,
                Write::SetScheduleCursor {
                    key: k(0, "every 5s"),
                    cursor,
                },
            )
            .unwrap();
            store.close().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(
            store.schedule_cursor_blocking(&k(0, "every 5s")).unwrap(),
            Some(cursor)
        );
        assert_eq!(
            store.schedule_cursor_blocking(&k(0, "every 6s")).unwrap(),
            None
        );
        assert_eq!(
            store.schedule_cursor_blocking(&k(1, "every 5s")).unwrap(),
            None
        );
    }

    fn submit_at(store: &SledStore, agent: &AgentId, created_at: u64) -> Task {
        let mut t = task(agent);
        t.created_at = created_at;
        let Written::Accepted(t) = blocking(
            store,
            Write::Submit {
                task: Arc::new(t),
                idempotency: None,
            },
        )
        .unwrap() else {
            panic!("not accepted")
        };
        Arc::unwrap_or_clone(t)
    }

    fn page(store: &SledStore, q: ListQuery) -> TaskPage {
        store.list_tasks_blocking(&q).unwrap()
    }

    #[test]
    fn cancel_is_ordered_with_start_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let cancel = |id| Write::Cancel { id, at_ms: 7 };

        // Revoked first: the start (and a completion) are refused, the record stays REVOKED.
        let t = submit_at(&store, &agent, 1);
        let Written::Cancel(CancelOutcome::Revoked(r)) = blocking(&store, cancel(t.id)).unwrap()
        else {
            panic!()
        };
        assert_eq!((r.status, r.finished_at), (TaskStatus::Revoked, Some(7)));
        assert!(store.queued_blocking(&agent).unwrap().is_empty());
        let mut started = t.clone();
        started.status = TaskStatus::Started;
        assert_eq!(
            blocking(&store, Write::Start(Arc::new(started.clone()))).unwrap(),
            Written::Revoked
        );
        started.status = TaskStatus::Success;
        let complete = Write::Complete {
            task: Arc::new(started),
            state: AgentState::default(),
        };
        assert_eq!(blocking(&store, complete).unwrap(), Written::Revoked);
        assert_eq!(
            store.task_blocking(t.id).unwrap().unwrap().status,
            TaskStatus::Revoked
        );
        assert_eq!(
            blocking(&store, cancel(t.id)).unwrap(),
            Written::Cancel(CancelOutcome::NotCancellable(TaskStatus::Revoked))
        );

        // Started first, even within one batch: the cancel is refused.
        let t = submit_at(&store, &agent, 2);
        let mut started = t.clone();
        started.status = TaskStatus::Started;
        let (tx, rx) = std::sync::mpsc::channel();
        for w in [Write::Start(Arc::new(started)), cancel(t.id)] {
            let tx = tx.clone();
            store.write(w, Box::new(move |r| tx.send(r).unwrap()));
        }
        assert_eq!(rx.recv().unwrap().unwrap(), Written::Done);
        assert_eq!(
            rx.recv().unwrap().unwrap(),
            Written::Cancel(CancelOutcome::NotCancellable(TaskStatus::Started))
        );
        assert_eq!(
            blocking(&store, cancel(TaskId::random())).unwrap(),
            Written::Cancel(CancelOutcome::Unknown)
        );
    }

    #[test]
    fn an_unfiltered_walk_merges_every_agents_index_newest_first_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agents: Vec<AgentId> = ["a", "b/x", "b/xy", "c"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        // Interleaved times, ties across agents included (ordered by id then).
        let mut all = Vec::new();
        for i in 0..40u64 {
            let t = submit_at(&store, &agents[(i * 7 % 4) as usize], 100 + i / 2);
            all.push((t.created_at, t.id));
        }
        all.sort();
        all.reverse();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let p = page(
                &store,
                ListQuery {
                    agent: None,
                    status: None,
                    since_ms: Some(101),
                    until_ms: None,
                    cursor,
                    limit: 3,
                    scan_limit: 1000,
                },
            );
            seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<_> = all.into_iter().filter(|(ms, _)| *ms >= 101).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn listing_walks_newest_first_with_filters_and_bounded_scans() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let mut all = Vec::new();
        for ms in 1..=30u64 {
            let agent = if ms % 3 == 0 { &b } else { &a };
            all.push(submit_at(&store, agent, ms / 2));
        }
        let q = |limit| ListQuery {
            limit,
            scan_limit: 1000,
            ..ListQuery::default()
        };
        // A walk in pages of 7 sees everything once, newest first, with tasks arriving.
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let p = page(&store, ListQuery { cursor, ..q(7) });
            seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
            submit_at(&store, &a, now_ms());
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let mut expected: Vec<_> = all.iter().map(|t| (t.created_at, t.id)).collect();
        expected.sort();
        expected.reverse();
        assert_eq!(seen, expected);

        let only_b = page(
            &store,
            ListQuery {
                agent: Some(b.clone()),
                since_ms: Some(3),
                until_ms: Some(9),
                ..q(100)
            },
        );
        assert!(only_b
            .tasks
            .iter()
            .all(|t| t.agent == b && (3..9).contains(&t.created_at)));
        assert_eq!(only_b.tasks.len(), 4);

        // A status filter with no match stops at the scan bound and hands back a cursor.
        let none = page(
            &store,
            ListQuery {
                status: Some(TaskStatus::Failure),
                scan_limit: 10,
                ..q(100)
            },
        );
        assert!(none.tasks.is_empty());
        assert!(none.next_cursor.is_some());
    }

    #[test]
    fn purge_removes_listing_entries_and_never_a_task_that_is_not_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let done = submit_at(&store, &agent, 1);
        let mut finished = done.clone();
        finished.status = TaskStatus::Success;
        finished.finished_at = Some(1);
        blocking(
            &store,
            Write::Complete {
                task: Arc::new(finished),
                state: AgentState::default(),
            },
        )
        .unwrap();
        let revoked = submit_at(&store, &agent, 2);
        blocking(
            &store,
            Write::Cancel {
                id: revoked.id,
                at_ms: 1,
            },
        )
        .unwrap();
        // A task finished once that is running again (parked) is not purged.
        let again = submit_at(&store, &agent, 3);
        let mut parked = again.clone();
        parked.status = TaskStatus::AwaitingInput;
        parked.finished_at = Some(1);
        blocking(
            &store,
            Write::Complete {
                task: Arc::new(parked),
                state: AgentState::default(),
            },
        )
        .unwrap();
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
        assert!(store.task_blocking(done.id).unwrap().is_none());
        assert!(store.task_blocking(revoked.id).unwrap().is_none());
        assert!(store.task_blocking(again.id).unwrap().is_some());
        let db = store.shared.db().unwrap();
        assert_eq!(db.scan_prefix(LIST_AGENT).count(), 1);
        assert!(db.scan_prefix(REVOKED).next().is_none());
        let listed = page(
            &store,
            ListQuery {
                limit: 10,
                scan_limit: 10,
                ..ListQuery::default()
            },
        );
        assert_eq!(listed.tasks.len(), 1);
    }

    #[test]
    fn the_purge_walks_past_tasks_that_are_not_due_and_still_reads_finished_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        // More unfinished tasks before the cutoff than one purge write looks at, then one that
        // is due: a single purge still reaches it.
        let wall = PURGE_CHUNK * PURGE_LOOK_FACTOR + 5;
        let mut running = Vec::new();
        for n in 0..wall {
            let mut t = submit_at(&store, &agent, 10 + n as u64);
            t.status = TaskStatus::Started;
            t.started_at = Some(11 + n as u64);
            blocking(&store, Write::Start(Arc::new(t.clone()))).unwrap();
            running.push(t.id);
        }
        let due = submit_at(&store, &agent, 10 + wall as u64);
        let mut done = due.clone();
        done.status = TaskStatus::Failure;
        done.finished_at = Some(20 + wall as u64);
        complete(&store, &done);
        // A task of the release before this one: a finished entry beside its state record.
        let both = submit_at(&store, &agent, 5);
        let mut finished = both.clone();
        finished.status = TaskStatus::Success;
        finished.finished_at = Some(6);
        complete(&store, &finished);
        let db = store.shared.db().unwrap();
        db.insert(finished_key(6, &both.id), both.id.as_bytes().to_vec())
            .unwrap();
        // A finished task writes no finished entry any more.
        assert_eq!(db.scan_prefix(FINISHED).count(), 1);
        drop(db);

        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2, "each once");
        assert!(store.task_blocking(due.id).unwrap().is_none());
        assert!(store.task_blocking(both.id).unwrap().is_none());
        assert!(running
            .iter()
            .all(|id| store.task_blocking(*id).unwrap().is_some()));
        let db = store.shared.db().unwrap();
        assert!(db.scan_prefix(FINISHED).next().is_none());
        assert_eq!(
            db.scan_prefix(STATE).count(),
            wall,
            "only the running tasks' states"
        );
        // Nothing left to do: the next purge finds nothing and ends.
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
    }

    #[test]
    fn a_purge_leaves_a_task_changed_earlier_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let t = submit_at(&store, &agent, 1);
        let mut done = t.clone();
        done.status = TaskStatus::Failure;
        done.finished_at = Some(2);
        complete(&store, &done);
        // Staged by hand, as the writer would if the two writes met in one group commit.
        let db = store.shared.db().unwrap();
        let (mut batch, mut staged, revoked) =
            (sled::Batch::default(), Staged::default(), HashSet::new());
        let mut again = done.clone();
        again.status = TaskStatus::Started;
        again.finished_at = None;
        let shared = &store.shared;
        let start = Write::Start(Arc::new(again));
        stage(&db, shared, &revoked, &mut batch, &mut staged, start).unwrap();
        *shared.purge_cursor.lock().unwrap() = Some(STATE.to_vec());
        let purge = Write::Purge {
            finished_before_ms: now_ms(),
            limit: 10,
        };
        let purged = stage(&db, shared, &revoked, &mut batch, &mut staged, purge).unwrap();
        assert_eq!(purged, Written::Purged(0));
        db.apply_batch(batch).unwrap();
        let stored = store.task_blocking(t.id).unwrap().expect("not purged");
        assert_eq!(stored.status, TaskStatus::Started);
        // Once that batch is on disk, the task is judged by what it is now.
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 0);
    }

    #[test]
    fn status_changes_stage_deliveries_in_the_same_batch_and_they_survive_reopen() {
        use crate::outbox::{DeliveryStatus, EndpointPlan, EventType};
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let quiet: AgentId = "b".parse().unwrap();
        let outbox = || {
            Arc::new(Outbox::new(HashMap::from([(
                agent.clone(),
                vec![EndpointPlan {
                    events: EventType::ALL.into_iter().collect(),
                }],
            )])))
        };
        let open = |outbox: Arc<Outbox>| {
            reopen_opts(dir.path(), || Options {
                outbox: Some(outbox.clone()),
                ..Options::default()
            })
        };
        let first = outbox();
        let mut rx = first.take_receiver().unwrap();
        let store = open(first);
        let Written::Accepted(t) = blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        )
        .unwrap() else {
            panic!()
        };
        let mut started = (*t).clone();
        started.status = TaskStatus::Started;
        started.tick = 1;
        let started = Arc::new(started);
        // Start written twice: the second is no status change and plans nothing.
        blocking(&store, Write::Start(started.clone())).unwrap();
        blocking(&store, Write::Start(started.clone())).unwrap();
        let mut done = (*started).clone();
        done.status = TaskStatus::Success;
        blocking(
            &store,
            Write::Complete {
                task: Arc::new(done),
                state: AgentState::default(),
            },
        )
        .unwrap();
        blocking(
            &store,
            Write::Submit {
                task: Arc::new(task(&quiet)),
                idempotency: None,
            },
        )
        .unwrap();
        let mut handed = Vec::new();
        while let Ok(d) = rx.try_recv() {
            handed.push(d);
        }
        assert_eq!(
            handed.iter().map(|d| d.event).collect::<Vec<_>>(),
            vec![EventType::Started, EventType::Succeeded]
        );
        assert!(handed[0].id < handed[1].id);
        assert_eq!(handed[1].webhook_id, format!("{}.task.succeeded.1", t.id));
        store.close().unwrap();
        drop(store);
        let store = open(outbox());
        let all = read_deliveries(
            &store.shared,
            &DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .unwrap();
        assert_eq!(all, handed);
        let after = read_deliveries(
            &store.shared,
            &DeliveryQuery {
                after: Some(handed[0].id),
                status: Some(DeliveryStatus::Pending),
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .unwrap();
        assert_eq!(after.len(), 1);
        blocking(
            &store,
            Write::NotifyEndpoint {
                agent: agent.clone(),
                endpoint: 3,
                disabled: true,
            },
        )
        .unwrap();
        assert_eq!(
            read_disabled_endpoints(&store.shared).unwrap(),
            vec![(agent.clone(), 3)]
        );
        blocking(
            &store,
            Write::NotifyEndpoint {
                agent: agent.clone(),
                endpoint: 3,
                disabled: false,
            },
        )
        .unwrap();
        assert!(read_disabled_endpoints(&store.shared).unwrap().is_empty());
        // Retention removes finished deliveries and keeps pending ones.
        let mut finished = all[0].clone();
        finished.status = DeliveryStatus::Succeeded;
        blocking(&store, Write::Delivery(Box::new(finished))).unwrap();
        store.purge(Duration::ZERO).unwrap();
        let left = read_deliveries(
            &store.shared,
            &DeliveryQuery {
                limit: 10,
                ..DeliveryQuery::default()
            },
        )
        .unwrap();
        assert_eq!(left, vec![all[1].clone()]);
    }

    /// Records `task` (already finished) as its tick's outcome.
    fn complete(store: &SledStore, task: &Task) {
        let write = Write::Complete {
            task: Arc::new(task.clone()),
            state: AgentState::default(),
        };
        assert_eq!(blocking(store, write).unwrap(), Written::Done);
    }

    #[test]
    fn state_records_of_the_previous_layout_are_read_superseded_and_purged() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let db = store.shared.db().unwrap();
        let t = submit_at(&store, &agent, 1);
        let mut started = t.clone();
        started.status = TaskStatus::Started;
        started.attempt = 1;
        blocking(&store, Write::Start(Arc::new(started.clone()))).unwrap();
        // What the previous release wrote: the state under `u/<task id>`.
        let record = db.remove(state_key(&t)).unwrap().unwrap();
        db.insert(legacy_state_key(&t.id), record).unwrap();
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), started);
        // The next change goes under the new key and wins over the stale legacy record.
        let mut finished = started.clone();
        finished.status = TaskStatus::Success;
        finished.finished_at = Some(5);
        complete(&store, &finished);
        assert!(db.get(legacy_state_key(&t.id)).unwrap().is_some());
        assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), finished);
        // A purge takes both.
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 1);
        assert!(db.scan_prefix(STATE).next().is_none());
        assert!(store.task_blocking(t.id).unwrap().is_none());
        store.close().unwrap();
    }

    #[test]
    fn changes_after_acceptance_write_a_small_state_record_and_revocations_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let (done, revoked);
        {
            let store = SledStore::open(dir.path()).unwrap();
            let t = submit_at(&store, &agent, 1);
            let db = store.shared.db().unwrap();
            let head = db.get(task_key(&t.id)).unwrap().unwrap();
            assert_eq!(head[0], record::TASK_V1);
            let mut finished = t.clone();
            finished.status = TaskStatus::Success;
            finished.finished_at = Some(5);
            finished.result = Some(serde_json::json!({"response": {"ok": true}}));
            complete(&store, &finished);
            // The head is untouched; the change is a record of its own, holding the output once.
            assert_eq!(db.get(task_key(&t.id)).unwrap().unwrap(), head);
            let state = db.get(state_key(&t)).unwrap().unwrap();
            assert_eq!(state[0], record::STATE_V1);
            assert!(state.len() < 64, "{} bytes", state.len());
            assert_eq!(store.task_blocking(t.id).unwrap().unwrap(), finished);
            done = finished;
            let r = submit_at(&store, &agent, 2);
            blocking(&store, Write::Cancel { id: r.id, at_ms: 3 }).unwrap();
            revoked = r;
            store.close().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.task_blocking(done.id).unwrap().unwrap(), done);
        let mut started = revoked.clone();
        started.status = TaskStatus::Started;
        assert_eq!(
            blocking(&store, Write::Start(Arc::new(started))).unwrap(),
            Written::Revoked,
            "the revocation is known to the writer after a reopen"
        );
        // Purged, the task leaves the writer's set with its records.
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
        let db = store.shared.db().unwrap();
        assert!(db.scan_prefix(STATE).next().is_none());
        assert!(db.scan_prefix(TASK).next().is_none());
    }

    #[test]
    fn second_open_reports_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _store = SledStore::open(dir.path()).unwrap();
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Locked { .. })
        ));
    }

    #[test]
    fn write_async_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let res = rt.block_on(write_async(
            store.as_ref(),
            Write::Submit {
                task: Arc::new(task(&agent)),
                idempotency: None,
            },
        ));
        assert!(matches!(res, Ok(Written::Accepted(_))));
    }

    /// Stages `writes` in one batch and applies it, as one group commit of the writer does. It
    /// bypasses the writer, whose cache of each agent's newest listing entry then lags: a test
    /// that lists tasks this way must not also submit tasks of the same agent through the writer.
    fn one_commit(store: &SledStore, writes: Vec<Write>) -> Vec<Written> {
        let db = store.shared.db().unwrap();
        let (mut batch, mut staged) = (sled::Batch::default(), Staged::default());
        let revoked = HashSet::new();
        let written = writes
            .into_iter()
            .map(|w| stage(&db, &store.shared, &revoked, &mut batch, &mut staged, w).unwrap())
            .collect();
        staged.write_queue(&mut batch);
        staged.write_listing(&mut batch);
        db.apply_batch(batch).unwrap();
        written
    }

    fn accepted(written: Vec<Written>) -> Vec<Task> {
        written
            .into_iter()
            .map(|w| match w {
                Written::Accepted(t) => Arc::unwrap_or_clone(t),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn submits(agent: &AgentId, n: usize) -> Vec<Write> {
        (0..n)
            .map(|_| Write::Submit {
                task: Arc::new(task(agent)),
                idempotency: None,
            })
            .collect()
    }

    fn queue_keys(store: &SledStore, agent: &AgentId) -> usize {
        let db = store.shared.db().unwrap();
        db.scan_prefix(queue_prefix(agent)).count()
    }

    fn ids(tasks: &[&Task]) -> Vec<TaskId> {
        tasks.iter().map(|t| t.id).collect()
    }

    #[test]
    fn one_group_commit_queues_an_agents_tasks_under_one_key_and_completions_shrink_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let store = SledStore::open(dir.path()).unwrap();
        let mut writes = submits(&a, 3);
        writes.extend(submits(&b, 2));
        writes.extend(submits(&a, 1));
        let t = accepted(one_commit(&store, writes));
        assert_eq!((queue_keys(&store, &a), queue_keys(&store, &b)), (1, 1));
        assert_eq!(
            store.queued_blocking(&a).unwrap(),
            ids(&[&t[0], &t[1], &t[2], &t[5]])
        );
        assert_eq!(store.queued_blocking(&b).unwrap(), ids(&[&t[3], &t[4]]));
        // A later commit takes two out of the segment and queues one more behind it.
        let done = |t: &Task| Write::Complete {
            task: Arc::new(t.clone()),
            state: AgentState::default(),
        };
        let mut writes = vec![done(&t[0]), done(&t[2])];
        writes.extend(submits(&a, 1));
        let more = one_commit(&store, writes).pop().unwrap();
        let Written::Accepted(t6) = more else {
            panic!("not accepted")
        };
        assert!(t6.seq > t[5].seq);
        assert_eq!(queue_keys(&store, &a), 2);
        assert_eq!(
            store.queued_blocking(&a).unwrap(),
            ids(&[&t[1], &t[5], &t6])
        );
        // The writer's own commits, and a reopen, see the same queue.
        complete(&store, &t[1]);
        complete(&store, &t[5]);
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.queued_blocking(&a).unwrap(), vec![t6.id]);
        assert_eq!(queue_keys(&store, &a), 1, "the emptied segment is removed");
        complete(&store, &t6);
        assert_eq!(queue_keys(&store, &a), 0);
        assert_eq!(store.queued_blocking(&b).unwrap(), ids(&[&t[3], &t[4]]));
    }

    #[test]
    fn queue_entries_of_the_previous_layout_come_first_and_leave_with_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let db = store.shared.db().unwrap();
        // What the previous release wrote for a queued task: its head with a sled id as its
        // position, and a key of its own holding the bare task id.
        let mut old = task(&agent);
        old.seq = 7;
        let (mut batch, mut staged) = (sled::Batch::default(), Staged::default());
        put_task(
            &db,
            &store.shared,
            &mut batch,
            &mut staged,
            &old,
            Part::Head,
        )
        .unwrap();
        batch.insert(queue_key(&agent, 7), old.id.as_bytes().to_vec());
        db.apply_batch(batch).unwrap();
        let new = accepted(one_commit(&store, submits(&agent, 1))).remove(0);
        assert!(new.seq > old.seq);
        assert_eq!(store.queued_blocking(&agent).unwrap(), ids(&[&old, &new]));
        complete(&store, &old);
        assert_eq!(store.queued_blocking(&agent).unwrap(), vec![new.id]);
        assert_eq!(db.get(queue_key(&agent, 7)).unwrap(), None);
        assert!(store.unreadable_records().is_empty());
    }

    #[test]
    fn a_damaged_segment_is_reported_and_left_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let db = store.shared.db().unwrap();
        let t = accepted(one_commit(&store, submits(&agent, 2)));
        let (base, _) = queue::locate(t[0].seq).unwrap();
        db.insert(queue_key(&agent, base), vec![1, 2, 3]).unwrap();
        assert_eq!(store.queued_blocking(&agent).unwrap(), Vec::<TaskId>::new());
        complete(&store, &t[0]);
        assert_eq!(
            db.get(queue_key(&agent, base)).unwrap().as_deref(),
            Some(&[1u8, 2, 3][..])
        );
        assert_eq!(store.unreadable_records().len(), 1);
    }

    fn list_keys(store: &SledStore, agent: &AgentId) -> usize {
        let db = store.shared.db().unwrap();
        db.scan_prefix(list_agent_prefix(agent)).count()
    }

    fn submits_at(agent: &AgentId, created: &[u64]) -> Vec<Write> {
        created
            .iter()
            .map(|&ms| {
                let mut t = task(agent);
                t.created_at = ms;
                Write::Submit {
                    task: Arc::new(t),
                    idempotency: None,
                }
            })
            .collect()
    }

    /// Every listed task of a walk in pages of `limit` between the bounds, as (created, id).
    fn walk(
        store: &SledStore,
        agent: Option<&AgentId>,
        since: Option<u64>,
        until: Option<u64>,
        limit: usize,
    ) -> Vec<(u64, TaskId)> {
        let (mut seen, mut cursor) = (Vec::new(), None);
        loop {
            let p = page(
                store,
                ListQuery {
                    agent: agent.cloned(),
                    since_ms: since,
                    until_ms: until,
                    cursor,
                    limit,
                    scan_limit: 1000,
                    ..ListQuery::default()
                },
            );
            seen.extend(p.tasks.iter().map(|t| (t.created_at, t.id)));
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => return seen,
            }
        }
    }

    fn newest_first(tasks: &[Task]) -> Vec<(u64, TaskId)> {
        let mut all: Vec<_> = tasks.iter().map(|t| (t.created_at, t.id)).collect();
        all.sort_by(|a, b| b.cmp(a));
        all
    }

    #[test]
    fn one_group_commit_lists_an_agents_tasks_under_one_key_and_stragglers_keep_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
        let store = SledStore::open(dir.path()).unwrap();
        let mut writes = submits_at(&a, &[10, 30, 20, 30]);
        writes.extend(submits_at(&b, &[25]));
        let mut tasks = accepted(one_commit(&store, writes));
        assert_eq!((list_keys(&store, &a), list_keys(&store, &b)), (1, 1));
        // 25 falls inside the first key's range and joins it; 40 is newer than everything and
        // opens a key; 5 is older than everything and takes a key of its own.
        tasks.extend(accepted(one_commit(&store, submits_at(&a, &[25, 40, 5]))));
        assert_eq!(list_keys(&store, &a), 3);
        let of_a: Vec<Task> = tasks.iter().filter(|t| t.agent == a).cloned().collect();
        for limit in [1, 2, 3, 10] {
            assert_eq!(
                walk(&store, Some(&a), None, None, limit),
                newest_first(&of_a)
            );
            assert_eq!(walk(&store, None, None, None, limit), newest_first(&tasks));
        }
        // Bounds that cut through a key's range.
        let inside: Vec<Task> = of_a
            .iter()
            .filter(|t| (20..31).contains(&t.created_at))
            .cloned()
            .collect();
        assert_eq!(
            walk(&store, Some(&a), Some(20), Some(31), 2),
            newest_first(&inside)
        );
        assert!(store.unreadable_records().is_empty());
    }

    #[test]
    fn a_purge_takes_entries_out_of_their_key_and_a_key_moves_to_its_oldest_left() {
        let dir = tempfile::tempdir().unwrap();
        let agent: AgentId = "a".parse().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let t = accepted(one_commit(&store, submits_at(&agent, &[1, 2, 3])));
        for done in [&t[0], &t[2]] {
            let mut done = done.clone();
            done.status = TaskStatus::Success;
            done.finished_at = Some(4);
            complete(&store, &done);
        }
        assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, 2);
        assert_eq!(walk(&store, None, None, None, 10), newest_first(&t[1..2]));
        let db = store.shared.db().unwrap();
        let keys: Vec<_> = db.scan_prefix(list_agent_prefix(&agent)).collect();
        assert_eq!(keys.len(), 1);
        let (key, value) = keys[0].as_ref().unwrap();
        assert_eq!(
            key.as_ref(),
            listing_key(&list_agent_prefix(&agent), &listing::entry(2, &t[1].id))
        );
        assert!(value.is_empty());
        // New tasks after the purge still list above it.
        let more = accepted(one_commit(&store, submits_at(&agent, &[2, 9])));
        let mut all = vec![t[1].clone()];
        all.extend(more);
        assert_eq!(walk(&store, None, None, None, 1), newest_first(&all));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Against a model (the set of live tasks): random group commits of tasks at random
        /// times for two agents, completions and purges between them, a reopen in the middle,
        /// and walks in pages of random sizes with random bounds.
        #[test]
        fn the_listing_is_every_live_task_newest_first_whatever_the_commits(
            commits in proptest::collection::vec(
                (proptest::collection::vec((0u64..40, proptest::prelude::any::<bool>()), 0..8),
                 proptest::prelude::any::<bool>()),
                1..8,
            ),
            limit in 1usize..6,
            since in proptest::option::of(0u64..40),
            until in proptest::option::of(0u64..45),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (a, b): (AgentId, AgentId) = ("a".parse().unwrap(), "b".parse().unwrap());
            let mut store = SledStore::open(dir.path()).unwrap();
            let mut live: Vec<Task> = Vec::new();
            for (i, (submissions, purge)) in commits.iter().enumerate() {
                let writes = submissions
                    .iter()
                    .flat_map(|&(ms, of_a)| submits_at(if of_a { &a } else { &b }, &[ms]))
                    .collect();
                live.extend(accepted(one_commit(&store, writes)));
                if *purge {
                    // Every other live task finishes and goes.
                    let (gone, kept): (Vec<_>, Vec<_>) =
                        live.drain(..).enumerate().partition(|(j, _)| j % 2 == 0);
                    for (_, t) in &gone {
                        let mut done = t.clone();
                        done.status = TaskStatus::Success;
                        done.finished_at = Some(1);
                        complete(&store, &done);
                    }
                    proptest::prop_assert_eq!(store.purge(Duration::ZERO).unwrap().tasks, gone.len());
                    live = kept.into_iter().map(|(_, t)| t).collect();
                }
                if i == commits.len() / 2 {
                    drop(store);
                    store = reopen(dir.path());
                }
            }
            let within = |t: &&Task| {
                since.is_none_or(|s| t.created_at >= s) && until.is_none_or(|u| t.created_at < u)
            };
            let all: Vec<Task> = live.iter().filter(within).cloned().collect();
            proptest::prop_assert_eq!(walk(&store, None, since, until, limit), newest_first(&all));
            let of_a: Vec<Task> = all.iter().filter(|t| t.agent == a).cloned().collect();
            proptest::prop_assert_eq!(walk(&store, Some(&a), since, until, limit), newest_first(&of_a));
            proptest::prop_assert!(store.unreadable_records().is_empty());
        }
    }
}
