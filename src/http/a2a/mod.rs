//! Every agent with `[agent.a2a] enabled = true` as an A2A 1.0 server (JSON-RPC binding, SPEC
//! section 10): the public Agent Card at `/a2a/{namespace}/{agent}/.well-known/agent-card.json`
//! and the JSON-RPC endpoint `POST /a2a/{namespace}/{agent}`.
//!
//! A2A adds no second way into tickgate: a new message is [`Intake::accept`] (idempotent on
//! `a2a:<messageId>`, scoped to the agent), a message for a task in `AWAITING_INPUT` is
//! [`Intake::resume`], a cancel is the store's `Write::Cancel` as on the admin API, a listing is
//! `Store::list_tasks` for the agent, and blocking sends and streams wait on the task event bus.
//! The wire format lives in [`wire`].
//!
//! [`Intake::accept`]: tickgate_actors::intake::Intake::accept
//! [`Intake::resume`]: tickgate_actors::intake::Intake::resume

mod wire;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tickgate_actors::events::Subscription;
use tickgate_actors::intake::{Accepted, Refused, ResumeRefused};
use tickgate_actors::model::{now_ms, AgentId, Source, Task, TaskId, TaskStatus};
use tickgate_actors::store::{
    write_async, CancelOutcome, IdempotencyKey, ListCursor, ListQuery, StoreError, Write, Written,
};
use tickgate_actors::token;

use super::admin::bearer_token;
use super::error::{error_body, ApiError};
use super::tasks::{load, progress, wait_for};
use super::{agent_in_path, no_such_agent, AgentLabel, AppState};
use wire::{Method, Request, RpcError};

/// Page size of `ListTasks` when `pageSize` is absent.
const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest `pageSize`.
const MAX_PAGE_SIZE: u64 = 100;
/// Most index entries one `ListTasks` page examines (as the admin listing).
const SCAN_LIMIT: usize = 5000;
/// A comment line sent on an idle stream, so that proxies and clients with read timeouts keep
/// a stream open while a long tick runs.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /a2a/{namespace}/{agent}/.well-known/agent-card.json`: the public Agent Card.
#[utoipa::path(
    get,
    path = "/a2a/{namespace}/{agent}/.well-known/agent-card.json",
    tag = "a2a",
    operation_id = "a2a_agent_card",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    responses(
        (status = 200, description = "The agent's A2A Agent Card", body = crate::http::schemas::A2aAgentCard,
            headers(("Cache-Control" = String, description = "`public, max-age=60`"))),
        (status = 404, description = "No such agent, or it is not an A2A agent", body = crate::http::schemas::ErrorBody),
    )
)]
pub async fn card(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let agent = agent_in_path(path)?;
    let cfg = state.a2a.get(&agent).ok_or_else(|| no_such_agent(&agent))?;
    let description = cfg
        .description
        .clone()
        .unwrap_or_else(|| format!("tickgate agent {agent}"));
    let skills = if cfg.skills.is_empty() {
        json!([{
            "id": agent.name(),
            "name": agent.to_string(),
            "description": description,
            "tags": [],
        }])
    } else {
        json!(cfg.skills)
    };
    let card = json!({
        "name": agent.to_string(),
        "description": description,
        "supportedInterfaces": [{
            "url": endpoint(&state, &agent),
            "protocolBinding": "JSONRPC",
            "protocolVersion": wire::PROTOCOL_VERSION,
        }],
        "version": env!("CARGO_PKG_VERSION"),
        "capabilities": {
            "streaming": true,
            "pushNotifications": false,
            "extendedAgentCard": false,
        },
        "securitySchemes": {
            "bearer": {
                "httpAuthSecurityScheme": {
                    "scheme": "Bearer",
                    "description": "the agent's webhook token",
                }
            }
        },
        "securityRequirements": [{ "schemes": { "bearer": { "list": [] } } }],
        "defaultInputModes": wire::INPUT_MODES,
        "defaultOutputModes": wire::OUTPUT_MODES,
        "skills": skills,
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=60"))
        .json(card))
}

/// The agent's JSON-RPC URL.
fn endpoint(state: &AppState, agent: &AgentId) -> String {
    format!(
        "{}/a2a/{}/{}",
        state.public_url,
        agent.namespace(),
        agent.name()
    )
}

/// `POST /a2a/{namespace}/{agent}`: one JSON-RPC call. Authentication first (the agent's webhook
/// token as bearer; `401` with `WWW-Authenticate: Bearer`), then the body's type and size, the
/// envelope, `A2A-Version`, and the method.
#[utoipa::path(
    post,
    path = "/a2a/{namespace}/{agent}",
    tag = "a2a",
    operation_id = "a2a_rpc",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
        ("A2A-Version" = Option<String>, Header, description = "`1.0` (a request without it is A2A 0.3, answered with VersionNotSupported)"),
    ),
    request_body(content = crate::http::schemas::JsonRpcRequest, content_type = "application/json",
        description = "One JSON-RPC 2.0 request: SendMessage, SendStreamingMessage, GetTask, CancelTask, SubscribeToTask, ListTasks"),
    security(("agent_token" = [])),
    responses(
        (status = 200, description = "A JSON-RPC response (a result or a JSON-RPC error), or for the streaming methods Server-Sent Events each holding one",
            content(
                (crate::http::schemas::JsonRpcResponse = "application/json"),
                (crate::http::schemas::A2aStreamEvent = "text/event-stream"),
            )),
        (status = 401, description = "The bearer token is not the agent's webhook token", body = crate::http::schemas::ErrorBody,
            headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 404, description = "No such agent, or it is not an A2A agent", body = crate::http::schemas::ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = crate::http::schemas::ErrorBody),
        (status = 413, description = "The body is too large", body = crate::http::schemas::ErrorBody),
        (status = 415, description = "Not a JSON content type, or a content encoding was declared", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed tokens from this client (error shape), or the agent's mailbox is full (JSON-RPC error)",
            body = crate::http::schemas::A2aRefusal, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "Breaker open, shutting down, overloaded or the store unavailable (error shape or JSON-RPC error)",
            body = crate::http::schemas::A2aRefusal, headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn rpc(
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let agent = agent_in_path(path)?;
    if !state.a2a.contains_key(&agent) {
        return Err(no_such_agent(&agent));
    }
    req.extensions_mut().insert(AgentLabel(agent.to_string()));
    let client = state.client_ip(&req);
    if let Err(wait) = state.failures.check(client) {
        return Err(ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil() as u64,
        });
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let authorized =
        presented.is_some_and(|t| state.tokens.resolve_for(&agent, &token::digest(t)).is_ok());
    if !authorized {
        state.failures.failed(client);
        return Ok(unauthorized());
    }
    if let Some(ct) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let essence = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" && !essence.ends_with("+json") {
            return Err(ApiError::UnsupportedMediaType(ct.to_string()));
        }
    }
    let body =
        super::limits::read_body(payload, &req, state.body_limits, &state.body_budget).await?;
    let request = match wire::parse_request(&body) {
        Ok(r) => r,
        Err((id, e)) => return Ok(rpc_error(&id, &e)),
    };
    if let Err(e) = wire::check_version(version(&req).as_deref()) {
        return Ok(rpc_error(&request.id, &e));
    }
    match call(&state, &agent, client, &request).await {
        Ok(Answer::Result(result)) => {
            Ok(HttpResponse::Ok().json(wire::result_response(&request.id, result)))
        }
        Ok(Answer::Stream(resp)) => Ok(resp),
        Err(e) => Ok(rpc_error(&request.id, &e)),
    }
}

/// The `A2A-Version` header, or the `A2A-Version` query parameter the spec also allows.
fn version(req: &HttpRequest) -> Option<String> {
    if let Some(v) = req.headers().get("a2a-version") {
        return Some(v.to_str().unwrap_or("?").to_string());
    }
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    pairs
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("a2a-version"))
        .map(|(_, v)| v)
}

/// `401` in the error shape, with the challenge A2A clients expect.
fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
        .json(error_body(
            "unauthorized",
            "a bearer token is required: the agent's webhook token",
        ))
}

/// A JSON-RPC error answer: HTTP 200, or 429/503 with `Retry-After` for a refusal a retry may
/// overcome. Internal details are logged, never sent.
fn rpc_error(id: &Value, e: &RpcError) -> HttpResponse {
    if let RpcError::Internal(detail) = e {
        tracing::error!(detail = %detail, "A2A call failed");
    }
    let mut resp = HttpResponse::build(e.http_status());
    if let Some(secs) = e.retry_after() {
        resp.insert_header((header::RETRY_AFTER, secs.to_string()));
    }
    resp.json(wire::error_response(id, e))
}

/// What a method answers with.
enum Answer {
    /// A JSON-RPC `result`.
    Result(Value),
    /// A stream of JSON-RPC responses as Server-Sent Events.
    Stream(HttpResponse),
}

async fn call(
    state: &web::Data<AppState>,
    agent: &AgentId,
    client: IpAddr,
    req: &Request,
) -> Result<Answer, RpcError> {
    match wire::method(&req.method)? {
        Method::SendMessage => send(state, agent, client, req, false).await,
        Method::SendStreamingMessage => send(state, agent, client, req, true).await,
        Method::GetTask => {
            let raw = wire::required_str(&req.params, "id")?;
            let history = wire::history_length(req.params.get("historyLength"), "historyLength")?;
            let task = own_task(state, agent, raw).await?;
            Ok(Answer::Result(render(state, &task, history, true)))
        }
        Method::CancelTask => cancel(state, agent, &req.params).await,
        Method::SubscribeToTask => {
            let raw = wire::required_str(&req.params, "id")?;
            let id = task_id(raw)?;
            let sub = state.events.subscribe(id);
            let task = own_task(state, agent, raw).await?;
            if task.status.is_terminal() {
                return Err(RpcError::UnsupportedOperation(format!(
                    "the task is {}; a finished task has no more events",
                    wire::state(task.status)
                )));
            }
            Ok(Answer::Stream(stream(
                state,
                req.id.clone(),
                sub,
                task,
                false,
            )))
        }
        Method::ListTasks => list(state, agent, &req.params).await,
    }
}

/// The task as an A2A `Task`.
fn render(state: &AppState, task: &Task, history: Option<u64>, artifacts: bool) -> Value {
    wire::task(task, history, artifacts, &state.poll_url(&task.id))
}

fn task_id(raw: &str) -> Result<TaskId, RpcError> {
    raw.parse()
        .map_err(|_| RpcError::TaskNotFound(raw.chars().take(64).collect()))
}

/// A task of this agent; another agent's task is not found, exactly like a missing one.
async fn own_task(state: &AppState, agent: &AgentId, raw: &str) -> Result<Task, RpcError> {
    let id = task_id(raw)?;
    match load(state, id).await.map_err(from_api)? {
        Some(task) if task.agent == *agent => Ok(task),
        _ => Err(RpcError::TaskNotFound(id.to_string())),
    }
}

/// `SendMessage` / `SendStreamingMessage`: a new task, or the answer to a task that requires
/// input; then the task at once (`returnImmediately`), after waiting for a terminal or
/// interrupted state (bounded by `server.max_wait`), or as a stream.
async fn send(
    state: &web::Data<AppState>,
    agent: &AgentId,
    client: IpAddr,
    req: &Request,
    streaming: bool,
) -> Result<Answer, RpcError> {
    let (msg, cfg) = wire::parse_send(&req.params)?;
    let (task, sub) = match &msg.task_id {
        Some(raw) => continue_task(state, agent, &msg, raw).await?,
        None => new_task(state, agent, client, &msg, &req.method).await?,
    };
    if streaming {
        return Ok(Answer::Stream(stream(
            state,
            req.id.clone(),
            sub,
            task,
            true,
        )));
    }
    let task = if cfg.return_immediately {
        std::sync::Arc::new(task)
    } else {
        wait_for(state, sub, std::sync::Arc::new(task), state.max_wait)
            .await
            .map_err(from_api)?
            .0
    };
    Ok(Answer::Result(
        json!({ "task": render(state, &task, cfg.history_length, true) }),
    ))
}

/// Submits a new task through the intake; a repeated `messageId` answers with the task it
/// created (the same message) or InvalidParams (another message).
async fn new_task(
    state: &AppState,
    agent: &AgentId,
    client: IpAddr,
    msg: &wire::Incoming,
    method: &str,
) -> Result<(Task, Subscription), RpcError> {
    let source = Source {
        method: "A2A".into(),
        remote_ip: client.to_string(),
        event: Some(method.to_string()),
        ..Source::default()
    };
    let mut task = Task::new(agent.clone(), json!({ "message": msg.message }), source);
    task.title = Some(
        msg.text
            .clone()
            .unwrap_or_else(|| format!("A2A message — {agent}")),
    );
    let body = serde_json::to_vec(&msg.message).unwrap_or_default();
    let key = IdempotencyKey {
        key: format!("a2a:{}", msg.message_id),
        body_sha256: Sha256::digest(&body).into(),
    };
    let sub = state.events.subscribe(task.id);
    match state.intake.accept(task, Some(key)).await {
        Ok(Accepted::New(task)) => Ok((Arc::unwrap_or_clone(task), sub)),
        Ok(Accepted::Duplicate(id)) => {
            drop(sub);
            let sub = state.events.subscribe(id);
            let original = load(state, id).await.map_err(from_api)?.ok_or_else(|| {
                RpcError::Internal(format!("idempotency key points at missing task {id}"))
            })?;
            Ok((original, sub))
        }
        Err(e) => Err(refused(e)),
    }
}

/// Answers a task in `AWAITING_INPUT` with the message (`resume.response = {"message": …}`).
async fn continue_task(
    state: &AppState,
    agent: &AgentId,
    msg: &wire::Incoming,
    raw: &str,
) -> Result<(Task, Subscription), RpcError> {
    let existing = own_task(state, agent, raw).await?;
    if msg
        .context_id
        .as_ref()
        .is_some_and(|c| *c != wire::context_id(&existing))
    {
        return Err(RpcError::InvalidParams(
            "message.contextId is not the context of the task named by message.taskId".into(),
        ));
    }
    let sub = state.events.subscribe(existing.id);
    // A repeated answer (a client's retry) is the answer already taken: the task as it is now,
    // never a second resume, even when the continuation has parked again.
    let last_answer = existing
        .resume
        .as_ref()
        .and_then(|r| r.response.pointer("/message/messageId"))
        .and_then(Value::as_str);
    if last_answer == Some(msg.message_id.as_str()) {
        return Ok((existing, sub));
    }
    not_awaiting(&existing)?;
    let resumed = state
        .intake
        .resume(existing.id, json!({ "message": msg.message }))
        .await
        .map_err(|e| match e {
            ResumeRefused::UnknownTask(id) => RpcError::TaskNotFound(id.to_string()),
            ResumeRefused::NotAwaiting { status, .. } => {
                let mut t = existing.clone();
                t.status = status;
                not_awaiting(&t).err().unwrap_or_else(|| {
                    RpcError::Internal("resume refused a task that awaits input".into())
                })
            }
            ResumeRefused::UnknownAgent(_) => RpcError::TaskNotFound(existing.id.to_string()),
            ResumeRefused::ShuttingDown => refused(Refused::ShuttingDown),
            ResumeRefused::MailboxFull => refused(Refused::MailboxFull),
            ResumeRefused::StoreUnavailable(e) => refused(Refused::StoreUnavailable(e)),
        })?;
    Ok((Arc::unwrap_or_clone(resumed), sub))
}

/// UnsupportedOperation for a task that cannot take a message now.
fn not_awaiting(task: &Task) -> Result<(), RpcError> {
    match task.status {
        TaskStatus::AwaitingInput => Ok(()),
        s if s.is_terminal() => Err(RpcError::UnsupportedOperation(format!(
            "the task is {}; a task in a terminal state takes no more messages",
            wire::state(s)
        ))),
        s => Err(RpcError::UnsupportedOperation(format!(
            "the task is {}; only a task that requires input takes a message",
            wire::state(s)
        ))),
    }
}

/// The intake's refusals as JSON-RPC errors; nothing was stored for any of them.
fn refused(e: Refused) -> RpcError {
    let unavailable = |reason, message: &str, status, retry_after| RpcError::Unavailable {
        reason,
        message: message.to_string(),
        status,
        retry_after,
    };
    match e {
        Refused::UnknownAgent(agent) => RpcError::Internal(format!("no agent {agent}")),
        Refused::Conflict(id) => RpcError::InvalidParams(format!(
            "message.messageId was already used for task {id} with a different message"
        )),
        Refused::ShuttingDown => unavailable(
            "SHUTTING_DOWN",
            "the server is shutting down; retry later",
            StatusCode::SERVICE_UNAVAILABLE,
            1,
        ),
        Refused::BreakerOpen { retry_after } => unavailable(
            "BREAKER_OPEN",
            "the agent is failing and its circuit breaker is open; retry later",
            StatusCode::SERVICE_UNAVAILABLE,
            retry_after.as_secs_f64().ceil() as u64,
        ),
        Refused::MailboxFull => unavailable(
            "MAILBOX_FULL",
            "the agent's mailbox is full; retry later",
            StatusCode::TOO_MANY_REQUESTS,
            1,
        ),
        Refused::StoreUnavailable(e) => store_down(e),
    }
}

fn store_down(e: StoreError) -> RpcError {
    tracing::error!(error = %e, "store unavailable");
    RpcError::Unavailable {
        reason: "STORE_UNAVAILABLE",
        message: "the task store is unavailable; retry later".into(),
        status: StatusCode::SERVICE_UNAVAILABLE,
        retry_after: 1,
    }
}

/// The edge's errors met while serving a call (store reads, waits) as JSON-RPC errors.
fn from_api(e: ApiError) -> RpcError {
    match e {
        ApiError::Store(e) => store_down(e),
        other => RpcError::Internal(other.to_string()),
    }
}

/// `CancelTask`: the admin API's cancel (the store writer decides against the current status).
async fn cancel(
    state: &AppState,
    agent: &AgentId,
    params: &Map<String, Value>,
) -> Result<Answer, RpcError> {
    let raw = wire::required_str(params, "id")?;
    let task = own_task(state, agent, raw).await?;
    let write = Write::Cancel {
        id: task.id,
        at_ms: now_ms(),
    };
    match write_async(state.store.as_ref(), write).await {
        Ok(Written::Cancel(CancelOutcome::Revoked(task))) => {
            let task: Arc<Task> = Arc::from(task);
            state.events.publish(&task);
            tracing::info!(task_id = %task.id, agent = %task.agent, "task canceled over A2A");
            Ok(Answer::Result(render(state, &task, None, true)))
        }
        Ok(Written::Cancel(CancelOutcome::NotCancellable(status))) => Err(
            RpcError::TaskNotCancelable(if status == TaskStatus::Started {
                "the task's tick is running and is not interrupted".to_string()
            } else {
                format!(
                    "the task is {} and can no longer be canceled",
                    wire::state(status)
                )
            }),
        ),
        Ok(Written::Cancel(CancelOutcome::Unknown)) => Err(RpcError::TaskNotFound(raw.into())),
        Ok(other) => Err(RpcError::Internal(format!(
            "store answered a cancel with {other:?}"
        ))),
        Err(e) => Err(store_down(e)),
    }
}

/// `ListTasks`: the agent's tasks, newest first by creation (tickgate's listing order), one page
/// per call; filters by state, context and status time.
async fn list(
    state: &AppState,
    agent: &AgentId,
    params: &Map<String, Value>,
) -> Result<Answer, RpcError> {
    let invalid = |m: &str| RpcError::InvalidParams(m.to_string());
    let page_size = match params.get("pageSize") {
        None | Some(Value::Null) => DEFAULT_PAGE_SIZE,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .ok_or_else(|| invalid("pageSize must be a whole number from 1 to 100"))?,
    };
    let cursor = match params.get("pageToken") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            ListCursor::decode(s)
                .ok_or_else(|| invalid("pageToken is not a nextPageToken of this listing"))?,
        ),
        Some(_) => return Err(invalid("pageToken must be a string")),
    };
    let statuses: Option<&[TaskStatus]> = match params.get("status") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() || s == "TASK_STATE_UNSPECIFIED" => None,
        Some(Value::String(s)) => {
            Some(wire::statuses(s).ok_or_else(|| invalid("status is not a TASK_STATE_* value"))?)
        }
        Some(_) => return Err(invalid("status must be a string")),
    };
    let context = match params.get("contextId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(invalid("contextId must be a string")),
    };
    let after_ms = match params.get("statusTimestampAfter") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            humantime::parse_rfc3339_weak(s.trim_end_matches(['Z', 'z']))
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .ok_or_else(|| invalid("statusTimestampAfter must be an RFC 3339 time in UTC"))?,
        ),
        Some(_) => return Err(invalid("statusTimestampAfter must be a string")),
    };
    let artifacts = match params.get("includeArtifacts") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("includeArtifacts must be a boolean")),
    };
    let history = wire::history_length(params.get("historyLength"), "historyLength")?;
    if statuses.is_some_and(<[TaskStatus]>::is_empty) {
        // REJECTED and AUTH_REQUIRED: tickgate has no such tasks.
        return Ok(Answer::Result(json!({
            "tasks": [], "nextPageToken": "", "pageSize": page_size, "totalSize": 0,
        })));
    }
    let page = state
        .store
        .list_tasks(ListQuery {
            agent: Some(agent.clone()),
            status: statuses.filter(|s| s.len() == 1).map(|s| s[0]),
            since_ms: None,
            until_ms: None,
            cursor,
            limit: page_size as usize,
            scan_limit: SCAN_LIMIT,
        })
        .await
        .map_err(store_down)?;
    let tasks: Vec<Value> = page
        .tasks
        .iter()
        .filter(|t| statuses.is_none_or(|s| s.contains(&t.status)))
        .filter(|t| context.is_none_or(|c| wire::context_id(t) == c))
        .filter(|t| after_ms.is_none_or(|a| wire::status_time(t) > a))
        .map(|t| render(state, t, history, artifacts))
        .collect();
    Ok(Answer::Result(json!({
        "totalSize": tasks.len(),
        "tasks": tasks,
        "nextPageToken": page.next_cursor.map(|c| c.encode()).unwrap_or_default(),
        "pageSize": page_size,
    })))
}

/// What a stream holds between frames.
struct StreamState {
    state: web::Data<AppState>,
    id: Value,
    sub: Subscription,
    task_id: TaskId,
    seen: (u32, u64, u8),
    frames: VecDeque<web::Bytes>,
    done: bool,
    stop_at_input: bool,
}

impl StreamState {
    fn frame(&self, result: Value) -> web::Bytes {
        let body = wire::result_response(&self.id, result).to_string();
        web::Bytes::from(format!("data: {body}\n\n"))
    }

    /// Queues the events a new state means: the artifact, then the status; and ends the stream
    /// at a terminal state (and, for a send, at an interrupted one).
    fn push(&mut self, task: &Task) {
        if let Some(update) = wire::artifact_update(task) {
            let f = self.frame(update);
            self.frames.push_back(f);
        }
        let f = self.frame(wire::status_update(task));
        self.frames.push_back(f);
        self.seen = progress(task);
        self.done = ends(task.status, self.stop_at_input);
    }
}

fn ends(status: TaskStatus, stop_at_input: bool) -> bool {
    status.is_terminal() || (stop_at_input && status == TaskStatus::AwaitingInput)
}

/// The SSE answer: `{"task": …}` with the current state first, then a `statusUpdate` per change
/// (an `artifactUpdate` with the response before the completed status), closing at the terminal
/// state. A send's stream also closes when the task requires input (the answer is a new message
/// with its own stream); a subscription stays until the end.
fn stream(
    state: &web::Data<AppState>,
    id: Value,
    sub: Subscription,
    task: Task,
    stop_at_input: bool,
) -> HttpResponse {
    let mut s = StreamState {
        state: state.clone(),
        id,
        sub,
        task_id: task.id,
        seen: progress(&task),
        frames: VecDeque::new(),
        done: ends(task.status, stop_at_input),
        stop_at_input,
    };
    let first = s.frame(json!({ "task": render(state, &task, None, true) }));
    s.frames.push_back(first);
    let body = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(frame) = s.frames.pop_front() {
                return Some((Ok::<_, actix_web::Error>(frame), s));
            }
            if s.done {
                return None;
            }
            match tokio::time::timeout(KEEPALIVE, s.sub.next()).await {
                Err(_) => return Some((Ok(web::Bytes::from_static(b": keepalive\n\n")), s)),
                Ok(Some(task)) => {
                    if progress(&task) > s.seen {
                        s.push(&task);
                    }
                }
                Ok(None) => {
                    // The hub forgot the task (terminal): the store has its last state.
                    if let Ok(Some(task)) = load(&s.state, s.task_id).await {
                        if progress(&task) > s.seen {
                            s.push(&task);
                        }
                    }
                    s.done = true;
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .streaming(body)
}
