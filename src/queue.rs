//! Queue triggers (SPEC section 11): each `[[agent.queue]]` entry consumes a JetStream subject
//! and turns every message into a task of its agent through the one intake, like
//! [`crate::schedule`] does for schedule slots; finished tasks of those agents can be published
//! back to a `reply_subject`.
//!
//! - **Consuming.** One durable pull consumer per (agent, entry), named from the agent id and the
//!   entry's index ([`consumer_name`]), with `filter_subject` = the subject and explicit acks, on
//!   the stream that covers the subject (created as `TICKGATE_Q_<subject>` with file storage when
//!   none does). Several nodes with the same config bind the same consumer, so each message goes
//!   to one of them.
//! - **Acknowledging.** A message is acked only once [`Intake::accept`] said the task is durable
//!   (new or duplicate); a refusal that can pass (mailbox full, breaker open, store unavailable,
//!   shutting down) naks it with a delay so JetStream redelivers it; a payload that is not JSON
//!   and a key reused with another body are terminated, logged (without the payload) and
//!   counted, never redelivered. See [`disposition`].
//! - **Idempotency.** The `Nats-Msg-Id` header is the idempotency key (body digest = SHA-256 of
//!   the payload); without it `<stream>:<stream sequence>`, so a redelivery (an ack lost with a
//!   dying node, an expired `ack_wait`) still gives one task.
//! - **Results.** Terminal changes of `QUEUE` tasks seen on this node's task feed
//!   ([`TaskEvents::subscribe_all`]) are published to the matching entry's `reply_subject` as the
//!   task record JSON: through JetStream with `Nats-Msg-Id = <task id>` when a stream covers the
//!   subject, else as a core NATS publish. This is best effort: the feed is in memory, so
//!   results finished while this node could not publish for long, or during its shutdown, can be
//!   missing (and are counted as dropped when tickgate knows).
//! - **Outages.** async-nats reconnects by itself; every loop here survives NATS going away:
//!   errors re-create the stream/consumer handles after a capped backoff, and nothing panics.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tickgate_actors::agent::AgentHandle;
use tickgate_actors::events::TaskEvents;
use tickgate_actors::intake::{Accepted, Intake, Refused};
use tickgate_actors::model::{AgentId, JsonText, Source, Task, TaskId, TextError};
use tickgate_actors::store::IdempotencyKey;
use tokio::sync::{broadcast, mpsc};

use crate::config::QueueEntry;
use crate::metrics::Metrics;

/// First wait after a failure; doubled per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);

/// Longest wait between two attempts to (re)connect, (re)create a consumer or publish.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How often a waiting loop looks whether the service drains.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// Messages one pull asks for; small enough that buffered messages are handled well inside
/// `ack_wait` even when each is deferred.
const PULL_BATCH: usize = 32;

/// Pull request lifetime and the server's idle heartbeat within it: a silent connection is
/// noticed after two missed heartbeats, and the consumer is then re-created.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
const PULL_HEARTBEAT: Duration = Duration::from_secs(3);

/// Redelivery delay for a message refused because the agent's mailbox is full.
const MAILBOX_FULL_DELAY: Duration = Duration::from_secs(1);

/// Redelivery delay for a message the store could not make durable.
const STORE_DELAY: Duration = Duration::from_secs(5);

/// After a deferral, the consumer waits this long before the next message, so that a full
/// mailbox is not met with a burst of naks.
const DEFER_PAUSE: Duration = Duration::from_millis(250);

/// Finished task records waiting for a publish; beyond this they are dropped (and counted).
const RESULTS_BUFFER: usize = 4096;

/// How long a "does a stream cover this reply subject" answer is reused.
const REPLY_ROUTE_TTL: Duration = Duration::from_secs(30);

/// Headers never passed to the runner, as for webhooks: a producer's credentials stay between
/// it and NATS.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// What the queue triggers share with the rest of the service.
#[derive(Clone)]
pub struct QueueDeps {
    /// The one accept path.
    pub intake: Arc<Intake>,
    /// `tickgate_queue_*` counters.
    pub metrics: Arc<Metrics>,
    /// Base of the `poll_url` in published task records.
    pub public_url: String,
    /// Larger payloads are terminated, like webhook bodies over `server.max_body_bytes`.
    pub max_payload: usize,
}

/// One consumer to run: an agent's entry and its index in `[[agent.queue]]`.
#[derive(Clone)]
pub struct Consumed {
    /// The agent the messages become tasks of.
    pub agent: AgentHandle,
    /// The entry's 0-based index (part of the consumer's name).
    pub index: usize,
    /// The entry.
    pub entry: QueueEntry,
}

/// The queue triggers of a configuration: the consumers and, when any entry has a
/// `reply_subject`, the subscription to the task feed that finds finished tasks. Build it with
/// [`Triggers::new`] before the agents can finish anything, then [`Triggers::start`] it.
pub struct Triggers {
    url: String,
    consumed: Vec<Consumed>,
    feed: Option<broadcast::Receiver<Arc<Task>>>,
}

impl Triggers {
    /// The triggers of `consumed`, or `None` when there are none (nothing connects to NATS).
    /// Subscribes to `events` now when results are to be published, so no change made after
    /// this call is missed.
    pub fn new(url: Option<String>, consumed: Vec<Consumed>, events: &TaskEvents) -> Option<Self> {
        if consumed.is_empty() {
            return None;
        }
        let url = url?;
        let feed = consumed
            .iter()
            .any(|c| c.entry.reply_subject.is_some())
            .then(|| events.subscribe_all());
        Some(Self {
            url,
            consumed,
            feed,
        })
    }

    /// Connects (retrying with backoff until it succeeds or the service drains) and runs the
    /// consumers and the results publisher on the current actix runtime. Everything stops when
    /// the service drains or its system stops.
    pub fn start(self, deps: QueueDeps) {
        let (results_tx, results_rx) = mpsc::channel(RESULTS_BUFFER);
        let routes = reply_routes(&self.consumed);
        if let Some(feed) = self.feed {
            let metrics = deps.metrics.clone();
            let routes = routes.clone();
            actix_rt::spawn(watch_feed(feed, routes, results_tx, metrics));
        }
        let url = self.url;
        let consumed = self.consumed;
        actix_rt::spawn(async move {
            let Some(client) = connect(&url, &deps.intake).await else {
                return;
            };
            let js = jetstream::new(client.clone());
            for c in consumed {
                actix_rt::spawn(run_consumer(deps.clone(), client.clone(), js.clone(), c));
            }
            if !routes.is_empty() {
                actix_rt::spawn(publish_results(deps, client, js, routes, results_rx));
            }
        });
    }
}

/// The durable consumer's name for entry `index` of `agent`: `tickgate_<namespace>_<name>_<index>`.
/// Agent names are DNS labels (no `_`), so the name is unique per entry; anything outside
/// `[A-Za-z0-9_-]` (which JetStream refuses in names) becomes `_`.
pub fn consumer_name(agent: &AgentId, index: usize) -> String {
    sanitise(&format!(
        "tickgate_{}_{index}",
        agent.to_string().replace('/', "_")
    ))
}

/// The stream tickgate creates for `subject` when no stream covers it: `TICKGATE_Q_<subject>`
/// with every character outside `[A-Za-z0-9_-]` (dots, wildcards) turned into `_`.
pub fn stream_name(subject: &str) -> String {
    sanitise(&format!("TICKGATE_Q_{subject}"))
}

fn sanitise(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What to tell JetStream about a message after the intake answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The task is durable (new, or an earlier delivery's): done with the message.
    Ack,
    /// Not taken for now; redeliver after the delay (`None`: at once, to any node).
    Nak(Option<Duration>),
    /// Never taken: do not redeliver.
    Term,
}

/// The rule from intake answers to acknowledgements: only durability acks; refusals that can
/// pass are redelivered later; a key reused with another body can never pass and is terminated.
pub fn disposition(answer: &Result<Accepted<TaskId>, Refused>) -> Disposition {
    match answer {
        Ok(Accepted::New(_) | Accepted::Duplicate(_)) => Disposition::Ack,
        Err(Refused::Conflict(_)) => Disposition::Term,
        // Another node (or this one after its restart) takes it.
        Err(Refused::ShuttingDown) => Disposition::Nak(None),
        Err(Refused::BreakerOpen { retry_after }) => {
            Disposition::Nak(Some((*retry_after).max(Duration::from_secs(1))))
        }
        Err(Refused::MailboxFull) => Disposition::Nak(Some(MAILBOX_FULL_DELAY)),
        Err(Refused::StoreUnavailable(_) | Refused::UnknownAgent(_)) => {
            Disposition::Nak(Some(STORE_DELAY))
        }
    }
}

/// Whether the concrete `subject` is matched by `pattern` (NATS wildcards `*` and `>`).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for p in pattern.split('.') {
        if p == ">" {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Doubling, capped waits between attempts; interrupted when the service drains.
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Self {
        Self {
            next: BACKOFF_MIN,
            cap,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// Waits the current delay (or until draining); `false` when the service drains.
    async fn wait(&mut self, intake: &Intake) -> bool {
        let until = Instant::now() + self.next;
        self.next = (self.next * 2).min(self.cap);
        while Instant::now() < until {
            if intake.is_draining() {
                return false;
            }
            tokio::time::sleep(DRAIN_POLL.min(until - Instant::now())).await;
        }
        !intake.is_draining()
    }
}

/// Why a running pull is left.
enum Leave {
    /// The service drains.
    Drained,
    /// The connection has been down for [`DISCONNECTED_LIMIT`].
    Disconnected,
}

/// A connection down this long ends the pull (and re-creates it after the outage), whether or
/// not the pull itself has noticed missing heartbeats yet.
const DISCONNECTED_LIMIT: Duration = Duration::from_secs(2);

/// Resolves when the service drains or the client's connection has stayed down for
/// [`DISCONNECTED_LIMIT`].
async fn leave(intake: &Intake, client: &async_nats::Client) -> Leave {
    let mut down_since: Option<Instant> = None;
    loop {
        if intake.is_draining() {
            return Leave::Drained;
        }
        if client.connection_state() == async_nats::connection::State::Connected {
            down_since = None;
        } else if down_since.get_or_insert_with(Instant::now).elapsed() >= DISCONNECTED_LIMIT {
            return Leave::Disconnected;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The URL as logs may show it: without any user or password.
fn shown_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            match (part.find("://"), part.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    format!("{}://{}", &part[..scheme], &part[at + 1..])
                }
                _ => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects to `url` (a comma-separated server list), retrying with backoff; `None` if the
/// service drains first. Later outages are the client's business: it reconnects by itself.
async fn connect(url: &str, intake: &Intake) -> Option<async_nats::Client> {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let shown = shown_url(url);
    let mut backoff = Backoff::new(Duration::from_secs(30));
    loop {
        let options = async_nats::ConnectOptions::new()
            .name("tickgate")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None);
        match options.connect(servers.clone()).await {
            Ok(client) => {
                tracing::info!(url = %shown, "connected to NATS for queue triggers");
                return Some(client);
            }
            Err(e) => {
                tracing::warn!(url = %shown, error = %e, "cannot connect to NATS for queue triggers; retrying");
            }
        }
        if !backoff.wait(intake).await {
            return None;
        }
    }
}

/// Runs one entry's consumer until the service drains: (re)binds the stream and the durable
/// consumer, pulls, hands each message to [`handle`]; any failure waits a capped backoff and
/// starts over, so an outage of NATS is survived without panicking or spinning.
async fn run_consumer(
    deps: QueueDeps,
    client: async_nats::Client,
    js: jetstream::Context,
    c: Consumed,
) {
    let agent = c.agent.spec.id.to_string();
    let name = consumer_name(&c.agent.spec.id, c.index);
    let mut backoff = Backoff::new(BACKOFF_MAX);
    loop {
        if deps.intake.is_draining() {
            return;
        }
        match consume(&deps, &client, &js, &c, &name, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(agent = %agent, subject = %c.entry.subject, consumer = %name, error = %e, "queue consumer interrupted; re-creating it");
            }
        }
        if !backoff.wait(&deps.intake).await {
            return;
        }
    }
}

/// One life of a consumer: `Ok` when the service drains, `Err` with the reason otherwise.
async fn consume(
    deps: &QueueDeps,
    client: &async_nats::Client,
    js: &jetstream::Context,
    c: &Consumed,
    name: &str,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let stream = bind_stream(js, &c.entry.subject).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_string()),
            description: Some(format!(
                "tickgate queue trigger {}[{}]",
                c.agent.spec.id, c.index
            )),
            filter_subject: c.entry.subject.clone(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: c.entry.ack_wait,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create the consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(PULL_BATCH)
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| format!("cannot pull: {e}"))?;
    tracing::info!(agent = %c.agent.spec.id, subject = %c.entry.subject, consumer = %name, "queue consumer running");
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            why = leave(&deps.intake, client) => match why {
                Leave::Drained => {
                    give_back(&mut messages).await;
                    return Ok(());
                }
                Leave::Disconnected => return Err("the connection to NATS is down".into()),
            },
        };
        match next {
            None => return Err("the message stream ended".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(message)) => {
                backoff.reset();
                if handle(deps, c, message).await == Some(Disposition::Nak(None)) {
                    // Refused as shutting down: the service is draining.
                    give_back(&mut messages).await;
                    return Ok(());
                }
            }
        }
    }
}

/// Naks, without delay, the messages this pull already holds (at most a batch) so that another
/// node takes them now rather than after `ack_wait`; best effort while the service drains.
async fn give_back(messages: &mut pull::Stream) {
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(20), messages.next()).await
    {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// The stream covering `subject`, created (file storage) when none does. Several nodes may
/// create it at once: JetStream answers an identical create with the existing stream.
async fn bind_stream(
    js: &jetstream::Context,
    subject: &str,
) -> Result<jetstream::stream::Stream, String> {
    use async_nats::jetstream::context::GetStreamByNameErrorKind;
    match js.stream_by_subject(subject).await {
        Ok(name) => js
            .get_stream(&name)
            .await
            .map_err(|e| format!("cannot read stream {name}: {e}")),
        Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => {
            let name = stream_name(subject);
            let stream = js
                .create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.to_string()],
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    format!("no stream covers the subject and creating {name} failed: {e}")
                })?;
            tracing::info!(stream = %name, subject, "created a stream for a queue trigger");
            Ok(stream)
        }
        Err(e) => Err(format!(
            "cannot look up the stream covering the subject: {e}"
        )),
    }
}

/// Turns one message into a task and acknowledges it by [`disposition`]. Returns what was done
/// (`None` when the ack itself could not be sent: JetStream redelivers after `ack_wait`).
async fn handle(
    deps: &QueueDeps,
    c: &Consumed,
    message: jetstream::Message,
) -> Option<Disposition> {
    let agent = c.agent.spec.id.to_string();
    let (stream, sequence, delivered) = match message.info() {
        Ok(info) => (
            info.stream.to_string(),
            info.stream_sequence,
            info.delivered,
        ),
        Err(e) => {
            // Not a JetStream delivery (cannot happen on a pull consumer); nothing to ack.
            tracing::warn!(agent = %agent, error = %e, "queue message without JetStream metadata ignored");
            return None;
        }
    };
    let subject = message.subject.to_string();
    let dispose = |d: Disposition, outcome: &'static str| {
        deps.metrics.queue.message(&agent, outcome);
        d
    };
    let disposition = match task_of(deps, c, &message, &stream, sequence) {
        Err((outcome, why)) => {
            tracing::warn!(agent = %agent, subject = %subject, stream = %stream, sequence, reason = outcome, "queue message terminated: {why}");
            dispose(Disposition::Term, outcome)
        }
        Ok((task, key)) => {
            let answer = deps.intake.accept_id(task, Some(key)).await;
            let d = disposition(&answer);
            match &answer {
                Ok(Accepted::New(id)) => {
                    tracing::debug!(agent = %agent, subject = %subject, sequence, task_id = %id, "queue message queued as a task");
                    dispose(d, "task")
                }
                Ok(Accepted::Duplicate(id)) => {
                    tracing::info!(agent = %agent, subject = %subject, sequence, delivered, task_id = %id, "queue message was already a task");
                    dispose(d, "duplicate")
                }
                Err(Refused::Conflict(id)) => {
                    tracing::warn!(agent = %agent, subject = %subject, stream = %stream, sequence, task_id = %id, "queue message terminated: its idempotency key was used for another task with a different body");
                    dispose(d, "conflict")
                }
                Err(refused) => {
                    tracing::info!(agent = %agent, subject = %subject, sequence, delivered, error = %refused, "queue message deferred; JetStream redelivers it");
                    dispose(d, "deferred")
                }
            }
        }
    };
    let kind = match disposition {
        Disposition::Ack => AckKind::Ack,
        Disposition::Nak(delay) => AckKind::Nak(delay),
        Disposition::Term => AckKind::Term,
    };
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(agent = %agent, sequence, error = %e, "cannot acknowledge a queue message; JetStream redelivers it after ack_wait");
        return None;
    }
    if matches!(disposition, Disposition::Nak(Some(_))) {
        tokio::time::sleep(DEFER_PAUSE).await;
    }
    Some(disposition)
}

/// The task and idempotency key of a message, or why it can never be one (the metric outcome and
/// words for the log, which never quote the payload).
fn task_of(
    deps: &QueueDeps,
    c: &Consumed,
    message: &jetstream::Message,
    stream: &str,
    sequence: u64,
) -> Result<(Task, IdempotencyKey), (&'static str, String)> {
    let payload = &message.payload;
    if payload.len() > deps.max_payload {
        return Err((
            "invalid",
            format!(
                "the payload has {} bytes; server.max_body_bytes allows {}",
                payload.len(),
                deps.max_payload
            ),
        ));
    }
    let max = crate::ingress::body::MAX_DEPTH;
    let inputs = JsonText::parse_limited(payload, max).map_err(|e| match e {
        TextError::Invalid(e) => ("not_json", format!("the payload is not JSON ({e})")),
        TextError::TooDeep(depth) => (
            "invalid",
            format!(
                "the payload nests arrays and objects {depth} levels deep; at most {max} are accepted"
            ),
        ),
    })?;
    let mut headers = BTreeMap::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            let name = name.to_string().to_ascii_lowercase();
            if CREDENTIAL_HEADERS.contains(&name.as_str()) {
                continue;
            }
            let joined = values
                .iter()
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            headers.insert(name, joined);
        }
    }
    let key = match headers.get("nats-msg-id").filter(|id| !id.is_empty()) {
        Some(id) if id.len() > crate::ingress::delivery::MAX_DELIVERY_ID => {
            return Err((
                "invalid",
                format!(
                    "its Nats-Msg-Id is longer than {} characters",
                    crate::ingress::delivery::MAX_DELIVERY_ID
                ),
            ))
        }
        Some(id) => id.clone(),
        None => format!("{stream}:{sequence}"),
    };
    let source = Source {
        method: "QUEUE".into(),
        event: Some(message.subject.to_string()),
        headers,
        ..Source::default()
    };
    let task = Task::new(c.agent.spec.id.clone(), inputs, source);
    let key = IdempotencyKey {
        key,
        body_sha256: Sha256::digest(payload).into(),
    };
    Ok((task, key))
}

/// Per agent, the (pattern, reply subject) pairs of its entries that publish results.
type Routes = Arc<HashMap<AgentId, Vec<(String, String)>>>;

fn reply_routes(consumed: &[Consumed]) -> Routes {
    let mut routes: HashMap<AgentId, Vec<(String, String)>> = HashMap::new();
    for c in consumed {
        if let Some(reply) = &c.entry.reply_subject {
            routes
                .entry(c.agent.spec.id.clone())
                .or_default()
                .push((c.entry.subject.clone(), reply.clone()));
        }
    }
    Arc::new(routes)
}

/// The reply subjects a finished task goes to: those of its agent's entries whose subject
/// matches the one the task's message came on, each once.
fn replies_for(routes: &Routes, task: &Task) -> Vec<String> {
    let Some(entries) = routes.get(&task.agent) else {
        return Vec::new();
    };
    let subject = task.source.event.as_deref().unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for (pattern, reply) in entries {
        if subject_matches(pattern, subject) && !out.contains(reply) {
            out.push(reply.clone());
        }
    }
    out
}

/// Picks the finished `QUEUE` tasks with a reply route out of the task feed, quickly, so the
/// feed does not lag behind a slow publish; a lag is logged with its count.
async fn watch_feed(
    mut feed: broadcast::Receiver<Arc<Task>>,
    routes: Routes,
    out: mpsc::Sender<Arc<Task>>,
    metrics: Arc<Metrics>,
) {
    loop {
        match feed.recv().await {
            Ok(task) => {
                if !task.status.is_terminal()
                    || task.source.method != "QUEUE"
                    || replies_for(&routes, &task).is_empty()
                {
                    continue;
                }
                if let Err(mpsc::error::TrySendError::Full(task)) = out.try_send(task) {
                    tracing::warn!(agent = %task.agent, task_id = %task.id, "queue results are not being published fast enough; a finished task's record is dropped");
                    metrics.queue.results(&task.agent.to_string(), "dropped", 1);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "the task feed lagged; finished task records among the missed changes are not published");
                metrics.queue.results("unknown", "dropped", missed);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Publishes each finished task's record to its reply subjects, retrying with a capped backoff
/// until it is published or the service drains.
async fn publish_results(
    deps: QueueDeps,
    client: async_nats::Client,
    js: jetstream::Context,
    routes: Routes,
    mut tasks: mpsc::Receiver<Arc<Task>>,
) {
    let mut via_stream: HashMap<String, (bool, Instant)> = HashMap::new();
    let mut backoff = Backoff::new(BACKOFF_MAX);
    while let Some(task) = tasks.recv().await {
        let record = crate::http::record::TaskRecord::at(&task, &deps.public_url);
        let body = match serde_json::to_vec(&record) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(task_id = %task.id, error = %e, "cannot render a task record for its reply subject");
                continue;
            }
        };
        let agent = task.agent.to_string();
        for reply in replies_for(&routes, &task) {
            loop {
                match publish(&client, &js, &mut via_stream, &reply, &task, body.clone()).await {
                    Ok(()) => {
                        backoff.reset();
                        deps.metrics.queue.results(&agent, "published", 1);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(agent = %agent, task_id = %task.id, subject = %reply, error = %e, "cannot publish a finished task's record; retrying");
                        via_stream.remove(&reply);
                        if !backoff.wait(&deps.intake).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}

async fn publish(
    client: &async_nats::Client,
    js: &jetstream::Context,
    via_stream: &mut HashMap<String, (bool, Instant)>,
    subject: &str,
    task: &Task,
    body: Vec<u8>,
) -> Result<(), String> {
    use async_nats::jetstream::context::GetStreamByNameErrorKind;
    let fresh = via_stream
        .get(subject)
        .filter(|(_, at)| at.elapsed() < REPLY_ROUTE_TTL)
        .map(|(yes, _)| *yes);
    let stream = match fresh {
        Some(yes) => yes,
        None => {
            let yes = match js.stream_by_subject(subject).await {
                Ok(_) => true,
                Err(e) if e.kind() == GetStreamByNameErrorKind::NotFound => false,
                Err(e) => return Err(format!("cannot look up a stream for it: {e}")),
            };
            via_stream.insert(subject.to_string(), (yes, Instant::now()));
            yes
        }
    };
    if stream {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", task.id.to_string().as_str());
        js.publish_with_headers(subject.to_string(), headers, body.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
    } else {
        client
            .publish(subject.to_string(), body.into())
            .await
            .map_err(|e| e.to_string())?;
        client.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_actors::store::StoreError;

    #[test]
    fn only_durability_acks_and_passing_refusals_are_redelivered() {
        let id = TaskId::random();
        assert_eq!(disposition(&Ok(Accepted::New(id))), Disposition::Ack);
        assert_eq!(disposition(&Ok(Accepted::Duplicate(id))), Disposition::Ack);
        assert_eq!(disposition(&Err(Refused::Conflict(id))), Disposition::Term);
        assert_eq!(
            disposition(&Err(Refused::MailboxFull)),
            Disposition::Nak(Some(MAILBOX_FULL_DELAY))
        );
        assert_eq!(
            disposition(&Err(Refused::StoreUnavailable(StoreError::Closed))),
            Disposition::Nak(Some(STORE_DELAY))
        );
        assert_eq!(
            disposition(&Err(Refused::BreakerOpen {
                retry_after: Duration::from_secs(7)
            })),
            Disposition::Nak(Some(Duration::from_secs(7)))
        );
        // A breaker about to half-open still waits a moment rather than being retried at once.
        assert_eq!(
            disposition(&Err(Refused::BreakerOpen {
                retry_after: Duration::ZERO
            })),
            Disposition::Nak(Some(Duration::from_secs(1)))
        );
        assert_eq!(
            disposition(&Err(Refused::ShuttingDown)),
            Disposition::Nak(None)
        );
    }

    #[test]
    fn names_are_deterministic_and_allowed_by_jetstream() {
        let id: AgentId = "ops/ci-bot".parse().unwrap();
        assert_eq!(consumer_name(&id, 2), "tickgate_ops_ci-bot_2");
        assert_eq!(stream_name("agent.events.>"), "TICKGATE_Q_agent_events__");
        assert_eq!(stream_name("a b*"), "TICKGATE_Q_a_b_");
    }

    #[test]
    fn wildcards_match_like_nats() {
        for (pattern, subject, want) in [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            ("*.b", "x.b", true),
            ("a", "a.b", false),
        ] {
            assert_eq!(
                subject_matches(pattern, subject),
                want,
                "{pattern} ~ {subject}"
            );
        }
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            shown_url("nats://user:secret@h1:4222, nats://h2:4222"),
            "nats://h1:4222,nats://h2:4222"
        );
    }
}
