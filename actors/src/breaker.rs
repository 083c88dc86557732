//! Per-agent circuit breakers. Without one, an agent whose runner is broken (or whose upstream
//! API is down) keeps accepting triggers that are stored durably only to fail one after another,
//! and a sender that retries makes the queue longer. The breaker turns triggers away with `503`
//! and `Retry-After` while the agent is failing, then lets exactly one trial tick through to find
//! out whether it has recovered.
//!
//! The decisions live in [`Breaker`], a plain state machine that is handed the time instead of
//! reading a clock, so every transition is tested without sleeping. [`BreakerActor`] owns one per
//! agent: it is the single place the HTTP edge asks before queueing and the agents report to after
//! every tick, so admissions and outcomes are seen in one order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use foldhash::HashMap;
use serde::Serialize;

use crate::events::TickOutcome;
use crate::model::AgentId;

/// The grace used when a constructor is not given one. A trial's outcome normally arrives within
/// one tick timeout of its admission (ticks are serialized, and any outcome after the admission
/// decides), so two default tick timeouts leave room for a slow store without wedging an agent
/// for long when an outcome is lost.
pub const DEFAULT_TRIAL_TIMEOUT: Duration = Duration::from_secs(120);

/// A zero `open_for` would tell refused callers to retry after zero seconds and let the breaker
/// flap on every trigger; the smallest effective value keeps `Retry-After` meaningful.
const MIN_OPEN_FOR: Duration = Duration::from_millis(1);

/// SPEC: triggers refused while the trial is in flight get `Retry-After: 1`.
const TRIAL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An agent's breaker thresholds, taken from its `breaker = { failures, open_for }` config so
/// that a flaky agent and a critical one can trip differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// How many failed ticks in a row mean the agent is broken rather than unlucky; 0 is
    /// treated as 1 so that a bad value cannot disable the breaker silently.
    pub failures: u32,
    /// How long triggers are refused before a trial is let through: the time the agent (or
    /// whatever it depends on) is given to recover. Raised to at least 1 ms.
    pub open_for: Duration,
}

/// The breaker's answer to a trigger, so the HTTP edge can queue, queue-and-report, or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed: queue the task as usual.
    Allowed,
    /// The breaker is half-open and this trigger is its one trial. Queue it; if it is not
    /// queued after all, send [`TrialAbandoned`] so that another trigger can be the trial.
    Trial,
    /// The agent is failing: answer `503` and queue nothing.
    Refused {
        /// When a retry could be admitted, never zero and never more than `open_for`; the HTTP
        /// edge rounds it up to whole seconds for `Retry-After`.
        retry_after: Duration,
    },
}

/// The state operators see in `/ready`, `/admin/agents` and metrics. It serializes as
/// `"closed"`, `"open"` or `"half_open"`, which are part of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// The agent works: triggers are queued.
    Closed,
    /// The agent failed repeatedly: triggers are refused until `open_for` has passed.
    Open,
    /// `open_for` has passed: one trial is let through and its outcome decides.
    HalfOpen,
}

impl BreakerState {
    /// The API name, for log fields and metric labels that should not go through serde.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Open and half-open are stored as the instants they started from rather than as deadlines, so
/// no `Instant + Duration` can overflow whatever the configured durations are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open { since: Instant },
    HalfOpen { trial: Option<Instant> },
}

/// One agent's breaker as a pure state machine: no clock, no actor, no I/O, so the rules of the
/// product (when to open, when to admit a trial, which outcomes count) can be checked
/// exhaustively and reused by any front end.
#[derive(Debug, Clone)]
pub struct Breaker {
    failures_to_open: u32,
    open_for: Duration,
    trial_timeout: Duration,
    phase: Phase,
    consecutive_failures: u32,
}

impl Breaker {
    /// A closed breaker whose lost trials stop blocking after [`DEFAULT_TRIAL_TIMEOUT`] beyond
    /// `open_for`.
    pub fn new(policy: BreakerPolicy) -> Self {
        Self::with_trial_timeout(policy, DEFAULT_TRIAL_TIMEOUT)
    }

    /// A closed breaker whose trial, if no outcome arrives for `open_for + trial_timeout` after
    /// its admission, no longer blocks the next one: an outcome lost to a crash or a shutdown
    /// must not wedge the agent in half-open for ever.
    pub fn with_trial_timeout(policy: BreakerPolicy, trial_timeout: Duration) -> Self {
        Self {
            failures_to_open: policy.failures.max(1),
            open_for: policy.open_for.max(MIN_OPEN_FOR),
            trial_timeout,
            phase: Phase::Closed,
            consecutive_failures: 0,
        }
    }

    /// Decides whether a trigger may be queued. Admitting a trial changes the state (the next
    /// trigger is refused), so this is called once per trigger, just before queueing it.
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.settle(now);
        match self.phase {
            Phase::Closed => Admission::Allowed,
            Phase::Open { since } => Admission::Refused {
                retry_after: self
                    .open_for
                    .saturating_sub(now.saturating_duration_since(since)),
            },
            Phase::HalfOpen { trial: Some(at) } if !self.trial_expired(at, now) => {
                Admission::Refused {
                    retry_after: TRIAL_RETRY_AFTER.min(self.open_for),
                }
            }
            Phase::HalfOpen { .. } => {
                self.phase = Phase::HalfOpen { trial: Some(now) };
                Admission::Trial
            }
        }
    }

    /// Takes a finished tick into account. Outcomes arriving while open, or while half-open
    /// before a trial was admitted, belong to tasks accepted before the breaker opened and say
    /// nothing new, so they are ignored; in half-open the first outcome after the trial's
    /// admission decides.
    pub fn record(&mut self, success: bool, now: Instant) {
        self.settle(now);
        match self.phase {
            Phase::Open { .. } | Phase::HalfOpen { trial: None } => {}
            Phase::Closed | Phase::HalfOpen { trial: Some(_) } if success => {
                self.phase = Phase::Closed;
                self.consecutive_failures = 0;
            }
            Phase::Closed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if self.consecutive_failures >= self.failures_to_open {
                    self.phase = Phase::Open { since: now };
                }
            }
            Phase::HalfOpen { trial: Some(_) } => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.phase = Phase::Open { since: now };
            }
        }
    }

    /// Frees the trial slot when the admitted trial was not queued after all (a duplicate, a
    /// store error, a full mailbox): no outcome will come for it, and the next trigger should
    /// become the trial instead of waiting for the trial timeout.
    pub fn trial_abandoned(&mut self) {
        if let Phase::HalfOpen { trial: Some(_) } = self.phase {
            self.phase = Phase::HalfOpen { trial: None };
        }
    }

    /// Closes the breaker at once, for an operator who knows the cause is fixed and does not
    /// want to wait for `open_for` and a trial.
    pub fn reset(&mut self) {
        self.phase = Phase::Closed;
        self.consecutive_failures = 0;
    }

    /// The state as of `now`: an open breaker becomes half-open by the passage of time alone,
    /// so listings must say which instant they describe.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { since } if !self.open_expired(since, now) => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Failed ticks in a row that the breaker counted, for logs and operators judging how
    /// broken an agent is; outcomes the breaker ignored are not included.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    fn settle(&mut self, now: Instant) {
        if let Phase::Open { since } = self.phase {
            if self.open_expired(since, now) {
                self.phase = Phase::HalfOpen { trial: None };
            }
        }
    }

    fn open_expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.open_for
    }

    fn trial_expired(&self, admitted: Instant, now: Instant) -> bool {
        now.saturating_duration_since(admitted) >= self.open_for.saturating_add(self.trial_timeout)
    }

    fn trial_in_flight(&self) -> bool {
        matches!(self.phase, Phase::HalfOpen { trial: Some(_) })
    }
}

/// Which agents' breakers are closed, readable by every HTTP worker without a message. A closed
/// breaker admits every trigger and admitting changes nothing, so the edge only needs to ask the
/// actor when a breaker is open or half-open: the common case costs an atomic load instead of
/// a round trip through one actor. The actor is the only writer.
#[derive(Debug, Default)]
pub struct ClosedBreakers(HashMap<AgentId, AtomicBool>);

impl ClosedBreakers {
    /// Whether the agent's breaker was closed as of the actor's last decision. Agents without a
    /// breaker count as closed.
    pub fn is_closed(&self, agent: &AgentId) -> bool {
        self.0
            .get(agent)
            .is_none_or(|closed| closed.load(Ordering::Acquire))
    }

    fn set(&self, agent: &AgentId, closed: bool) {
        if let Some(flag) = self.0.get(agent) {
            flag.store(closed, Ordering::Release);
        }
    }
}

/// Owns every agent's [`Breaker`] so that admissions from many HTTP workers and outcomes from
/// agents on many arbiters are applied in one order, without locks.
pub struct BreakerActor {
    breakers: HashMap<AgentId, Breaker>,
    closed: Arc<ClosedBreakers>,
}

impl BreakerActor {
    /// Breakers for the configured agents, with [`DEFAULT_TRIAL_TIMEOUT`] as the trial grace.
    pub fn new(agents: Vec<(AgentId, BreakerPolicy)>) -> Self {
        Self::with_trial_timeout(agents, DEFAULT_TRIAL_TIMEOUT)
    }

    /// Breakers for the configured agents; a trial without an outcome for `open_for +
    /// trial_timeout` stops blocking the next one. Pass at least the longest tick timeout, since
    /// an outcome cannot arrive sooner than the tick running at admission finishes.
    pub fn with_trial_timeout(
        agents: Vec<(AgentId, BreakerPolicy)>,
        trial_timeout: Duration,
    ) -> Self {
        let closed = ClosedBreakers(
            agents
                .iter()
                .map(|(id, _)| (id.clone(), AtomicBool::new(true)))
                .collect(),
        );
        Self {
            breakers: agents
                .into_iter()
                .map(|(id, policy)| (id, Breaker::with_trial_timeout(policy, trial_timeout)))
                .collect(),
            closed: Arc::new(closed),
        }
    }

    /// The lock-free view of which breakers are closed, kept current by this actor.
    pub fn closed(&self) -> Arc<ClosedBreakers> {
        self.closed.clone()
    }
}

impl Actor for BreakerActor {
    type Context = Context<Self>;
}

/// Asks whether a trigger for the agent may be queued. Agents without a breaker (not
/// configured here) are always allowed, so a missing entry can never block traffic.
#[derive(Message, Debug, Clone)]
#[rtype(result = "Admission")]
pub struct Admit(pub AgentId);

/// Reports that the trigger admitted as the agent's trial was not queued, so that the next
/// trigger can be the trial.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TrialAbandoned(pub AgentId);

/// Closes the agent's breaker (the admin endpoint). Answers `false` when the agent has no
/// breaker, so the caller can answer `404`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "bool")]
pub struct Reset(pub AgentId);

/// Every agent's breaker state as of now, for `/ready`, admin listings and metrics.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "BTreeMap<AgentId, BreakerState>")]
pub struct Snapshot;

impl Handler<Admit> for BreakerActor {
    type Result = MessageResult<Admit>;

    fn handle(&mut self, Admit(id): Admit, _ctx: &mut Self::Context) -> Self::Result {
        let Some(breaker) = self.breakers.get_mut(&id) else {
            return MessageResult(Admission::Allowed);
        };
        let now = Instant::now();
        let replaces_lost_trial = breaker.trial_in_flight();
        let admission = breaker.admit(now);
        if admission == Admission::Trial {
            if replaces_lost_trial {
                tracing::warn!(agent = %id, "breaker trial got no outcome in time; admitting another trial");
            } else {
                tracing::info!(agent = %id, "breaker half-open; admitting a trial tick");
            }
        }
        MessageResult(admission)
    }
}

impl Handler<TickOutcome> for BreakerActor {
    type Result = ();

    fn handle(&mut self, outcome: TickOutcome, _ctx: &mut Self::Context) {
        let Some(breaker) = self.breakers.get_mut(&outcome.agent) else {
            return;
        };
        let now = Instant::now();
        let before = breaker.state(now);
        breaker.record(outcome.success, now);
        let after = breaker.state(now);
        self.closed
            .set(&outcome.agent, after == BreakerState::Closed);
        let id = &outcome.agent;
        let failures = breaker.consecutive_failures();
        match (before, after) {
            (BreakerState::Closed, BreakerState::Open) => {
                tracing::warn!(agent = %id, failures, task_id = %outcome.task_id, "breaker opened");
            }
            (BreakerState::HalfOpen, BreakerState::Open) => {
                tracing::warn!(agent = %id, failures, task_id = %outcome.task_id, "breaker trial failed; breaker opened again");
            }
            (BreakerState::HalfOpen, BreakerState::Closed) => {
                tracing::info!(agent = %id, task_id = %outcome.task_id, "breaker trial succeeded; breaker closed");
            }
            _ => {}
        }
    }
}

impl Handler<TrialAbandoned> for BreakerActor {
    type Result = ();

    fn handle(&mut self, TrialAbandoned(id): TrialAbandoned, _ctx: &mut Self::Context) {
        if let Some(breaker) = self.breakers.get_mut(&id) {
            if breaker.trial_in_flight() {
                tracing::debug!(agent = %id, "breaker trial was not queued; the next trigger may be the trial");
            }
            breaker.trial_abandoned();
        }
    }
}

impl Handler<Reset> for BreakerActor {
    type Result = bool;

    fn handle(&mut self, Reset(id): Reset, _ctx: &mut Self::Context) -> bool {
        let Some(breaker) = self.breakers.get_mut(&id) else {
            return false;
        };
        let before = breaker.state(Instant::now());
        breaker.reset();
        self.closed.set(&id, true);
        if before != BreakerState::Closed {
            tracing::info!(agent = %id, from = before.as_str(), "breaker closed by reset");
        }
        true
    }
}

impl Handler<Snapshot> for BreakerActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        MessageResult(
            self.breakers
                .iter()
                .map(|(id, breaker)| (id.clone(), breaker.state(now)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn policy(failures: u32, open_for: Duration) -> BreakerPolicy {
        BreakerPolicy { failures, open_for }
    }

    /// A breaker with failures = 3, open_for = 30 s, grace = 60 s, opened at the returned instant.
    fn opened() -> (Breaker, Instant) {
        let mut b = Breaker::with_trial_timeout(policy(3, 30 * SEC), 60 * SEC);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(false, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Open);
        (b, t0)
    }

    /// `opened()`, moved past `open_for` with a trial admitted at the returned instant.
    fn trial_in_flight() -> (Breaker, Instant) {
        let (mut b, t0) = opened();
        let t = t0 + 30 * SEC;
        assert_eq!(b.admit(t), Admission::Trial);
        (b, t)
    }

    #[test]
    fn closed_breaker_allows_and_a_success_resets_the_count() {
        let mut b = Breaker::new(policy(3, 30 * SEC));
        let t = Instant::now();
        b.record(false, t);
        b.record(false, t);
        assert_eq!(b.consecutive_failures(), 2);
        b.record(true, t);
        assert_eq!(b.consecutive_failures(), 0);
        b.record(false, t);
        b.record(false, t);
        assert_eq!(b.state(t), BreakerState::Closed);
        assert_eq!(b.admit(t), Admission::Allowed);
    }

    #[test]
    fn consecutive_failures_open_it_and_refusals_count_down() {
        let (mut b, t0) = opened();
        assert_eq!(b.consecutive_failures(), 3);
        assert_eq!(
            b.admit(t0),
            Admission::Refused {
                retry_after: 30 * SEC
            }
        );
        assert_eq!(
            b.admit(t0 + 10 * SEC),
            Admission::Refused {
                retry_after: 20 * SEC
            }
        );
        assert_eq!(b.state(t0 + 10 * SEC), BreakerState::Open);
    }

    #[test]
    fn outcomes_while_open_are_ignored() {
        let (mut b, t0) = opened();
        b.record(true, t0 + SEC);
        b.record(false, t0 + 2 * SEC);
        assert_eq!(b.state(t0 + 3 * SEC), BreakerState::Open);
        assert_eq!(b.consecutive_failures(), 3);
        assert_eq!(
            b.admit(t0 + 3 * SEC),
            Admission::Refused {
                retry_after: 27 * SEC
            }
        );
    }

    #[test]
    fn after_open_for_exactly_one_trial_is_admitted() {
        let (mut b, t0) = opened();
        let t = t0 + 30 * SEC;
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        assert_eq!(b.admit(t), Admission::Trial);
        assert_eq!(b.admit(t), Admission::Refused { retry_after: SEC });
        assert_eq!(
            b.admit(t + 10 * SEC),
            Admission::Refused { retry_after: SEC }
        );
        assert_eq!(b.state(t + 10 * SEC), BreakerState::HalfOpen);
    }

    #[test]
    fn successful_trial_closes_it() {
        let (mut b, t) = trial_in_flight();
        b.record(true, t + SEC);
        assert_eq!(b.state(t + SEC), BreakerState::Closed);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.admit(t + SEC), Admission::Allowed);
    }

    #[test]
    fn failed_trial_opens_it_for_another_open_for() {
        let (mut b, t) = trial_in_flight();
        b.record(false, t + 5 * SEC);
        assert_eq!(b.state(t + 5 * SEC), BreakerState::Open);
        assert_eq!(b.consecutive_failures(), 4);
        assert_eq!(
            b.admit(t + 5 * SEC),
            Admission::Refused {
                retry_after: 30 * SEC
            }
        );
        assert_eq!(b.admit(t + 35 * SEC), Admission::Trial);
    }

    #[test]
    fn half_open_ignores_outcomes_until_a_trial_is_admitted() {
        let (mut b, t0) = opened();
        let t = t0 + 31 * SEC;
        b.record(false, t);
        b.record(true, t);
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        assert_eq!(b.admit(t), Admission::Trial);
    }

    #[test]
    fn first_outcome_after_the_trial_decides_even_if_it_is_an_older_task() {
        let (mut b, t) = trial_in_flight();
        b.record(false, t + SEC);
        assert_eq!(b.state(t + SEC), BreakerState::Open);
        b.record(true, t + 2 * SEC);
        assert_eq!(b.state(t + 2 * SEC), BreakerState::Open);
    }

    #[test]
    fn abandoned_trial_lets_the_next_trigger_be_the_trial() {
        let (mut b, t) = trial_in_flight();
        b.trial_abandoned();
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        b.record(false, t);
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        assert_eq!(b.admit(t), Admission::Trial);
        assert_eq!(b.admit(t), Admission::Refused { retry_after: SEC });
    }

    #[test]
    fn a_trial_without_outcome_stops_blocking_after_open_for_plus_grace() {
        let (mut b, t) = trial_in_flight();
        let expiry = t + 30 * SEC + 60 * SEC;
        assert_eq!(
            b.admit(expiry - Duration::from_millis(1)),
            Admission::Refused { retry_after: SEC }
        );
        assert_eq!(b.admit(expiry), Admission::Trial);
        assert_eq!(b.admit(expiry), Admission::Refused { retry_after: SEC });
    }

    #[test]
    fn reset_closes_from_every_state() {
        let (mut open, t0) = opened();
        open.reset();
        assert_eq!(open.state(t0), BreakerState::Closed);
        assert_eq!(open.consecutive_failures(), 0);
        assert_eq!(open.admit(t0), Admission::Allowed);

        let (mut half_open, t) = trial_in_flight();
        half_open.reset();
        assert_eq!(half_open.admit(t), Admission::Allowed);
        half_open.record(false, t);
        assert_eq!(half_open.state(t), BreakerState::Closed);
    }

    #[test]
    fn zero_thresholds_are_raised_to_the_smallest_useful_ones() {
        let mut b = Breaker::new(policy(0, Duration::ZERO));
        let t = Instant::now();
        b.record(false, t);
        assert_eq!(b.state(t), BreakerState::Open);
        assert_eq!(
            b.admit(t),
            Admission::Refused {
                retry_after: MIN_OPEN_FOR
            }
        );
        assert_eq!(b.admit(t + MIN_OPEN_FOR), Admission::Trial);
    }

    #[test]
    fn short_open_for_caps_the_half_open_retry_after() {
        let open_for = Duration::from_millis(50);
        let mut b = Breaker::new(policy(1, open_for));
        let t = Instant::now();
        b.record(false, t);
        assert_eq!(b.admit(t + open_for), Admission::Trial);
        assert_eq!(
            b.admit(t + open_for),
            Admission::Refused {
                retry_after: open_for
            }
        );
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let mut b = Breaker::with_trial_timeout(policy(1, Duration::MAX), Duration::MAX);
        let t = Instant::now();
        b.record(false, t);
        assert_eq!(
            b.admit(t + SEC),
            Admission::Refused {
                retry_after: Duration::MAX - SEC
            }
        );
        assert_eq!(b.state(t + SEC), BreakerState::Open);
    }

    #[test]
    fn state_names_are_the_api_names() {
        for (state, name) in [
            (BreakerState::Closed, "closed"),
            (BreakerState::Open, "open"),
            (BreakerState::HalfOpen, "half_open"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.as_str(), name);
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Admit,
            Record(bool),
            Abandon,
            Reset,
            Advance(Duration),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Admit),
                4 => any::<bool>().prop_map(Op::Record),
                1 => Just(Op::Abandon),
                1 => Just(Op::Reset),
                3 => (0u64..3_000).prop_map(|ms| Op::Advance(Duration::from_millis(ms))),
            ]
        }

        fn duration() -> impl Strategy<Value = Duration> {
            prop_oneof![
                1 => Just(Duration::ZERO),
                1 => Just(Duration::MAX),
                8 => (1u64..2_000).prop_map(Duration::from_millis),
            ]
        }

        /// What the rules say must be true, tracked from the outside: only the public API of
        /// the breaker is consulted.
        struct Expected {
            failures: u32,
            open_for: Duration,
            grace: Duration,
            closed_streak: u32,
            trial: Option<Instant>,
            reset_since_last_record: bool,
        }

        impl Expected {
            fn trial_blocks(&self, now: Instant) -> bool {
                self.trial.is_some_and(|at| {
                    now.saturating_duration_since(at) < self.open_for.saturating_add(self.grace)
                })
            }
        }

        fn check(failures: u32, open_for: Duration, grace: Duration, ops: &[Op]) {
            let mut b = Breaker::with_trial_timeout(policy(failures, open_for), grace);
            let mut x = Expected {
                failures: failures.max(1),
                open_for: open_for.max(MIN_OPEN_FOR),
                grace,
                closed_streak: 0,
                trial: None,
                reset_since_last_record: false,
            };
            let mut now = Instant::now();
            for op in ops {
                let before = b.state(now);
                let untouched = b.clone();
                match op {
                    Op::Admit => {
                        let admission = b.admit(now);
                        match admission {
                            Admission::Allowed => assert_eq!(before, BreakerState::Closed),
                            Admission::Trial => {
                                assert_eq!(before, BreakerState::HalfOpen);
                                assert!(!x.trial_blocks(now), "second trial while one in flight");
                                x.trial = Some(now);
                            }
                            Admission::Refused { retry_after } => {
                                assert!(
                                    before == BreakerState::Open
                                        || (before == BreakerState::HalfOpen
                                            && x.trial_blocks(now)),
                                    "refused in {before:?} without a trial in flight"
                                );
                                assert!(!retry_after.is_zero());
                                assert!(retry_after <= x.open_for);
                            }
                        }
                        if x.reset_since_last_record {
                            assert_eq!(admission, Admission::Allowed);
                        }
                        if before == BreakerState::Open {
                            assert!(matches!(admission, Admission::Refused { .. }));
                        }
                        if before == BreakerState::HalfOpen && !x.trial_blocks(now) {
                            assert!(x.trial == Some(now));
                        }
                    }
                    Op::Record(success) => {
                        b.record(*success, now);
                        let after = b.state(now);
                        x.reset_since_last_record = false;
                        match before {
                            BreakerState::Closed if *success => {
                                x.closed_streak = 0;
                                assert_eq!(after, BreakerState::Closed);
                            }
                            BreakerState::Closed => {
                                x.closed_streak += 1;
                                if x.closed_streak >= x.failures {
                                    assert_eq!(after, BreakerState::Open);
                                    x.closed_streak = 0;
                                } else {
                                    assert_eq!(after, BreakerState::Closed);
                                }
                            }
                            BreakerState::HalfOpen if x.trial.is_some() => {
                                x.trial = None;
                                if *success {
                                    assert_eq!(after, BreakerState::Closed);
                                    x.closed_streak = 0;
                                } else {
                                    assert_eq!(after, BreakerState::Open);
                                }
                            }
                            BreakerState::Open | BreakerState::HalfOpen => {
                                assert_eq!(after, before, "ignored outcome changed the state");
                                assert_eq!(
                                    b.consecutive_failures(),
                                    untouched.consecutive_failures()
                                );
                                assert_eq!(b.clone().admit(now), untouched.clone().admit(now));
                            }
                        }
                    }
                    Op::Abandon => {
                        b.trial_abandoned();
                        if before == BreakerState::HalfOpen {
                            x.trial = None;
                        }
                        assert_eq!(b.state(now), before);
                    }
                    Op::Reset => {
                        b.reset();
                        x.closed_streak = 0;
                        x.trial = None;
                        x.reset_since_last_record = true;
                        assert_eq!(b.state(now), BreakerState::Closed);
                        assert_eq!(b.clone().admit(now), Admission::Allowed);
                    }
                    Op::Advance(d) => {
                        now += *d;
                        let after = b.state(now);
                        let by_time_alone = after == before
                            || (before == BreakerState::Open && after == BreakerState::HalfOpen);
                        assert!(by_time_alone, "{before:?} became {after:?} as time passed");
                    }
                }
                let after = b.state(now);
                if after == BreakerState::Open && before != BreakerState::Open {
                    assert!(matches!(op, Op::Record(false)), "{op:?} opened the breaker");
                }
                if after == BreakerState::Closed {
                    assert_eq!(b.consecutive_failures(), x.closed_streak);
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn rules_hold_for_any_sequence(
                failures in 0u32..6,
                open_for in duration(),
                grace in duration(),
                ops in prop::collection::vec(op(), 0..200),
            ) {
                check(failures, open_for, grace, &ops);
            }
        }
    }

    mod actor {
        use super::*;
        use crate::model::TaskId;

        const OPEN_FOR: Duration = Duration::from_millis(50);

        fn agent(name: &str) -> AgentId {
            AgentId::new("test", name).unwrap()
        }

        fn start(failures: u32) -> Addr<BreakerActor> {
            BreakerActor::new(vec![
                (agent("flaky"), policy(failures, OPEN_FOR)),
                (agent("steady"), policy(failures, OPEN_FOR)),
            ])
            .start()
        }

        async fn tick(addr: &Addr<BreakerActor>, name: &str, success: bool) {
            addr.send(TickOutcome {
                agent: agent(name),
                task_id: TaskId::random(),
                success,
                duration: Duration::from_millis(3),
            })
            .await
            .unwrap();
        }

        async fn admit(addr: &Addr<BreakerActor>, name: &str) -> Admission {
            addr.send(Admit(agent(name))).await.unwrap()
        }

        /// Polls until the breaker admits a trial, failing after 5 s.
        async fn wait_for_trial(addr: &Addr<BreakerActor>, name: &str) {
            let deadline = Instant::now() + 5 * SEC;
            loop {
                match admit(addr, name).await {
                    Admission::Trial => return,
                    Admission::Refused { retry_after } => {
                        assert!(Instant::now() < deadline, "no trial admitted within 5 s");
                        actix_rt::time::sleep(retry_after.min(Duration::from_millis(10))).await;
                    }
                    Admission::Allowed => panic!("breaker closed while waiting for a trial"),
                }
            }
        }

        async fn states(addr: &Addr<BreakerActor>) -> BTreeMap<AgentId, BreakerState> {
            addr.send(Snapshot).await.unwrap()
        }

        #[actix_rt::test]
        async fn failures_open_it_then_a_successful_trial_closes_it() {
            let addr = start(3);
            for _ in 0..3 {
                assert_eq!(admit(&addr, "flaky").await, Admission::Allowed);
                tick(&addr, "flaky", false).await;
            }
            assert!(matches!(
                admit(&addr, "flaky").await,
                Admission::Refused { retry_after } if !retry_after.is_zero() && retry_after <= OPEN_FOR
            ));
            assert_eq!(admit(&addr, "steady").await, Admission::Allowed);

            wait_for_trial(&addr, "flaky").await;
            assert!(matches!(
                admit(&addr, "flaky").await,
                Admission::Refused { .. }
            ));
            assert_eq!(
                states(&addr).await.get(&agent("flaky")),
                Some(&BreakerState::HalfOpen)
            );

            tick(&addr, "flaky", true).await;
            assert_eq!(admit(&addr, "flaky").await, Admission::Allowed);
            assert_eq!(
                states(&addr).await.get(&agent("flaky")),
                Some(&BreakerState::Closed)
            );
        }

        #[actix_rt::test]
        async fn failed_trial_opens_it_again() {
            let addr = start(1);
            tick(&addr, "flaky", false).await;
            wait_for_trial(&addr, "flaky").await;
            tick(&addr, "flaky", false).await;
            assert_eq!(
                states(&addr).await.get(&agent("flaky")),
                Some(&BreakerState::Open)
            );
            assert!(matches!(
                admit(&addr, "flaky").await,
                Admission::Refused { .. }
            ));
        }

        #[actix_rt::test]
        async fn abandoned_trial_lets_another_trigger_be_the_trial() {
            let addr = start(1);
            tick(&addr, "flaky", false).await;
            wait_for_trial(&addr, "flaky").await;
            addr.send(TrialAbandoned(agent("flaky"))).await.unwrap();
            assert_eq!(admit(&addr, "flaky").await, Admission::Trial);
        }

        #[actix_rt::test]
        async fn reset_closes_known_agents_and_reports_unknown_ones() {
            let addr = start(1);
            tick(&addr, "flaky", false).await;
            assert_eq!(
                states(&addr).await,
                BTreeMap::from([
                    (agent("flaky"), BreakerState::Open),
                    (agent("steady"), BreakerState::Closed),
                ])
            );
            assert!(addr.send(Reset(agent("flaky"))).await.unwrap());
            assert_eq!(admit(&addr, "flaky").await, Admission::Allowed);
            assert!(!addr.send(Reset(agent("ghost"))).await.unwrap());
        }

        #[actix_rt::test]
        async fn agents_without_a_breaker_are_always_allowed() {
            let addr = start(1);
            tick(&addr, "ghost", false).await;
            addr.send(TrialAbandoned(agent("ghost"))).await.unwrap();
            assert_eq!(admit(&addr, "ghost").await, Admission::Allowed);
            assert!(!states(&addr).await.contains_key(&agent("ghost")));
        }
    }
}
