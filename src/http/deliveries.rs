//! Admin routes over the status callback outbox (SPEC section 9): list deliveries, send a dead
//! letter again, re-enable an endpoint a receiver disabled with `410 Gone`.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use tickgate_actors::model::{rfc3339, AgentId};
use tickgate_actors::outbox::{Delivery, DeliveryStatus};
use tickgate_actors::store::DeliveryQuery;

use super::admin::Admin;
use super::error::ApiError;
use super::AppState;
use crate::outbox_worker::{status_name, NotifyError};

/// Largest page a listing returns.
const MAX_LIMIT: usize = 1000;
/// Page size when `limit` is not given.
const DEFAULT_LIMIT: usize = 100;

/// `GET /admin/deliveries` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this agent's deliveries (`namespace/name`).
    agent: Option<String>,
    /// `pending`, `succeeded` or `failed`.
    status: Option<String>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
    /// A `next_cursor` from the previous page.
    cursor: Option<String>,
}

/// A delivery as the admin API shows it: never the secret, the signature or the body.
pub(super) fn render(d: &Delivery) -> Value {
    json!({
        "id": d.id.to_string(),
        "agent": d.agent.to_string(),
        "endpoint": d.endpoint,
        "task_id": d.task_id.to_string(),
        "type": d.event.as_str(),
        "webhook_id": d.webhook_id,
        "status": status_name(d.status),
        "attempts": d.attempts,
        "next_attempt_at": d.next_attempt_at.map(rfc3339),
        "last_error": d.last_error,
        "created_at": rfc3339(d.created_at),
    })
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("no delivery {raw}")))
}

impl From<NotifyError> for ApiError {
    fn from(e: NotifyError) -> Self {
        match e {
            NotifyError::NoSuchDelivery(_) | NotifyError::NoSuchEndpoint { .. } => {
                ApiError::NotFound(e.to_string())
            }
            NotifyError::NotFailed { .. } => ApiError::Conflict(e.to_string()),
            NotifyError::Store(e) => ApiError::Store(e),
        }
    }
}

/// `GET /admin/deliveries?agent=&status=&limit=&cursor=`, oldest first.
#[utoipa::path(
    get,
    path = "/admin/deliveries",
    tag = "admin",
    operation_id = "list_deliveries",
    params(
        ListQuery
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Deliveries, oldest first", body = crate::http::schemas::DeliveryPage),
        (status = 400, description = "A filter, `limit` or `cursor` is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn list(
    _: Admin,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let agent = q
        .agent
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.parse::<AgentId>()
                .map_err(|e| ApiError::BadRequest(format!("agent: {e}")))
        })
        .transpose()?;
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<DeliveryStatus>().map_err(ApiError::BadRequest))
        .transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::BadRequest(format!(
            "limit: must be between 1 and {MAX_LIMIT}"
        )));
    }
    let after = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!("cursor: {c:?} is not a cursor from a listing"))
            })
        })
        .transpose()?;
    let page = state
        .store
        .deliveries(DeliveryQuery {
            agent,
            status,
            after,
            limit,
        })
        .await?;
    let next_cursor = (page.len() == limit)
        .then(|| page.last().map(|d| d.id.to_string()))
        .flatten();
    let deliveries: Vec<Value> = page.iter().map(render).collect();
    Ok(HttpResponse::Ok().json(json!({ "deliveries": deliveries, "next_cursor": next_cursor })))
}

/// `POST /admin/deliveries/{id}/retry`: `202` with the delivery, pending again.
#[utoipa::path(
    post,
    path = "/admin/deliveries/{id}/retry",
    tag = "admin",
    operation_id = "retry_delivery",
    params(
        ("id" = String, Path, description = "The delivery id"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "The delivery, pending again", body = crate::http::schemas::DeliveryRecord),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such delivery", body = crate::http::schemas::ErrorBody),
        (status = 409, description = "The delivery has not failed", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn retry(
    _: Admin,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let raw = path.into_inner();
    let id = parse_id(&raw)?;
    let Some(notifier) = &state.notifier else {
        return Err(ApiError::NotFound(format!("no delivery {raw}")));
    };
    let d = notifier.retry(id).await?;
    Ok(HttpResponse::Accepted().json(render(&d)))
}

/// `POST /admin/agents/{namespace}/{agent}/notify/{index}/enable`.
#[utoipa::path(
    post,
    path = "/admin/agents/{namespace}/{agent}/notify/{index}/enable",
    tag = "admin",
    operation_id = "enable_notify_endpoint",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
        ("index" = String, Path, description = "The endpoint's index in the agent's `[[agent.notify]]` list"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The endpoint takes deliveries again", body = crate::http::schemas::EndpointEnabled),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such agent or endpoint", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn enable(
    _: Admin,
    path: web::Path<(String, String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (namespace, name, index) = path.into_inner();
    let agent = AgentId::new(&namespace, &name)
        .map_err(|_| ApiError::NotFound(format!("no agent {namespace}/{name}")))?;
    let not_found = || ApiError::NotFound(format!("agent {agent} has no notify endpoint {index}"));
    let i: usize = index.parse().map_err(|_| not_found())?;
    let Some(notifier) = state
        .notifier
        .as_ref()
        .filter(|n| n.has_endpoint(&agent, i))
    else {
        return Err(not_found());
    };
    notifier.enable(&agent, i).await?;
    Ok(HttpResponse::Ok().json(json!({
        "agent": agent.to_string(),
        "endpoint": i,
        "enabled": true,
    })))
}
