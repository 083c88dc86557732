//! Start-up and shutdown: open the store, settle tokens, start agents, the registry and the
//! breaker, recover queued tasks, bind, print webhook URLs, serve; on SIGTERM drain (refuse new
//! triggers with 503, let running ticks finish within the grace period), flush, exit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Arbiter};
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use tickgate_actors::agent::{self, AgentDeps, Lifecycle};
use tickgate_actors::breaker::{BreakerActor, BreakerPolicy};
use tickgate_actors::events::TaskEvents;
use tickgate_actors::intake::Intake;
use tickgate_actors::registry::{bootstrap_tokens, NewToken, Registry};
use tickgate_actors::store::nats::{NatsOptions, NatsStore};
use tickgate_actors::store::sled::{Options, SledStore};
use tickgate_actors::store::{Store, StoreError};

use crate::config::{Settings, StoreKind};
use crate::http::{self, AppState};
use crate::ingress::rate_limit::FailureLimiter;
use crate::metrics::{Metrics, TickRecorder};

/// Why the service could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The store could not be opened or read at start-up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Server(std::io::Error),
}

/// Client addresses whose failed authentications are remembered at once (oldest forgotten first).
const FAILURE_CLIENTS: usize = 100_000;

/// Time a client has to send a request's head (line and headers) after connecting or after the
/// previous response on a kept-alive connection; actix answers 408 and closes after it. The
/// body has its own, longer deadline (`server.body_timeout`).
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a closing connection gets to finish its shutdown before it is dropped; without it a
/// client that never reads the last response could keep the socket.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long in-flight HTTP requests (sync waiters) get once the drain is over.
const HTTP_STOP_GRACE: u64 = 2;

/// Runs the service on the sled store until SIGTERM or SIGINT.
pub fn serve(settings: Settings) -> Result<(), AppError> {
    // Orphans of runner processes (a `setsid` child whose parent exited) become tickgate's
    // children, so that the runner sweeps can find and reap them.
    if let Err(e) = tickgate_actors::runner::become_subreaper() {
        tracing::warn!("cannot become a child subreaper ({e}); escaped runner processes are found by their environment only");
    }
    if settings.config.store.kind == StoreKind::Nats {
        return serve_nats(settings);
    }
    actix_rt::System::new().block_on(async move {
        let metrics = Arc::new(Metrics::new());
        let store = SledStore::open_opts(
            &settings.config.store.path,
            Options {
                sync: settings.config.store.sync,
                observer: Some(metrics.clone()),
                outbox: crate::outbox_worker::outbox_for(&settings),
            },
        )?;
        let served = run(settings, store.clone(), metrics, shutdown_signal(), |_| {}).await;
        store.close()?;
        tracing::info!("store flushed; bye");
        served
    })
}

/// Runs the service as one node of a cluster on NATS JetStream until SIGTERM or SIGINT; on the
/// way out it gives up its agents' leases, so other nodes take them over at once.
fn serve_nats(settings: Settings) -> Result<(), AppError> {
    let store = NatsStore::open(NatsOptions {
        url: settings.config.store.url.clone().unwrap_or_default(),
        replicas: settings.config.store.replicas,
        lease: settings.config.store.lease.0,
        node_id: node_id(&settings),
        task_retention: settings.config.store.task_retention.0,
        connect_timeout: NATS_CONNECT_TIMEOUT,
        outbox: crate::outbox_worker::outbox_for(&settings),
    })?;
    let served = actix_rt::System::new().block_on({
        let store = store.clone();
        async move {
            let metrics = Arc::new(Metrics::new());
            run(settings, store, metrics, shutdown_signal(), |_| {}).await
        }
    });
    store.release_all_blocking();
    store.close();
    tracing::info!("leases released; bye");
    served
}

/// How long start-up waits for NATS before it gives up.
const NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// `[server] node_id`, or `<hostname>:<port>` (the process id when the port is picked at bind).
pub fn node_id(settings: &Settings) -> String {
    if let Some(id) = &settings.config.server.node_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    match settings.listen.port() {
        0 => format!("{host}:pid{}", std::process::id()),
        port => format!("{host}:{port}"),
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// Everything a running service holds besides the HTTP server: the handlers' shared state, the
/// arbiters the agents run on (stopped at shutdown) and the tokens created just now (printed once).
pub struct Built {
    /// The state every handler reads; hand it to [`create_app`].
    pub state: web::Data<AppState>,
    /// Webhook tokens issued during this start, to be shown once.
    pub created: Vec<NewToken>,
    /// Whether the admin routes exist.
    pub admin_enabled: bool,
    arbiters: Vec<Arbiter>,
}

impl Built {
    /// Stops the agents' arbiters; their queued tasks stay on disk for the next start.
    pub fn stop_agents(&self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// Settles tokens, starts the breaker, the agents (re-queuing what the store holds), the
/// registry and the intake, and returns the handlers' state. Needs a running actix system;
/// binds nothing, so tests can serve the state in-process with `actix_web::test`.
pub async fn build_state(
    settings: &Settings,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    public_url: String,
) -> Result<Built, AppError> {
    // Scheduled-only agents (`webhook.enabled = false`) get no token at all.
    let ids: Vec<_> = settings
        .agents
        .iter()
        .filter(|a| a.webhook_enabled)
        .map(|a| a.spec.id.clone())
        .collect();
    let no_webhook: HashSet<_> = settings
        .agents
        .iter()
        .filter(|a| !a.webhook_enabled)
        .map(|a| a.spec.id.clone())
        .collect();
    let pinned: BTreeMap<_, _> = settings
        .agents
        .iter()
        .filter_map(|a| Some((a.spec.id.clone(), a.pinned_token.clone()?)))
        .collect();
    let tokens = bootstrap_tokens(store.as_ref(), &ids, &pinned)?;

    // A lost trial outcome (crash, shutdown) stops blocking once the longest tick could be over.
    let trial_timeout = settings
        .agents
        .iter()
        .map(|a| a.spec.tick_timeout)
        .max()
        .unwrap_or_default()
        + Duration::from_secs(10);
    let breaker = BreakerActor::with_trial_timeout(
        settings
            .agents
            .iter()
            .map(|a| {
                (
                    a.spec.id.clone(),
                    BreakerPolicy {
                        failures: a.breaker.failures,
                        open_for: a.breaker.open_for.0,
                    },
                )
            })
            .collect(),
        trial_timeout,
    );
    let closed_breakers = breaker.closed();
    let breaker = breaker.start();
    let recorder = TickRecorder(metrics.clone()).start();
    let tick_stats = Arc::new(http::ui::TickStats::default());
    let stats_recorder = http::ui::StatsRecorder(tick_stats.clone()).start();
    let events = Arc::new(TaskEvents::default());
    let lifecycle = Arc::new(Lifecycle::default());
    let deps = AgentDeps {
        store: store.clone(),
        events: events.clone(),
        outcomes: vec![
            breaker.clone().recipient(),
            recorder.recipient(),
            stats_recorder.recipient(),
        ],
        lifecycle: lifecycle.clone(),
    };
    // Before any agent starts: pending deliveries are loaded before new ones can be created.
    let notifier = crate::outbox_worker::Notifier::start(
        settings,
        store.clone(),
        metrics.clone(),
        public_url.clone(),
    )
    .await?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
    let mut handles = Vec::with_capacity(settings.agents.len());
    let mut gates = HashMap::with_capacity(settings.agents.len());
    let mut recovered = 0;
    let retry_timers = store.retry_timers().await?;
    for (i, setup) in settings.agents.iter().enumerate() {
        let state = store.agent_state(&setup.spec.id).await?;
        let queued = store.queued(&setup.spec.id).await?;
        let handle = agent::start(
            setup.spec.clone(),
            state,
            deps.clone(),
            &arbiters[i % arbiters.len()].handle(),
        );
        recovered += queued.len();
        tickgate_actors::retry::hold_recovered(&handle, &retry_timers);
        handle.recover(queued);
        gates.insert(setup.spec.id.clone(), setup.gate());
        handles.push(handle);
    }
    if recovered > 0 {
        tracing::info!(tasks = recovered, "re-queued tasks found in the store");
    }
    let scheduled: Vec<_> = settings
        .agents
        .iter()
        .zip(&handles)
        .filter(|(setup, _)| !setup.schedule.is_empty())
        .map(|(setup, handle)| (handle.clone(), setup.schedule.clone(), setup.catch_up))
        .collect();
    if !retry_timers.is_empty() {
        tracing::info!(
            tasks = retry_timers.len(),
            "retry timers found in the store"
        );
    }
    tickgate_actors::retry::start(
        &handles,
        store.clone(),
        events.clone(),
        breaker.clone(),
        closed_breakers.clone(),
        lifecycle.clone(),
        retry_timers,
    );
    if let Ok(nats) = store.clone().as_any().downcast::<NatsStore>() {
        // Other nodes' task changes reach this node's waiters; this node's agents tick only
        // while it holds their leases.
        nats.fan_in(events.clone());
        tickgate_actors::cluster::start(nats, handles.clone());
    }
    let intake = Arc::new(
        Intake::new(
            handles.iter().cloned(),
            breaker.clone(),
            closed_breakers,
            lifecycle.clone(),
            store.clone(),
        )
        .with_events(events.clone()),
    );
    // Parked tasks whose answer never came fail at their expiry, restarts included.
    tickgate_actors::awaiting::spawn_expiry(store.clone(), events.clone());
    let handles_for_queue = handles.clone();
    let registry = Registry::new(
        handles,
        tokens.digests,
        pinned.keys().cloned().collect::<HashSet<_>>(),
        store.clone(),
    )
    .without_webhook(no_webhook);
    let token_index = registry.index();
    let registry = registry.start();

    let body_budget = http::BodyBudget::new(
        settings.config.server.max_inflight_body_bytes,
        metrics.inflight_body_bytes.clone(),
    );
    // Subscribed to the task feed here, before any agent can finish a task it should report.
    let queue_triggers = crate::queue::Triggers::new(
        settings.queue_url(),
        settings
            .agents
            .iter()
            .zip(&handles_for_queue)
            .flat_map(|(setup, handle)| {
                setup
                    .queue
                    .iter()
                    .enumerate()
                    .map(|(index, entry)| crate::queue::Consumed {
                        agent: handle.clone(),
                        index,
                        entry: entry.clone(),
                    })
            })
            .collect(),
        &events,
    );
    let queue_deps = crate::queue::QueueDeps {
        intake: intake.clone(),
        metrics: metrics.clone(),
        public_url: public_url.clone(),
        max_payload: settings.config.server.max_body_bytes,
    };
    let scheduler_deps = crate::schedule::SchedulerDeps {
        store: store.clone(),
        intake: intake.clone(),
        metrics: metrics.clone(),
    };
    let state = web::Data::new(AppState {
        node_id: node_id(settings),
        registry,
        tokens: token_index,
        breaker,
        intake,
        store,
        events,
        lifecycle,
        metrics,
        gates,
        public_url,
        max_wait: settings.config.server.max_wait.0,
        trusted_proxies: settings.trusted_proxies.clone(),
        failures: FailureLimiter::new(
            settings.config.server.auth_failures.per_second,
            settings.config.server.auth_failures.burst,
            FAILURE_CLIENTS,
        ),
        admin_token: settings.admin_token.clone(),
        body_limits: http::BodyLimits {
            max_bytes: settings.config.server.max_body_bytes,
            timeout: settings.config.server.body_timeout.0,
        },
        body_budget,
        schedules: scheduled
            .iter()
            .map(|(handle, entries, _)| (handle.spec.id.clone(), entries.clone()))
            .collect(),
        notifier,
        a2a: settings
            .agents
            .iter()
            .filter_map(|a| Some((a.spec.id.clone(), a.a2a.clone()?)))
            .collect(),
        tick_stats,
    });
    for (handle, entries, catch_up) in scheduled {
        crate::schedule::start(scheduler_deps.clone(), handle, entries, catch_up);
    }
    if let Some(triggers) = queue_triggers {
        triggers.start(queue_deps);
    }
    Ok(Built {
        state,
        created: tokens.created,
        admin_enabled: settings.admin_token.is_some(),
        arbiters,
    })
}

/// The actix-web application over `state`: routes, the error shape and the access log. The
/// server builds one per worker; tests call it with `actix_web::test::init_service`.
pub fn create_app(
    state: web::Data<AppState>,
    admin_enabled: bool,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(state)
        .wrap(http::error_shape())
        .wrap(from_fn(http::access_log))
        .configure(|c| http::routes(c, admin_enabled))
        .default_service(web::to(http::not_found))
}

/// Runs the service on `store` until `stop` resolves, then drains. `on_bound` learns the bound
/// address (tests bind port 0). The caller closes the store afterwards.
pub async fn run(
    settings: Settings,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()>,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), AppError> {
    let listener = TcpListener::bind(settings.listen).map_err(|source| AppError::Bind {
        addr: settings.listen.to_string(),
        source,
    })?;
    let bound = listener.local_addr().map_err(AppError::Server)?;
    let public_url = settings
        .config
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"))
        .trim_end_matches('/')
        .to_string();
    let built = build_state(&settings, store.clone(), metrics, public_url.clone()).await?;
    announce(&settings, &bound.to_string(), &public_url, &built.created);
    on_bound(bound);

    let lifecycle = built.state.lifecycle.clone();
    spawn_retention(store.clone(), settings.config.store.task_retention.0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (state, admin_enabled) = (built.state.clone(), built.admin_enabled);
    let server = HttpServer::new(move || create_app(state.clone(), admin_enabled))
        .workers(settings.config.server.workers.unwrap_or(threads))
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        .disable_signals()
        .shutdown_timeout(HTTP_STOP_GRACE)
        .listen(listener)
        .map_err(AppError::Server)?
        .run();
    let handle = server.handle();
    let mut serving = actix_rt::spawn(server);

    let served = tokio::select! {
        res = &mut serving => Some(res.map_err(|e| AppError::Server(std::io::Error::other(e))).and_then(|r| r.map_err(AppError::Server))),
        _ = stop => None,
    };
    if let Some(result) = served {
        return result;
    }
    drain(&lifecycle, settings.config.server.shutdown_grace.0).await;
    handle.stop(true).await;
    let _ = serving.await;
    built.stop_agents();
    store.flush()?;
    Ok(())
}

/// Refuses new triggers and waits for running ticks, up to `grace`. Ticks still running after
/// it are abandoned (their process groups are killed when the agents stop); their tasks stay
/// STARTED on disk and run again with `attempt` + 1 on the next start.
async fn drain(lifecycle: &Lifecycle, grace: Duration) {
    lifecycle.drain();
    let deadline = Instant::now() + grace;
    tracing::info!(running = lifecycle.running(), grace = %humantime::format_duration(grace), "draining");
    while lifecycle.running() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match lifecycle.running() {
        0 => tracing::info!("drained; no tick running"),
        n => tracing::warn!(running = n, "grace period over; abandoning running ticks"),
    }
}

/// Prints where the service listens and each newly created webhook URL, once. Tokens that
/// already existed are never printed again: the operator is told how to rotate instead.
fn announce(settings: &Settings, bound: &str, public_url: &str, created: &[NewToken]) {
    println!(
        "tickgate listening on http://{bound} ({})",
        settings.source_name
    );
    for new in created {
        println!(
            "webhook for {}: POST {public_url}/webhooks/{}",
            new.agent, new.token
        );
    }
    if let Some(first) = created.first() {
        println!(
            "try it: curl -s -X POST -H 'Content-Type: application/json' -d '{{\"hello\":\"world\"}}' '{public_url}/webhooks/{}?wait=10'",
            first.token
        );
    }
    let fresh: HashSet<_> = created.iter().map(|c| &c.agent).collect();
    for setup in &settings.agents {
        if !setup.webhook_enabled {
            println!(
                "agent {}: no webhook ({} schedule entries, {} queue subjects)",
                setup.spec.id,
                setup.schedule.len(),
                setup.queue.len()
            );
        } else if !fresh.contains(&setup.spec.id) && setup.pinned_token.is_none() {
            println!(
                "agent {}: webhook token issued earlier (new one: tickgate token rotate {})",
                setup.spec.id, setup.spec.id
            );
        }
    }
    if settings.admin_token.is_some() {
        println!("dashboard: {public_url}/ui (sign in with the admin token)");
    }
    println!("tickgate serving {} agents", settings.agents.len());
}

/// Purges finished tasks older than the retention, a few times per retention period.
fn spawn_retention(store: Arc<dyn Store>, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.purge(retention)).await {
                Ok(Ok(p)) if p.tasks > 0 => {
                    tracing::info!(tasks = p.tasks, "purged finished tasks")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "retention purge failed"),
                Err(e) => tracing::warn!(error = %e, "retention purge panicked"),
            }
        }
    });
}
