//! Admin API, enabled only when an admin token is configured. Every handler takes [`Admin`],
//! which checks the bearer token in constant time before anything else runs.

use std::future::{ready, Ready};

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use serde_json::json;
use subtle::ConstantTimeEq;
use tickgate_actors::model::AgentId;
use tickgate_actors::registry::{List, Rotate, RotateError};

use super::error::ApiError;
use super::AppState;

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let expected = req
            .app_data::<web::Data<AppState>>()
            .and_then(|s| s.admin_token.clone());
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = match (expected, presented) {
            (Some(expected), Some(presented)) => {
                bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
            }
            _ => false,
        };
        ready(if ok {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        })
    }
}

/// `GET /admin/agents`: every agent with its queue and tick count; never a token.
pub async fn list_agents(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let agents = state.registry.send(List).await?;
    let agents: Vec<_> = agents
        .iter()
        .map(|a| {
            json!({
                "id": a.spec.id.to_string(),
                "namespace": a.spec.id.namespace(),
                "name": a.spec.id.name(),
                "queued": a.mailbox.queued(),
                "mailbox": a.mailbox.capacity(),
                "ticks": a.ticks.load(std::sync::atomic::Ordering::Acquire),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "agents": agents })))
}

/// `POST /admin/agents/{namespace}/{agent}/token`: a new token, shown in this answer only.
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
            RotateError::Pinned(_) => ApiError::Conflict(e.to_string()),
            RotateError::Store(e) => ApiError::Store(e),
        })?;
    tracing::info!(agent = %agent, "webhook token rotated");
    Ok(HttpResponse::Ok().json(json!({
        "agent": agent.to_string(),
        "token": token,
        "webhook_url": format!("{}/webhooks/{token}", state.public_url),
    })))
}
