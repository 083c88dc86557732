//! The listing index as the store keeps it (`la/`, and the `l/` keys of earlier releases): the
//! staging that adds and removes a task's entry, and the reader that walks every agent's index
//! for a listing page. The rule the keys keep (which entries a key holds) is pure code in
//! `store::listing`; this file is what sled does with it.

use std::collections::BTreeSet;

use super::staged::Staged;
use super::{agent_key, backend, hex, Shared, LIST, LIST_AGENT};
use crate::model::{AgentId, Task, TaskId};
use crate::store::listing::{self, Entry};
use crate::store::{ListCursor, ListQuery, StoreError, TaskPage};

pub(super) fn list_key(task: &Task) -> Vec<u8> {
    let mut k = LIST.to_vec();
    k.extend_from_slice(&task.created_at.to_be_bytes());
    k.extend_from_slice(task.id.as_bytes());
    k
}

pub(super) fn list_agent_prefix(agent: &AgentId) -> Vec<u8> {
    let mut k = agent_key(LIST_AGENT, agent, 1 + 8 + 16);
    k.push(0);
    k
}

/// The listing key whose own entry is `e`, under an agent's `prefix`.
pub(super) fn listing_key(prefix: &[u8], e: &Entry) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + e.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(e);
    k
}

impl Staged {
    /// Puts the listing keys the batch changed into it. A key that lost its own entry moves to
    /// its oldest remaining one (nothing else lies in its range, so the move keeps the rule of
    /// `listing`), and a key left without entries goes.
    pub(super) fn write_listing(&mut self, batch: &mut sled::Batch) {
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
}

/// Adds a task to its agent's listing index (see `listing` for the rule this keeps): with the
/// batch's other tasks of the agent that are newer than everything listed before, under one
/// key; an older one into the key whose range holds it, or under a key of its own.
pub(super) fn list(
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
pub(super) fn unlist(
    db: &sled::Db,
    shared: &Shared,
    staged: &mut Staged,
    task: &Task,
) -> Result<(), StoreError> {
    let e = listing::entry(task.created_at, &task.id);
    unlist_entry(db, shared, staged, &list_agent_prefix(&task.agent), &e)
}

/// Takes an entry out of the listing index under `prefix` (an agent's `la/<agent>\0`): for the
/// purge, which meets entries whose task is gone.
pub(super) fn unlist_entry(
    db: &sled::Db,
    shared: &Shared,
    staged: &mut Staged,
    prefix: &[u8],
    e: &Entry,
) -> Result<(), StoreError> {
    if let Some(entries) = holding_key(db, shared, staged, prefix, e)? {
        entries.remove(e);
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
pub(super) fn listed_entries(
    shared: &Shared,
    prefix: &[u8],
    key: &[u8],
    value: &[u8],
) -> Option<Vec<Entry>> {
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

/// One listing page, newest first: a reverse range scan of each agent's listing index between
/// the filters' bounds (below the cursor), merged by `(created_at, id)` when no agent is given,
/// reading each examined task's record, stopping at `limit` matches or `scan_limit` examined
/// entries, whichever comes first.
///
/// There is no global index: a submission inserts one listing key (`la/<agent>\0<created><id>`),
/// not two, because the accept path runs on the single writer and every key costs it (issue #11).
/// An unfiltered page pays instead: one seek per agent that has tasks, then a k-way merge. Stores
/// written before this change also hold `l/` keys; they are no longer read and go with the purge.
pub(super) fn read_list(shared: &Shared, q: &ListQuery) -> Result<TaskPage, StoreError> {
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
