//! Prometheus metrics. Counters and histograms are updated where things happen (the access log,
//! tick outcomes, store flushes); gauges that describe current state (queue depth, breaker
//! state) are read at scrape time, so they can never drift from the truth.

use actix::prelude::*;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tickgate_actors::agent::TickOutcome;

/// Every tickgate metric; names all start with `tickgate_`.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    ticks: IntCounterVec,
    tick_seconds: HistogramVec,
    flush_seconds: HistogramVec,
    fsyncs: IntCounter,
    unreadable: IntCounter,
    /// Tasks waiting or running per agent, set at scrape time.
    pub queued: IntGaugeVec,
    /// 0 closed, 1 half-open, 2 open, per agent, set at scrape time.
    pub breaker: IntGaugeVec,
    /// Bytes held by request bodies still being received (slow senders show up here).
    pub inflight_body_bytes: IntGauge,
    schedule_skipped: IntCounterVec,
    /// Retries scheduled per agent; brought up to the agents' own counts at scrape time.
    retries: IntCounterVec,
    /// Serialises the retry catch-up, so two concurrent scrapes cannot both add the same count.
    retries_catch_up: std::sync::Mutex<()>,
    /// Runner stderr bytes read but not logged (over the per-tick log limit); brought up to the
    /// runners' own counter at scrape time.
    stderr_dropped: IntCounter,
    /// Serialises that catch-up, so two concurrent scrapes cannot both add the same bytes.
    stderr_catch_up: std::sync::Mutex<()>,
    /// Status callbacks.
    pub notify: NotifyMetrics,
    /// Queue triggers.
    pub queue: QueueMetrics,
}

/// Queue trigger metrics (SPEC section 11); labels are the agent and an outcome, never a subject
/// or payload.
pub struct QueueMetrics {
    /// Messages handled by agent and outcome: `task` (a new task), `duplicate` (its key named an
    /// existing task), `deferred` (refused for now and redelivered later), `not_json` and
    /// `invalid` (terminated: no task, never redelivered), `conflict` (its key named a task with
    /// another body; terminated).
    pub messages: IntCounterVec,
    /// Finished task records for `reply_subject` by agent and outcome: `published`, or `dropped`
    /// (the in-memory queue of results overflowed or the task feed lagged).
    pub results: IntCounterVec,
}

impl QueueMetrics {
    fn new(registry: &Registry) -> Self {
        let messages = IntCounterVec::new(
            Opts::new(
                "tickgate_queue_messages_total",
                "Queue trigger messages handled, by agent and outcome",
            ),
            &["agent", "outcome"],
        )
        .expect("metric definition");
        let results = IntCounterVec::new(
            Opts::new(
                "tickgate_queue_results_total",
                "Finished task records for reply subjects, by agent and outcome",
            ),
            &["agent", "outcome"],
        )
        .expect("metric definition");
        for m in [messages.clone(), results.clone()] {
            registry.register(Box::new(m)).expect("unique metric names");
        }
        Self { messages, results }
    }

    /// Counts one handled message.
    pub fn message(&self, agent: &str, outcome: &str) {
        self.messages.with_label_values(&[agent, outcome]).inc();
    }

    /// Counts `n` finished task records published or dropped.
    pub fn results(&self, agent: &str, outcome: &str, n: u64) {
        self.results.with_label_values(&[agent, outcome]).inc_by(n);
    }
}

/// Status callback metrics (SPEC section 9); labels are the agent and the endpoint's index, never
/// its URL (which may carry credentials) or anything from its secret.
pub struct NotifyMetrics {
    /// Attempts by agent, endpoint index and outcome (`delivered`, `failed`, `gone`, `refused`).
    pub deliveries: IntCounterVec,
    /// Time from sending a callback to its answer.
    pub latency: HistogramVec,
    /// Deliveries the worker holds that are not finished yet.
    pub outbox_depth: IntGauge,
    /// Endpoints disabled by a 410 and not re-enabled.
    pub disabled_endpoints: IntGauge,
}

impl NotifyMetrics {
    fn new(registry: &Registry) -> Self {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "tickgate_notify_deliveries_total",
                "Status callback attempts by agent, endpoint index and outcome",
            ),
            &["agent", "endpoint", "outcome"],
        )
        .expect("metric definition");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tickgate_notify_delivery_seconds",
                "Time from sending a status callback to its answer",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0]),
            &["agent", "endpoint"],
        )
        .expect("metric definition");
        let outbox_depth = IntGauge::new(
            "tickgate_notify_outbox_depth",
            "Status callback deliveries not finished yet",
        )
        .expect("metric definition");
        let disabled_endpoints = IntGauge::new(
            "tickgate_notify_disabled_endpoints",
            "Callback endpoints disabled by a 410 Gone",
        )
        .expect("metric definition");
        for m in [
            Box::new(deliveries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(outbox_depth.clone()),
            Box::new(disabled_endpoints.clone()),
        ] {
            registry.register(m).expect("unique metric names");
        }
        Self {
            deliveries,
            latency,
            outbox_depth,
            disabled_endpoints,
        }
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tickgate_http_requests_total",
                "HTTP requests by agent and status code",
            ),
            &["agent", "code"],
        )
        .expect("metric definition");
        let ticks = IntCounterVec::new(
            Opts::new("tickgate_ticks_total", "Ticks by agent and outcome"),
            &["agent", "outcome"],
        )
        .expect("metric definition");
        let tick_seconds = HistogramVec::new(
            HistogramOpts::new("tickgate_tick_duration_seconds", "Runner time per tick").buckets(
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0],
            ),
            &["agent"],
        )
        .expect("metric definition");
        let flush_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tickgate_store_flush_duration_seconds",
                "Time of one group commit (apply + flush) in the store writer",
            )
            .buckets(vec![
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
            ]),
            &[],
        )
        .expect("metric definition");
        let fsyncs = IntCounter::new(
            "tickgate_store_fsync_total",
            "fdatasync calls on the store: every group commit with [store] sync = \"fsync\", at most every 50 ms with \"flush\"",
        )
        .expect("metric definition");
        let unreadable = IntCounter::new(
            "tickgate_store_unreadable_records_total",
            "Distinct stored records found undecodable since start (each is logged with its key)",
        )
        .expect("metric definition");
        let queued = IntGaugeVec::new(
            Opts::new("tickgate_queue_depth", "Tasks waiting or running per agent"),
            &["agent"],
        )
        .expect("metric definition");
        let breaker = IntGaugeVec::new(
            Opts::new(
                "tickgate_breaker_state",
                "Circuit breaker state per agent: 0 closed, 1 half-open, 2 open",
            ),
            &["agent"],
        )
        .expect("metric definition");
        let inflight_body_bytes = IntGauge::new(
            "tickgate_inflight_body_bytes",
            "Bytes held by request bodies still being received",
        )
        .expect("metric definition");
        let schedule_skipped = IntCounterVec::new(
            Opts::new(
                "tickgate_schedule_skipped_total",
                "Schedule slots that created no task, by agent and reason",
            ),
            &["agent", "reason"],
        )
        .expect("metric definition");
        registry
            .register(Box::new(schedule_skipped.clone()))
            .expect("unique metric names");
        let retries = IntCounterVec::new(
            Opts::new(
                "tickgate_task_retries_total",
                "Failed attempts that were given a retry (task parked in RETRY), by agent",
            ),
            &["agent"],
        )
        .expect("metric definition");
        registry
            .register(Box::new(retries.clone()))
            .expect("unique metric names");
        let stderr_dropped = IntCounter::new(
            "tickgate_runner_stderr_dropped_bytes_total",
            "Runner stderr bytes not logged because a tick exceeded its stderr log limit",
        )
        .expect("metric definition");
        registry
            .register(Box::new(stderr_dropped.clone()))
            .expect("unique metric names");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ticks.clone()),
            Box::new(tick_seconds.clone()),
            Box::new(flush_seconds.clone()),
            Box::new(fsyncs.clone()),
            Box::new(unreadable.clone()),
            Box::new(queued.clone()),
            Box::new(breaker.clone()),
            Box::new(inflight_body_bytes.clone()),
        ] {
            registry.register(m).expect("unique metric names");
        }
        let notify = NotifyMetrics::new(&registry);
        let queue = QueueMetrics::new(&registry);
        Self {
            registry,
            requests,
            ticks,
            tick_seconds,
            flush_seconds,
            fsyncs,
            unreadable,
            queued,
            breaker,
            inflight_body_bytes,
            schedule_skipped,
            retries,
            retries_catch_up: std::sync::Mutex::new(()),
            stderr_dropped,
            stderr_catch_up: std::sync::Mutex::new(()),
            notify,
            queue,
        }
    }

    /// Counts a schedule slot that was skipped (`mailbox_full`, `breaker_open`, `store`, ...).
    pub fn schedule_skipped(&self, agent: &str, reason: &str) {
        self.schedule_skipped
            .with_label_values(&[agent, reason])
            .inc();
    }

    /// Counts one HTTP request; `agent` is "none" when no agent was resolved.
    pub fn request(&self, agent: &str, code: u16) {
        self.requests
            .with_label_values(&[agent, code_label(code)])
            .inc();
    }

    /// Records one store group commit.
    pub fn flush(&self, seconds: f64) {
        self.flush_seconds
            .with_label_values(&[] as &[&str])
            .observe(seconds);
    }

    /// Stored records found undecodable since start; shown in the `/ready` body.
    pub fn unreadable_records(&self) -> u64 {
        self.unreadable.get()
    }

    /// Brings an agent's retry counter up to `total`, the count the agent keeps itself (read at
    /// scrape time, so the agents need no handle on the metrics).
    pub fn retries_seen(&self, agent: &str, total: u64) {
        let _one_at_a_time = self
            .retries_catch_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let counter = self.retries.with_label_values(&[agent]);
        counter.inc_by(total.saturating_sub(counter.get()));
    }

    /// Records a finished tick.
    pub fn tick(&self, outcome: &TickOutcome) {
        let agent = outcome.agent.to_string();
        let result = if outcome.success {
            "success"
        } else {
            "failure"
        };
        self.ticks.with_label_values(&[&agent, result]).inc();
        self.tick_seconds
            .with_label_values(&[&agent])
            .observe(outcome.duration.as_secs_f64());
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        {
            let _one_at_a_time = self
                .stderr_catch_up
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let dropped = tickgate_actors::runner::STDERR_DROPPED_BYTES
                .load(std::sync::atomic::Ordering::Relaxed);
            self.stderr_dropped
                .inc_by(dropped.saturating_sub(self.stderr_dropped.get()));
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn code_label(code: u16) -> &'static str {
    match code {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        c if c < 300 => "2xx",
        c if c < 500 => "4xx",
        _ => "5xx",
    }
}

/// The store reports group commits, fsyncs and undecodable records here.
impl tickgate_actors::store::sled::Observer for Metrics {
    fn flushed(&self, took: std::time::Duration, _requests: usize) {
        self.flush(took.as_secs_f64());
    }

    fn fsynced(&self) {
        self.fsyncs.inc();
    }

    fn unreadable(&self, _record: &str) {
        self.unreadable.inc();
    }
}

/// Receives tick outcomes from agents, like the breaker does, and turns them into metrics.
pub struct TickRecorder(pub std::sync::Arc<Metrics>);

impl Actor for TickRecorder {
    type Context = Context<Self>;
}

impl Handler<TickOutcome> for TickRecorder {
    type Result = ();
    fn handle(&mut self, outcome: TickOutcome, _: &mut Context<Self>) {
        self.0.tick(&outcome);
    }
}
