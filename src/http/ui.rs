//! The operator page (SPEC section 12) and the admin routes that feed it.
//!
//! `GET /ui` serves one HTML page; its script and style are separate routes under `/ui/`,
//! compiled into the binary with `include_str!`, so the page needs no build step and no external
//! asset, and the Content-Security-Policy can allow only the page's own origin
//! (`default-src 'self'`, no `'unsafe-inline'`). The page itself holds no data: it asks for the
//! admin token, keeps it in the tab's `sessionStorage` only, and reads everything from the admin
//! API with `Authorization: Bearer`.
//!
//! Live updates come from `GET /admin/events`, a Server-Sent Events stream that requires the
//! admin token like every admin route. `EventSource` cannot send headers, and a token in a query
//! string would end up in proxy logs and browser history, so the page reads the stream with
//! `fetch()` and parses the frames itself. The stream sends:
//! - `agents`: every agent's breaker, queue, tick count, schedules and tick history, once a
//!   second (the charts move with time even when nothing ticks); the first frame carries the
//!   whole history window, later ones only its last seconds, which the page merges;
//! - `task`: a task record each time any task changes state;
//! - `deliveries`: the failed status callbacks, when that list changes;
//! - `resync`: the stream fell behind and dropped task changes; the page re-reads its lists.

mod stats;

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use futures_util::stream;
use serde_json::{json, Value};
use tickgate_actors::breaker::{BreakerState, Snapshot};
use tickgate_actors::model::{now_ms, Task};
use tickgate_actors::outbox::DeliveryStatus;
use tickgate_actors::registry::List;
use tickgate_actors::store::DeliveryQuery;
use tokio::sync::broadcast;

use super::admin::Admin;
use super::error::ApiError;
use super::tasks::{load, TaskRecord};
use super::AppState;
pub use stats::{StatsRecorder, TickStats};

/// The page, compiled in.
const INDEX_HTML: &str = include_str!("ui/index.html");
/// The page's script, compiled in.
const APP_JS: &str = include_str!("ui/app.js");
/// The page's style, compiled in.
const APP_CSS: &str = include_str!("ui/app.css");

/// Only the page's own origin may provide scripts, styles, images and connections; nothing may
/// frame the page, and no form posts anywhere.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often the event stream sends the agents frame.
const AGENTS_EVERY: Duration = Duration::from_secs(1);
/// Every how many agents frames the failed deliveries are read again.
const DELIVERIES_EVERY: u32 = 5;
/// Most failed deliveries the stream shows.
const DELIVERIES_SHOWN: usize = 100;

/// A static asset with the page's security headers.
fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// `GET /ui`: the operator page.
#[utoipa::path(
    get,
    path = "/ui",
    tag = "ui",
    operation_id = "ui_page",
    responses(
        (status = 200, description = "The operator page; with a Content-Security-Policy that allows only the page's own origin", content_type = "text/html; charset=utf-8", body = String),
    )
)]
pub async fn page() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`: the page's script.
#[utoipa::path(
    get,
    path = "/ui/app.js",
    tag = "ui",
    operation_id = "ui_script",
    responses(
        (status = 200, description = "The page's script; with a Content-Security-Policy that allows only the page's own origin", content_type = "text/javascript; charset=utf-8", body = String),
    )
)]
pub async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/app.css`: the page's style.
#[utoipa::path(
    get,
    path = "/ui/app.css",
    tag = "ui",
    operation_id = "ui_style",
    responses(
        (status = 200, description = "The page's style; with a Content-Security-Policy that allows only the page's own origin", content_type = "text/css; charset=utf-8", body = String),
    )
)]
pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// `GET /admin/stats`: every agent's ticks per second and tick durations over the last
/// [`stats::WINDOW_SECS`] seconds, for the page's charts and for scripts.
#[utoipa::path(
    get,
    path = "/admin/stats",
    tag = "admin",
    operation_id = "admin_stats",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every agent's tick history over the window", body = crate::http::schemas::TickStatsAnswer),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn stats(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let agents = state.registry.send(List).await?;
    let now = now_ms();
    let agents: Vec<Value> = agents
        .iter()
        .map(|a| json!({ "id": a.spec.id.to_string(), "history": state.tick_stats.history(&a.spec.id, now) }))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "window_secs": stats::WINDOW_SECS, "agents": agents })))
}

/// `GET /admin/tasks/{id}`: the task record with what only an operator sees: its `inputs`.
#[utoipa::path(
    get,
    path = "/admin/tasks/{id}",
    tag = "admin",
    operation_id = "admin_task",
    params(
        ("id" = String, Path, description = "The task id"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The task record with its `inputs`", body = crate::http::schemas::AdminTaskRecord),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn task(
    _: Admin,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let raw = id.into_inner();
    let not_found = || ApiError::NotFound(format!("no task with id {raw:?}"));
    let id = raw.parse().map_err(|_| not_found())?;
    let task = load(&state, id).await?.ok_or_else(not_found)?;
    let mut record = serde_json::to_value(TaskRecord::new(&task, &state))
        .map_err(|e| ApiError::Internal(format!("cannot render task: {e}")))?;
    record["inputs"] = task.inputs.to_value();
    Ok(HttpResponse::Ok().json(record))
}

/// Every agent as the `agents` frame shows it at `now` (Unix ms): the `/admin/agents` fields
/// plus the history of the last `history_secs` seconds.
async fn agents_frame(state: &AppState, now: u64, history_secs: u64) -> Result<Value, ApiError> {
    let agents = state.registry.send(List).await?;
    let breakers = state.breaker.send(Snapshot).await?;
    let agents: Vec<Value> = agents
        .iter()
        .map(|a| {
            json!({
                "id": a.spec.id.to_string(),
                "breaker": breakers.get(&a.spec.id).copied().unwrap_or(BreakerState::Closed),
                "queued": a.mailbox.queued(),
                "mailbox": a.mailbox.capacity(),
                "ticks": a.ticks.load(std::sync::atomic::Ordering::Acquire),
                "schedules": super::admin::schedules(state, &a.spec.id, now / 1000),
                "history": state.tick_stats.recent(&a.spec.id, now, history_secs),
            })
        })
        .collect();
    Ok(json!({ "now": now, "window_secs": stats::WINDOW_SECS, "agents": agents }))
}

/// The failed deliveries, newest last, as `GET /admin/deliveries?status=failed` shows them.
async fn deliveries_frame(state: &AppState) -> Result<Value, ApiError> {
    let page = state
        .store
        .deliveries(DeliveryQuery {
            agent: None,
            status: Some(DeliveryStatus::Failed),
            after: None,
            limit: DELIVERIES_SHOWN,
        })
        .await?;
    let deliveries: Vec<Value> = page.iter().map(super::deliveries::render).collect();
    Ok(json!({ "deliveries": deliveries }))
}

/// One SSE frame.
fn frame(event: &str, data: &Value) -> web::Bytes {
    web::Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// What one event stream holds between frames.
struct Feed {
    state: web::Data<AppState>,
    tasks: broadcast::Receiver<std::sync::Arc<Task>>,
    every: tokio::time::Interval,
    beats: u32,
    /// The second of the last agents frame: the next one resends history from the second before
    /// it, so a tick counted after a frame was built is in the next, however late that comes.
    last_second: Option<u64>,
    /// The last deliveries frame sent, to send it again only when it changed.
    deliveries: Option<Value>,
}

impl Feed {
    /// The next frame: a task change as soon as it happens, else the periodic frames.
    async fn next(&mut self) -> Result<web::Bytes, ApiError> {
        tokio::select! {
            changed = self.tasks.recv() => match changed {
                Ok(task) => {
                    let record = serde_json::to_value(TaskRecord::new(&task, &self.state))
                        .map_err(|e| ApiError::Internal(format!("cannot render task: {e}")))?;
                    Ok(frame("task", &record))
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Ok(frame("resync", &json!({ "missed": missed })))
                }
                Err(broadcast::error::RecvError::Closed) => {
                    Err(ApiError::Internal("the task feed closed".into()))
                }
            },
            _ = self.every.tick() => {
                let now = now_ms();
                let secs = self.last_second.map_or(stats::WINDOW_SECS, |last| {
                    (now / 1000).saturating_sub(last) + 2
                });
                self.last_second = Some(now / 1000);
                let mut out = frame("agents", &agents_frame(&self.state, now, secs).await?).to_vec();
                if self.beats.is_multiple_of(DELIVERIES_EVERY) {
                    let failed = deliveries_frame(&self.state).await?;
                    if self.deliveries.as_ref() != Some(&failed) {
                        out.extend_from_slice(&frame("deliveries", &failed));
                        self.deliveries = Some(failed);
                    }
                }
                self.beats = self.beats.wrapping_add(1);
                Ok(web::Bytes::from(out))
            }
        }
    }
}

/// `GET /admin/events`: the page's live feed (see the module documentation for its frames).
/// Subscribes before the first frame, so that no change after the page's initial reads is
/// missed. A failure ends the stream; the page reconnects and re-reads.
#[utoipa::path(
    get,
    path = "/admin/events",
    tag = "admin",
    operation_id = "admin_events",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Server-Sent Events: `agents` (every second), `task` (each change), `deliveries` (failed callbacks, when they change), `resync`", content_type = "text/event-stream", body = crate::http::schemas::AdminEvent),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn events(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let tasks = state.events.subscribe_all();
    let mut every = tokio::time::interval(AGENTS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let feed = Feed {
        state,
        tasks,
        every,
        beats: 0,
        last_second: None,
        deliveries: None,
    };
    let body = stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        match feed.next().await {
            Ok(bytes) => Some((Ok::<_, actix_web::Error>(bytes), Some(feed))),
            Err(e) => {
                tracing::warn!(error = %e, "admin event stream ended");
                None
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Reverse proxies such as nginx would otherwise hold frames back.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}
