//! Liveness, readiness and metrics. Readiness is what load balancers and senders watch: it is
//! false while the store fails, while draining for shutdown, and when every agent's breaker is
//! open (the seeds' advice: "if the agent enters circuit breaker, return 503").

use std::collections::BTreeMap;

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};
use tickgate_actors::agent::AgentHandle;
use tickgate_actors::breaker::{BreakerState, Snapshot};
use tickgate_actors::registry::{Find, List};

use super::error::ApiError;
use super::{agent_in_path, no_such_agent, AppState};

/// 200 while the process serves requests; says nothing about agents or the store.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    responses(
        (status = 200, description = "The process serves requests", body = crate::http::schemas::OkBody),

    )
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}

fn agent_entry(handle: &AgentHandle, breaker: Option<&BreakerState>) -> Value {
    json!({
        "breaker": breaker.copied().unwrap_or(BreakerState::Closed),
        "queued": handle.mailbox.queued(),
    })
}

fn answer(ready: bool, agents: BTreeMap<String, Value>, state: &AppState) -> HttpResponse {
    // Undecodable records do not make the service unready (everything else still works), but
    // the operator must see them: each is also logged with its key.
    let store = json!({
        "healthy": state.store.healthy(),
        "unreadable_records": state.metrics.unreadable_records(),
    });
    let body = json!({ "ready": ready, "agents": agents, "store": store });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(body)
    }
}

/// `GET /ready`: ready when the store is healthy, the server is not draining, and at least one
/// agent's breaker is not open.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "health",
    operation_id = "ready",
    responses(
        (status = 200, description = "Ready", body = crate::http::schemas::Readiness),
        (status = 503, description = "Not ready (the body says why)", body = crate::http::schemas::Readiness,
            headers(("Retry-After" = u64, description = "Seconds"))),

    )
)]
pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let handles = state.registry.send(List).await?;
    let breakers = state.breaker.send(Snapshot).await?;
    let any_usable = handles
        .iter()
        .any(|h| breakers.get(&h.spec.id) != Some(&BreakerState::Open));
    let agents = handles
        .iter()
        .map(|h| {
            (
                h.spec.id.to_string(),
                agent_entry(h, breakers.get(&h.spec.id)),
            )
        })
        .collect();
    let serving = state.store.healthy() && !state.lifecycle.is_draining();
    Ok(answer(serving && any_usable, agents, &state))
}

/// `GET /ready/{namespace}/{agent}`: the same for one agent, whose breaker alone decides.
#[utoipa::path(
    get,
    path = "/ready/{namespace}/{agent}",
    tag = "health",
    operation_id = "ready_agent",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    responses(
        (status = 200, description = "The agent takes triggers", body = crate::http::schemas::Readiness),
        (status = 503, description = "Not ready (the body says why)", body = crate::http::schemas::Readiness,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 404, description = "No such agent", body = crate::http::schemas::ErrorBody),
    )
)]
pub async fn ready_agent(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = agent_in_path(path)?;
    let handle = state
        .registry
        .send(Find(id.clone()))
        .await?
        .ok_or_else(|| no_such_agent(&id))?;
    let breakers = state.breaker.send(Snapshot).await?;
    let breaker = breakers.get(&id);
    let usable = breaker != Some(&BreakerState::Open);
    let serving = state.store.healthy() && !state.lifecycle.is_draining();
    let agents = BTreeMap::from([(id.to_string(), agent_entry(&handle, breaker))]);
    Ok(answer(serving && usable, agents, &state))
}

/// `GET /metrics`: Prometheus text exposition. Gauges describing current state are refreshed
/// from the registry and the breaker at scrape time.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),

    )
)]
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let handles = state.registry.send(List).await?;
    let breakers = state.breaker.send(Snapshot).await?;
    for h in &handles {
        let id = h.spec.id.to_string();
        state
            .metrics
            .queued
            .with_label_values(&[&id])
            .set(h.mailbox.queued() as i64);
        let level = match breakers.get(&h.spec.id) {
            Some(BreakerState::Open) => 2,
            Some(BreakerState::HalfOpen) => 1,
            _ => 0,
        };
        state.metrics.breaker.with_label_values(&[&id]).set(level);
        state.metrics.retries_seen(&id, h.retry.retries());
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render()))
}
