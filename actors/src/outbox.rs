//! Outbound status callbacks (SPEC section 9): which deliveries a task's status change creates,
//! the stored delivery record, and the pure state machines that decide what happens after an
//! attempt (retry schedule, `Retry-After`, dead letter) and when an endpoint may be tried
//! (a per-endpoint breaker).
//!
//! The store's writer asks the [`Outbox`] for deliveries whenever it stages a task record whose
//! status differs from the stored one, and writes them in the same batch: a delivery exists if and
//! only if the state change that caused it is durable. Once the batch is on disk the writer hands
//! the new deliveries to [`Outbox::committed`], which feeds the delivery worker's channel. The
//! worker (in the binary) does the HTTP; nothing here does I/O.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::{AgentId, Task, TaskId, TaskStatus};

/// Consecutive failed attempts (across deliveries) that open an endpoint's breaker.
pub const BREAKER_FAILURES: u32 = 10;
/// How long an open endpoint breaker waits before it lets one trial attempt through.
pub const BREAKER_OPEN_MS: u64 = 30_000;
/// Longest `Retry-After` honoured; a receiver cannot park a delivery for longer than a day.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// An event a receiver can subscribe to; derived only from a task's status, so status changes
/// made by any part of tickgate produce events without knowing about callbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// The task's tick started (`STARTED`).
    #[serde(rename = "task.started")]
    Started,
    /// An attempt failed and a retry is scheduled (`RETRY`).
    #[serde(rename = "task.retrying")]
    Retrying,
    /// The tick asked for input (`AWAITING_INPUT`).
    #[serde(rename = "task.awaiting_input")]
    AwaitingInput,
    /// The task succeeded (`SUCCESS`).
    #[serde(rename = "task.succeeded")]
    Succeeded,
    /// The task failed for good (`FAILURE`).
    #[serde(rename = "task.failed")]
    Failed,
    /// The task was cancelled (`REVOKED`).
    #[serde(rename = "task.canceled")]
    Canceled,
}

impl EventType {
    /// Every event, in the order the SPEC lists them.
    pub const ALL: [EventType; 6] = [
        EventType::Started,
        EventType::Retrying,
        EventType::AwaitingInput,
        EventType::Succeeded,
        EventType::Failed,
        EventType::Canceled,
    ];

    /// The events an endpoint gets when its config names none.
    pub const DEFAULT: [EventType; 3] = [
        EventType::Succeeded,
        EventType::Failed,
        EventType::AwaitingInput,
    ];

    /// The event a task entering `status` produces; `PENDING` produces none.
    pub fn for_status(status: TaskStatus) -> Option<Self> {
        Some(match status {
            TaskStatus::Pending => return None,
            TaskStatus::Started => Self::Started,
            TaskStatus::Retry => Self::Retrying,
            TaskStatus::AwaitingInput => Self::AwaitingInput,
            TaskStatus::Success => Self::Succeeded,
            TaskStatus::Failure => Self::Failed,
            TaskStatus::Revoked => Self::Canceled,
        })
    }

    /// The wire name, e.g. `task.succeeded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "task.started",
            Self::Retrying => "task.retrying",
            Self::AwaitingInput => "task.awaiting_input",
            Self::Succeeded => "task.succeeded",
            Self::Failed => "task.failed",
            Self::Canceled => "task.canceled",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown event {s:?}; expected one of {}",
                    Self::ALL.map(|e| e.as_str()).join(", ")
                )
            })
    }
}

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not yet delivered; attempts continue (or wait for a disabled endpoint).
    Pending,
    /// The receiver answered 2xx.
    Succeeded,
    /// Dead letter: the schedule is exhausted or the target was refused.
    Failed,
}

impl FromStr for DeliveryStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(Self::Pending),
            "succeeded" => Ok(Self::Succeeded),
            "failed" => Ok(Self::Failed),
            _ => Err(format!(
                "unknown delivery status {s:?}; expected pending, failed or succeeded"
            )),
        }
    }
}

/// One callback to one endpoint about one status change, stored under its own key prefix.
/// It carries the task as it was at the event, so `data` shows that moment even after the task
/// moved on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Store-assigned, increasing: creation order, which is also the per-task delivery order.
    pub id: u64,
    /// The task's agent, whose `notify` list holds the endpoint.
    pub agent: AgentId,
    /// 0-based index into the agent's `notify` list.
    pub endpoint: usize,
    /// The task the event is about.
    pub task_id: TaskId,
    /// What happened.
    pub event: EventType,
    /// `<task_id>.<type>.<tick>`: the same on every attempt so receivers can deduplicate.
    pub webhook_id: String,
    /// Pending, succeeded or failed.
    pub status: DeliveryStatus,
    /// Attempts made so far (all rounds).
    pub attempts: u32,
    /// Attempts made in the current round; an admin retry starts a new round at 0. Indexes the
    /// retry schedule.
    #[serde(default)]
    pub round_attempts: u32,
    /// When the next attempt is due, Unix ms; `None` once the delivery is finished.
    pub next_attempt_at: Option<u64>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the event happened (Unix ms); the body's `timestamp`.
    pub created_at: u64,
    /// The task record at the event.
    pub task: Task,
}

/// What one endpoint subscribes to.
#[derive(Debug, Clone, Default)]
pub struct EndpointPlan {
    /// The events it receives.
    pub events: HashSet<EventType>,
}

/// The planner and the hand-off to the delivery worker. One per process, shared with the store.
pub struct Outbox {
    plans: HashMap<AgentId, Vec<EndpointPlan>>,
    tx: mpsc::UnboundedSender<Delivery>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Delivery>>>,
}

impl fmt::Debug for Outbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("agents", &self.plans.len())
            .finish()
    }
}

impl Outbox {
    /// An outbox for these agents' endpoints (index = position in the agent's `notify` list).
    pub fn new(plans: HashMap<AgentId, Vec<EndpointPlan>>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            plans,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Whether any endpoint of `agent` exists; lets the writer skip the previous-status lookup
    /// for agents without callbacks.
    pub fn wants(&self, agent: &AgentId) -> bool {
        self.plans.get(agent).is_some_and(|p| !p.is_empty())
    }

    /// Deliveries for a task whose status went from `previous` (`None`: new task) to
    /// `task.status`. Ids are 0 here; the store assigns them.
    pub fn plan(&self, previous: Option<TaskStatus>, task: &Task, now_ms: u64) -> Vec<Delivery> {
        if previous == Some(task.status) {
            return Vec::new();
        }
        let Some(event) = EventType::for_status(task.status) else {
            return Vec::new();
        };
        let Some(plans) = self.plans.get(&task.agent) else {
            return Vec::new();
        };
        plans
            .iter()
            .enumerate()
            .filter(|(_, p)| p.events.contains(&event))
            .map(|(endpoint, _)| Delivery {
                id: 0,
                agent: task.agent.clone(),
                endpoint,
                task_id: task.id,
                event,
                webhook_id: format!("{}.{}.{}", task.id, event, task.tick),
                status: DeliveryStatus::Pending,
                attempts: 0,
                round_attempts: 0,
                next_attempt_at: Some(now_ms),
                last_error: None,
                created_at: now_ms,
                task: task.clone(),
            })
            .collect()
    }

    /// Called by the store once deliveries are durable: hands them to the worker. Never blocks.
    pub fn committed(&self, deliveries: Vec<Delivery>) {
        for d in deliveries {
            // The receiver is gone only at shutdown; the delivery is on disk and loads next start.
            let _ = self.tx.send(d);
        }
    }

    /// Queues an existing delivery for the worker (an admin retry); same channel as new ones.
    pub fn requeue(&self, delivery: Delivery) {
        let _ = self.tx.send(delivery);
    }

    /// The worker's end of the channel; `None` after the first call.
    pub fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Delivery>> {
        self.rx.lock().ok().and_then(|mut rx| rx.take())
    }
}

/// How an attempt ended, as the worker classified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered,
    /// Non-2xx (other than 410), a timeout or a connection error; `retry_after` from a 429/503.
    Failed {
        /// Why, for `last_error`.
        error: String,
        /// The receiver's `Retry-After`, if it sent one with 429 or 503.
        retry_after: Option<Duration>,
    },
    /// 410 Gone: the endpoint is disabled until an admin re-enables it.
    Gone,
    /// The SSRF guard refused the target: retrying cannot help.
    Refused(String),
}

/// Applies an attempt's outcome to a delivery: the pure retry state machine. `schedule` is the
/// endpoint's `retry_schedule` (delays after the immediate try), `jitter` in `[0, 1)` spreads
/// retries by up to ±10 %.
pub fn after_attempt(
    d: &mut Delivery,
    outcome: Outcome,
    schedule: &[Duration],
    now_ms: u64,
    jitter: f64,
) {
    d.attempts = d.attempts.saturating_add(1);
    match outcome {
        Outcome::Delivered => {
            d.status = DeliveryStatus::Succeeded;
            d.next_attempt_at = None;
            d.last_error = None;
        }
        Outcome::Refused(why) => {
            d.status = DeliveryStatus::Failed;
            d.next_attempt_at = None;
            d.last_error = Some(why);
        }
        Outcome::Gone => {
            // Not a failure of this delivery: it waits, unattempted, for the endpoint's return.
            d.last_error = Some("the receiver answered 410 Gone; endpoint disabled".into());
            d.next_attempt_at = Some(now_ms);
        }
        Outcome::Failed { error, retry_after } => {
            d.last_error = Some(error);
            let round = d.round_attempts as usize;
            d.round_attempts = d.round_attempts.saturating_add(1);
            match schedule.get(round) {
                None => {
                    d.status = DeliveryStatus::Failed;
                    d.next_attempt_at = None;
                }
                Some(delay) => {
                    let wait = match retry_after {
                        Some(ra) => ra.min(MAX_RETRY_AFTER),
                        None => jittered(*delay, jitter),
                    };
                    d.next_attempt_at = Some(now_ms.saturating_add(wait.as_millis() as u64));
                }
            }
        }
    }
}

/// `delay` spread by up to ±10 % (`jitter` in `[0, 1)`), so retries of many deliveries that
/// failed together do not arrive together.
pub fn jittered(delay: Duration, jitter: f64) -> Duration {
    let factor = 0.9 + 0.2 * jitter.clamp(0.0, 1.0);
    delay.mul_f64(factor)
}

/// A random number in `[0, 1)` for [`jittered`], from the OS.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// Parses a `Retry-After` value given in seconds (the HTTP-date form is not honoured and falls
/// back to the schedule).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// A per-endpoint breaker, so a dead receiver is not hammered by every pending delivery. Opens
/// after [`BREAKER_FAILURES`] consecutive failed attempts; after [`BREAKER_OPEN_MS`] one trial
/// goes through; its success closes the breaker, its failure opens it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointBreaker {
    failures: u32,
    open_until: Option<u64>,
    trial: bool,
}

impl EndpointBreaker {
    /// May an attempt start now? `Err(t)`: not before Unix ms `t`.
    pub fn admit(&mut self, now_ms: u64) -> Result<(), u64> {
        match self.open_until {
            None => Ok(()),
            Some(until) if now_ms < until => Err(until),
            Some(_) if self.trial => Err(now_ms + 1000),
            Some(_) => {
                self.trial = true;
                Ok(())
            }
        }
    }

    /// Records an attempt's result (a 410 or a refusal does not count either way).
    pub fn record(&mut self, success: bool, now_ms: u64) {
        if success {
            *self = Self::default();
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if self.trial || self.failures >= BREAKER_FAILURES {
            self.trial = false;
            self.open_until = Some(now_ms + BREAKER_OPEN_MS);
        }
    }

    /// A trial that ended without an answer that counts (410, refusal) gives the slot back.
    pub fn release(&mut self) {
        self.trial = false;
    }

    /// Whether attempts are being held back.
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

/// Whether a delivery to `ip` must be refused unless `allow_private`: loopback, private,
/// link-local, unique-local, unspecified, shared (CGNAT), broadcast and documentation ranges,
/// and IPv6 addresses that embed such an IPv4 address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;
    use proptest::prelude::*;

    fn delivery() -> Delivery {
        let task = Task::new(
            "a".parse().unwrap(),
            serde_json::json!({}),
            Source::default(),
        );
        let outbox = Outbox::new(HashMap::from([(
            task.agent.clone(),
            vec![EndpointPlan {
                events: EventType::ALL.into_iter().collect(),
            }],
        )]));
        let mut t = task;
        t.status = TaskStatus::Success;
        t.tick = 3;
        let mut ds = outbox.plan(Some(TaskStatus::Started), &t, 1000);
        assert_eq!(ds.len(), 1);
        ds.remove(0)
    }

    #[test]
    fn plans_follow_status_changes_and_subscriptions() {
        let mut task = Task::new(
            "a".parse().unwrap(),
            serde_json::json!({}),
            Source::default(),
        );
        let outbox = Outbox::new(HashMap::from([(
            task.agent.clone(),
            vec![
                EndpointPlan {
                    events: EventType::DEFAULT.into_iter().collect(),
                },
                EndpointPlan {
                    events: [EventType::Started].into_iter().collect(),
                },
            ],
        )]));
        assert!(
            outbox.plan(None, &task, 1).is_empty(),
            "PENDING has no event"
        );
        task.status = TaskStatus::Started;
        task.tick = 7;
        let started = outbox.plan(Some(TaskStatus::Pending), &task, 1);
        assert_eq!(started.len(), 1);
        assert_eq!(started[0].endpoint, 1);
        assert_eq!(started[0].webhook_id, format!("{}.task.started.7", task.id));
        assert!(outbox.plan(Some(TaskStatus::Started), &task, 1).is_empty());
        task.status = TaskStatus::Failure;
        let failed = outbox.plan(Some(TaskStatus::Started), &task, 1);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].endpoint, 0);
        assert_eq!(failed[0].event, EventType::Failed);
        let other = Task::new(
            "b".parse().unwrap(),
            serde_json::json!({}),
            Source::default(),
        );
        assert!(!outbox.wants(&other.agent));
    }

    #[test]
    fn every_status_but_pending_has_its_event() {
        let pairs = [
            (TaskStatus::Started, "task.started"),
            (TaskStatus::Retry, "task.retrying"),
            (TaskStatus::AwaitingInput, "task.awaiting_input"),
            (TaskStatus::Success, "task.succeeded"),
            (TaskStatus::Failure, "task.failed"),
            (TaskStatus::Revoked, "task.canceled"),
        ];
        for (status, name) in pairs {
            assert_eq!(EventType::for_status(status).unwrap().as_str(), name);
        }
        assert_eq!(EventType::for_status(TaskStatus::Pending), None);
    }

    #[test]
    fn event_names_round_trip() {
        for e in EventType::ALL {
            assert_eq!(e.as_str().parse::<EventType>().unwrap(), e);
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
        assert!("task.done".parse::<EventType>().is_err());
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn retry_after_seconds_only() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("999999999"), Some(MAX_RETRY_AFTER));
    }

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            Just(Outcome::Delivered),
            (proptest::option::of(0u64..100)).prop_map(|ra| Outcome::Failed {
                error: "500".into(),
                retry_after: ra.map(Duration::from_secs),
            }),
            Just(Outcome::Gone),
            Just(Outcome::Refused("private".into())),
        ]
    }

    proptest! {
        #[test]
        fn failures_dead_letter_after_exactly_the_schedule(
            schedule in proptest::collection::vec(1u64..10_000, 0..8),
            jitter in 0.0f64..1.0,
        ) {
            let schedule: Vec<Duration> = schedule.into_iter().map(Duration::from_millis).collect();
            let mut d = delivery();
            let mut now = 1000;
            for i in 0..=schedule.len() {
                prop_assert_eq!(d.status, DeliveryStatus::Pending);
                after_attempt(&mut d, Outcome::Failed { error: "x".into(), retry_after: None }, &schedule, now, jitter);
                if i < schedule.len() {
                    let due = d.next_attempt_at.unwrap();
                    let delay = due - now;
                    let nominal = schedule[i].as_millis() as u64;
                    // ±10 %, with 1 ms of rounding.
                    prop_assert!(delay * 10 + 10 >= nominal * 9 && delay * 10 <= nominal * 11 + 10);
                    now = due;
                }
            }
            prop_assert_eq!(d.status, DeliveryStatus::Failed);
            prop_assert_eq!(d.attempts as usize, schedule.len() + 1);
            prop_assert_eq!(d.next_attempt_at, None);
        }

        #[test]
        fn finished_deliveries_have_no_due_time_and_pending_ones_do(
            outcomes in proptest::collection::vec(outcome(), 1..20),
        ) {
            let schedule = vec![Duration::from_secs(1); 3];
            let mut d = delivery();
            for (i, o) in outcomes.into_iter().enumerate() {
                if d.status != DeliveryStatus::Pending { break; }
                let before = d.attempts;
                after_attempt(&mut d, o, &schedule, 1000 + i as u64, 0.5);
                prop_assert_eq!(d.attempts, before + 1);
                prop_assert_eq!(d.status == DeliveryStatus::Pending, d.next_attempt_at.is_some());
                prop_assert!(d.round_attempts as usize <= schedule.len() + 1);
            }
        }

        #[test]
        fn breaker_opens_after_ten_failures_and_admits_one_trial(
            results in proptest::collection::vec(any::<bool>(), 0..60),
        ) {
            let mut b = EndpointBreaker::default();
            let mut consecutive = 0u32;
            let mut now = 0u64;
            for ok in results {
                now += 1;
                if let Err(until) = b.admit(now) {
                    prop_assert!(until > now);
                    prop_assert!(until - now <= BREAKER_OPEN_MS);
                    now = until;
                    prop_assert!(b.admit(now).is_ok(), "one trial after the open period");
                }
                if b.is_open() {
                    prop_assert!(b.admit(now).is_err(), "only one trial at a time");
                }
                b.record(ok, now);
                if ok { consecutive = 0 } else { consecutive += 1 }
                prop_assert_eq!(b.is_open(), consecutive >= BREAKER_FAILURES);
            }
        }
    }
}
