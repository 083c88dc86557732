//! The HTTP edge: routes, shared state, and the access log. Handlers stay short: extract, call
//! one domain function or actor, map the result.

mod a2a;
pub mod admin;
mod admin_tasks;
pub mod deliveries;
pub mod error;
pub mod health;
mod limits;
pub mod openapi;
pub mod record;
pub mod schemas;
pub mod tasks;
pub(crate) mod ui;
pub mod webhook;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{ErrorHandlers, Next};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use ipnetwork::IpNetwork;
use tickgate_actors::agent::Lifecycle;
use tickgate_actors::breaker::BreakerActor;
use tickgate_actors::events::TaskEvents;
use tickgate_actors::intake::Intake;
use tickgate_actors::model::AgentId;
use tickgate_actors::registry::{Registry, TokenIndex};
use tickgate_actors::store::Store;
use tracing::Instrument;

use crate::ingress::client_ip::client_ip;
use crate::ingress::rate_limit::FailureLimiter;
use crate::ingress::Gate;
use crate::metrics::Metrics;
use error::ApiError;
pub use limits::{BodyBudget, BodyLimits};

/// State shared by every handler; built once at start-up and never mutated, so no handler holds
/// a lock across an await.
pub struct AppState {
    /// This node's name (`[server] node_id`), shown as the owner of agents it runs.
    pub node_id: String,
    /// Token → agent, rotation, listings.
    pub registry: Addr<Registry>,
    /// Per-agent circuit breakers: admission of triggers and readiness.
    pub breaker: Addr<BreakerActor>,
    /// The registry's token map, read without a message on every trigger.
    pub tokens: Arc<TokenIndex>,
    /// The accept path every trigger goes through (admission, mailbox slot, durable submit).
    pub intake: Arc<Intake>,
    /// Draining switch and running-tick count.
    pub lifecycle: Arc<Lifecycle>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Task reads.
    pub store: Arc<dyn Store>,
    /// Task status changes, for sync waits and SSE.
    pub events: Arc<TaskEvents>,
    /// Per-agent ingress rules.
    pub gates: HashMap<AgentId, Gate>,
    /// Base of `poll_url`s and webhook URLs.
    pub public_url: String,
    /// Cap on a synchronous wait.
    pub max_wait: Duration,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNetwork>,
    /// Throttles clients that fail token lookups or signatures.
    pub failures: FailureLimiter,
    /// Admin bearer token; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Size and time limits for one request body.
    pub body_limits: limits::BodyLimits,
    /// Bytes held by all bodies being received, bounded.
    pub body_budget: limits::BodyBudget,
    /// Each scheduled agent's entries, for `/admin/agents`.
    pub schedules: HashMap<AgentId, Vec<tickgate_actors::schedule::Entry>>,
    /// The status callback worker, when any agent has `[[agent.notify]]`.
    pub notifier: Option<crate::outbox_worker::Notifier>,
    /// The agents served over A2A (`[agent.a2a] enabled`), with their card settings.
    pub a2a: HashMap<AgentId, crate::config::A2aConfig>,
    /// Per-agent ticks per second and durations over the last minutes, for the operator page.
    pub tick_stats: Arc<ui::TickStats>,
}

impl AppState {
    /// The client address after trusted-proxy resolution.
    pub fn client_ip(&self, req: &HttpRequest) -> IpAddr {
        let peer = req
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let xff: Vec<std::borrow::Cow<'_, str>> = req
            .headers()
            .get_all(&X_FORWARDED_FOR)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .collect();
        let xff: Vec<&str> = xff.iter().map(|v| v.as_ref()).collect();
        client_ip(peer, &xff, &self.trusted_proxies)
    }

    /// The URL callers poll for a task.
    pub fn poll_url(&self, id: &impl std::fmt::Display) -> String {
        format!("{}/tasks/{id}", self.public_url)
    }
}

/// One served route: what `tests/openapi.rs` compares with the OpenAPI document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `get` or `post`.
    pub method: &'static str,
    /// The path template as registered (`{name}` segments).
    pub path: &'static str,
    /// Served only when an admin token is configured.
    pub admin: bool,
}

/// The route table. Every route is registered from here and nowhere else (a test in this module
/// fails on any other registration), and `tests/openapi.rs` fails when a row is missing from the
/// OpenAPI document, so a new route cannot go undocumented. Each path also answers other methods
/// with `405` in the one error shape.
macro_rules! route_table {
    (
        public { $($pp:literal => [$($pm:ident $pmod:ident::$pf:ident),+ $(,)?]),* $(,)? }
        admin { $($ap:literal => [$($am:ident $amod:ident::$af:ident),+ $(,)?]),* $(,)? }
    ) => {
        /// Every route tickgate serves (admin ones only with an admin token).
        pub const ROUTES: &[Route] = &[
            $($(Route { method: stringify!($pm), path: $pp, admin: false },)+)*
            $($(Route { method: stringify!($am), path: $ap, admin: true },)+)*
        ];

        fn register_public(cfg: &mut web::ServiceConfig) {
            $(cfg.service(
                web::resource($pp)
                    $(.route(web::$pm().to($pmod::$pf)))+
                    .default_service(web::to(method_not_allowed)),
            );)*
        }

        fn register_admin(cfg: &mut web::ServiceConfig) {
            $(cfg.service(
                web::resource($ap)
                    $(.route(web::$am().to($amod::$af)))+
                    .default_service(web::to(method_not_allowed)),
            );)*
        }
    };
}

route_table! {
    public {
        "/webhooks/{token}" => [post webhook::post_by_token, get webhook::get_by_token],
        "/api/webhooks/agents/{token}" => [post webhook::post_by_token, get webhook::get_by_token],
        "/webhooks/{namespace}/{agent}/{token}" => [post webhook::post_named, get webhook::get_named],
        "/tasks/{id}" => [get tasks::get],
        "/tasks/{id}/resume" => [post tasks::resume],
        "/tasks/{id}/events" => [get tasks::events],
        "/api/task_status" => [get tasks::status_alias],
        "/a2a/{namespace}/{agent}/.well-known/agent-card.json" => [get a2a::card],
        "/a2a/{namespace}/{agent}" => [post a2a::rpc],
        "/healthz" => [get health::healthz],
        "/ready" => [get health::ready],
        "/ready/{namespace}/{agent}" => [get health::ready_agent],
        "/metrics" => [get health::metrics],
        "/openapi.json" => [get openapi::document],
        "/ui" => [get ui::page],
        "/ui/app.js" => [get ui::script],
        "/ui/app.css" => [get ui::style],
    }
    admin {
        "/admin/agents" => [get admin::list_agents],
        "/admin/agents/{namespace}/{agent}/token" => [post admin::rotate_token],
        "/admin/agents/{namespace}/{agent}/restart" => [post admin::restart_agent],
        "/admin/agents/{namespace}/{agent}/breaker/reset" => [post admin::reset_breaker],
        "/admin/deliveries" => [get deliveries::list],
        "/admin/deliveries/{id}/retry" => [post deliveries::retry],
        "/admin/agents/{namespace}/{agent}/notify/{index}/enable" => [post deliveries::enable],
        "/admin/tasks" => [get admin_tasks::list],
        "/admin/tasks/{id}/replay" => [post admin_tasks::replay],
        "/admin/tasks/{id}/cancel" => [post admin_tasks::cancel],
        "/admin/agents/{namespace}/{agent}/replay" => [post admin_tasks::replay_agent],
        "/admin/events" => [get ui::events],
        "/admin/stats" => [get ui::stats],
        "/admin/tasks/{id}" => [get ui::task],
    }
}

/// Registers every route of [`ROUTES`]. Admin routes exist only when an admin token is
/// configured.
pub fn routes(cfg: &mut web::ServiceConfig, admin_enabled: bool) {
    // Extractor failures say what was wrong, in the one error shape.
    cfg.app_data(web::QueryConfig::default().error_handler(|e, _| {
        ApiError::BadRequest(format!("the query string is invalid: {e}")).into()
    }))
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(format!("the path is invalid: {e}")).into()),
    );
    register_public(cfg);
    if admin_enabled {
        register_admin(cfg);
    }
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// The agent a `{namespace}/{agent}` route names. A name that is not even valid is answered like
/// one that does not exist, so the answer never depends on which rule it broke.
pub fn agent_in_path(path: web::Path<(String, String)>) -> Result<AgentId, ApiError> {
    let (namespace, name) = path.into_inner();
    AgentId::new(&namespace, &name)
        .map_err(|_| ApiError::NotFound(format!("no agent {namespace}/{name}")))
}

/// The `404` for a well-formed agent id that is not configured.
pub fn no_such_agent(agent: &AgentId) -> ApiError {
    ApiError::NotFound(format!("no agent {agent}"))
}

/// The fallback for unknown paths.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

/// Rewrites non-JSON error responses into the standard error shape.
pub fn error_shape<B: MessageBody + 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new().default_handler(error::normalize)
}

/// The shortest secret a webhook URL can carry (`token_env` tokens must be at least this long).
const MIN_TOKEN_LEN: usize = 32;

/// Named once: a `&str` header name is parsed into a `HeaderName` on every lookup.
const X_FORWARDED_FOR: actix_web::http::header::HeaderName =
    actix_web::http::header::HeaderName::from_static("x-forwarded-for");

/// What the access log shows for a request's path, so that logs never hold a working URL or a
/// token. Webhook routes appear as their pattern (`/webhooks/{token}`; the agent is logged
/// beside it). Any other path appears as requested, except that every segment long enough to
/// be a token, other than a task id after `/tasks/`, is replaced: a mistyped webhook URL (a
/// trailing slash, a wrong prefix) misses the webhook routes but still carries the token.
pub fn loggable_path(path: &str, pattern: Option<&str>) -> String {
    if let Some(p) =
        pattern.filter(|p| p.starts_with("/webhooks/") || p.starts_with("/api/webhooks/"))
    {
        return p.to_string();
    }
    let mut previous = "";
    path.split('/')
        .map(|segment| {
            let task_id = previous == "tasks" && uuid::Uuid::parse_str(segment).is_ok();
            previous = segment;
            if segment.len() >= MIN_TOKEN_LEN && !task_id {
                "[redacted]"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The agent a request was resolved to, left in the request's extensions by the webhook
/// handlers so that the access log can label metrics without parsing paths again.
#[derive(Debug, Clone)]
pub struct AgentLabel(pub String);

/// Access log and request metrics, with a span per request. Logs the redacted path and never
/// the query string, which may carry secrets for GET triggers.
pub async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = tracing::field::Empty,
        agent = tracing::field::Empty
    );
    // What only the log line shows is worked out only when it is logged: below `info` the
    // redaction of the path (a second route match in actix) would be done for nothing on every
    // request (#16). The path is known to be safe to show only once routing is done.
    let logged = !span.is_disabled();
    let raw_path = logged.then(|| req.path().to_string());
    let res = next.call(req).instrument(span.clone()).await;
    let _entered = span.enter();
    match &res {
        Ok(r) => {
            let status = r.status().as_u16();
            let request = r.request();
            if let Some(raw_path) = &raw_path {
                span.record(
                    "path",
                    loggable_path(raw_path, request.match_pattern().as_deref()).as_str(),
                );
            }
            let extensions = request.extensions();
            let agent = extensions.get::<AgentLabel>().map(|a| a.0.as_str());
            if let Some(agent) = agent.filter(|_| logged) {
                span.record("agent", agent);
            }
            if let Some(metrics) = metrics {
                metrics.request(agent.unwrap_or("none"), status);
            }
            drop(extensions);
            tracing::info!(
                status,
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            )
        }
        Err(e) => {
            if let Some(raw_path) = &raw_path {
                span.record("path", loggable_path(raw_path, None).as_str());
            }
            tracing::info!(
                status = e.as_response_error().status_code().as_u16(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            )
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn webhook_tokens_are_redacted() {
        let token = "YDpamW_BnUbzSE7xSG4xoHKISLLH8asFnKNUdN53I7Y";
        let named = "/webhooks/{namespace}/{agent}/{token}";
        assert_eq!(
            loggable_path(&format!("/webhooks/ns/a/{token}"), Some(named)),
            named
        );
        assert_eq!(
            loggable_path(&format!("/webhooks/{token}"), Some("/webhooks/{token}")),
            "/webhooks/{token}"
        );
        // Unmatched: a trailing slash, an extra segment, a wrong prefix or case.
        for path in [
            format!("/webhooks/{token}/"),
            format!("/webhooks/{token}/extra"),
            format!("/webhooks/x/y/{token}/z"),
            format!("/Webhooks/{token}"),
            format!("//webhooks//{token}"),
            "/webhooks/5676e39f-4c30-4628-8368-61e91f909049/".to_string(),
        ] {
            let logged = loggable_path(&path, None);
            assert!(
                !logged.contains(token) && !logged.contains("5676e39f"),
                "{logged}"
            );
            assert!(logged.contains("[redacted]"), "{logged}");
        }
        let id = "5676e39f-4c30-4628-8368-61e91f909049";
        assert_eq!(
            loggable_path(&format!("/tasks/{id}"), Some("/tasks/{id}")),
            format!("/tasks/{id}")
        );
        assert_eq!(loggable_path("/nope", None), "/nope");
    }
}
