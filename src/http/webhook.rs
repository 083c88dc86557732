//! Trigger routes: authenticate the token, run the agent's ingress gate, parse the body, submit
//! the task to the agent, and answer at once (202) or after waiting for the tick (200, or 202
//! with `timed_out`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::HttpMessage;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};
use tickgate_actors::agent::AgentHandle;
use tickgate_actors::intake::Accepted;
use tickgate_actors::model::{AgentId, JsonText, Source, Task, TaskId};
use tickgate_actors::registry::ResolveError;
use tickgate_actors::token;

use super::error::ApiError;
use super::limits;
use super::tasks::{load, wait_for, wait_for_new, TaskRecord};
use super::{AgentLabel, AppState};
use crate::ingress::body::{self, BodyError, Controls};
use crate::ingress::{title, Gate, GateError};

/// `POST /webhooks/{token}` and `POST /api/webhooks/agents/{token}`.
#[utoipa::path(
    post,
    path = "/webhooks/{token}",
    tag = "triggers",
    operation_id = "trigger",
    params(
        ("token" = String, Path, description = "The agent's webhook token"),
        ("wait" = Option<String>, Query, description = "How long to wait for the task: seconds, `true` (30 s) or `false`"),
    ),
    request_body(description = "Any JSON value or a form. An object's `inputs`, `title`, `env` and `wait` fields are read when present; otherwise the whole body is the task's inputs. An empty body is `{}`.",
        content(
            (serde_json::Value = "application/json"),
            (Object = "application/x-www-form-urlencoded"),
        )),
    responses(
        (status = 200, description = "The task after a synchronous wait (`?wait=N`, `Prefer: wait=N` or the body's `wait`); a provider handshake's answer; or the agent's configured `webhook.ack`", body = TaskRecord),
        (status = 202, description = "Accepted: the task is on disk and queued (or a synchronous wait ran out: then the body is the task record with `timed_out`)",
            body = crate::http::schemas::TriggerAccepted, headers(("Location" = String, description = "The task's poll URL"))),
        (status = 400, description = "A body field, the query string, `wait` or the delivery id is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The signature check failed, or (named form) the token is not this agent's", body = crate::http::schemas::ErrorBody),
        (status = 403, description = "The client address is outside the agent's `allow_cidrs`", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No agent has this token", body = crate::http::schemas::ErrorBody),
        (status = 408, description = "The body did not arrive within `server.body_timeout`", body = crate::http::schemas::ErrorBody),
        (status = 413, description = "The body exceeds `max_body_bytes`", body = crate::http::schemas::ErrorBody),
        (status = 415, description = "Neither JSON nor a form, or a `Content-Encoding` was declared", body = crate::http::schemas::ErrorBody),
        (status = 422, description = "The idempotency key was used before with a different body", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Rate limited, too many failed tokens from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The agent's breaker is open, the server is shutting down or overloaded, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn post_by_token(
    token: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let client = state.client_ip(&req);
    let agent = resolve(&state, &req, client, None, &token).await?;
    let body = limits::read_body(payload, &req, state.body_limits, &state.body_budget).await?;
    trigger(&state, &agent, &req, client, &body, None).await
}

/// `POST /webhooks/{namespace}/{agent}/{token}`.
#[utoipa::path(
    post,
    path = "/webhooks/{namespace}/{agent}/{token}",
    tag = "triggers",
    operation_id = "trigger_named",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
        ("token" = String, Path, description = "The agent's webhook token"),
        ("wait" = Option<String>, Query, description = "How long to wait for the task: seconds, `true` (30 s) or `false`"),
    ),
    request_body(description = "Any JSON value or a form. An object's `inputs`, `title`, `env` and `wait` fields are read when present; otherwise the whole body is the task's inputs. An empty body is `{}`.",
        content(
            (serde_json::Value = "application/json"),
            (Object = "application/x-www-form-urlencoded"),
        )),
    responses(
        (status = 200, description = "The task after a synchronous wait (`?wait=N`, `Prefer: wait=N` or the body's `wait`); a provider handshake's answer; or the agent's configured `webhook.ack`", body = TaskRecord),
        (status = 202, description = "Accepted: the task is on disk and queued (or a synchronous wait ran out: then the body is the task record with `timed_out`)",
            body = crate::http::schemas::TriggerAccepted, headers(("Location" = String, description = "The task's poll URL"))),
        (status = 400, description = "A body field, the query string, `wait` or the delivery id is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The signature check failed, or (named form) the token is not this agent's", body = crate::http::schemas::ErrorBody),
        (status = 403, description = "The client address is outside the agent's `allow_cidrs`", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No agent has this token", body = crate::http::schemas::ErrorBody),
        (status = 408, description = "The body did not arrive within `server.body_timeout`", body = crate::http::schemas::ErrorBody),
        (status = 413, description = "The body exceeds `max_body_bytes`", body = crate::http::schemas::ErrorBody),
        (status = 415, description = "Neither JSON nor a form, or a `Content-Encoding` was declared", body = crate::http::schemas::ErrorBody),
        (status = 422, description = "The idempotency key was used before with a different body", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Rate limited, too many failed tokens from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The agent's breaker is open, the server is shutting down or overloaded, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn post_named(
    path: web::Path<(String, String, String)>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (namespace, name, token) = path.into_inner();
    let client = state.client_ip(&req);
    let agent = resolve(&state, &req, client, Some((&namespace, &name)), &token).await?;
    let body = limits::read_body(payload, &req, state.body_limits, &state.body_budget).await?;
    trigger(&state, &agent, &req, client, &body, None).await
}

/// `GET /webhooks/{token}`: a verification ping without a query string, a trigger with one.
#[utoipa::path(
    get,
    path = "/webhooks/{token}",
    tag = "triggers",
    operation_id = "trigger_get",
    params(
        ("token" = String, Path, description = "The agent's webhook token"),
        ("wait" = Option<String>, Query, description = "How long to wait for the task; every other query parameter becomes an input (string)"),
    ),
    responses(
        (status = 200, description = "Without a query string: a verification ping. With one (and `wait`): the task after a synchronous wait", body = crate::http::schemas::GetTriggerAnswer),
        (status = 202, description = "Accepted: the task is on disk and queued (or a synchronous wait ran out: then the body is the task record with `timed_out`)",
            body = crate::http::schemas::TriggerAccepted, headers(("Location" = String, description = "The task's poll URL"))),
        (status = 400, description = "A body field, the query string, `wait` or the delivery id is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The signature check failed, or (named form) the token is not this agent's", body = crate::http::schemas::ErrorBody),
        (status = 403, description = "The client address is outside the agent's `allow_cidrs`", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No agent has this token", body = crate::http::schemas::ErrorBody),
        (status = 405, description = "The agent does not take GET triggers (`allow_get`)", body = crate::http::schemas::ErrorBody),
        (status = 422, description = "The idempotency key was used before with a different body", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Rate limited, too many failed tokens from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The agent's breaker is open, the server is shutting down or overloaded, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn get_by_token(
    token: web::Path<String>,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let client = state.client_ip(&req);
    let agent = resolve(&state, &req, client, None, &token).await?;
    get_trigger(&state, &agent, &req, client).await
}

/// `GET /webhooks/{namespace}/{agent}/{token}`.
#[utoipa::path(
    get,
    path = "/webhooks/{namespace}/{agent}/{token}",
    tag = "triggers",
    operation_id = "trigger_get_named",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
        ("token" = String, Path, description = "The agent's webhook token"),
        ("wait" = Option<String>, Query, description = "How long to wait for the task; every other query parameter becomes an input (string)"),
    ),
    responses(
        (status = 200, description = "Without a query string: a verification ping. With one (and `wait`): the task after a synchronous wait", body = crate::http::schemas::GetTriggerAnswer),
        (status = 202, description = "Accepted: the task is on disk and queued (or a synchronous wait ran out: then the body is the task record with `timed_out`)",
            body = crate::http::schemas::TriggerAccepted, headers(("Location" = String, description = "The task's poll URL"))),
        (status = 400, description = "A body field, the query string, `wait` or the delivery id is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The signature check failed, or (named form) the token is not this agent's", body = crate::http::schemas::ErrorBody),
        (status = 403, description = "The client address is outside the agent's `allow_cidrs`", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No agent has this token", body = crate::http::schemas::ErrorBody),
        (status = 405, description = "The agent does not take GET triggers (`allow_get`)", body = crate::http::schemas::ErrorBody),
        (status = 422, description = "The idempotency key was used before with a different body", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Rate limited, too many failed tokens from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The agent's breaker is open, the server is shutting down or overloaded, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn get_named(
    path: web::Path<(String, String, String)>,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (namespace, name, token) = path.into_inner();
    let client = state.client_ip(&req);
    let agent = resolve(&state, &req, client, Some((&namespace, &name)), &token).await?;
    get_trigger(&state, &agent, &req, client).await
}

async fn get_trigger(
    state: &AppState,
    agent: &AgentHandle,
    req: &HttpRequest,
    client: IpAddr,
) -> Result<HttpResponse, ApiError> {
    if req.query_string().is_empty() {
        return Ok(HttpResponse::Ok().json(json!({ "ok": true })));
    }
    if !gate(state, agent).allow_get {
        return Err(ApiError::MethodNotAllowed);
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("the query string is malformed: {e}")))?;
    let inputs: Map<String, Value> = pairs
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    trigger(state, agent, req, client, &[], Some(Value::Object(inputs))).await
}

/// Token → agent, throttling clients that keep presenting bad tokens.
async fn resolve(
    state: &AppState,
    req: &HttpRequest,
    client: IpAddr,
    named: Option<(&str, &str)>,
    token: &str,
) -> Result<AgentHandle, ApiError> {
    if let Err(wait) = state.failures.check(client) {
        return Err(ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil() as u64,
        });
    }
    let digest = token::digest(token);
    let found = match named {
        None => state.tokens.resolve(&digest).ok_or(ApiError::UnknownToken),
        Some((namespace, name)) => match AgentId::new(namespace, name) {
            Err(_) => Err(ApiError::UnknownToken),
            Ok(agent) => state
                .tokens
                .resolve_for(&agent, &digest)
                .map_err(|e| match e {
                    ResolveError::UnknownAgent => ApiError::UnknownToken,
                    ResolveError::WrongToken => ApiError::WrongToken,
                }),
        },
    };
    match &found {
        Ok(agent) => {
            req.extensions_mut()
                .insert(AgentLabel(agent.spec.id.to_string()));
        }
        Err(_) => state.failures.failed(client),
    }
    found
}

fn gate<'a>(state: &'a AppState, agent: &AgentHandle) -> &'a Gate {
    state
        .gates
        .get(&agent.spec.id)
        .expect("every registered agent has a gate")
}

/// A request's headers as (name, value) pairs in arrival order, for lookups by a name given as
/// text. Values that are not visible ASCII read as absent, as `HeaderValue::to_str` has it.
struct HeaderList<'a>(Vec<(&'a str, Option<&'a str>)>);

impl<'a> HeaderList<'a> {
    fn of(req: &'a HttpRequest) -> Self {
        Self(
            req.headers()
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().ok()))
                .collect(),
        )
    }

    /// The first value of header `name` (any case), like `HeaderMap::get`.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| *v)
    }
}

/// Named once: looking a header up by `&str` parses the name into a `HeaderName` on every call.
const PREFER: header::HeaderName = header::HeaderName::from_static("prefer");

/// The gate, the body, the submission and the answer: the whole trigger after authentication.
async fn trigger(
    state: &AppState,
    agent: &AgentHandle,
    req: &HttpRequest,
    client: IpAddr,
    raw_body: &[u8],
    query_inputs: Option<Value>,
) -> Result<HttpResponse, ApiError> {
    if state.intake.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let query_inputs_given = query_inputs.is_some();
    let gate = gate(state, agent);
    gate.check_source(client).map_err(gate_error)?;
    // The headers listed once, then scanned: `headers().get(name)` parses `name` into a
    // `HeaderName` (an allocation for every non-standard name) on each of the ten-odd lookups
    // a trigger makes, and walking the map itself costs as much as the list (#16).
    let listed = HeaderList::of(req);
    let lookup = |name: &str| listed.get(name).map(str::to_string);
    if let Err(e) = gate.check_signature(&lookup, raw_body) {
        state.failures.failed(client);
        return Err(gate_error(e));
    }
    // Provider handshake (Slack's url_verification): answered here, no task.
    if let Some(answer) = gate.handshake(raw_body) {
        return Ok(HttpResponse::Ok().json(answer));
    }
    gate.check_rate().map_err(gate_error)?;

    let inputs = match query_inputs {
        Some(inputs) => JsonText::from_value(&inputs),
        None => body::inputs(listed.get("content-type"), raw_body).map_err(body_error)?,
    };
    // The payload's top-level members, read once from its text for the controls, the delivery
    // id and the title (#16). A query-string trigger has no controls.
    let members = inputs.members();
    let Controls { title, env, wait } = if query_inputs_given {
        Controls::default()
    } else {
        body::controls(&members).map_err(body_error)?
    };
    limits::check_env(&env)?;
    if let Some(name) = env
        .keys()
        .find(|name| !agent.spec.allow_env.contains(*name))
    {
        return Err(ApiError::EnvNotAllowed(name.clone()));
    }
    let wait = requested_wait(req, wait)?.map(|w| w.min(state.max_wait));
    // Delivery id (configured rule, headers, provider body id): see ingress::delivery.
    let idempotency = gate
        .delivery
        .key(&lookup, &members, raw_body)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;

    let derived = title::derive(&lookup, &members, &agent.spec.id);
    drop(members);
    let mut source = source(req, client, gate);
    source.event = derived.event;
    let mut task = Task::new(agent.spec.id.clone(), inputs, source);
    task.title = Some(title.unwrap_or(derived.title));
    task.env = env;
    let duplicate_of = match wait {
        // Only the id comes back either way, so the agent owns the task it runs (#16).
        Some(wait) => {
            let sub = state.events.subscribe_outcome(task.id);
            match state.intake.accept_id(task, idempotency).await? {
                Accepted::New(id) => {
                    let (task, timed_out) = wait_for_new(state, sub, id, wait).await?;
                    return Ok(finished_or_pending(state, &task, timed_out, false));
                }
                Accepted::Duplicate(id) => id,
            }
        }
        None => {
            let agent = task.agent.clone();
            match state.intake.accept_id(task, idempotency).await? {
                // `webhook.ack` replaces the fire-and-forget answer.
                Accepted::New(id) => {
                    return Ok(gate
                        .delivery
                        .ack()
                        .unwrap_or_else(|| accepted(state, &id, &agent)))
                }
                Accepted::Duplicate(id) => id,
            }
        }
    };
    duplicate(state, gate, duplicate_of, wait).await
}

/// The answer to a delivery whose idempotency key names task `id` already: that task as it is
/// (or as it ends within `wait`), or the configured `webhook.ack` for a fire-and-forget caller.
async fn duplicate(
    state: &AppState,
    gate: &Gate,
    id: TaskId,
    wait: Option<Duration>,
) -> Result<HttpResponse, ApiError> {
    // `webhook.ack` replaces a fire-and-forget duplicate's answer too.
    if let (None, Some(ack)) = (wait, gate.delivery.ack()) {
        return Ok(ack);
    }
    let sub = wait.map(|_| state.events.subscribe(id));
    let original = load(state, id).await?.map(Arc::new).ok_or_else(|| {
        ApiError::Internal(format!("idempotency key points at missing task {id}"))
    })?;
    let (task, timed_out) = match (wait, sub) {
        (Some(wait), Some(sub)) => wait_for(state, sub, original, wait).await?,
        _ => (original, false),
    };
    Ok(finished_or_pending(state, &task, timed_out, true))
}

/// The fire-and-forget answer: `202`, `Location` and `{"task_id", "status", "agent",
/// "poll_url"}`. Written field by field into one buffer: the shape is fixed and only the agent
/// and the URL are strings that may need escaping, which serde_json does for them (#16).
fn accepted(state: &AppState, id: &TaskId, agent: &AgentId) -> HttpResponse {
    let mut buf = [0; 36];
    let id = id.encode(&mut buf);
    let poll_url = [state.public_url.as_str(), "/tasks/", id].concat();
    HttpResponse::Accepted()
        .insert_header((header::LOCATION, poll_url.as_str()))
        .content_type("application/json")
        .body(accepted_body(id, agent, &poll_url))
}

/// The body of [`accepted`]. A new task is `PENDING` until its agent starts it.
fn accepted_body(id: &str, agent: &AgentId, poll_url: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(96 + poll_url.len());
    body.extend_from_slice(b"{\"task_id\":\"");
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(b"\",\"status\":\"PENDING\",\"agent\":");
    // Serializing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, agent);
    body.extend_from_slice(b",\"poll_url\":");
    let _ = serde_json::to_writer(&mut body, poll_url);
    body.push(b'}');
    body
}

fn finished_or_pending(
    state: &AppState,
    task: &Task,
    timed_out: bool,
    duplicate: bool,
) -> HttpResponse {
    let mut record = TaskRecord::new(task, state).timed_out(timed_out);
    if duplicate {
        record = record.duplicate();
    }
    let mut resp = if timed_out && !duplicate {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Ok()
    };
    resp.insert_header((header::LOCATION, state.poll_url(&task.id)))
        .json(record)
}

/// The wait a caller asked for: `?wait=N`, then `Prefer: wait=N`, then the body's `wait`.
fn requested_wait(
    req: &HttpRequest,
    from_body: Option<Duration>,
) -> Result<Option<Duration>, ApiError> {
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(req.query_string()).unwrap_or_default();
    if let Some((_, v)) = query.iter().find(|(k, _)| k == "wait") {
        return parse_wait(v);
    }
    let prefer = req
        .headers()
        .get_all(&PREFER)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|pref| {
            let (k, v) = pref.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait")).then(|| v.trim().trim_matches('"').to_string())
        });
    if let Some(v) = prefer {
        return parse_wait(&v);
    }
    Ok(from_body)
}

fn parse_wait(v: &str) -> Result<Option<Duration>, ApiError> {
    match v {
        "true" => Ok(Some(body::DEFAULT_WAIT)),
        "false" => Ok(None),
        _ => body::seconds(v.parse::<f64>().ok()).map_err(body_error),
    }
}

/// Request metadata for the tick, without credentials.
fn source(req: &HttpRequest, client: IpAddr, gate: &Gate) -> Source {
    let mut headers = BTreeMap::new();
    for (name, value) in req.headers() {
        let name = name.as_str();
        if gate.secret_headers.iter().any(|s| s == name) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            headers
                .entry(name.to_string())
                .and_modify(|existing: &mut String| {
                    existing.push_str(", ");
                    existing.push_str(v);
                })
                .or_insert_with(|| v.to_string());
        }
    }
    Source {
        method: req.method().as_str().to_string(),
        remote_ip: ip_text(client),
        event: None,
        headers,
        ..Source::default()
    }
}

/// An address as `Display` writes it; an IPv4 one (the common case) without the formatting
/// machinery, which cost a webhook request about 1.4k instructions (#16).
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if octet >= 100 {
            s.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            s.push(char::from(b'0' + octet / 10 % 10));
        }
        s.push(char::from(b'0' + octet % 10));
    }
    s
}

fn gate_error(e: GateError) -> ApiError {
    match e {
        GateError::Forbidden => ApiError::Forbidden,
        GateError::Signature(e) => ApiError::BadSignature(e.to_string()),
        GateError::RateLimited(wait) => ApiError::RateLimited {
            retry_after: wait.as_secs_f64().ceil() as u64,
        },
    }
}

fn body_error(e: BodyError) -> ApiError {
    match e {
        BodyError::UnsupportedType(t) => ApiError::UnsupportedMediaType(t),
        BodyError::InvalidJson(m) => ApiError::InvalidJson(m),
        BodyError::InvalidField(m) => ApiError::BadRequest(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickgate_actors::model::TaskStatus;

    /// The body as serde would write it from the same fields, in the same order.
    #[derive(serde::Serialize)]
    struct AcceptedBody<'a> {
        task_id: &'a TaskId,
        status: TaskStatus,
        agent: &'a AgentId,
        poll_url: &'a str,
    }

    #[test]
    fn every_octet_is_written_as_display_writes_it() {
        for o in 0..=255u8 {
            let ip = IpAddr::from([o, 0, o, 255]);
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    proptest::proptest! {
        /// The IPv4 fast path writes what `Display` writes; IPv6 goes through `Display`.
        #[test]
        fn addresses_are_written_as_display_writes_them(v4 in proptest::prelude::any::<[u8; 4]>(), v6 in proptest::prelude::any::<[u8; 16]>()) {
            for ip in [IpAddr::from(v4), IpAddr::from(v6)] {
                proptest::prop_assert_eq!(ip_text(ip), ip.to_string());
            }
        }
    }

    #[test]
    fn the_accepted_body_is_what_serde_writes() {
        let agent: AgentId = "github/ci-bot".parse().unwrap();
        for base in [
            "http://127.0.0.1:8080",
            "https://hooks.example/x \"q\" \\ é\u{1}",
        ] {
            let id = TaskId::random();
            let mut buf = [0; 36];
            let text = id.encode(&mut buf);
            assert_eq!(text, id.to_string());
            let poll_url = format!("{base}/tasks/{id}");
            let expected = serde_json::to_vec(&AcceptedBody {
                task_id: &id,
                status: TaskStatus::Pending,
                agent: &agent,
                poll_url: &poll_url,
            })
            .unwrap();
            assert_eq!(
                String::from_utf8(accepted_body(text, &agent, &poll_url)).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }
}
