//! Admin API, enabled only when an admin token is configured. Every handler takes [`Admin`],
//! which checks the bearer token in constant time before anything else runs.

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use serde_json::json;
use subtle::ConstantTimeEq;
use tickgate_actors::agent::Restart;
use tickgate_actors::breaker::{BreakerState, Reset, Snapshot};
use tickgate_actors::model::{now_ms, rfc3339, AgentId};
use tickgate_actors::registry::{Find, List, Rotate, RotateError};

use super::error::ApiError;
use super::{agent_in_path, no_such_agent, AppState};

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

/// Checks the admin token. Clients that keep presenting wrong tokens share the webhook routes'
/// auth-failure limiter, so guessing the admin token is throttled like guessing webhook tokens.
fn authenticate(req: &HttpRequest) -> Result<Admin, ApiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal("admin route without app state".into()))?;
    let client = state.client_ip(req);
    if let Err(wait) = state.failures.check(client) {
        return Err(ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil() as u64,
        });
    }
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let ok = match (&state.admin_token, presented) {
        (Some(expected), Some(presented)) => {
            bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
        }
        _ => false,
    };
    if ok {
        Ok(Admin)
    } else {
        state.failures.failed(client);
        Err(ApiError::Unauthorized)
    }
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is matched without
/// regard to case, as HTTP auth schemes are case-insensitive (RFC 9110 §11.1).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// `GET /admin/agents`: every agent with its queue and tick count; never a token.
#[utoipa::path(
    get,
    path = "/admin/agents",
    tag = "admin",
    operation_id = "list_agents",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every agent with its breaker, queue and schedules", body = crate::http::schemas::AgentList),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn list_agents(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let agents = state.registry.send(List).await?;
    let breakers = state.breaker.send(Snapshot).await?;
    let now = now_ms() / 1000;
    let agents: Vec<_> = agents
        .iter()
        .map(|a| {
            json!({
                "id": a.spec.id.to_string(),
                "namespace": a.spec.id.namespace(),
                "name": a.spec.id.name(),
                "breaker": breakers.get(&a.spec.id).copied().unwrap_or(BreakerState::Closed),
                "queued": a.mailbox.queued(),
                "mailbox": a.mailbox.capacity(),
                "ticks": a.ticks.load(std::sync::atomic::Ordering::Acquire),
                "schedules": schedules(&state, &a.spec.id, now),
                "owner": state.store.owner(&a.spec.id).unwrap_or_else(|| state.node_id.clone()),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

/// An agent's schedule entries with their next slot (`null` if the entry never fires again).
pub(super) fn schedules(state: &AppState, agent: &AgentId, now: u64) -> Vec<serde_json::Value> {
    state
        .schedules
        .get(agent)
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    json!({
                        "expression": e.expression,
                        "next_at": e.next_after(now).map(|s| rfc3339(s * 1000)),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `POST /admin/agents/{namespace}/{agent}/token`: a new token, shown in this answer only.
#[utoipa::path(
    post,
    path = "/admin/agents/{namespace}/{agent}/token",
    tag = "admin",
    operation_id = "rotate_token",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The new token, shown in this answer only", body = crate::http::schemas::RotatedToken),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such agent", body = crate::http::schemas::ErrorBody),
        (status = 409, description = "The agent's token is pinned by configuration, or it has no webhook", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn rotate_token(
    _: Admin,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (namespace, name) = path.into_inner();
    let agent = AgentId::new(&namespace, &name)
        .map_err(|_| ApiError::NotFound(format!("no agent {namespace}/{name}")))?;
    let token = state
        .registry
        .send(Rotate(agent.clone()))
        .await?
        .map_err(|e| match e {
            RotateError::UnknownAgent(a) => ApiError::NotFound(format!("no agent {a}")),
            RotateError::Pinned(_) | RotateError::NoWebhook(_) => ApiError::Conflict(e.to_string()),
            RotateError::Store(e) => ApiError::Store(e),
        })?;
    tracing::info!(agent = %agent, "webhook token rotated");
    Ok(HttpResponse::Ok().json(json!({
        "agent": agent.to_string(),
        "token": token,
        "webhook_url": format!("{}/webhooks/{token}", state.public_url),
    })))
}

/// `POST /admin/agents/{namespace}/{agent}/breaker/reset`: closes an agent's breaker at once,
/// for when the operator knows the cause is fixed and does not want to wait for `open_for`.
#[utoipa::path(
    post,
    path = "/admin/agents/{namespace}/{agent}/breaker/reset",
    tag = "admin",
    operation_id = "reset_breaker",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The breaker is closed", body = crate::http::schemas::BreakerReset),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such agent", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn reset_breaker(
    _: Admin,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let agent = agent_in_path(path)?;
    if !state.breaker.send(Reset(agent.clone())).await? {
        return Err(no_such_agent(&agent));
    }
    tracing::info!(agent = %agent, "breaker reset by admin");
    Ok(HttpResponse::Ok()
        .json(json!({ "agent": agent.to_string(), "breaker": BreakerState::Closed })))
}

/// `POST /admin/agents/{namespace}/{agent}/restart`: restarts the agent actor (and so its
/// persistent runner process) after the ticks already queued; nothing queued is lost.
#[utoipa::path(
    post,
    path = "/admin/agents/{namespace}/{agent}/restart",
    tag = "admin",
    operation_id = "restart_agent",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "The restart is queued behind the agent's queued ticks", body = crate::http::schemas::RestartQueued),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such agent", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn restart_agent(
    _: Admin,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let agent = agent_in_path(path)?;
    let handle = state
        .registry
        .send(Find(agent.clone()))
        .await?
        .ok_or_else(|| no_such_agent(&agent))?;
    handle.addr.do_send(Restart);
    tracing::info!(agent = %agent, "agent restart requested by admin");
    Ok(HttpResponse::Accepted().json(json!({ "agent": agent.to_string(), "restart": "queued" })))
}

#[cfg(test)]
mod tests {
    use super::bearer_token;
    use proptest::prelude::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    proptest! {
        #[test]
        fn any_case_of_bearer_is_read(token in "[A-Za-z0-9_-]{1,40}", mask in any::<u8>()) {
            let scheme: String = "bearer"
                .chars()
                .enumerate()
                .map(|(i, c)| if mask >> i & 1 == 1 { c.to_ascii_uppercase() } else { c })
                .collect();
            let header = format!("{scheme} {token}");
            prop_assert_eq!(bearer_token(&header), Some(token.as_str()));
        }
    }
}
