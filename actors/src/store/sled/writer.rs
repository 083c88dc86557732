//! The writer thread: the one owner of every store write. It collects the requests queued for
//! it into a group commit (staged by `stage`), applies and flushes it, makes it durable per
//! [`SyncMode`], and after a failed commit probes the disk and reopens the `Db` until writes work
//! again. Separate from the staging so that this file is only about the thread, durability and
//! recovery, not about what any one write puts into the batch.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stage::stage;
use super::staged::Staged;
use super::tasks::load_revoked;
use super::{backend, open_db, open_waiting, Shared, SyncMode, PERIODIC_SYNC, PROBE, REOPEN_WAIT};
use crate::model::{now_ms, TaskId};
use crate::store::{OnWritten, StoreError, Write, Written};

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

pub(super) struct Job {
    pub(super) write: Write,
    pub(super) done: OnWritten,
}

/// `fdatasync` of sled's files for [`SyncMode::Fsync`]. sled keeps everything but large values
/// in its `db` file; values above its blob threshold go to files under `blobs/`, which sled
/// writes without syncing, so new ones are synced here (with their directory).
pub(super) struct Durable {
    db_file: File,
    blobs_dir: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl Durable {
    pub(super) fn new(path: &Path) -> std::io::Result<Self> {
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
pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) shared: Arc<Shared>,
    /// The writer's handle; `None` after a failure until a reopen succeeds.
    pub(super) db: Option<sled::Db>,
    /// Every revoked task still stored (its `rv/` marker), so `Start` and `Complete` check it
    /// without a tree read; loaded at open and at every reopen, updated after each commit.
    pub(super) revoked: foldhash::HashSet<TaskId>,
    /// `fdatasync` of sled's files: after every group commit in [`SyncMode::Fsync`], at most every
    /// [`PERIODIC_SYNC`] in [`SyncMode::Flush`]. `None` after a failure until a reopen succeeds.
    pub(super) durable: Option<Durable>,
    /// When the oldest flushed write not yet covered by an `fdatasync` was flushed.
    pub(super) unsynced_since: Option<Instant>,
    pub(super) sync: SyncMode,
    /// The staging state of the group commit in progress, kept between commits for its
    /// capacity.
    pub(super) staged: Staged,
    /// A commit failed: sled holds a global error and must be reopened before writing again.
    pub(super) broken: bool,
    pub(super) last_error: Option<StoreError>,
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Job>) {
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
