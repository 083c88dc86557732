//! Task status changes, fanned out to whoever waits on them: sync triggers and SSE streams.
//!
//! A small broadcast channel per watched task delivers every change in order (an SSE client must
//! see STARTED even when the tick is quick); a watcher that only waits for the outcome (a sync
//! trigger) asks for the stopping points alone, and while nobody wants more, the other changes
//! are not announced at all. Entries exist only while someone watches; a publisher
//! never creates one, so tasks nobody waits on cost nothing here. Events carry `Arc<Task>`: a
//! publisher that already shares its task (the store writer's answers do) hands out a reference,
//! not a deep copy of the payload, however many watchers there are.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::HashMap;
use tokio::sync::broadcast;

use crate::model::{AgentId, Task, TaskId, TaskStatus};

/// Emitted by an agent after every tick: the seam for the circuit breaker, metrics and the
/// operator page's tick history. It lives here, beside the task events, so that its consumers
/// (the breaker above all) need not depend on the agent actor.
#[derive(actix::Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TickOutcome {
    /// Which agent ticked.
    pub agent: AgentId,
    /// Which task the tick served.
    pub task_id: TaskId,
    /// Whether the task ended in SUCCESS.
    pub success: bool,
    /// How long the runner took.
    pub duration: Duration,
}

/// A task changes state three times per attempt; this leaves room for a slow reader.
const EVENTS_PER_TASK: usize = 16;

/// Changes of all tasks buffered for one slow reader of the whole feed before it lags.
const EVENTS_ALL: usize = 1024;

/// One watched task: its channel, and how many of its subscriptions want every change rather
/// than only the stopping points.
struct Watch {
    tx: broadcast::Sender<Arc<Task>>,
    progress: usize,
}

/// The hub shared by agents (publishers) and the HTTP edge (subscribers).
#[derive(Default)]
pub struct TaskEvents {
    watched: Mutex<HashMap<TaskId, Watch>>,
    /// Every task's changes, for the operator page's event stream; created on first use, and a
    /// publish costs one atomic read while nobody listens.
    all: std::sync::OnceLock<broadcast::Sender<Arc<Task>>>,
}

/// A live subscription; dropping it unregisters the task when it was the last watcher.
pub struct Subscription {
    hub: Arc<TaskEvents>,
    id: TaskId,
    rx: broadcast::Receiver<Arc<Task>>,
    /// Whether it counts among the task's progress watchers.
    progress: bool,
}

impl TaskEvents {
    /// Starts watching `id`. Subscribe *before* reading the stored state: a change published in
    /// between is then seen by the subscription, so no update is ever missed.
    pub fn subscribe(self: &Arc<Self>, id: TaskId) -> Subscription {
        self.watch(id, true)
    }

    /// Starts watching `id` for its stopping points only (a terminal status, or waiting for
    /// input), for a caller that waits for the outcome and reads the store if it gives up. While
    /// a task has only such watchers, its other changes are not announced, so the agent's
    /// STARTED costs no copy of the task (#16). A subscription may still see other changes when
    /// someone else watches the same task's progress.
    pub fn subscribe_outcome(self: &Arc<Self>, id: TaskId) -> Subscription {
        self.watch(id, false)
    }

    fn watch(self: &Arc<Self>, id: TaskId, progress: bool) -> Subscription {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let watch = watched.entry(id).or_insert_with(|| Watch {
            tx: broadcast::channel(EVENTS_PER_TASK).0,
            progress: 0,
        });
        watch.progress += usize::from(progress);
        Subscription {
            hub: self.clone(),
            id,
            rx: watch.tx.subscribe(),
            progress,
        }
    }

    /// Watches every task's changes (the admin event stream). A reader that falls more than
    /// [`EVENTS_ALL`] changes behind gets `Lagged` and should re-read what it shows.
    pub fn subscribe_all(&self) -> broadcast::Receiver<Arc<Task>> {
        self.all
            .get_or_init(|| broadcast::channel(EVENTS_ALL).0)
            .subscribe()
    }

    /// The whole feed's sender while someone reads it, for a publisher that announces a task
    /// only there (the intake's new tasks, which no per-task watcher can know of yet).
    pub fn feed(&self) -> Option<broadcast::Sender<Arc<Task>>> {
        self.all.get().filter(|tx| tx.receiver_count() > 0).cloned()
    }

    /// Announces a task's new state, after it is durable. The task is copied only when someone
    /// watches it; publishers holding an `Arc` use [`TaskEvents::publish_shared`] instead.
    pub fn publish(&self, task: &Task) {
        self.send(task.id, task.status, || Arc::new(task.clone()));
    }

    /// Like [`TaskEvents::publish`] for a task that is already shared: watchers get the same
    /// `Arc`, so announcing costs no copy of the task on the request path.
    pub fn publish_shared(&self, task: &Arc<Task>) {
        self.send(task.id, task.status, || task.clone());
    }

    fn send(&self, id: TaskId, status: TaskStatus, task: impl FnOnce() -> Arc<Task>) {
        let terminal = status.is_terminal();
        let mut task = Some(task);
        let mut shared: Option<Arc<Task>> = None;
        let mut take = || {
            shared
                .get_or_insert_with(|| (task.take().expect("made once"))())
                .clone()
        };
        if let Some(all) = self.all.get().filter(|tx| tx.receiver_count() > 0) {
            let _ = all.send(take());
        }
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(watch) = watched.get(&id) {
            if watch.progress > 0 || status.is_stopping_point() {
                let _ = watch.tx.send(take());
            }
            if terminal {
                watched.remove(&id);
            }
        }
    }

    /// Announces a change made on another node (NATS store) to this node's watchers of that
    /// task only: the whole feed carries this node's own changes, so that what reads it (the
    /// queue reply publisher) acts on each change once in a cluster.
    pub fn publish_watchers(&self, task: &Arc<Task>) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(watch) = watched.get(&task.id) {
            if watch.progress > 0 || task.status.is_stopping_point() {
                let _ = watch.tx.send(task.clone());
            }
            if task.status.is_terminal() {
                watched.remove(&task.id);
            }
        }
    }

    /// Whether anyone here waits on `id`; lets a node skip decoding other nodes' changes of
    /// tasks nobody here watches.
    pub fn is_watched(&self, id: &TaskId) -> bool {
        self.watched
            .lock()
            .map(|w| w.contains_key(id))
            .unwrap_or(false)
    }

    /// How many tasks are being watched; for tests and metrics.
    pub fn watched(&self) -> usize {
        self.watched.lock().map(|w| w.len()).unwrap_or(0)
    }
}

impl Subscription {
    /// Waits for the next published state. `None` once the task reached a terminal state and
    /// every state before it has been returned.
    pub async fn next(&mut self) -> Option<Arc<Task>> {
        loop {
            match self.rx.recv().await {
                Ok(task) => return Some(task),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watched = self.hub.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(watch) = watched.get_mut(&self.id) {
            // Our receiver is still alive here, so "only us" means a count of one.
            if watch.tx.receiver_count() <= 1 {
                watched.remove(&self.id);
            } else if self.progress {
                watch.progress -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;

    #[tokio::test(flavor = "current_thread")]
    async fn subscriber_sees_updates_then_end_and_hub_forgets_the_task() {
        let hub = Arc::new(TaskEvents::default());
        let mut task = Task::new(
            "a".parse().unwrap(),
            serde_json::json!(null),
            Source::default(),
        );
        let mut sub = hub.subscribe(task.id);
        task.status = TaskStatus::Started;
        hub.publish(&task);
        assert_eq!(sub.next().await.unwrap().status, TaskStatus::Started);
        task.status = TaskStatus::Success;
        hub.publish(&task);
        assert_eq!(sub.next().await.unwrap().status, TaskStatus::Success);
        assert!(sub.next().await.is_none());
        assert_eq!(hub.watched(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_outcome_watcher_gets_stopping_points_and_progress_only_beside_a_progress_watcher() {
        let hub = Arc::new(TaskEvents::default());
        let mut task = Task::new(
            "a".parse().unwrap(),
            serde_json::json!(null),
            Source::default(),
        );
        let mut outcome = hub.subscribe_outcome(task.id);
        task.status = TaskStatus::Started;
        hub.publish(&task);
        task.status = TaskStatus::AwaitingInput;
        hub.publish(&task);
        assert_eq!(
            outcome.next().await.unwrap().status,
            TaskStatus::AwaitingInput
        );

        // With a progress watcher beside it, every change goes out (one channel per task).
        let mut progress = hub.subscribe(task.id);
        task.status = TaskStatus::Started;
        hub.publish(&task);
        assert_eq!(progress.next().await.unwrap().status, TaskStatus::Started);
        assert_eq!(outcome.next().await.unwrap().status, TaskStatus::Started);
        // ...and stops again once that watcher is gone.
        drop(progress);
        task.status = TaskStatus::Retry;
        hub.publish(&task);
        task.status = TaskStatus::Success;
        hub.publish(&task);
        assert_eq!(outcome.next().await.unwrap().status, TaskStatus::Success);
        assert!(outcome.next().await.is_none());
        assert_eq!(hub.watched(), 0);
    }

    #[test]
    fn dropping_the_last_subscription_unregisters() {
        let hub = Arc::new(TaskEvents::default());
        let id = TaskId::random();
        let a = hub.subscribe(id);
        let b = hub.subscribe(id);
        drop(a);
        assert_eq!(hub.watched(), 1);
        drop(b);
        assert_eq!(hub.watched(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_whole_feed_sees_every_task_and_costs_nothing_unwatched() {
        let hub = Arc::new(TaskEvents::default());
        let task = Task::new(
            "a".parse().unwrap(),
            serde_json::json!(1),
            Source::default(),
        );
        hub.publish(&task);
        let mut all = hub.subscribe_all();
        let other = Task::new(
            "b".parse().unwrap(),
            serde_json::json!(2),
            Source::default(),
        );
        hub.publish(&other);
        hub.publish(&task);
        assert_eq!(all.recv().await.unwrap().id, other.id);
        assert_eq!(all.recv().await.unwrap().id, task.id);
        assert_eq!(hub.watched(), 0);
    }
}
