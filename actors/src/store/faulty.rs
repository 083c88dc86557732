//! A [`Store`] wrapper whose writes can be made to fail on demand. It exists for fault tests and
//! drills: it shows that a failing disk turns into 503s and an unready service, never into a
//! panic or a 202 for a task that is not stored.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{
    AgentState, DeliveryQuery, ListQuery, OnWritten, Purged, ScheduleCursor, ScheduleKey, Store,
    StoreError, StoreFuture, TaskPage, Write,
};
use crate::model::{AgentId, Task, TaskId};
use crate::outbox::{Delivery, Outbox};

/// Delegates to `inner` unless writes are switched to fail.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    failing: AtomicBool,
    last_failed: AtomicBool,
    refused: AtomicUsize,
}

impl FaultyStore {
    /// Wraps a working store; writes succeed until [`FaultyStore::fail_writes`] is called.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failing: AtomicBool::new(false),
            last_failed: AtomicBool::new(false),
            refused: AtomicUsize::new(0),
        })
    }

    /// Makes every following write fail (`true`) or succeed again (`false`).
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Writes refused so far, so a test can wait until something was really attempted.
    pub fn refused_writes(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Store for FaultyStore {
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn write(&self, write: Write, done: OnWritten) {
        if self.failing.load(Ordering::SeqCst) {
            self.last_failed.store(true, Ordering::SeqCst);
            self.refused.fetch_add(1, Ordering::SeqCst);
            done(Err(StoreError::Backend("injected write fault".into())));
            return;
        }
        self.last_failed.store(false, Ordering::SeqCst);
        self.inner.write(write, done);
    }

    fn task(&self, id: TaskId) -> StoreFuture<Option<Task>> {
        self.inner.task(id)
    }

    fn agent_state(&self, agent: &AgentId) -> StoreFuture<AgentState> {
        self.inner.agent_state(agent)
    }

    fn queued(&self, agent: &AgentId) -> StoreFuture<Vec<TaskId>> {
        self.inner.queued(agent)
    }

    fn token_digest(&self, agent: &AgentId) -> Result<Option<[u8; 32]>, StoreError> {
        self.inner.token_digest(agent)
    }

    fn schedule_cursor(&self, key: &ScheduleKey) -> StoreFuture<Option<ScheduleCursor>> {
        self.inner.schedule_cursor(key)
    }

    fn retry_timers(&self) -> StoreFuture<Vec<super::RetryTimer>> {
        self.inner.retry_timers()
    }

    fn due_awaits(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<(u64, TaskId)>> {
        self.inner.due_awaits(now_ms, limit)
    }

    fn deliveries(&self, query: DeliveryQuery) -> StoreFuture<Vec<Delivery>> {
        self.inner.deliveries(query)
    }

    fn delivery(&self, id: u64) -> StoreFuture<Option<Delivery>> {
        self.inner.delivery(id)
    }

    fn disabled_endpoints(&self) -> StoreFuture<Vec<(AgentId, usize)>> {
        self.inner.disabled_endpoints()
    }

    fn outbox(&self) -> Option<Arc<Outbox>> {
        self.inner.outbox()
    }

    fn list_tasks(&self, query: ListQuery) -> StoreFuture<TaskPage> {
        self.inner.list_tasks(query)
    }

    fn purge(&self, older_than: Duration) -> Result<Purged, StoreError> {
        self.inner.purge(older_than)
    }

    fn healthy(&self) -> bool {
        !self.last_failed.load(Ordering::SeqCst) && self.inner.healthy()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}
