//! Task records: the whole head (`t/`, the task as it is now, see `record`) and the state records
//! (`u/`) that earlier layouts kept beside a head; how a task is staged (with the status callbacks
//! a change plans, the outbox hook) and read back, and the revoked markers (`rv/`) that keep a
//! cancelled task from running. Separate because every other part reads or writes tasks through
//! these.

use foldhash::HashSet;

use super::listed::list;
use super::staged::Staged;
use super::{backend, encode, key, outbox_key, Shared, REVOKED, STATE, TASK};
use crate::model::{now_ms, Task, TaskId, TaskStatus};
use crate::store::record;
use crate::store::{queue, StoreError};

pub(super) fn task_key(id: &TaskId) -> Vec<u8> {
    key(TASK, &[id.as_bytes()])
}

/// Where the first binary layout kept a task's state record: no longer written, read for a task
/// whose head is not whole, removed with the task.
pub(super) fn state_key(task: &Task) -> Vec<u8> {
    state_key_at(task.created_at, &task.id)
}

/// [`state_key`] of a task known by its creation time and id (a listing entry).
pub(super) fn state_key_at(created_ms: u64, id: &TaskId) -> Vec<u8> {
    key(STATE, &[&created_ms.to_be_bytes(), id.as_bytes()])
}

/// Where the release before the `u/<created_at><id>` keys kept a task's state record.
pub(super) fn legacy_state_key(id: &TaskId) -> Vec<u8> {
    key(STATE, &[id.as_bytes()])
}

/// A task's state record: under its key, or for a task last changed by an older release, under
/// the legacy one.
fn get_state(db: &sled::Db, task: &Task) -> Result<Option<sled::IVec>, StoreError> {
    match db.get(state_key(task)).map_err(backend)? {
        Some(state) => Ok(Some(state)),
        None => db.get(legacy_state_key(&task.id)).map_err(backend),
    }
}

impl Shared {
    /// Reads a task: its head record and, for a head that is not whole (an earlier layout), its
    /// state record over it if it has one. `None` when there is no head (never accepted, or
    /// purged).
    pub(super) fn load_task(&self, db: &sled::Db, id: TaskId) -> Result<Option<Task>, StoreError> {
        let Some(head) = db.get(task_key(&id)).map_err(backend)? else {
            return Ok(None);
        };
        let unreadable = |e: record::RecordError| {
            let what = format!("task {id}");
            self.report_unreadable(what.clone(), &e.into_json());
            StoreError::Backend(format!("the stored {what} cannot be decoded"))
        };
        let mut task = record::decode_task(id, &head).map_err(unreadable)?;
        if record::is_whole(&head) {
            return Ok(Some(task));
        }
        if let Some(state) = get_state(db, &task)? {
            record::apply_state(&mut task, &state).map_err(unreadable)?;
        }
        Ok(Some(task))
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
pub(super) fn staged_task(
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

/// Whether [`put_task`] writes a newly accepted task or a change of a stored one. Both rewrite
/// the whole head; they differ in what the outbox compares the status with (nothing, or the
/// stored status).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Head,
    State,
}

/// Stages a task's whole head, and with it the status callbacks its status change causes (the
/// outbox hook): when the task is new or its status differs from the stored (or earlier staged)
/// one, the outbox plans deliveries, which go into the same batch under
/// [`OUTBOX`](super::OUTBOX).
///
/// A change rewrites the head, inputs and headers included, rather than writing a small state
/// record under a key of its own: measured, the second key per task cost the writer more (its
/// leaf insert and its share of leaf splits) than the bytes written again (#16). A state record
/// an earlier layout left beside the head is stale from then on and goes with the purge.
pub(super) fn put_task(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    task: &Task,
    part: Part,
) -> Result<(), StoreError> {
    if part == Part::State {
        list_if_old(db, shared, batch, staged, task)?;
    }
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        buf.clear();
        record::encode_task_into(&mut buf, task);
        // sled copies the value into a shared slice of its own either way; from a borrowed
        // buffer that is the only allocation.
        batch.insert(task_key(&task.id), &buf[..]);
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

/// Lists a task accepted by a release older than the segmented queue (its queue position lacks
/// [`queue::SEGMENTED`]), which may be older than the listing index too and so have no entry:
/// the retention purge walks the listing, so an unlisted task that finishes now would never be
/// purged (its release wrote a finished entry only when a task finished). Listing it again is
/// harmless when it is listed already (its key is rewritten as it is), and such tasks are only
/// the ones still in flight across the upgrade; every later task is listed on acceptance.
pub(super) fn list_if_old(
    db: &sled::Db,
    shared: &Shared,
    batch: &mut sled::Batch,
    staged: &mut Staged,
    task: &Task,
) -> Result<(), StoreError> {
    if task.seq & queue::SEGMENTED == 0 {
        list(db, shared, batch, staged, task)?;
    }
    Ok(())
}

/// A stored task's status, read from the second byte of its whole head (or, for an earlier
/// layout, of its state record, else its head); only a head in the JSON layout is decoded whole.
/// An unreadable record has none.
fn stored_status(db: &sled::Db, task: &Task) -> Result<Option<TaskStatus>, StoreError> {
    let id = task.id;
    let head = db.get(task_key(&id)).map_err(backend)?;
    if let Some(raw) = head.as_ref().filter(|h| record::is_whole(h)) {
        return Ok(record::stored_status(raw));
    }
    if let Some(raw) = get_state(db, task)? {
        return Ok(record::stored_status(&raw));
    }
    let Some(raw) = head else {
        return Ok(None);
    };
    Ok(
        record::stored_status(&raw)
            .or_else(|| record::decode_task(id, &raw).ok().map(|t| t.status)),
    )
}

pub(super) fn revoked_key(id: &TaskId) -> Vec<u8> {
    key(REVOKED, &[id.as_bytes()])
}

/// Whether `id` was revoked, in this batch or before: answered from memory (the writer's set of
/// revoked tasks, loaded from the `rv/` markers at open), never from a tree read.
pub(super) fn is_revoked(revoked: &HashSet<TaskId>, staged: &Staged, id: &TaskId) -> bool {
    staged.revoked.contains(id) || revoked.contains(id)
}

/// Every revoked marker in the store, for the writer's in-memory set.
pub(super) fn load_revoked(db: &sled::Db) -> Result<HashSet<TaskId>, StoreError> {
    let mut set = HashSet::default();
    for entry in db.scan_prefix(REVOKED) {
        let (k, _) = entry.map_err(backend)?;
        if let Ok(bytes) = <[u8; 16]>::try_from(&k[REVOKED.len()..]) {
            set.insert(TaskId::from_bytes(bytes));
        }
    }
    Ok(set)
}

pub(super) fn read_task(shared: &Shared, id: TaskId) -> Result<Option<Task>, StoreError> {
    shared.load_task(&shared.db()?, id)
}
