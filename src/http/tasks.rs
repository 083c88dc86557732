//! The task resource: polling, the DocsGPT-style alias, Server-Sent Events, and the wait used by
//! synchronous triggers.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use futures_util::stream;
use serde::Deserialize;
use serde_json::Value;
use tickgate_actors::events::Subscription;
use tickgate_actors::model::{Task, TaskId, TaskStatus};

use subtle::ConstantTimeEq;
use tickgate_actors::intake::ResumeRefused;
use tickgate_actors::token;

use super::admin::bearer_token;
use super::error::ApiError;
use super::AppState;

pub use super::record::TaskRecord;

/// Reads a task off the arbiter thread.
pub async fn load(state: &AppState, id: TaskId) -> Result<Option<Task>, ApiError> {
    Ok(state.store.task(id).await?)
}

fn parse_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("no task with id {raw:?}")))
}

async fn load_or_404(state: &AppState, raw: &str) -> Result<Task, ApiError> {
    let id = parse_id(raw)?;
    load(state, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task with id {raw:?}")))
}

/// `GET /tasks/{id}`.
#[utoipa::path(
    get,
    path = "/tasks/{id}",
    tag = "tasks",
    operation_id = "get_task",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "The task", body = TaskRecord),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn get(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let task = load_or_404(&state, &id).await?;
    Ok(HttpResponse::Ok().json(TaskRecord::new(&task, &state)))
}

/// Query of the DocsGPT-compatible alias.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    task_id: String,
}

/// `GET /api/task_status?task_id={id}`.
#[utoipa::path(
    get,
    path = "/api/task_status",
    tag = "tasks",
    params(StatusQuery),
    responses(
        (status = 200, description = "The task", body = TaskRecord),
        (status = 400, description = "`task_id` is missing", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn status_alias(
    query: web::Query<StatusQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let task = load_or_404(&state, &query.task_id).await?;
    Ok(HttpResponse::Ok().json(TaskRecord::new(&task, &state)))
}

/// Waits until the task is terminal or awaiting input, or `wait` runs out; returns the latest
/// known state (the publisher's `Arc`, not a copy) and whether the wait ran out. `sub` must have
/// been taken before `task` was read, so that no change can fall between the read and the
/// subscription.
pub async fn wait_for(
    state: &AppState,
    mut sub: Subscription,
    mut task: Arc<Task>,
    wait: Duration,
) -> Result<(Arc<Task>, bool), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    // A task waiting for input is a stopping point too: nothing happens until someone answers.
    while !task.status.is_stopping_point() {
        tokio::select! {
            next = sub.next() => match next {
                Some(t) => task = t,
                None => {
                    if let Some(stored) = load(state, task.id).await? {
                        task = Arc::new(stored);
                    }
                    let timed_out = !task.status.is_stopping_point();
                    return Ok((task, timed_out));
                }
            },
            _ = tokio::time::sleep_until(deadline) => return Ok((task, true)),
        }
    }
    Ok((task, false))
}

/// [`wait_for`] for a task the caller has just submitted and kept only the id of, watched
/// through [`TaskEvents::subscribe_outcome`](tickgate_actors::events::TaskEvents::subscribe_outcome):
/// it holds no copy of the task while the agent runs it (#16). Should the wait end before a
/// stopping point, the answer is the task as stored then.
pub async fn wait_for_new(
    state: &AppState,
    mut sub: Subscription,
    id: TaskId,
    wait: Duration,
) -> Result<(Arc<Task>, bool), ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut latest = None;
    loop {
        tokio::select! {
            next = sub.next() => match next {
                Some(t) if t.status.is_stopping_point() => return Ok((t, false)),
                // Seen only when someone else watches this task's progress.
                Some(t) => latest = Some(t),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let task = match load(state, id).await? {
        Some(stored) => Arc::new(stored),
        None => latest
            .ok_or_else(|| ApiError::Internal(format!("accepted task {id} is not in the store")))?,
    };
    let timed_out = !task.status.is_stopping_point();
    Ok((task, timed_out))
}

/// Orders states so that a stream never goes backwards when a stored read and a published event
/// overlap: by attempt, then tick (a resumed task's continuation runs as a later tick of the same
/// attempt), then status within the tick. A PENDING task holding an answer comes after the
/// AWAITING_INPUT it answers, which has the same attempt and tick.
pub(super) fn progress(task: &Task) -> (u32, u64, u8) {
    let rank = match task.status {
        TaskStatus::Pending if task.resume.is_some() => 3,
        TaskStatus::Pending => 0,
        TaskStatus::Started => 1,
        TaskStatus::Retry | TaskStatus::AwaitingInput => 2,
        TaskStatus::Success | TaskStatus::Failure | TaskStatus::Revoked => 4,
    };
    (task.attempt, task.tick, rank)
}

fn sse_frame(task: &Task, state: &AppState) -> web::Bytes {
    let data = serde_json::to_string(&TaskRecord::new(task, state)).unwrap_or_default();
    web::Bytes::from(format!("event: status\ndata: {data}\n\n"))
}

/// `GET /tasks/{id}/events`: one `status` event per change, closing after the terminal one.
/// Works for finished tasks too (one event, then the end).
#[utoipa::path(
    get,
    path = "/tasks/{id}/events",
    tag = "tasks",
    operation_id = "task_events",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "Server-Sent Events: `event: status` with the task record as `data`, one per change, closing after the terminal one",
            content_type = "text/event-stream", body = crate::http::schemas::TaskEvent),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn events(
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    let sub = state.events.subscribe(id);
    let task = load(&state, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task with id {:?}", id.to_string())))?;
    let first = sse_frame(&task, &state);
    let done = task.status.is_terminal();
    let seen = progress(&task);
    let body = stream::unfold(
        (Some(first), sub, state, seen, done),
        |(first, mut sub, state, seen, done)| async move {
            if let Some(frame) = first {
                return Some((
                    Ok::<_, actix_web::Error>(frame),
                    (None, sub, state, seen, done),
                ));
            }
            if done {
                return None;
            }
            loop {
                let task = sub.next().await?;
                if progress(&task) <= seen {
                    continue;
                }
                let frame = sse_frame(&task, &state);
                let done = task.status.is_terminal();
                return Some((Ok(frame), (None, sub, state, progress(&task), done)));
            }
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body))
}

/// `POST /tasks/{id}/resume`: answers a task parked in `AWAITING_INPUT` (SPEC section 8). The
/// caller proves itself with the task's agent's webhook token or the admin token as a bearer
/// token; failures count toward the per-client auth-failure limit like wrong webhook tokens.
#[utoipa::path(
    post,
    path = "/tasks/{id}/resume",
    tag = "tasks",
    operation_id = "resume_task",
    params(("id" = String, Path, description = "The task id")),
    request_body(content = crate::http::schemas::ResumeBody, content_type = "application/json"),
    security(("admin_token" = []), ("agent_token" = [])),
    responses(
        (status = 202, description = "The answer is recorded; the task is queued to continue", body = TaskRecord),
        (status = 400, description = "The body has no `response` field", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "Neither the admin token nor the agent's webhook token", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = crate::http::schemas::ErrorBody),
        (status = 409, description = "The task is not awaiting input", body = crate::http::schemas::ErrorBody),
        (status = 413, description = "The body is too large", body = crate::http::schemas::ErrorBody),
        (status = 415, description = "The body declares a content encoding", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "Shutting down, overloaded, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn resume(
    id: web::Path<String>,
    req: actix_web::HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let client = state.client_ip(&req);
    if let Err(wait) = state.failures.check(client) {
        return Err(ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil() as u64,
        });
    }
    let task = load_or_404(&state, &id).await?;
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    if !may_answer(&state, &task, presented) {
        state.failures.failed(client);
        return Err(ApiError::WrongToken);
    }
    // The same size, time and in-flight limits as a trigger's body.
    let body =
        super::limits::read_body(payload, &req, state.body_limits, &state.body_budget).await?;
    let mut fields: serde_json::Map<String, Value> =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let response = fields.remove("response").ok_or_else(|| {
        ApiError::BadRequest("the body must be a JSON object with a \"response\" field".into())
    })?;
    let resumed = state
        .intake
        .resume(task.id, response)
        .await
        .map_err(|e| match e {
            ResumeRefused::UnknownTask(id) => {
                ApiError::NotFound(format!("no task with id {:?}", id.to_string()))
            }
            e @ ResumeRefused::NotAwaiting { .. } => ApiError::Conflict(e.to_string()),
            ResumeRefused::UnknownAgent(agent) => super::no_such_agent(&agent),
            ResumeRefused::ShuttingDown => ApiError::ShuttingDown,
            ResumeRefused::MailboxFull => ApiError::MailboxFull,
            ResumeRefused::StoreUnavailable(e) => ApiError::Store(e),
        })?;
    Ok(HttpResponse::Accepted().json(TaskRecord::new(&resumed, &state)))
}

/// Whether `presented` is the admin token or the webhook token of the task's agent; both
/// comparisons are constant-time (the webhook token by its digest).
fn may_answer(state: &AppState, task: &Task, presented: Option<&str>) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let admin = state
        .admin_token
        .as_ref()
        .is_some_and(|t| bool::from(t.as_bytes().ct_eq(presented.as_bytes())));
    admin
        || state
            .tokens
            .resolve_for(&task.agent, &token::digest(presented))
            .is_ok()
}
