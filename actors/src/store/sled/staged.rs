//! [`Staged`]: what the batch of a group commit has changed so far that the tree cannot show
//! yet (sled's `Batch` is write-only), read by every part that stages a write. A file of its
//! own, below the staging code of each record kind, so that those parts and the dispatch in
//! `stage` all depend on it and not on each other.

use std::collections::BTreeSet;

use foldhash::{HashMap, HashSet};

use crate::model::{AgentId, Task, TaskId, TaskStatus};
use crate::outbox::Delivery;
use crate::store::listing::Entry;
use crate::store::queue::Segment;

/// Most agents whose newest listing entry the writer keeps between commits; past it the cache
/// starts again empty (a miss costs one read).
const LIST_TAILS_KEPT: usize = 100_000;

/// Keys written earlier in the same batch, which `db.get` cannot see yet.
#[derive(Default)]
pub(super) struct Staged {
    /// Idempotency keys staged in this batch: the task each names and its body digest.
    pub(super) idem: HashMap<Vec<u8>, (TaskId, [u8; 32])>,
    /// Tasks written by conditional writes earlier in the batch, so that a second condition
    /// (a second answer, an expiry) sees the first one's result.
    pub(super) tasks: HashMap<TaskId, Task>,
    /// Status of each task record staged in this batch, for the outbox's previous-status check.
    pub(super) statuses: HashMap<TaskId, TaskStatus>,
    /// Deliveries staged in this batch, handed to the outbox once the batch is durable.
    pub(super) deliveries: Vec<Delivery>,
    /// Tasks revoked in this batch, for `Start` and `Complete`; added to the writer's set once
    /// the batch is durable.
    pub(super) revoked: HashSet<TaskId>,
    /// Revoked tasks purged in this batch; leave the writer's set once the batch is durable.
    pub(super) unrevoked: Vec<TaskId>,
    /// Queue segments this batch changes, by key, as it leaves them (empty: removed); written
    /// into the batch by [`Staged::write_queue`] once every write is staged.
    pub(super) queue: HashMap<Vec<u8>, Segment>,
    /// Per agent, the next position in the segment this batch queues new tasks in.
    pub(super) open: HashMap<AgentId, u64>,
    /// Listing keys of earlier commits this batch changes (an entry joins or leaves), by the key
    /// they are stored under, with all their entries as the batch leaves them.
    pub(super) listing: HashMap<Vec<u8>, BTreeSet<Entry>>,
    /// Per agent, this batch's entries newer than everything listed before: one new key.
    pub(super) list_new: HashMap<AgentId, BTreeSet<Entry>>,
    /// Per agent, the newest entry of its listing as of the last commit (`None`: no entry). A
    /// cache of what the store holds, read on a miss; unlike the rest it outlives the batch,
    /// and it is dropped when a commit fails.
    pub(super) list_tail: HashMap<AgentId, Option<Entry>>,
}

impl Staged {
    /// Empties it for the next batch, keeping the capacity of its maps (up to a bound, so that
    /// one very large batch does not pin its memory).
    pub(super) fn clear(&mut self) {
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
            self.list_tail = HashMap::default();
        }
    }
}
