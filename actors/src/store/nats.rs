//! The NATS JetStream backend (SPEC section 11): several tickgate nodes share one store.
//!
//! Layout, all created on first start with `replicas` copies:
//! - stream `TICKGATE_QUEUE`, subjects `tg.q.<agent>`: each agent's queue. A submission is one
//!   message (the task's first record, `Nats-Msg-Id` = the task id, so a repeat within the
//!   stream's duplicate window is dropped by JetStream); a retry or an answered task re-enters
//!   its queue as a message naming the task. The message's stream sequence is the task's `seq`,
//!   so acceptance order is the stream's order, cluster-wide. Only the agent's owner reads it.
//! - KV `tg_tasks`: task records, written with compare-and-set on their revision.
//! - KV `tg_idem`: idempotency keys, kept for `task_retention` by the bucket's `max_age`.
//! - KV `tg_state`: each agent's memory, tick counter and queue cursor, written with
//!   compare-and-set by its owner only, so a node that lost its lease cannot overwrite them.
//! - KV `tg_leases`: agent ownership; the bucket's `max_age` is the lease, so a dead owner's key
//!   disappears and another node's `create` takes the agent over.
//! - KV `tg_timers` (retry and await timers), `tg_meta` (tokens, schedule cursors, disabled
//!   callback endpoints), `tg_outbox` (callback deliveries).
//!
//! Every call runs on this store's own tokio runtime (its own threads), so callers on actix
//! arbiters only ever await a join handle, and no caller can forget to move I/O off its thread.
//! Writes that must stay in order (an agent's start, completion and the next start; delivery
//! updates) go through one serial lane per agent; submissions run concurrently (the stream
//! orders them) and conditional writes rely on compare-and-set.
//!
//! Task changes are also published on core NATS (`tg.ev.<node>`): every other node feeds them to
//! its [`TaskEvents`] watchers, so a sync wait or an SSE stream works whichever node ticks.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    AgentState, CancelOutcome, DeliveryQuery, IdempotencyKey, ListQuery, OnWritten, Purged,
    RetryTimer, ScheduleCursor, ScheduleKey, Store, StoreError, StoreFuture, TaskPage, Write,
    Written,
};
use crate::events::TaskEvents;
use crate::model::{now_ms, AgentId, Task, TaskId, TaskStatus};
use crate::outbox::{Delivery, Outbox};

/// The queue stream's name.
const QUEUE_STREAM: &str = "TICKGATE_QUEUE";
/// Repeats of a submission within this window are dropped by JetStream itself.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Header naming the task a queue message is for.
const TASK_HEADER: &str = "Tg-Task";
/// How long a JetStream request may take before the store reports itself unavailable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// First and last wait between attempts to record a tick's outcome while NATS refuses it
/// (about 6 s in all, well inside a lease's validity).
const FINISH_RETRY_MIN: Duration = Duration::from_millis(200);
const FINISH_RETRY_MAX: Duration = Duration::from_millis(3200);
/// How long the owner waits for a re-queued task's record to name its new queue position.
const REQUEUE_LANDING: Duration = Duration::from_secs(3);
/// Concurrent reads when a listing, purge or timer scan reads many records.
const SCAN_CONCURRENCY: usize = 32;

/// How to reach NATS and how this node takes part.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port` (several separated by commas).
    pub url: String,
    /// Copies of every stream and bucket (3 in production).
    pub replicas: usize,
    /// The ownership lease.
    pub lease: Duration,
    /// This node's name in leases and `/admin/agents`.
    pub node_id: String,
    /// How long idempotency keys are kept.
    pub task_retention: Duration,
    /// How long start-up waits for NATS before giving up.
    pub connect_timeout: Duration,
    /// Callback planning, when callbacks are configured.
    pub outbox: Option<Arc<Outbox>>,
}

/// An agent's record in `tg_state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateRecord {
    memory: serde_json::Value,
    ticks: u64,
    /// Every queue message at or before this stream sequence has been dealt with.
    cursor: u64,
    /// The node that wrote last (the owner).
    #[serde(default)]
    owner: String,
}

/// An idempotency key's record in `tg_idem`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdemRecord {
    task: TaskId,
    body_sha256: String,
}

/// One owned agent: the lease's revision, until when this node may act on it, and the queue
/// positions fed to the agent and not yet settled (the cursor never passes the lowest).
#[derive(Debug)]
struct Owned {
    lease_rev: u64,
    valid_until: Instant,
    state_rev: u64,
    cursor: u64,
    in_flight: BTreeSet<u64>,
    fed_upto: u64,
    /// The stream holds nothing of this agent's at or below this sequence any more.
    trimmed: u64,
}

struct Inner {
    node: String,
    node_token: String,
    lease: Duration,
    client: async_nats::Client,
    js: jetstream::Context,
    tasks: kv::Store,
    idem: kv::Store,
    state: kv::Store,
    leases: kv::Store,
    timers: kv::Store,
    meta: kv::Store,
    outbox_kv: kv::Store,
    owned: Mutex<HashMap<AgentId, Owned>>,
    owners: Mutex<HashMap<AgentId, String>>,
    /// Messages waiting in each agent's queue (by subject), as of the last lease round.
    backlog: Mutex<HashMap<String, usize>>,
    healthy: AtomicBool,
    /// Set once shutdown released the leases: no lease is taken again.
    closing: AtomicBool,
    delivery_counter: AtomicU64,
    outbox: Option<Arc<Outbox>>,
    events: OnceLock<Arc<TaskEvents>>,
}

struct Job {
    write: Write,
    done: OnWritten,
}

/// The JetStream store. Cheap to share; see the module docs for its layout.
pub struct NatsStore {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    lanes: Mutex<HashMap<String, Lane>>,
    stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("nats: {e}"))
}

/// Agent ids and node names as subject tokens and KV keys: hex of their bytes, which is valid
/// in both and cannot contain a separator.
fn token(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn agent_token(agent: &AgentId) -> String {
    token(&agent.to_string())
}

fn queue_subject(agent: &AgentId) -> String {
    format!("tg.q.{}", agent_token(agent))
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, StoreError> {
    serde_json::to_vec(v).map(Bytes::from).map_err(backend)
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(backend)
}

fn idem_key(agent: &AgentId, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(agent.to_string().as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    token_bytes(&h.finalize())
}

fn token_bytes(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, d) in out.iter_mut().enumerate() {
        *d = s
            .get(i * 2..i * 2 + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

fn retry_timer_key(due_ms: u64, id: &TaskId) -> String {
    format!("r.{due_ms:020}.{id}")
}

fn await_timer_key(expires_at: u64, id: &TaskId) -> String {
    format!("w.{expires_at:020}.{id}")
}

fn schedule_key(k: &ScheduleKey) -> String {
    format!(
        "s.{}.{}.{}",
        agent_token(&k.agent),
        k.index,
        token_bytes(&Sha256::digest(k.fingerprint.as_bytes())[..16])
    )
}

fn token_key(agent: &AgentId) -> String {
    format!("d.{}", agent_token(agent))
}

fn notify_off_key(agent: &AgentId, endpoint: usize) -> String {
    format!("n.{}.{endpoint}", agent_token(agent))
}

fn delivery_key(id: u64) -> String {
    format!("o.{id:020}")
}

fn is_kind<K: PartialEq + Clone + std::fmt::Debug + std::fmt::Display>(
    e: &async_nats::error::Error<K>,
    kind: K,
) -> bool {
    e.kind() == kind
}

impl NatsStore {
    /// Connects (waiting up to `connect_timeout`), creates the stream and buckets if missing, and
    /// starts the health probe. Blocking: called once at start-up, before anything is served.
    pub fn open(options: NatsOptions) -> Result<Arc<Self>, StoreError> {
        let (rt_tx, rt_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tickgate-nats".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("tickgate-nats")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = rt_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = rt_tx.send(Ok(rt.handle().clone()));
                // Lives until the store is closed or the process ends.
                let _ = stop_rx.recv();
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(backend)?;
        let rt = rt_rx
            .recv()
            .map_err(backend)?
            .map_err(|e| StoreError::Backend(format!("cannot start the NATS runtime: {e}")))?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(connect(options).await);
        });
        let inner = Arc::new(rx.recv().map_err(|_| StoreError::Closed)??);
        let store = Arc::new(Self {
            inner: inner.clone(),
            rt: rt.clone(),
            lanes: Mutex::new(HashMap::new()),
            stop: Mutex::new(Some(stop_tx)),
        });
        rt.spawn(probe(Arc::downgrade(&inner)));
        Ok(store)
    }

    /// This node's name, as leases and `/admin/agents` show it.
    pub fn node_id(&self) -> &str {
        &self.inner.node
    }

    /// The ownership lease.
    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    /// The runtime the store's I/O runs on; the cluster's lease loop and queue feeders run here
    /// too, so they never compete with HTTP workers for an arbiter.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Feeds task changes made by other nodes to `events`, so waiters here hear of ticks
    /// elsewhere. Call once, after the hub exists.
    pub fn fan_in(&self, events: Arc<TaskEvents>) {
        if self.inner.events.set(events.clone()).is_err() {
            return;
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match inner.client.subscribe("tg.ev.*").await {
                    Ok(mut sub) => {
                        backoff = Duration::from_millis(100);
                        let own = format!("tg.ev.{}", inner.node_token);
                        while let Some(msg) = sub.next().await {
                            if msg.subject.as_str() == own {
                                continue;
                            }
                            let named = msg
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(TASK_HEADER))
                                .and_then(|v| v.as_str().parse::<TaskId>().ok());
                            if named.is_some_and(|id| !events.is_watched(&id)) {
                                continue;
                            }
                            match serde_json::from_slice::<Task>(&msg.payload) {
                                Ok(task) => events.publish_watchers(&Arc::new(task)),
                                Err(e) => tracing::warn!(error = %e, "unreadable task event from another node"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot subscribe to other nodes' task events"),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// Whether this node holds `agent`'s lease and may still act on it.
    pub fn owns(&self, agent: &AgentId) -> bool {
        self.inner.owns(agent)
    }

    /// The node that owned `agent` at the last lease round, as far as this node knows.
    pub fn owner(&self, agent: &AgentId) -> Option<String> {
        if self.inner.owns(agent) {
            return Some(self.inner.node.clone());
        }
        self.inner.owners.lock().ok()?.get(agent).cloned()
    }

    /// One lease round for `agent`: renews the lease if this node holds it, else tries to take
    /// it. Answers whether this node owns the agent now, and whether that is new.
    pub async fn lease_round(&self, agent: &AgentId) -> Result<LeaseChange, StoreError> {
        self.inner.clone().lease_round(agent.clone()).await
    }

    /// Gives up every lease this node holds (graceful shutdown), so others take over at once.
    pub async fn release_all(&self) {
        let inner = self.inner.clone();
        inner.closing.store(true, Ordering::Release);
        let owned: Vec<_> = {
            let mut map = inner.owned.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(a, o)| (a, o.lease_rev)).collect()
        };
        for (agent, rev) in owned {
            let _ = inner
                .leases
                .delete_expect_revision(agent_token(&agent), Some(rev))
                .await;
        }
    }

    /// [`NatsStore::release_all`] from blocking code (shutdown, after the drain).
    pub fn release_all_blocking(self: &Arc<Self>) {
        let me = self.clone();
        let _ = self.block(async move {
            me.release_all().await;
            Ok(())
        });
    }

    /// Takes over `agent`'s state after winning its lease: reads it and writes it back as this
    /// node's (bumping its revision, so a former owner's late write fails), and answers it with
    /// the queue cursor to read from.
    pub async fn adopt(&self, agent: &AgentId) -> Result<(AgentState, u64), StoreError> {
        self.inner.clone().adopt(agent.clone()).await
    }

    /// The agent's retry timers, for its new owner to arm.
    pub async fn retry_timers_of(&self, agent: &AgentId) -> Result<Vec<RetryTimer>, StoreError> {
        let all = self.inner.clone().retry_timers().await?;
        Ok(all.into_iter().filter(|t| &t.agent == agent).collect())
    }

    /// Reads `agent`'s queue from stream sequence `from`, in order; each item is the message's
    /// sequence and the task id it names (`None` for a message tickgate did not write), with the
    /// task's first record for a submission.
    pub async fn queue_reader(
        &self,
        agent: &AgentId,
        from: u64,
    ) -> Result<
        impl futures_util::Stream<Item = Result<(u64, Option<TaskId>, Option<Task>), StoreError>>,
        StoreError,
    > {
        let stream = self.inner.queue_stream().await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: queue_subject(agent),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(backend)?;
        let messages = consumer.messages().await.map_err(backend)?;
        Ok(messages.map(|m| {
            let m = m.map_err(backend)?;
            let seq = m.info().map_err(backend)?.stream_sequence;
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get(TASK_HEADER))
                .and_then(|v| v.as_str().parse::<TaskId>().ok());
            // Only tickgate publishes here; anything else on the subject is passed over (with
            // its position, so reading goes on) rather than stopping the agent's queue.
            let first = match (&id, m.payload.is_empty()) {
                (None, _) | (_, true) => None,
                (Some(_), false) => serde_json::from_slice::<Task>(&m.payload).ok(),
            };
            Ok((seq, id, first))
        }))
    }

    /// The task a queue message at `seq` asks to run, or `None` when it has nothing to run
    /// (finished, revoked, parked, or superseded by a later queue entry). A submission whose
    /// record was not written (its node died between the publish and the record) gets it now.
    pub async fn runnable(
        &self,
        agent: &AgentId,
        seq: u64,
        id: TaskId,
        first: Option<Task>,
    ) -> Result<Option<Task>, StoreError> {
        let inner = self.inner.clone();
        let agent = agent.clone();
        let first_was_none = first.is_none();
        let task = match inner.tasks.get(id.to_string()).await.map_err(backend)? {
            Some(raw) => decode::<Task>(&raw)?,
            None => match first {
                Some(mut task) => {
                    task.seq = seq;
                    match inner.tasks.create(id.to_string(), encode(&task)?).await {
                        Ok(_) => task,
                        Err(e) if is_kind(&e, kv::CreateErrorKind::AlreadyExists) => {
                            match inner.tasks.get(id.to_string()).await.map_err(backend)? {
                                Some(raw) => decode::<Task>(&raw)?,
                                None => return Ok(None),
                            }
                        }
                        Err(e) => return Err(backend(e)),
                    }
                }
                None => return Ok(None),
            },
        };
        // A re-queue message (a due retry, an answer) is published before its task record is
        // updated with the message's position: give that update a moment to land. If it never
        // does, the re-queue lost its compare-and-set to another change, whose own message (if
        // any) comes later.
        let mut task = task;
        let mut wait = Duration::from_millis(5);
        let deadline = Instant::now() + REQUEUE_LANDING;
        while first_was_none
            && task.seq < seq
            && matches!(task.status, TaskStatus::Retry | TaskStatus::AwaitingInput)
            && Instant::now() < deadline
        {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
            match inner.task_entry(id).await? {
                Some((t, _)) => task = t,
                None => return Ok(None),
            }
        }
        let runnable = task.agent == agent
            && task.seq == seq
            && matches!(task.status, TaskStatus::Pending | TaskStatus::Started);
        Ok(runnable.then_some(task))
    }

    /// The feeder handed the message at `seq` to the agent: the cursor stays below it until
    /// its task leaves the queue.
    pub fn feeding(&self, agent: &AgentId, seq: u64) {
        if let Some(o) = self.inner.owned_mut(agent).as_mut() {
            o.in_flight.insert(seq);
            o.fed_upto = o.fed_upto.max(seq);
        }
    }

    /// The message at `seq` had nothing to run: the cursor may pass it.
    pub fn skipped(&self, agent: &AgentId, seq: u64) {
        if let Some(o) = self.inner.owned_mut(agent).as_mut() {
            o.fed_upto = o.fed_upto.max(seq);
        }
    }

    /// Drops the queue messages of an owned agent that are behind its stored cursor, so the
    /// stream holds each agent's backlog and nothing more (and its per-subject count is the
    /// backlog that bounds the agent's mailbox cluster-wide).
    pub async fn trim(&self, agent: &AgentId) -> Result<(), StoreError> {
        let persisted = {
            let mut guard = self.inner.owned_mut(agent);
            match guard.as_mut() {
                Some(o) if o.cursor > o.trimmed => o.cursor,
                _ => return Ok(()),
            }
        };
        let stream = self.inner.queue_stream().await?;
        stream
            .purge()
            .filter(queue_subject(agent))
            .sequence(persisted + 1)
            .await
            .map_err(backend)?;
        if let Some(o) = self.inner.owned_mut(agent).as_mut() {
            o.trimmed = o.trimmed.max(persisted);
        }
        Ok(())
    }

    /// Re-reads how many messages wait in each agent's queue (one request for all agents).
    pub async fn refresh_backlog(&self) -> Result<(), StoreError> {
        let stream = self.inner.queue_stream().await?;
        let counts: HashMap<String, usize> = stream
            .info_with_subjects("tg.q.*")
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)?;
        *self.inner.backlog.lock().unwrap_or_else(|e| e.into_inner()) = counts;
        Ok(())
    }

    /// Closes the runtime; used on shutdown after the last write.
    pub fn close(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
    }

    fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> StoreFuture<T> {
        let handle = self.rt.spawn(fut);
        Box::pin(async move { handle.await.map_err(|_| StoreError::Closed)? })
    }

    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    fn lane(&self, name: String) -> Lane {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry(name)
            .or_insert_with(|| {
                let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
                let lane = Lane {
                    tx,
                    pending: Arc::new(AtomicU64::new(0)),
                    applied: Arc::new(tokio::sync::Notify::new()),
                };
                let inner = self.inner.clone();
                let (pending, applied) = (lane.pending.clone(), lane.applied.clone());
                self.rt.spawn(async move {
                    while let Some(job) = rx.recv().await {
                        let res = inner.clone().apply(job.write).await;
                        inner.note(&res);
                        (job.done)(res);
                        pending.fetch_sub(1, Ordering::AcqRel);
                        applied.notify_waiters();
                    }
                });
                lane
            })
            .clone()
    }

    /// Waits until fewer than `n` of `agent`'s writes (starts, completions) wait in its lane:
    /// the owner's feeder keeps pace with the store instead of running ahead of it, so an
    /// agent's backlog stays in JetStream rather than in this process.
    pub async fn writes_below(&self, agent: &AgentId, n: u64) {
        let lane = self.lane(agent_token(agent));
        loop {
            let applied = lane.applied.notified();
            if lane.pending.load(Ordering::Acquire) < n {
                return;
            }
            applied.await;
        }
    }
}

/// One serial write queue, with how many writes wait in it.
#[derive(Clone)]
struct Lane {
    tx: mpsc::UnboundedSender<Job>,
    pending: Arc<AtomicU64>,
    applied: Arc<tokio::sync::Notify>,
}

/// What a lease round changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// This node owns the agent and did before.
    Kept,
    /// This node just took the agent.
    Won,
    /// This node owned the agent and no longer does.
    Lost,
    /// Another node owns the agent.
    Elsewhere,
}

async fn connect(options: NatsOptions) -> Result<Inner, StoreError> {
    let deadline = Instant::now() + options.connect_timeout;
    let client = loop {
        match async_nats::ConnectOptions::new()
            .name(format!("tickgate {}", options.node_id))
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100u64 << attempt.min(6)).min(5000))
            })
            .connect(servers(&options.url)?)
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "NATS not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(StoreError::Backend(format!(
                    "cannot reach NATS at {}: {e}",
                    options.url
                )))
            }
        }
    };
    let mut js = jetstream::new(client.clone());
    js.set_timeout(REQUEST_TIMEOUT);
    // Creating replicated streams can outlast one request's timeout while a NATS cluster elects
    // their leaders (or another node creates them at the same moment): retried until the deadline.
    let buckets = loop {
        match layout(&js, &options).await {
            Ok(buckets) => break buckets,
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "NATS streams and buckets not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let [tasks, idem, state, leases, timers, meta, outbox_kv] = buckets;
    Ok(Inner {
        node_token: token(&options.node_id),
        node: options.node_id,
        lease: options.lease,
        tasks,
        idem,
        state,
        leases,
        timers,
        meta,
        outbox_kv,
        client,
        js,
        owned: Mutex::new(HashMap::new()),
        owners: Mutex::new(HashMap::new()),
        backlog: Mutex::new(HashMap::new()),
        healthy: AtomicBool::new(true),
        closing: AtomicBool::new(false),
        delivery_counter: AtomicU64::new(0),
        outbox: options.outbox,
        events: OnceLock::new(),
    })
}

/// Creates (or opens) the queue stream and the buckets, in the order `Inner` lists them.
async fn layout(
    js: &jetstream::Context,
    options: &NatsOptions,
) -> Result<[kv::Store; 7], StoreError> {
    let replicas = options.replicas.max(1);
    js.get_or_create_stream(stream::Config {
        name: QUEUE_STREAM.into(),
        subjects: vec!["tg.q.*".into()],
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(backend)?;
    let bucket = |name: &str, max_age: Duration| kv::Config {
        bucket: name.into(),
        history: 1,
        max_age,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let open = |config: kv::Config| {
        let js = js.clone();
        async move {
            let kv = match js.get_key_value(config.bucket.clone()).await {
                Ok(kv) => kv,
                Err(_) => match js.create_key_value(config.clone()).await {
                    Ok(kv) => kv,
                    // Another node created it meanwhile.
                    Err(created) => {
                        js.get_key_value(config.bucket.clone()).await.map_err(|_| {
                            StoreError::Backend(format!(
                                "nats: cannot create the bucket {}: {created}",
                                config.bucket
                            ))
                        })?
                    }
                },
            };
            leader_reads(&js, kv, &config.bucket).await
        }
    };
    let none = Duration::ZERO;
    Ok([
        open(bucket("tg_tasks", none)).await?,
        open(bucket("tg_idem", options.task_retention)).await?,
        open(bucket("tg_state", none)).await?,
        open(bucket("tg_leases", options.lease)).await?,
        open(bucket("tg_timers", none)).await?,
        open(bucket("tg_meta", none)).await?,
        open(bucket("tg_outbox", none)).await?,
    ])
}

/// Makes the bucket's reads go to its stream leader. Buckets are created with direct gets
/// allowed, which lets any replica answer a read, including one that is behind after a NATS
/// server restarted: a record read there has an old revision, and the compare-and-set built on
/// it fails (or, worse, a finished task reads as still queued). tickgate's reads decide writes,
/// so they must be the leader's.
async fn leader_reads(
    js: &jetstream::Context,
    kv: kv::Store,
    bucket: &str,
) -> Result<kv::Store, StoreError> {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(backend)?;
    let mut config = stream.info().await.map_err(backend)?.config.clone();
    if !config.allow_direct {
        return Ok(kv);
    }
    config.allow_direct = false;
    js.update_stream(&config).await.map_err(backend)?;
    js.get_key_value(bucket).await.map_err(backend)
}

/// `url` as async-nats wants a server list: one address per comma-separated entry.
fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, StoreError> {
    url.split(',')
        .map(|u| {
            u.trim().parse::<async_nats::ServerAddr>().map_err(|e| {
                StoreError::Backend(format!("nats: {:?} is not a server address: {e}", u.trim()))
            })
        })
        .collect()
}

/// Marks the store unhealthy while NATS is unreachable and healthy again once a JetStream
/// request goes through, so `/ready` recovers without waiting for traffic.
async fn probe(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Some(inner) = inner.upgrade() else { return };
        let ok = inner.client.connection_state() == async_nats::connection::State::Connected
            && inner.js.query_account().await.is_ok();
        inner.healthy.store(ok, Ordering::Release);
    }
}

impl Inner {
    /// The queue stream's handle (no info request: the three callers only read or purge it).
    async fn queue_stream(&self) -> Result<jetstream::stream::Stream<()>, StoreError> {
        self.js
            .get_stream_no_info(QUEUE_STREAM)
            .await
            .map_err(backend)
    }

    /// A failed write while NATS is unreachable makes the store unhealthy at once (the probe
    /// makes it healthy again); a lost compare-and-set race is not a failure of the store.
    fn note<T>(&self, res: &Result<T, StoreError>) {
        if res.is_err()
            && self.client.connection_state() != async_nats::connection::State::Connected
        {
            self.healthy.store(false, Ordering::Release);
        }
    }

    fn connected(&self) -> Result<(), StoreError> {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(StoreError::Backend("nats: not connected".into()))
        }
    }

    fn owns(&self, agent: &AgentId) -> bool {
        self.owned
            .lock()
            .map(|m| m.get(agent).is_some_and(|o| o.valid_until > Instant::now()))
            .unwrap_or(false)
    }

    fn owned_mut(&self, agent: &AgentId) -> OwnedGuard<'_> {
        OwnedGuard {
            guard: self.owned.lock().unwrap_or_else(|e| e.into_inner()),
            agent: agent.clone(),
        }
    }

    /// A fed queue position that will not finish: the cursor may pass it.
    fn settle(&self, agent: &AgentId, seq: u64) {
        if let Some(o) = self.owned_mut(agent).as_mut() {
            o.in_flight.remove(&seq);
        }
    }

    async fn lease_round(self: Arc<Self>, agent: AgentId) -> Result<LeaseChange, StoreError> {
        if self.closing.load(Ordering::Acquire) {
            return Ok(LeaseChange::Elsewhere);
        }
        let key = agent_token(&agent);
        let sent = Instant::now();
        // Acting stops well before the key can expire on the server: a third of the lease
        // is left for clock rate differences and the last write in flight.
        let valid_until = sent + self.lease * 2 / 3;
        let held = self.owned_mut(&agent).as_ref().map(|o| o.lease_rev);
        if let Some(rev) = held {
            match self
                .leases
                .update(&key, Bytes::from(self.node.clone()), rev)
                .await
            {
                Ok(rev) => {
                    if let Some(o) = self.owned_mut(&agent).as_mut() {
                        o.lease_rev = rev;
                        o.valid_until = valid_until;
                    }
                    return Ok(LeaseChange::Kept);
                }
                Err(e) => {
                    let lost = is_kind(&e, kv::UpdateErrorKind::WrongLastRevision);
                    let expired = self
                        .owned_mut(&agent)
                        .as_ref()
                        .is_none_or(|o| o.valid_until <= Instant::now());
                    if lost || expired {
                        self.owned_mut(&agent).remove();
                        tracing::warn!(agent = %agent, error = %e, "lost the agent's lease; its ticks stop here");
                        return Ok(LeaseChange::Lost);
                    }
                    return Err(backend(e));
                }
            }
        }
        match self
            .leases
            .create(&key, Bytes::from(self.node.clone()))
            .await
        {
            Ok(rev) => {
                self.owned.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    agent.clone(),
                    Owned {
                        lease_rev: rev,
                        valid_until,
                        state_rev: 0,
                        cursor: 0,
                        in_flight: BTreeSet::new(),
                        fed_upto: 0,
                        trimmed: 0,
                    },
                );
                Ok(LeaseChange::Won)
            }
            Err(e) if is_kind(&e, kv::CreateErrorKind::AlreadyExists) => {
                if let Ok(Some(owner)) = self.leases.get(&key).await {
                    let owner = String::from_utf8_lossy(&owner).into_owned();
                    if let Ok(mut owners) = self.owners.lock() {
                        owners.insert(agent, owner);
                    }
                }
                Ok(LeaseChange::Elsewhere)
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn adopt(self: Arc<Self>, agent: AgentId) -> Result<(AgentState, u64), StoreError> {
        let key = agent_token(&agent);
        let entry = self.state.entry(&key).await.map_err(backend)?;
        let (mut record, rev) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                (decode::<StateRecord>(&e.value)?, e.revision)
            }
            Some(e) => (StateRecord::default(), e.revision),
            None => (StateRecord::default(), 0),
        };
        record.owner = self.node.clone();
        let rev = if rev == 0 {
            match self.state.create(&key, encode(&record)?).await {
                Ok(r) => r,
                Err(e) => return Err(backend(e)),
            }
        } else {
            self.state
                .update(&key, encode(&record)?, rev)
                .await
                .map_err(backend)?
        };
        if let Some(o) = self.owned_mut(&agent).as_mut() {
            o.state_rev = rev;
            o.cursor = record.cursor;
            o.fed_upto = record.cursor;
            o.in_flight.clear();
        }
        Ok((
            AgentState {
                memory: record.memory,
                ticks: record.ticks,
            },
            record.cursor,
        ))
    }

    /// Publishes a task change for the other nodes' waiters (core NATS: a waiter that misses
    /// one still reads the record when it subscribes, and the next change reaches it).
    fn fan_out(&self, task: &Task) {
        if let Ok(payload) = serde_json::to_vec(task) {
            let client = self.client.clone();
            let subject = format!("tg.ev.{}", self.node_token);
            let mut headers = HeaderMap::new();
            headers.insert(TASK_HEADER, task.id.to_string().as_str());
            tokio::spawn(async move {
                let _ = client
                    .publish_with_headers(subject, headers, payload.into())
                    .await;
            });
        }
    }

    async fn task_entry(&self, id: TaskId) -> Result<Option<(Task, u64)>, StoreError> {
        match self.tasks.entry(id.to_string()).await.map_err(backend)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode::<Task>(&e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes `task` over the revision read, planning its callbacks from `previous`.
    async fn put_task(
        &self,
        task: &Task,
        rev: u64,
        previous: Option<TaskStatus>,
    ) -> Result<(), StoreError> {
        let planned = match &self.outbox {
            Some(outbox) if outbox.wants(&task.agent) => outbox.plan(previous, task, now_ms()),
            _ => Vec::new(),
        };
        self.tasks
            .update(task.id.to_string(), encode(task)?, rev)
            .await
            .map_err(backend)?;
        if !planned.is_empty() {
            let mut committed = Vec::with_capacity(planned.len());
            for mut d in planned {
                d.id = self.delivery_id();
                self.outbox_kv
                    .put(delivery_key(d.id), encode(&d)?)
                    .await
                    .map_err(backend)?;
                committed.push(d);
            }
            if let Some(outbox) = &self.outbox {
                outbox.committed(committed);
            }
        }
        self.fan_out(task);
        Ok(())
    }

    /// Cluster-unique, increasing with time: milliseconds, then a node-and-counter suffix.
    fn delivery_id(&self) -> u64 {
        let n = self.delivery_counter.fetch_add(1, Ordering::Relaxed) & 0xfff;
        let node = (Sha256::digest(self.node.as_bytes())[0] as u64) << 12;
        (now_ms() << 20) | node | n
    }

    /// A state write by the owner: compare-and-set on the revision it last wrote, and the
    /// cursor moved to just below the lowest queue position still being worked on.
    async fn put_state(
        &self,
        agent: &AgentId,
        state: &AgentState,
        settled: u64,
    ) -> Result<bool, StoreError> {
        let (rev, cursor) = {
            let mut guard = self.owned_mut(agent);
            let Some(o) = guard.as_mut() else {
                return Ok(false);
            };
            o.in_flight.remove(&settled);
            let cursor = match o.in_flight.first() {
                Some(lowest) => lowest.saturating_sub(1),
                None => o.fed_upto,
            };
            o.cursor = o.cursor.max(cursor);
            (o.state_rev, o.cursor)
        };
        let record = StateRecord {
            memory: state.memory.clone(),
            ticks: state.ticks,
            cursor,
            owner: self.node.clone(),
        };
        match self
            .state
            .update(agent_token(agent), encode(&record)?, rev)
            .await
        {
            Ok(rev) => {
                if let Some(o) = self.owned_mut(agent).as_mut() {
                    o.state_rev = rev;
                }
                Ok(true)
            }
            Err(e) if is_kind(&e, kv::UpdateErrorKind::WrongLastRevision) => {
                self.owned_mut(agent).remove();
                tracing::warn!(agent = %agent, "another node wrote the agent's state: this node lost the agent");
                Ok(false)
            }
            Err(e) => Err(backend(e)),
        }
    }

    async fn apply(self: Arc<Self>, write: Write) -> Result<Written, StoreError> {
        // A tick's outcome rides out a reconnection (its write retries, see `finish`); anything
        // else fails at once while NATS is away, so no caller waits on a request that cannot go.
        if !matches!(
            write,
            Write::Complete { .. } | Write::Retry { .. } | Write::Park { .. }
        ) {
            self.connected()?;
        }
        match write {
            Write::Submit { task, idempotency } => self.submit(task, idempotency).await,
            Write::Start(task) => {
                if !self.owns(&task.agent) {
                    return Ok(Written::Revoked);
                }
                let Some((stored, rev)) = self.task_entry(task.id).await? else {
                    self.settle(&task.agent, task.seq);
                    return Ok(Written::Revoked);
                };
                if stored.seq != task.seq
                    || !matches!(stored.status, TaskStatus::Pending | TaskStatus::Started)
                {
                    // Cancelled (or moved on) since it was fed: it will not finish, so its
                    // queue position must not hold the cursor back.
                    self.settle(&task.agent, task.seq);
                    return Ok(Written::Revoked);
                }
                self.put_task(&task, rev, Some(stored.status)).await?;
                Ok(Written::Done)
            }
            Write::Complete { task, state } => self.finish(task, state, None).await,
            Write::Retry { task, state } => {
                let due = task.next_attempt_at.unwrap_or_else(now_ms);
                self.finish(task.clone(), state, Some(retry_timer_key(due, &task.id)))
                    .await
            }
            Write::Park { task, state } => {
                let timer = task
                    .awaiting
                    .as_ref()
                    .map(|a| await_timer_key(a.expires_at, &task.id));
                self.finish(task, state, timer).await
            }
            Write::RetryDue { task: id, due_ms } => {
                // The timer goes only once the task is requeued (or has nothing to retry), so
                // a node dying half-way leaves the timer for whoever fires it next.
                let timer = retry_timer_key(due_ms, &id);
                let Some((mut task, rev)) = self.task_entry(id).await? else {
                    let _ = self.timers.delete(timer).await;
                    return Ok(Written::Done);
                };
                if task.status != TaskStatus::Retry || task.next_attempt_at != Some(due_ms) {
                    let _ = self.timers.delete(timer).await;
                    return Ok(Written::Done);
                }
                let previous = task.status;
                task.seq = self.requeue(&task).await?;
                task.status = TaskStatus::Pending;
                task.next_attempt_at = None;
                match self.put_task(&task, rev, Some(previous)).await {
                    Ok(()) => {
                        let _ = self.timers.delete(timer).await;
                        Ok(Written::Accepted(Arc::new(task)))
                    }
                    // Requeued by another node meanwhile; the extra queue message is skipped.
                    Err(_)
                        if self
                            .task_entry(id)
                            .await?
                            .is_some_and(|(t, _)| t.status != TaskStatus::Retry) =>
                    {
                        Ok(Written::Done)
                    }
                    Err(e) => Err(e),
                }
            }
            Write::Resume { id, response } => {
                let Some((task, rev)) = self.task_entry(id).await? else {
                    return Ok(Written::Unchanged(None));
                };
                let expires_at = task.awaiting.as_ref().map(|a| a.expires_at);
                let Some(mut next) = crate::awaiting::resume(&task, response) else {
                    return Ok(Written::Unchanged(Some(Box::new(task))));
                };
                next.seq = self.requeue(&next).await?;
                if let Err(e) = self.put_task(&next, rev, Some(task.status)).await {
                    return match self.task_entry(id).await? {
                        Some((now, _)) if now.status != TaskStatus::AwaitingInput => {
                            Ok(Written::Unchanged(Some(Box::new(now))))
                        }
                        _ => Err(e),
                    };
                }
                if let Some(at) = expires_at {
                    let _ = self.timers.delete(await_timer_key(at, &id)).await;
                }
                Ok(Written::Updated(Box::new(next)))
            }
            Write::Expire { id, expires_at } => {
                let _ = self.timers.delete(await_timer_key(expires_at, &id)).await;
                let Some((task, rev)) = self.task_entry(id).await? else {
                    return Ok(Written::Unchanged(None));
                };
                let Some(failed) = crate::awaiting::expire(&task, expires_at, now_ms()) else {
                    return Ok(Written::Unchanged(Some(Box::new(task))));
                };
                match self.put_task(&failed, rev, Some(task.status)).await {
                    Ok(()) => Ok(Written::Updated(Box::new(failed))),
                    Err(e) => match self.task_entry(id).await? {
                        Some((now, _)) if now.status != TaskStatus::AwaitingInput => {
                            Ok(Written::Unchanged(Some(Box::new(now))))
                        }
                        _ => Err(e),
                    },
                }
            }
            Write::Cancel { id, at_ms } => {
                // Compare-and-set: a start racing the cancel makes this update fail, and the
                // re-read decides.
                for _ in 0..3 {
                    let Some((mut task, rev)) = self.task_entry(id).await? else {
                        return Ok(Written::Cancel(CancelOutcome::Unknown));
                    };
                    let status = task.status;
                    if let Err(refused) = super::revoke(&mut task, status, at_ms) {
                        return Ok(Written::Cancel(refused));
                    }
                    if self.put_task(&task, rev, Some(status)).await.is_ok() {
                        return Ok(Written::Cancel(CancelOutcome::Revoked(Box::new(task))));
                    }
                }
                Err(StoreError::Backend(
                    "nats: the task kept changing during a cancel".into(),
                ))
            }
            Write::Purge {
                finished_before_ms,
                limit,
            } => self
                .purge(finished_before_ms, limit)
                .await
                .map(Written::Purged),
            Write::SetToken { agent, digest } => {
                self.meta
                    .put(token_key(&agent), Bytes::from(token_bytes(&digest)))
                    .await
                    .map_err(backend)?;
                Ok(Written::Done)
            }
            Write::SetScheduleCursor { key, cursor } => {
                self.meta
                    .put(schedule_key(&key), encode(&cursor)?)
                    .await
                    .map_err(backend)?;
                Ok(Written::Done)
            }
            Write::Delivery(d) => {
                self.outbox_kv
                    .put(delivery_key(d.id), encode(&*d)?)
                    .await
                    .map_err(backend)?;
                Ok(Written::Done)
            }
            Write::NotifyEndpoint {
                agent,
                endpoint,
                disabled,
            } => {
                let k = notify_off_key(&agent, endpoint);
                if disabled {
                    self.meta.put(k, Bytes::new()).await.map_err(backend)?;
                } else {
                    self.meta.delete(k).await.map_err(backend)?;
                }
                Ok(Written::Done)
            }
        }
    }

    /// Accepts a submission; see the module docs for why the order is key, publish, record.
    async fn submit(
        &self,
        mut accepted: Arc<Task>,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Written, StoreError> {
        let task = Arc::make_mut(&mut accepted);
        let mut idem_written = None;
        if let Some(idem) = &idempotency {
            let k = idem_key(&task.agent, &idem.key);
            let record = IdemRecord {
                task: task.id,
                body_sha256: token_bytes(&idem.body_sha256),
            };
            match self.idem.create(&k, encode(&record)?).await {
                Ok(_) => idem_written = Some(k),
                Err(e) if is_kind(&e, kv::CreateErrorKind::AlreadyExists) => {
                    let raw = self.idem.get(&k).await.map_err(backend)?.ok_or_else(|| {
                        StoreError::Backend("nats: an idempotency key vanished while read".into())
                    })?;
                    let seen: IdemRecord = decode(&raw)?;
                    if unhex32(&seen.body_sha256) != idem.body_sha256 {
                        return Ok(Written::Conflict(seen.task));
                    }
                    if self.task_entry(seen.task).await?.is_some() {
                        return Ok(Written::Duplicate(seen.task));
                    }
                    // The key's first submission is either in flight on another node, or its
                    // node died before publishing: publish under the recorded id; JetStream's
                    // deduplication drops it in the first case.
                    task.id = seen.task;
                }
                Err(e) => return Err(backend(e)),
            }
            task.idempotency_key = Some(idem.key.clone());
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", task.id.to_string().as_str());
        headers.insert(TASK_HEADER, task.id.to_string().as_str());
        let published = async {
            self.js
                .publish_with_headers(queue_subject(&task.agent), headers, encode(&*task)?)
                .await
                .map_err(backend)?
                .await
                .map_err(backend)
        }
        .await;
        let ack = match published {
            Ok(ack) => ack,
            Err(e) => {
                if let Some(k) = idem_written {
                    let _ = self.idem.delete(k).await;
                }
                return Err(e);
            }
        };
        task.seq = ack.sequence;
        if ack.duplicate {
            // The id is already in the stream. Either this submission adopted it from a key
            // whose first submission is in flight or whose node died, or this *is* the first
            // submission and a node that adopted its id published before it did (ids are
            // random, so nothing else repeats one). Either way the task exists (JetStream answers
            // with its sequence) but its record may not be written yet: written here, so the
            // answer "duplicate of task X" can be read back at once. The same body, by its
            // digest, so either record is the task's.
            self.first_record(task).await?;
            return Ok(Written::Duplicate(task.id));
        }
        self.first_record(task).await?;
        Ok(Written::Accepted(accepted))
    }

    /// Writes an accepted task's first record unless one exists: the owner may have read the
    /// queue message first and written the record from it.
    async fn first_record(&self, task: &Task) -> Result<(), StoreError> {
        match self.tasks.create(task.id.to_string(), encode(task)?).await {
            Ok(_) => Ok(()),
            Err(e) if is_kind(&e, kv::CreateErrorKind::AlreadyExists) => Ok(()),
            Err(e) => Err(backend(e)),
        }
    }

    /// Puts a task back in its agent's queue; answers its new position.
    async fn requeue(&self, task: &Task) -> Result<u64, StoreError> {
        let mut headers = HeaderMap::new();
        headers.insert(TASK_HEADER, task.id.to_string().as_str());
        let ack = self
            .js
            .publish_with_headers(queue_subject(&task.agent), headers, Bytes::new())
            .await
            .map_err(backend)?
            .await
            .map_err(backend)?;
        Ok(ack.sequence)
    }

    /// A tick's outcome (complete, retry or park): task record, then the owner's state, then the
    /// timer it needs.
    async fn finish(
        &self,
        task: Arc<Task>,
        state: AgentState,
        timer: Option<String>,
    ) -> Result<Written, StoreError> {
        let mut wait = FINISH_RETRY_MIN;
        loop {
            match self.finish_once(&task, &state, timer.as_deref()).await {
                Err(e) if wait <= FINISH_RETRY_MAX && self.owns(&task.agent) => {
                    tracing::warn!(task_id = %task.id, error = %e, retry_in_ms = wait.as_millis() as u64, "could not record the tick's outcome yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => {
                    // Still STARTED in the store, its queue position below the cursor: letting
                    // the agent go (the lease lapses, then a node adopts it, maybe this one)
                    // runs the task again from the store instead of leaving it stranded.
                    tracing::error!(agent = %task.agent, task_id = %task.id, error = %e, "could not record the tick's outcome; giving up the agent so its queue is read again");
                    self.owned_mut(&task.agent).remove();
                    return Err(e);
                }
                done => return done,
            }
        }
    }

    async fn finish_once(
        &self,
        task: &Task,
        state: &AgentState,
        timer: Option<&str>,
    ) -> Result<Written, StoreError> {
        if !self.owns(&task.agent) {
            tracing::warn!(task_id = %task.id, "tick finished after this node lost its agent; the new owner runs it again");
            return Ok(Written::Revoked);
        }
        let Some((stored, rev)) = self.task_entry(task.id).await? else {
            self.settle(&task.agent, task.seq);
            return Ok(Written::Revoked);
        };
        if stored.status == TaskStatus::Revoked {
            self.put_state(&task.agent, state, task.seq).await?;
            return Ok(Written::Revoked);
        }
        // A retry of this write after the record landed but the state did not.
        let written = stored.seq == task.seq
            && stored.status == task.status
            && stored.attempt == task.attempt
            && stored.finished_at == task.finished_at;
        if !written {
            if stored.seq != task.seq || stored.status.is_terminal() {
                self.settle(&task.agent, task.seq);
                return Ok(Written::Revoked);
            }
            // The timer first: a timer whose task never reached RETRY (or AWAITING_INPUT) is
            // dropped when it fires, a task in RETRY without its timer would wait forever.
            if let Some(key) = timer {
                let value = match task.status {
                    TaskStatus::Retry => Bytes::from(task.agent.to_string()),
                    _ => Bytes::from(task.id.to_string()),
                };
                self.timers.put(key, value).await.map_err(backend)?;
            }
            self.put_task(task, rev, Some(stored.status)).await?;
        }
        if !self.put_state(&task.agent, state, task.seq).await? {
            tracing::warn!(task_id = %task.id, "the tick's memory was not kept: this node lost the agent");
        }
        Ok(Written::Done)
    }

    async fn keys(&self, kv: &kv::Store) -> Result<Vec<String>, StoreError> {
        kv.keys()
            .await
            .map_err(backend)?
            .try_collect()
            .await
            .map_err(backend)
    }

    async fn all_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let keys = self.keys(&self.tasks).await?;
        let tasks = &self.tasks;
        let found: Vec<Option<Bytes>> = futures_util::stream::iter(keys)
            .map(|k| async move { tasks.get(k).await.map_err(backend) })
            .buffer_unordered(SCAN_CONCURRENCY)
            .try_collect()
            .await?;
        found
            .into_iter()
            .flatten()
            .map(|raw| decode::<Task>(&raw))
            .collect()
    }

    async fn purge(&self, finished_before_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut purged = 0;
        for task in self.all_tasks().await? {
            if purged >= limit {
                break;
            }
            let due = task.status.is_terminal()
                && task.finished_at.is_some_and(|f| f < finished_before_ms);
            if due {
                self.tasks
                    .purge(task.id.to_string())
                    .await
                    .map_err(backend)?;
                if let Some(key) = &task.idempotency_key {
                    let _ = self.idem.purge(idem_key(&task.agent, key)).await;
                }
                purged += 1;
            }
        }
        for key in self.keys(&self.outbox_kv).await? {
            if let Some(raw) = self.outbox_kv.get(&key).await.map_err(backend)? {
                let d: Delivery = decode(&raw)?;
                if d.created_at < finished_before_ms
                    && d.status != crate::outbox::DeliveryStatus::Pending
                {
                    let _ = self.outbox_kv.purge(&key).await;
                }
            }
        }
        Ok(purged)
    }

    async fn retry_timers(self: Arc<Self>) -> Result<Vec<RetryTimer>, StoreError> {
        let mut timers = Vec::new();
        for key in self.keys(&self.timers).await? {
            let mut parts = key.splitn(3, '.');
            let (Some("r"), Some(due), Some(id)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(due_ms), Ok(task)) = (due.parse::<u64>(), id.parse::<TaskId>()) else {
                continue;
            };
            let Some(raw) = self.timers.get(&key).await.map_err(backend)? else {
                continue;
            };
            let Ok(agent) = String::from_utf8_lossy(&raw).parse::<AgentId>() else {
                continue;
            };
            timers.push(RetryTimer {
                due_ms,
                task,
                agent,
            });
        }
        timers.sort_by_key(|t| t.due_ms);
        Ok(timers)
    }
}

/// The owned-agent entry for one agent, under the map's lock.
struct OwnedGuard<'a> {
    guard: std::sync::MutexGuard<'a, HashMap<AgentId, Owned>>,
    agent: AgentId,
}

impl OwnedGuard<'_> {
    fn as_mut(&mut self) -> Option<&mut Owned> {
        self.guard.get_mut(&self.agent)
    }
    fn as_ref(&self) -> Option<&Owned> {
        self.guard.get(&self.agent)
    }
    fn remove(&mut self) {
        self.guard.remove(&self.agent);
    }
}

impl Store for NatsStore {
    fn write(&self, write: Write, done: OnWritten) {
        let lane = match &write {
            Write::Submit { .. } | Write::Purge { .. } => None,
            Write::Start(t) => Some(agent_token(&t.agent)),
            Write::Complete { task, .. } | Write::Retry { task, .. } | Write::Park { task, .. } => {
                Some(agent_token(&task.agent))
            }
            _ => Some("misc".to_string()),
        };
        match lane {
            Some(name) => {
                let lane = self.lane(name);
                lane.pending.fetch_add(1, Ordering::AcqRel);
                if let Err(mpsc::error::SendError(job)) = lane.tx.send(Job { write, done }) {
                    lane.pending.fetch_sub(1, Ordering::AcqRel);
                    (job.done)(Err(StoreError::Closed));
                }
            }
            None => {
                let inner = self.inner.clone();
                self.rt.spawn(async move {
                    let res = inner.clone().apply(write).await;
                    inner.note(&res);
                    done(res);
                });
            }
        }
    }

    fn task(&self, id: TaskId) -> StoreFuture<Option<Task>> {
        let inner = self.inner.clone();
        self.spawn(async move { Ok(inner.task_entry(id).await?.map(|(t, _)| t)) })
    }

    fn agent_state(&self, agent: &AgentId) -> StoreFuture<AgentState> {
        let inner = self.inner.clone();
        let key = agent_token(agent);
        self.spawn(async move {
            Ok(match inner.state.get(key).await.map_err(backend)? {
                Some(raw) => {
                    let r: StateRecord = decode(&raw)?;
                    AgentState {
                        memory: r.memory,
                        ticks: r.ticks,
                    }
                }
                None => AgentState::default(),
            })
        })
    }

    /// Empty: in a cluster the owner reads its agents' queues from the stream (see
    /// [`NatsStore::queue_reader`]); nothing is re-queued at start-up.
    fn queued(&self, _agent: &AgentId) -> StoreFuture<Vec<TaskId>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn token_digest(&self, agent: &AgentId) -> Result<Option<[u8; 32]>, StoreError> {
        let inner = self.inner.clone();
        let key = token_key(agent);
        self.block(async move {
            Ok(inner
                .meta
                .get(key)
                .await
                .map_err(backend)?
                .map(|raw| unhex32(&String::from_utf8_lossy(&raw))))
        })
    }

    fn schedule_cursor(&self, key: &ScheduleKey) -> StoreFuture<Option<ScheduleCursor>> {
        let inner = self.inner.clone();
        let key = schedule_key(key);
        self.spawn(async move {
            match inner.meta.get(key).await.map_err(backend)? {
                Some(raw) => Ok(Some(decode(&raw)?)),
                None => Ok(None),
            }
        })
    }

    /// Every node arms every timer it learns of: firing is a compare-and-set, so one wins.
    fn retry_timers(&self) -> StoreFuture<Vec<RetryTimer>> {
        let inner = self.inner.clone();
        self.spawn(inner.retry_timers())
    }

    fn due_awaits(&self, now_ms: u64, limit: usize) -> StoreFuture<Vec<(u64, TaskId)>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let mut due = Vec::new();
            for key in inner.keys(&inner.timers).await? {
                let mut parts = key.splitn(3, '.');
                let (Some("w"), Some(at), Some(id)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if let (Ok(at), Ok(id)) = (at.parse::<u64>(), id.parse::<TaskId>()) {
                    if at <= now_ms {
                        due.push((at, id));
                    }
                }
            }
            due.sort();
            due.truncate(limit);
            Ok(due)
        })
    }

    fn deliveries(&self, query: DeliveryQuery) -> StoreFuture<Vec<Delivery>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let mut keys = inner.keys(&inner.outbox_kv).await?;
            keys.sort();
            let mut out = Vec::new();
            for key in keys {
                if out.len() >= query.limit {
                    break;
                }
                let Some(raw) = inner.outbox_kv.get(&key).await.map_err(backend)? else {
                    continue;
                };
                let d: Delivery = decode(&raw)?;
                if query.after.is_some_and(|a| d.id <= a)
                    || query.agent.as_ref().is_some_and(|a| &d.agent != a)
                    || query.status.is_some_and(|s| d.status != s)
                {
                    continue;
                }
                out.push(d);
            }
            Ok(out)
        })
    }

    fn delivery(&self, id: u64) -> StoreFuture<Option<Delivery>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            match inner
                .outbox_kv
                .get(delivery_key(id))
                .await
                .map_err(backend)?
            {
                Some(raw) => Ok(Some(decode(&raw)?)),
                None => Ok(None),
            }
        })
    }

    fn disabled_endpoints(&self) -> StoreFuture<Vec<(AgentId, usize)>> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let mut out = Vec::new();
            for key in inner.keys(&inner.meta).await? {
                let mut parts = key.splitn(3, '.');
                let (Some("n"), Some(agent), Some(idx)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let bytes: Option<Vec<u8>> = (0..agent.len() / 2)
                    .map(|i| u8::from_str_radix(agent.get(i * 2..i * 2 + 2)?, 16).ok())
                    .collect();
                let agent = bytes
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.parse::<AgentId>().ok());
                if let (Some(agent), Ok(idx)) = (agent, idx.parse::<usize>()) {
                    out.push((agent, idx));
                }
            }
            Ok(out)
        })
    }

    fn outbox(&self) -> Option<Arc<Outbox>> {
        self.inner.outbox.clone()
    }

    /// Reads every retained task record and pages them in memory: the JetStream layout keeps
    /// no time-ordered index, so a listing costs O(tasks retained) (see docs/operations.md).
    fn list_tasks(&self, query: ListQuery) -> StoreFuture<TaskPage> {
        let inner = self.inner.clone();
        self.spawn(async move {
            let mut tasks: Vec<Task> = inner
                .all_tasks()
                .await?
                .into_iter()
                .filter(|t| {
                    query.agent.as_ref().is_none_or(|a| &t.agent == a)
                        && query.status.is_none_or(|s| t.status == s)
                        && query.since_ms.is_none_or(|s| t.created_at >= s)
                        && query.until_ms.is_none_or(|u| t.created_at < u)
                })
                .collect();
            tasks.sort_by(|a, b| {
                (b.created_at, b.id.as_bytes()).cmp(&(a.created_at, a.id.as_bytes()))
            });
            let start = match query.cursor {
                Some(c) => tasks
                    .iter()
                    .position(|t| {
                        (t.created_at, *t.id.as_bytes()) < (c.created_ms, *c.id.as_bytes())
                    })
                    .unwrap_or(tasks.len()),
                None => 0,
            };
            let page: Vec<Task> = tasks
                .iter()
                .skip(start)
                .take(query.limit)
                .cloned()
                .collect();
            let next_cursor = (start + page.len() < tasks.len())
                .then(|| page.last())
                .flatten()
                .map(|t| super::ListCursor {
                    created_ms: t.created_at,
                    id: t.id,
                });
            Ok(TaskPage {
                tasks: page,
                next_cursor,
            })
        })
    }

    fn purge(&self, older_than: Duration) -> Result<Purged, StoreError> {
        let inner = self.inner.clone();
        let before = now_ms().saturating_sub(older_than.as_millis() as u64);
        let tasks = self.block(async move { inner.purge(before, usize::MAX).await })?;
        Ok(Purged { tasks })
    }

    fn dispatches(&self) -> bool {
        true
    }

    fn owner(&self, agent: &AgentId) -> Option<String> {
        NatsStore::owner(self, agent)
    }

    fn backlog(&self, agent: &AgentId) -> Option<usize> {
        let backlog = self.inner.backlog.lock().ok()?;
        Some(backlog.get(&queue_subject(agent)).copied().unwrap_or(0))
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
            && self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    fn flush(&self) -> Result<(), StoreError> {
        let client = self.inner.client.clone();
        self.block(async move { client.flush().await.map_err(backend) })
    }
}
