//! The sled backend. Everything lives in one tree under short key prefixes so that one
//! `apply_batch` covers every record of a request (task, queue entry, idempotency key) and they
//! land together or not at all. One writer thread owns all writes: it blocks for the first
//! request, takes whatever else is queued, applies one batch and flushes once for all of them.
//! sled 0.34's concurrent `flush_async` stalls (sled issue 1308), so a single flusher is the
//! design rather than an optimisation; `../shared/notes/durable-accept.md` has the measurements.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{AgentState, OnWritten, Purged, Store, StoreError, StoreFuture, Write, Written};
use crate::model::{now_ms, AgentId, Task, TaskId};

const TASK: &[u8] = b"t/";
const QUEUE: &[u8] = b"q/";
const IDEM: &[u8] = b"i/";
const AGENT_TOKEN: &[u8] = b"d/";
const AGENT: &[u8] = b"a/";
const FINISHED: &[u8] = b"f/";

/// Most finished tasks one purge write removes; a purge of more takes several writes, so
/// submissions are never held behind a long one.
const PURGE_CHUNK: usize = 1000;

/// Largest number of requests folded into one batch; bounds the latency of the first of them.
const MAX_BATCH: usize = 4096;

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

/// sled-backed [`Store`].
pub struct SledStore {
    db: sled::Db,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    healthy: Arc<AtomicBool>,
}

impl SledStore {
    /// Opens (or creates) the store at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        Self::open_with(path, None)
    }

    /// Like [`SledStore::open`], reporting every group commit to `on_flush`.
    pub fn open_with(path: &Path, on_flush: Option<FlushHook>) -> Result<Arc<Self>, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| open_error(path, e))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let healthy = Arc::new(AtomicBool::new(true));
        let writer = {
            let db = db.clone();
            let healthy = healthy.clone();
            std::thread::Builder::new()
                .name("tickgate-store-writer".into())
                .spawn(move || writer_loop(db, rx, healthy, on_flush))
                .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?
        };
        Ok(Arc::new(Self {
            db,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            healthy,
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

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = prefix.to_vec();
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

fn queue_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = key(QUEUE, &[agent.to_string().as_bytes()]);
    k.push(0);
    k
}

fn queue_key(agent: &AgentId, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(agent);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn idem_key(agent: &AgentId, idem_key: &str) -> Vec<u8> {
    key(IDEM, &[agent.to_string().as_bytes(), idem_key.as_bytes()])
}

fn finished_key(at_ms: u64, id: &TaskId) -> Vec<u8> {
    key(FINISHED, &[&at_ms.to_be_bytes(), id.as_bytes()])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(backend)
}

fn writer_loop(
    db: sled::Db,
    rx: mpsc::Receiver<Job>,
    healthy: Arc<AtomicBool>,
    on_flush: Option<FlushHook>,
) {
    let mut jobs = Vec::new();
    while let Ok(first) = rx.recv() {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut batch = sled::Batch::default();
        let mut staged = Staged::default();
        // Each write is consumed by staging: an accepted task moves into its answer rather than
        // being copied, which matters on this one thread every write goes through.
        let staged_jobs: Vec<(OnWritten, Result<Written, StoreError>)> = jobs
            .drain(..)
            .map(|job| (job.done, stage(&db, &mut batch, &mut staged, job.write)))
            .collect();
        let requests = staged_jobs.len();
        let started = std::time::Instant::now();
        let committed = db
            .apply_batch(batch)
            .and_then(|()| db.flush().map(|_| ()))
            .map_err(backend);
        if let Some(hook) = &on_flush {
            hook(started.elapsed(), requests);
        }
        if let Err(e) = &committed {
            tracing::error!(error = %e, requests, "store write failed");
        }
        healthy.store(committed.is_ok(), Ordering::Relaxed);
        for (done, outcome) in staged_jobs {
            let result = match &committed {
                Ok(()) => outcome,
                Err(e) => Err(e.clone()),
            };
            done(result);
        }
    }
}

/// Keys written earlier in the same batch, which `db.get` cannot see yet.
#[derive(Default)]
struct Staged {
    idem: HashMap<Vec<u8>, (TaskId, [u8; 32])>,
}

fn stage(
    db: &sled::Db,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    write: Write,
) -> Result<Written, StoreError> {
    match write {
        Write::Submit {
            mut task,
            idempotency,
        } => {
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
            task.seq = db.generate_id().map_err(backend)?;
            batch.insert(task_key(&task.id), encode(&*task)?);
            batch.insert(
                queue_key(&task.agent, task.seq),
                task.id.as_bytes().to_vec(),
            );
            Ok(Written::Accepted(task))
        }
        Write::Start(task) => {
            batch.insert(task_key(&task.id), encode(&*task)?);
            Ok(Written::Done)
        }
        Write::Complete { task, state } => {
            batch.insert(task_key(&task.id), encode(&*task)?);
            batch.remove(queue_key(&task.agent, task.seq));
            batch.insert(
                finished_key(task.finished_at.unwrap_or_else(now_ms), &task.id),
                task.id.as_bytes().to_vec(),
            );
            batch.insert(
                key(AGENT, &[task.agent.to_string().as_bytes()]),
                encode(&state)?,
            );
            Ok(Written::Done)
        }
        Write::Purge {
            finished_before_ms,
            limit,
        } => {
            let mut end = FINISHED.to_vec();
            end.extend_from_slice(&finished_before_ms.to_be_bytes());
            let mut purged = 0;
            for entry in db.range(FINISHED.to_vec()..end).take(limit) {
                let (k, id) = entry.map_err(backend)?;
                batch.remove(k);
                let Ok(bytes) = <[u8; 16]>::try_from(id.as_ref()) else {
                    continue;
                };
                let id = TaskId::from_bytes(bytes);
                let key = task_key(&id);
                if let Some(raw) = db.get(&key).map_err(backend)? {
                    let task: Task = serde_json::from_slice(&raw).map_err(backend)?;
                    if let Some(idem) = &task.idempotency_key {
                        batch.remove(idem_key(&task.agent, idem));
                    }
                }
                batch.remove(key);
                purged += 1;
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
    }
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
    let record: IdemRecord = serde_json::from_slice(&raw).map_err(backend)?;
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

fn read_task(db: &sled::Db, id: TaskId) -> Result<Option<Task>, StoreError> {
    match db.get(task_key(&id)).map_err(backend)? {
        Some(raw) => serde_json::from_slice(&raw).map(Some).map_err(backend),
        None => Ok(None),
    }
}

fn read_agent_state(db: &sled::Db, agent: &AgentId) -> Result<AgentState, StoreError> {
    match db
        .get(key(AGENT, &[agent.to_string().as_bytes()]))
        .map_err(backend)?
    {
        Some(raw) => serde_json::from_slice(&raw).map_err(backend),
        None => Ok(AgentState {
            memory: serde_json::json!({}),
            ticks: 0,
        }),
    }
}

fn read_queued(db: &sled::Db, agent: &AgentId) -> Result<Vec<TaskId>, StoreError> {
    let mut ids = Vec::new();
    for entry in db.scan_prefix(queue_prefix(agent)) {
        let (_, id) = entry.map_err(backend)?;
        match <[u8; 16]>::try_from(id.as_ref()) {
            Ok(bytes) => ids.push(TaskId::from_bytes(bytes)),
            Err(_) => tracing::warn!(agent = %agent, "skipping a malformed queue entry"),
        }
    }
    Ok(ids)
}

/// Blocking reads for code that runs outside any async runtime (tests, tools); async code uses
/// the [`Store`] trait's reads, which run these off the calling thread.
impl SledStore {
    /// Reads one task, blocking the calling thread.
    pub fn task_blocking(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        read_task(&self.db, id)
    }

    /// An agent's memory and tick counter, blocking the calling thread.
    pub fn agent_state_blocking(&self, agent: &AgentId) -> Result<AgentState, StoreError> {
        read_agent_state(&self.db, agent)
    }

    /// The ids queued for an agent, blocking the calling thread.
    pub fn queued_blocking(&self, agent: &AgentId) -> Result<Vec<TaskId>, StoreError> {
        read_queued(&self.db, agent)
    }
}

impl Store for SledStore {
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
        let db = self.db.clone();
        off_thread(move || read_task(&db, id))
    }

    fn agent_state(&self, agent: &AgentId) -> StoreFuture<AgentState> {
        let (db, agent) = (self.db.clone(), agent.clone());
        off_thread(move || read_agent_state(&db, &agent))
    }

    fn queued(&self, agent: &AgentId) -> StoreFuture<Vec<TaskId>> {
        let (db, agent) = (self.db.clone(), agent.clone());
        off_thread(move || read_queued(&db, &agent))
    }

    fn token_digest(&self, agent: &AgentId) -> Result<Option<[u8; 32]>, StoreError> {
        let raw = self
            .db
            .get(key(AGENT_TOKEN, &[agent.to_string().as_bytes()]))
            .map_err(backend)?;
        Ok(raw.and_then(|r| <[u8; 32]>::try_from(r.as_ref()).ok()))
    }

    fn purge(&self, older_than: Duration) -> Result<Purged, StoreError> {
        let finished_before_ms = now_ms().saturating_sub(older_than.as_millis() as u64);
        let mut purged = Purged::default();
        loop {
            let write = Write::Purge {
                finished_before_ms,
                limit: PURGE_CHUNK,
            };
            match super::write_blocking(self, write)? {
                Written::Purged(n) => {
                    purged.tasks += n;
                    if n < PURGE_CHUNK {
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
        self.healthy.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Source, TaskStatus};
    use crate::store::{write_async, IdempotencyKey};

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
                    task: Box::new(task(&agent)),
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
                    task: Box::new(task(&agent)),
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
            let Written::Accepted(mut t) = blocking(
                &store,
                Write::Submit {
                    task: Box::new(task(&agent)),
                    idempotency: None,
                },
            )
            .unwrap() else {
                panic!()
            };
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
                    task: Arc::new(*t),
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
        let store = SledStore::open(dir.path()).unwrap();
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
            let Written::Accepted(mut t) = blocking(
                &store,
                Write::Submit {
                    task: Box::new(task(&agent)),
                    idempotency: Some(key(n)),
                },
            )
            .unwrap() else {
                panic!("not accepted")
            };
            t.status = TaskStatus::Success;
            t.finished_at = Some(finished_at);
            let id = t.id;
            let state = AgentState::default();
            blocking(
                &store,
                Write::Complete {
                    task: Arc::new(*t),
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
                    task: Box::new(task(&agent)),
                    idempotency: Some(key(n)),
                },
            )
            .unwrap()
        };
        assert!(matches!(again(0), Written::Accepted(_)));
        assert_eq!(again(total), Written::Duplicate(recent));
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
                task: Box::new(task(&agent)),
                idempotency: None,
            },
        ));
        assert!(matches!(res, Ok(Written::Accepted(_))));
    }
}
