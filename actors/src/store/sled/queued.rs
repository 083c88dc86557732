//! The agents' queues as the store keeps them (`q/`): positions, the segments a group commit
//! queues an agent's tasks in, and the staging and reading of them. The layout itself (what a
//! segment holds, how positions map to keys) is pure code in `store::queue`; this file is what
//! sled does with it.

use super::staged::Staged;
use super::{agent_key, backend, hex, Shared, QUEUE};
use crate::model::{AgentId, TaskId};
use crate::store::queue::{self, Segment};
use crate::store::StoreError;

pub(super) fn queue_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = agent_key(QUEUE, agent, 1 + 8);
    k.push(0);
    k
}

pub(super) fn queue_key(agent: &AgentId, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(agent);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Staged {
    /// Puts the queue segments the batch changed into it: each once, however many of its tasks
    /// the batch queued or took out.
    pub(super) fn write_queue(&mut self, batch: &mut sled::Batch) {
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
pub(super) fn enqueue_fresh(
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
pub(super) fn dequeue(
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
pub(super) fn requeue(
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

pub(super) fn read_queued(shared: &Shared, agent: &AgentId) -> Result<Vec<TaskId>, StoreError> {
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
