//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the code.
//!
//! Operations come from the `#[utoipa::path]` attribute on each handler and schemas from
//! `ToSchema` derives, so the document changes with the code that serves it. The route table in
//! `super` (`ROUTES`) registers the routes; `tests/openapi.rs` fails when a route in the table is
//! missing from this document (or the document names a route that is not served). Every 4xx/5xx
//! response refers to the one shared [`ErrorBody`] schema.
//!
//! Several handlers answer with JSON built in place rather than with a Rust type; the schemas
//! for those answers are declared here, and the API fuzz run (`benches/schemathesis.sh`) checks
//! them against what the server really sends.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{a2a, admin, admin_tasks, deliveries, health, tasks, ui, webhook};

/// The generated document. The route list here is checked against the route table by
/// `tests/openapi.rs`, so a handler that is registered but not listed fails the tests.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tickgate",
        description = "Turns incoming webhooks into serialized, durable ticks of long-lived agents. \
            Every error answer has the body `{\"error\":{\"code\",\"message\"}}` (schema `ErrorBody`); \
            every 429 and 503 carries `Retry-After`. Admin routes exist only when an admin token is configured."
    ),
    paths(
        webhook::post_by_token,
        webhook::get_by_token,
        webhook::post_named,
        webhook::get_named,
        tasks::get,
        tasks::resume,
        tasks::events,
        tasks::status_alias,
        a2a::card,
        a2a::rpc,
        health::healthz,
        health::ready,
        health::ready_agent,
        health::metrics,
        document,
        admin::list_agents,
        admin::rotate_token,
        admin::restart_agent,
        admin::reset_breaker,
        deliveries::list,
        deliveries::retry,
        deliveries::enable,
        admin_tasks::list,
        admin_tasks::replay,
        admin_tasks::cancel,
        admin_tasks::replay_agent,
        ui::page,
        ui::script,
        ui::style,
        ui::events,
        ui::stats,
        ui::task,
    ),
    modifiers(&Aliases, &BearerSchemes),
    tags(
        (name = "triggers", description = "Webhook triggers: one task per accepted request"),
        (name = "tasks", description = "Task records, their event streams, and answers to tasks awaiting input"),
        (name = "health", description = "Liveness, readiness and metrics"),
        (name = "admin", description = "Operator API; needs the admin bearer token"),
        (name = "ui", description = "The operator page (its data comes from the admin API)"),
        (name = "a2a", description = "Agents as A2A 1.0 servers (JSON-RPC binding); see docs/api.md, A2A"),
    )
)]
pub struct ApiDoc;

/// Paths served by the same handlers as another path (the compatibility aliases), documented as
/// copies of it so that every served path is in the document.
const ALIASES: &[(&str, &str)] = &[("/api/webhooks/agents/{token}", "/webhooks/{token}")];

struct Aliases;

impl Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (alias, original) in ALIASES {
            let Some(item) = openapi.paths.paths.get(*original) else {
                continue;
            };
            let mut item = item.clone();
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                // Operation ids must be unique in a document.
                op.operation_id = op.operation_id.as_ref().map(|id| format!("{id}_alias"));
            }
            openapi.paths.paths.insert(alias.to_string(), item);
        }
    }
}

/// The two bearer credentials: the admin token, and an agent's webhook token (accepted by
/// `POST /tasks/{id}/resume` for that agent's tasks).
struct BearerSchemes;

impl Modify for BearerSchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("admin_token", "The admin token (`[admin] token_env`)."),
            (
                "agent_token",
                "The webhook token of the task's agent (resume only).",
            ),
        ] {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.description = Some(what.to_string());
            components.add_security_scheme(name, SecurityScheme::Http(http));
        }
    }
}

/// The document as served, rendered once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the OpenAPI document serializes")
    })
}

/// `GET /openapi.json`.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object))
)]
pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(json())
}
