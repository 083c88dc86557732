//! Start-up and shutdown: open the store, settle tokens, start agents and the registry, recover
//! queued tasks, bind, print webhook URLs, serve, and flush on the way out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter};
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use tickgate_actors::agent::{self, AgentDeps};
use tickgate_actors::events::TaskEvents;
use tickgate_actors::registry::{bootstrap_tokens, Registry};
use tickgate_actors::store::sled::SledStore;
use tickgate_actors::store::{Store, StoreError};

use crate::config::Settings;
use crate::http::{self, AppState};
use crate::ingress::rate_limit::FailureLimiter;
use crate::ingress::Gate;

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

/// Failed lookups a client may make at once before it is throttled, and their refill rate.
const FAILURE_BURST: u32 = 20;
const FAILURE_PER_SECOND: f64 = 2.0;
const FAILURE_CLIENTS: usize = 100_000;

/// Runs the service until SIGTERM/SIGINT.
pub fn serve(settings: Settings) -> Result<(), AppError> {
    actix_rt::System::new().block_on(run(settings))
}

async fn run(settings: Settings) -> Result<(), AppError> {
    let store_path = settings.config.store.path.clone();
    let store = SledStore::open(&store_path)?;
    let dyn_store: Arc<dyn Store> = store.clone();

    let ids: Vec<_> = settings.agents.iter().map(|a| a.spec.id.clone()).collect();
    let pinned: BTreeMap<_, _> = settings
        .agents
        .iter()
        .filter_map(|a| Some((a.spec.id.clone(), a.pinned_token.clone()?)))
        .collect();
    let tokens = bootstrap_tokens(dyn_store.as_ref(), &ids, &pinned)?;

    let events = Arc::new(TaskEvents::default());
    let deps = AgentDeps {
        store: dyn_store.clone(),
        events: events.clone(),
        outcomes: None,
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arbiters: Vec<Arbiter> = (0..threads).map(|_| Arbiter::new()).collect();
    let mut handles = Vec::with_capacity(settings.agents.len());
    let mut gates = HashMap::with_capacity(settings.agents.len());
    let mut recovered = 0;
    for (i, setup) in settings.agents.iter().enumerate() {
        let state = dyn_store.agent_state(&setup.spec.id)?;
        let queued = dyn_store.queued(&setup.spec.id)?;
        let handle = agent::start(
            setup.spec.clone(),
            state,
            deps.clone(),
            &arbiters[i % arbiters.len()].handle(),
        );
        recovered += queued.len();
        handle.recover(queued);
        gates.insert(setup.spec.id.clone(), Gate::new(setup));
        handles.push(handle);
    }
    if recovered > 0 {
        tracing::info!(tasks = recovered, "re-queued tasks found in the store");
    }
    let registry = Registry::new(
        handles,
        tokens.digests,
        pinned.keys().cloned().collect::<HashSet<_>>(),
        dyn_store.clone(),
    )
    .start();

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
    announce(&settings, &bound.to_string(), &public_url, &tokens.created);

    let admin_enabled = settings.admin_token.is_some();
    let state = web::Data::new(AppState {
        registry,
        store: dyn_store.clone(),
        events,
        gates,
        public_url,
        max_body_bytes: settings.config.server.max_body_bytes,
        max_wait: settings.config.server.max_wait.0,
        trusted_proxies: settings.trusted_proxies.clone(),
        failures: FailureLimiter::new(FAILURE_PER_SECOND, FAILURE_BURST, FAILURE_CLIENTS),
        admin_token: settings.admin_token.clone(),
    });
    spawn_retention(dyn_store.clone(), settings.config.store.task_retention.0);

    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(http::error_shape())
            .wrap(from_fn(http::access_log))
            .configure(|c| http::routes(c, admin_enabled))
            .default_service(web::to(http::not_found))
    })
    .workers(settings.config.server.workers.unwrap_or(threads))
    .shutdown_timeout(settings.config.server.shutdown_grace.0.as_secs())
    .listen(listener)
    .map_err(AppError::Server)?
    .run();
    let served = server.await.map_err(AppError::Server);

    for arbiter in &arbiters {
        arbiter.stop();
    }
    store.close()?;
    tracing::info!("store flushed; bye");
    served
}

/// Prints where the service listens and each newly created webhook URL, once. Tokens that
/// already existed are never printed again: the operator is told how to rotate instead.
fn announce(
    settings: &Settings,
    bound: &str,
    public_url: &str,
    created: &[tickgate_actors::registry::NewToken],
) {
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
        if !fresh.contains(&setup.spec.id) && setup.pinned_token.is_none() {
            println!(
                "agent {}: webhook token issued earlier (new one: tickgate token rotate {})",
                setup.spec.id, setup.spec.id
            );
        }
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
