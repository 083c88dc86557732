//! Staging: what each [`Write`] puts into the batch of a group commit. The writes of one record kind each
//! stage through that kind's file (`tasks`, `queued`, `listed`); the ones here span kinds: the
//! dispatch over every write, idempotency keys, the retention purge and cancellation. Separate
//! from the writer thread, which only decides when a batch is committed.

use std::sync::{Arc, PoisonError};

use foldhash::HashSet;
use serde::{Deserialize, Serialize};

use super::listed::{list, list_key, listed_entries, unlist, unlist_entry};
use super::queued::{dequeue, enqueue_fresh, requeue};
use super::staged::Staged;
use super::tasks::{
    is_revoked, legacy_state_key, list_if_old, put_task, revoked_key, staged_task, state_key,
    state_key_at, task_key, Part,
};
use super::{
    agent_key, agent_state_key, await_timer_key, backend, decode, encode, hex, key, notify_off_key,
    outbox_key, retry_key, schedule_key, Shared, AGENT_TOKEN, FINISHED, IDEM, LIST_AGENT, OUTBOX,
    PURGE_LOOK_FACTOR,
};
use crate::model::{now_ms, AgentId, TaskId, TaskStatus};
use crate::outbox::Delivery;
use crate::store::listing::Entry;
use crate::store::record;
use crate::store::{CancelOutcome, StoreError, Write, Written};

pub(super) fn stage(
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
            // Tasks purged by this write: a task of an earlier release can have both a finished
            // entry and a listing entry, and the batch does not hide it from the second walk.
            let mut gone = HashSet::default();
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
            // Then every agent's listing index, in creation order: a task that finished before
            // the cutoff was created before it, so each agent's walk ends there. It resumes
            // where the previous write of this purge stopped, and looks at a bounded number of
            // tasks per write, so that tasks still running (or parked) before the cutoff cannot
            // make one write long.
            if purged < limit {
                let mut cursor = shared
                    .purge_cursor
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(from) = cursor.take() {
                    let mut walk = PurgeWalk {
                        db,
                        shared,
                        revoked,
                        finished_before_ms,
                        limit,
                        purged: &mut purged,
                        gone: &mut gone,
                    };
                    *cursor = walk.listed(batch, staged, from)?;
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
            // Before it takes a new queue position, which no longer tells its age.
            list_if_old(db, shared, batch, staged, &task)?;
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

/// One purge write's walk of the listing index (`la/`): what it reads, what it may do and what
/// it did so far.
struct PurgeWalk<'w> {
    db: &'w sled::Db,
    shared: &'w Shared,
    revoked: &'w HashSet<TaskId>,
    finished_before_ms: u64,
    limit: usize,
    purged: &'w mut usize,
    /// Tasks this write purged already (through a finished entry of an earlier release, whose
    /// listing entry the tree still shows until the batch is applied).
    gone: &'w mut HashSet<TaskId>,
}

impl PurgeWalk<'_> {
    /// Walks the listing keys from `from`, agent by agent, up to each agent's first key created
    /// after the cutoff, and purges the due tasks among their entries. A key is walked whole,
    /// so every write moves on by at least one key however many of its tasks are not due.
    /// Returns the key the next write resumes at, or `None` when the walk is done.
    fn listed(
        &mut self,
        batch: &mut sled::Batch,
        staged: &mut Staged,
        mut from: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (db, shared) = (self.db, self.shared);
        let cutoff = self.finished_before_ms.to_be_bytes();
        let mut looked = 0;
        'agents: loop {
            for entry in db.range(from.clone()..) {
                let (k, v) = entry.map_err(backend)?;
                if !k.starts_with(LIST_AGENT) {
                    return Ok(None);
                }
                // Agent names are URL-safe, so the first NUL after the tag ends the prefix.
                let Some(nul) = k[LIST_AGENT.len()..].iter().position(|&b| b == 0) else {
                    return Ok(None);
                };
                let prefix = &k[..LIST_AGENT.len() + nul + 1];
                // A key too short to hold an entry is damaged; the listing reports it.
                let Some(created) = k[prefix.len()..].get(..8) else {
                    continue;
                };
                if created >= &cutoff[..] {
                    // The agent's keys from here on hold tasks created after the cutoff.
                    from = prefix.to_vec();
                    *from.last_mut().expect("ends with the NUL") = 1;
                    continue 'agents;
                }
                if *self.purged >= self.limit || looked >= self.limit * PURGE_LOOK_FACTOR {
                    return Ok(Some(k.to_vec()));
                }
                let Some(entries) = listed_entries(shared, prefix, &k, &v) else {
                    continue;
                };
                for e in entries.iter().filter(|e| e[..8] < cutoff[..]) {
                    looked += 1;
                    let id = TaskId::from_bytes(e[8..].try_into().expect("a 24-byte entry"));
                    if self.gone.contains(&id) {
                        continue;
                    }
                    if self.task(batch, staged, prefix, e)? {
                        self.gone.insert(id);
                        *self.purged += 1;
                    }
                }
            }
            return Ok(None);
        }
    }

    /// Purges the task of a listing entry if it is due; whether it did. A whole head tells from
    /// its first bytes; a head of an earlier layout is read with its state record. A task whose
    /// record cannot be read is left (reported once): it may still be running. An entry whose
    /// task is gone (left behind by the purge of an unreadable record) goes, and so does a state
    /// record an earlier layout left beside the head.
    fn task(
        &mut self,
        batch: &mut sled::Batch,
        staged: &mut Staged,
        prefix: &[u8],
        e: &Entry,
    ) -> Result<bool, StoreError> {
        let (db, shared) = (self.db, self.shared);
        let id = TaskId::from_bytes(e[8..].try_into().expect("a 24-byte entry"));
        let Some(head) = db.get(task_key(&id)).map_err(backend)? else {
            // With any state record an earlier layout left, so that nothing of it outlives it.
            let created = u64::from_be_bytes(e[..8].try_into().expect("a 24-byte entry"));
            batch.remove(state_key_at(created, &id));
            batch.remove(legacy_state_key(&id));
            unlist_entry(db, shared, staged, prefix, e)?;
            return Ok(false);
        };
        let state = if record::is_whole(&head) {
            match record::state_finished(&head) {
                Ok(state) => state,
                Err(err) => {
                    shared.report_unreadable(format!("task {id}"), &err.into_json());
                    return Ok(false);
                }
            }
        } else {
            // Reported by the read when it fails.
            match shared.load_task(db, id) {
                Ok(Some(t)) => (t.status, t.finished_at),
                Ok(None) | Err(_) => return Ok(false),
            }
        };
        let (status, finished) = state;
        let due = status.is_terminal() && finished.is_none_or(|f| f < self.finished_before_ms);
        Ok(due
            && purge_task(
                db,
                shared,
                self.revoked,
                batch,
                staged,
                id,
                self.finished_before_ms,
            )?)
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
/// REVOKED with `finished_at` (which the retention purge reads from its head), it
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
    if let Err(refused) = crate::store::revoke(&mut task, status, at_ms) {
        return Ok(Written::Cancel(refused));
    }
    put_task(db, shared, batch, staged, &task, Part::State)?;
    dequeue(db, shared, batch, staged, &task.agent, task.seq)?;
    batch.insert(revoked_key(&id), Vec::new());
    staged.tasks.insert(id, task.clone());
    staged.revoked.insert(id);
    Ok(Written::Cancel(CancelOutcome::Revoked(Box::new(task))))
}

/// What is kept under an idempotency key.
#[derive(Serialize, Deserialize)]
struct IdemRecord {
    task: TaskId,
    body_sha256: String,
}

fn idem_key(agent: &AgentId, idem_key: &str) -> Vec<u8> {
    let mut k = agent_key(IDEM, agent, 1 + idem_key.len());
    k.push(0);
    k.extend_from_slice(idem_key.as_bytes());
    k
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
