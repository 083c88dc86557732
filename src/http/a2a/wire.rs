//! The A2A 1.0 JSON-RPC wire format, kept free of I/O so that it can be property-tested: the
//! request envelope, the `A2A-Version` rule, the methods served, the checks on an incoming
//! `Message`, the errors with their JSON-RPC and A2A codes, and the rendering of a tickgate task
//! as an A2A `Task`, `TaskStatusUpdateEvent` and `TaskArtifactUpdateEvent` (ProtoJSON: camelCase
//! fields, `TASK_STATE_*` and `ROLE_*` enum names, the 1.0 `Part` with one of
//! `text`/`raw`/`url`/`data`).

use actix_web::http::StatusCode;
use serde_json::{json, Map, Value};
use tickgate_actors::model::{rfc3339, Task, TaskStatus};

/// The protocol version served, as `Major.Minor`.
pub const PROTOCOL_VERSION: &str = "1.0";

/// Media types a message part may carry (explicitly in `mediaType`, or implied: `text/plain`
/// for a text part, `application/json` for a data part); also the card's input modes.
pub const INPUT_MODES: [&str; 2] = ["text/plain", "application/json"];

/// What tickgate answers with: a text part for a string response, a data part otherwise.
pub const OUTPUT_MODES: [&str; 2] = ["text/plain", "application/json"];

/// Longest accepted `messageId`; it becomes the idempotency key `a2a:<messageId>`, and keys are
/// at most 255 bytes.
pub const MAX_MESSAGE_ID: usize = 200;

/// Why a JSON-RPC call failed. Each variant is one JSON-RPC error code; messages never carry
/// internals (store errors and bugs are logged and answered with a fixed sentence).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RpcError {
    /// The body is not JSON (-32700).
    #[error("invalid JSON payload: {0}")]
    Parse(String),
    /// The JSON is not a JSON-RPC 2.0 request object (-32600).
    #[error("{0}")]
    InvalidRequest(String),
    /// The method does not exist (-32601).
    #[error("method not found: {0}")]
    MethodNotFound(String),
    /// The parameters are unusable (-32602).
    #[error("{0}")]
    InvalidParams(String),
    /// A bug or an unexpected failure (-32603); the detail goes to the log only.
    #[error("internal error")]
    Internal(String),
    /// TaskNotFoundError (-32001).
    #[error("task not found: {0}")]
    TaskNotFound(String),
    /// TaskNotCancelableError (-32002).
    #[error("{0}")]
    TaskNotCancelable(String),
    /// PushNotificationNotSupportedError (-32003).
    #[error("push notifications are not supported by this agent")]
    PushNotificationNotSupported,
    /// UnsupportedOperationError (-32004).
    #[error("{0}")]
    UnsupportedOperation(String),
    /// ContentTypeNotSupportedError (-32005).
    #[error("{0}")]
    ContentTypeNotSupported(String),
    /// VersionNotSupportedError (-32009).
    #[error("{0}")]
    VersionNotSupported(String),
    /// tickgate refused for now (breaker open, mailbox full, shutting down, store down): -32000,
    /// sent with an HTTP status (429 or 503) and `Retry-After`, so no client mistakes it for a
    /// result and every HTTP client knows it may retry.
    #[error("{message}")]
    Unavailable {
        /// `MAILBOX_FULL`, `BREAKER_OPEN`, `SHUTTING_DOWN` or `STORE_UNAVAILABLE`.
        reason: &'static str,
        /// A sentence for people.
        message: String,
        /// 429 or 503.
        status: StatusCode,
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
}

impl RpcError {
    /// The JSON-RPC error code.
    pub fn code(&self) -> i64 {
        match self {
            RpcError::Parse(_) => -32700,
            RpcError::InvalidRequest(_) => -32600,
            RpcError::MethodNotFound(_) => -32601,
            RpcError::InvalidParams(_) => -32602,
            RpcError::Internal(_) => -32603,
            RpcError::TaskNotFound(_) => -32001,
            RpcError::TaskNotCancelable(_) => -32002,
            RpcError::PushNotificationNotSupported => -32003,
            RpcError::UnsupportedOperation(_) => -32004,
            RpcError::ContentTypeNotSupported(_) => -32005,
            RpcError::VersionNotSupported(_) => -32009,
            RpcError::Unavailable { .. } => -32000,
        }
    }

    /// The `google.rpc.ErrorInfo` reason put in `error.data`.
    fn reason(&self) -> (&'static str, &'static str) {
        const A2A: &str = "a2a-protocol.org";
        match self {
            RpcError::Parse(_) => ("PARSE_ERROR", "jsonrpc.org"),
            RpcError::InvalidRequest(_) => ("INVALID_REQUEST", "jsonrpc.org"),
            RpcError::MethodNotFound(_) => ("METHOD_NOT_FOUND", "jsonrpc.org"),
            RpcError::InvalidParams(_) => ("INVALID_PARAMS", "jsonrpc.org"),
            RpcError::Internal(_) => ("INTERNAL", "jsonrpc.org"),
            RpcError::TaskNotFound(_) => ("TASK_NOT_FOUND", A2A),
            RpcError::TaskNotCancelable(_) => ("TASK_NOT_CANCELABLE", A2A),
            RpcError::PushNotificationNotSupported => ("PUSH_NOTIFICATION_NOT_SUPPORTED", A2A),
            RpcError::UnsupportedOperation(_) => ("UNSUPPORTED_OPERATION", A2A),
            RpcError::ContentTypeNotSupported(_) => ("CONTENT_TYPE_NOT_SUPPORTED", A2A),
            RpcError::VersionNotSupported(_) => ("VERSION_NOT_SUPPORTED", A2A),
            RpcError::Unavailable { reason, .. } => (reason, "tickgate"),
        }
    }

    /// The HTTP status the error is sent with: 200 for every JSON-RPC error (the call was
    /// answered), 429/503 for a refusal that a retry may overcome.
    pub fn http_status(&self) -> StatusCode {
        match self {
            RpcError::Unavailable { status, .. } => *status,
            _ => StatusCode::OK,
        }
    }

    /// Seconds for `Retry-After`, for refusals only.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            RpcError::Unavailable { retry_after, .. } => Some((*retry_after).max(1)),
            _ => None,
        }
    }

    /// The JSON-RPC error object.
    pub fn object(&self) -> Value {
        let (reason, domain) = self.reason();
        let mut metadata = Map::new();
        match self {
            RpcError::VersionNotSupported(_) => {
                metadata.insert("supportedVersions".into(), json!(PROTOCOL_VERSION));
            }
            RpcError::Unavailable { retry_after, .. } => {
                metadata.insert("retryAfterSeconds".into(), json!(retry_after.to_string()));
            }
            _ => {}
        }
        json!({
            "code": self.code(),
            "message": self.to_string(),
            "data": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": domain,
                "metadata": metadata,
            }],
        })
    }
}

/// A JSON-RPC response with an error.
pub fn error_response(id: &Value, error: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": error.object() })
}

/// A JSON-RPC response with a result.
pub fn result_response(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// A checked JSON-RPC request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The caller's id (string, number or null), echoed in the answer.
    pub id: Value,
    /// The method name as sent.
    pub method: String,
    /// The params object (`{}` when absent).
    pub params: Map<String, Value>,
}

/// Reads a JSON-RPC 2.0 request. An error comes with the id to answer with (`null` when the
/// request's id could not be read). Batches and notifications are not served: A2A has neither.
pub fn parse_request(body: &[u8]) -> Result<Request, (Value, RpcError)> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| (Value::Null, RpcError::Parse(e.to_string())))?;
    let Value::Object(mut obj) = value else {
        return Err((
            Value::Null,
            RpcError::InvalidRequest(
                "a JSON-RPC request must be a JSON object (batches are not served)".into(),
            ),
        ));
    };
    let id = match obj.remove("id") {
        Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => id,
        Some(_) => {
            return Err((
                Value::Null,
                RpcError::InvalidRequest("id must be a string, a number or null".into()),
            ))
        }
        None => {
            return Err((
                Value::Null,
                RpcError::InvalidRequest(
                    "the request has no id; notifications are not served".into(),
                ),
            ))
        }
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            id,
            RpcError::InvalidRequest("jsonrpc must be \"2.0\"".into()),
        ));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err((
                id,
                RpcError::InvalidRequest("method must be a string".into()),
            ))
        }
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(Value::Array(_)) => {
            return Err((
                id,
                RpcError::InvalidParams("params must be an object".into()),
            ))
        }
        Some(_) => {
            return Err((
                id,
                RpcError::InvalidRequest("params must be an object".into()),
            ))
        }
    };
    Ok(Request { id, method, params })
}

/// The methods served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A new task, or the answer to a task that requires input.
    SendMessage,
    /// The same, answered with a stream of events.
    SendStreamingMessage,
    /// A task by id.
    GetTask,
    /// The agent's tasks, newest first.
    ListTasks,
    /// Cancels a task that has not started.
    CancelTask,
    /// A stream of a task's events.
    SubscribeToTask,
}

/// The method a name names, or the error the spec gives for it: the push notification methods
/// are PushNotificationNotSupported (the card says `pushNotifications: false`), the extended card
/// is UnsupportedOperation (`extendedAgentCard: false`), anything else is MethodNotFound (the 0.3
/// names included: they only exist in A2A 0.3, which this server does not serve).
pub fn method(name: &str) -> Result<Method, RpcError> {
    match name {
        "SendMessage" => Ok(Method::SendMessage),
        "SendStreamingMessage" => Ok(Method::SendStreamingMessage),
        "GetTask" => Ok(Method::GetTask),
        "ListTasks" => Ok(Method::ListTasks),
        "CancelTask" => Ok(Method::CancelTask),
        "SubscribeToTask" => Ok(Method::SubscribeToTask),
        "CreateTaskPushNotificationConfig"
        | "GetTaskPushNotificationConfig"
        | "ListTaskPushNotificationConfigs"
        | "DeleteTaskPushNotificationConfig" => Err(RpcError::PushNotificationNotSupported),
        "GetExtendedAgentCard" => Err(RpcError::UnsupportedOperation(
            "this agent has no extended agent card".into(),
        )),
        other => Err(RpcError::MethodNotFound(printable(other, 64))),
    }
}

/// The `A2A-Version` rule: an absent or empty value means 0.3, which is not served; `1.0` is
/// served, with any patch number ignored (`1.0.3`); anything else is VersionNotSupported.
pub fn check_version(version: Option<&str>) -> Result<(), RpcError> {
    let v = version.map(str::trim).unwrap_or("");
    if v.is_empty() {
        return Err(RpcError::VersionNotSupported(
            "a request without A2A-Version is A2A 0.3, which this agent does not serve; send A2A-Version: 1.0"
                .into(),
        ));
    }
    // Major.Minor must be exactly 1.0; a patch number, if any, is digits and is ignored.
    let mut parts = v.split('.');
    let (major, minor, patch) = (parts.next(), parts.next(), parts.next());
    let patch_ok = patch.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts.next().is_none();
    if major == Some("1") && minor == Some("0") && patch_ok {
        return Ok(());
    }
    Err(RpcError::VersionNotSupported(format!(
        "A2A version {} is not supported; this agent serves {PROTOCOL_VERSION}",
        printable(v, 16)
    )))
}

/// `s` quoted for a message, cut to `max` characters and stripped of control characters, so an
/// error never echoes a large or odd value back.
fn printable(s: &str, max: usize) -> String {
    let cut: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// A `Message` a client sent, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The message as sent, stored in the task's `inputs.message`.
    pub message: Value,
    /// Its `messageId`: the idempotency key of a new task.
    pub message_id: String,
    /// `taskId`: the task this message answers.
    pub task_id: Option<String>,
    /// `contextId`, when the client gave one.
    pub context_id: Option<String>,
    /// The text parts, joined with newlines; the task's title.
    pub text: Option<String>,
}

/// `SendMessageConfiguration`, the parts tickgate honours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendConfig {
    /// `returnImmediately`: answer once the task is durable instead of waiting.
    pub return_immediately: bool,
    /// `historyLength` for the returned task.
    pub history_length: Option<u64>,
}

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::InvalidParams(msg.into())
}

/// Reads `SendMessageRequest` params: the message (required, `ROLE_USER`, a `messageId`, at
/// least one part, each part exactly one of `text`/`raw`/`url`/`data` in an accepted media type)
/// and the configuration.
pub fn parse_send(params: &Map<String, Value>) -> Result<(Incoming, SendConfig), RpcError> {
    let Some(Value::Object(msg)) = params.get("message") else {
        return Err(invalid("params.message must be a Message object"));
    };
    let message_id = match msg.get("messageId") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_MESSAGE_ID => id.clone(),
        Some(Value::String(id)) if !id.is_empty() => {
            return Err(invalid(format!(
                "message.messageId is longer than {MAX_MESSAGE_ID} bytes"
            )))
        }
        _ => return Err(invalid("message.messageId must be a non-empty string")),
    };
    if msg.get("role").and_then(Value::as_str) != Some("ROLE_USER") {
        return Err(invalid("message.role must be \"ROLE_USER\""));
    }
    let optional_str = |field: &str| -> Result<Option<String>, RpcError> {
        match msg.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!("message.{field} must be a string"))),
        }
    };
    let task_id = optional_str("taskId")?;
    let context_id = optional_str("contextId")?;
    let Some(Value::Array(parts)) = msg.get("parts") else {
        return Err(invalid("message.parts must be an array"));
    };
    if parts.is_empty() {
        return Err(invalid("message.parts must hold at least one part"));
    }
    let mut texts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if let Some(text) = check_part(i, part)? {
            texts.push(text);
        }
    }
    let config = match params.get("configuration") {
        None | Some(Value::Null) => SendConfig::default(),
        Some(Value::Object(c)) => parse_config(c)?,
        Some(_) => return Err(invalid("params.configuration must be an object")),
    };
    let text = (!texts.is_empty()).then(|| texts.join("\n"));
    Ok((
        Incoming {
            message: Value::Object(msg.clone()),
            message_id,
            task_id,
            context_id,
            text,
        },
        config,
    ))
}

/// Checks one part; returns its text for a text part.
fn check_part(i: usize, part: &Value) -> Result<Option<String>, RpcError> {
    let Value::Object(p) = part else {
        return Err(invalid(format!("message.parts[{i}] must be an object")));
    };
    let kinds: Vec<&str> = ["text", "raw", "url", "data"]
        .into_iter()
        .filter(|k| p.contains_key(*k))
        .collect();
    let [kind] = kinds.as_slice() else {
        return Err(invalid(format!(
            "message.parts[{i}] must have exactly one of text, raw, url, data"
        )));
    };
    let declared = match p.get("mediaType") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if m.is_empty() => None,
        Some(Value::String(m)) => Some(m.as_str()),
        Some(_) => {
            return Err(invalid(format!(
                "message.parts[{i}].mediaType must be a string"
            )))
        }
    };
    let implied = match *kind {
        "text" => Some("text/plain"),
        "data" => Some("application/json"),
        _ => None,
    };
    let media = declared.or(implied);
    // Parameters (`; charset=utf-8`) do not change the type.
    let essence = media.map(|m| {
        m.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    if !essence.as_deref().is_some_and(|m| INPUT_MODES.contains(&m)) {
        return Err(RpcError::ContentTypeNotSupported(format!(
            "message.parts[{i}]: media type {} is not accepted; this agent takes {}",
            media.map_or("(none given)".to_string(), |m| printable(m, 64)),
            INPUT_MODES.join(" and ")
        )));
    }
    match (*kind, &p[*kind]) {
        ("text", Value::String(t)) => Ok(Some(t.clone())),
        ("text", _) => Err(invalid(format!("message.parts[{i}].text must be a string"))),
        ("raw" | "url", Value::String(_)) => Ok(None),
        ("raw" | "url", _) => Err(invalid(format!(
            "message.parts[{i}].{kind} must be a string"
        ))),
        _ => Ok(None),
    }
}

fn parse_config(c: &Map<String, Value>) -> Result<SendConfig, RpcError> {
    let return_immediately = match c.get("returnImmediately") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("configuration.returnImmediately must be a boolean")),
    };
    let history_length = history_length(c.get("historyLength"), "configuration.historyLength")?;
    match c.get("acceptedOutputModes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(modes)) => {
            let modes: Vec<&str> = modes.iter().filter_map(Value::as_str).collect();
            if modes.len() != c["acceptedOutputModes"].as_array().map_or(0, Vec::len) {
                return Err(invalid(
                    "configuration.acceptedOutputModes must be a list of strings",
                ));
            }
            if !modes.is_empty() && !modes.iter().any(|m| OUTPUT_MODES.contains(m)) {
                return Err(RpcError::ContentTypeNotSupported(format!(
                    "this agent answers in {}; none is among configuration.acceptedOutputModes",
                    OUTPUT_MODES.join(" or ")
                )));
            }
        }
        Some(_) => {
            return Err(invalid(
                "configuration.acceptedOutputModes must be a list of strings",
            ))
        }
    }
    Ok(SendConfig {
        return_immediately,
        history_length,
    })
}

/// Reads an optional non-negative `historyLength`.
pub fn history_length(v: Option<&Value>, name: &str) -> Result<Option<u64>, RpcError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{name} must be a whole number of at least 0"))),
    }
}

/// Reads a required string parameter (a task id).
pub fn required_str<'a>(params: &'a Map<String, Value>, name: &str) -> Result<&'a str, RpcError> {
    match params.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(invalid(format!("params.{name} must be a non-empty string"))),
    }
}

/// The A2A state of a tickgate status (SPEC section 10).
pub fn state(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Pending => "TASK_STATE_SUBMITTED",
        TaskStatus::Started | TaskStatus::Retry => "TASK_STATE_WORKING",
        TaskStatus::AwaitingInput => "TASK_STATE_INPUT_REQUIRED",
        TaskStatus::Success => "TASK_STATE_COMPLETED",
        TaskStatus::Failure => "TASK_STATE_FAILED",
        TaskStatus::Revoked => "TASK_STATE_CANCELED",
    }
}

/// The tickgate statuses an A2A state filter matches; `None` for a name that is no state.
pub fn statuses(state: &str) -> Option<&'static [TaskStatus]> {
    Some(match state {
        "TASK_STATE_SUBMITTED" => &[TaskStatus::Pending],
        "TASK_STATE_WORKING" => &[TaskStatus::Started, TaskStatus::Retry],
        "TASK_STATE_INPUT_REQUIRED" => &[TaskStatus::AwaitingInput],
        "TASK_STATE_COMPLETED" => &[TaskStatus::Success],
        "TASK_STATE_FAILED" => &[TaskStatus::Failure],
        "TASK_STATE_CANCELED" => &[TaskStatus::Revoked],
        "TASK_STATE_REJECTED" | "TASK_STATE_AUTH_REQUIRED" => &[],
        _ => return None,
    })
}

/// The message a task was created from, when it came through A2A: read out of the inputs' text
/// (the A2A edge is the one reader that looks inside them).
fn origin(task: &Task) -> Option<Map<String, Value>> {
    let message = task.inputs.members().get("message")?;
    match serde_json::from_str(message.get()).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// The task's context: the one its A2A message named, else the task id (a task that came from
/// elsewhere, or whose client named no context, is a context of its own).
pub fn context_id(task: &Task) -> String {
    origin(task)
        .and_then(|mut m| m.remove("contextId"))
        .and_then(|c| match c {
            Value::String(c) if !c.is_empty() => Some(c),
            _ => None,
        })
        .unwrap_or_else(|| task.id.to_string())
}

/// A value as one part: a string as a text part, anything else as a data part.
pub fn part(value: &Value) -> Value {
    match value {
        Value::String(s) => json!({ "text": s }),
        other => json!({ "data": other }),
    }
}

/// When the task's current state began.
pub fn status_time(task: &Task) -> u64 {
    match task.status {
        TaskStatus::Success | TaskStatus::Failure | TaskStatus::Revoked => {
            task.finished_at.unwrap_or(task.created_at)
        }
        TaskStatus::AwaitingInput => task.awaiting.as_ref().map_or(task.created_at, |a| a.since),
        TaskStatus::Started | TaskStatus::Retry => task.started_at.unwrap_or(task.created_at),
        TaskStatus::Pending => task.created_at,
    }
}

/// `TaskStatus`: the state, when it began and, for a task that requires input or failed, the
/// agent's message (the `await.request`, or the error).
pub fn status(task: &Task) -> Value {
    let mut s = json!({
        "state": state(task.status),
        "timestamp": rfc3339(status_time(task)),
    });
    let body = match task.status {
        TaskStatus::AwaitingInput => task.awaiting.as_ref().map(|a| part(&a.request)),
        TaskStatus::Failure => task.error.as_ref().map(|e| json!({ "text": e })),
        _ => None,
    };
    if let Some(p) = body {
        s["message"] = json!({
            "messageId": format!("{}-{}-{}", task.id, task.tick, task.attempt),
            "contextId": context_id(task),
            "taskId": task.id.to_string(),
            "role": "ROLE_AGENT",
            "parts": [p],
        });
    }
    s
}

/// The tick's `response` as the task's one artifact.
pub fn artifact(task: &Task) -> Option<Value> {
    if task.status != TaskStatus::Success {
        return None;
    }
    let response = task.response_value()?;
    Some(json!({
        "artifactId": format!("{}-response", task.id),
        "name": "response",
        "parts": [part(&response)],
    }))
}

/// The A2A `Task`. `history_length` bounds `history` (the message the task came from and the
/// answer it was last resumed with); `Some(0)` omits it. Artifacts are left out when not asked.
pub fn task(
    task: &Task,
    history_length: Option<u64>,
    with_artifacts: bool,
    poll_url: &str,
) -> Value {
    let mut t = json!({
        "id": task.id.to_string(),
        "contextId": context_id(task),
        "status": status(task),
        "metadata": {
            "tickgate": {
                "agent": task.agent.to_string(),
                "status": task.status,
                "pollUrl": poll_url,
            }
        },
    });
    if with_artifacts {
        t["artifacts"] = Value::Array(artifact(task).into_iter().collect());
    }
    let mut history: Vec<Value> = origin(task).map(Value::Object).into_iter().collect();
    if let Some(answer) = task
        .resume
        .as_ref()
        .and_then(|r| r.response.get("message"))
        .filter(|m| m.is_object())
    {
        history.push(answer.clone());
    }
    let keep = history_length.map_or(history.len(), |n| n.min(history.len() as u64) as usize);
    if keep > 0 {
        let skip = history.len() - keep;
        t["history"] = Value::Array(history.into_iter().skip(skip).collect());
    }
    t
}

/// `StreamResponse.statusUpdate` for the task's current state.
pub fn status_update(task: &Task) -> Value {
    json!({
        "statusUpdate": {
            "taskId": task.id.to_string(),
            "contextId": context_id(task),
            "status": status(task),
        }
    })
}

/// `StreamResponse.artifactUpdate` carrying the response, for a completed task that has one.
pub fn artifact_update(task: &Task) -> Option<Value> {
    Some(json!({
        "artifactUpdate": {
            "taskId": task.id.to_string(),
            "contextId": context_id(task),
            "artifact": artifact(task)?,
            "append": false,
            "lastChunk": true,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tickgate_actors::model::Source;

    fn send(msg: Value) -> Result<(Incoming, SendConfig), RpcError> {
        let params = json!({ "message": msg });
        parse_send(params.as_object().unwrap())
    }

    fn msg(parts: Value) -> Value {
        json!({ "messageId": "m1", "role": "ROLE_USER", "parts": parts })
    }

    #[test]
    fn envelope_errors_have_the_json_rpc_codes() {
        assert_eq!(parse_request(b"{").unwrap_err().1.code(), -32700);
        assert_eq!(parse_request(b"[]").unwrap_err().1.code(), -32600);
        let (id, e) = parse_request(br#"{"jsonrpc":"1.0","id":7,"method":"GetTask"}"#).unwrap_err();
        assert_eq!((id, e.code()), (json!(7), -32600));
        assert_eq!(
            parse_request(br#"{"jsonrpc":"2.0","method":"GetTask"}"#)
                .unwrap_err()
                .1
                .code(),
            -32600
        );
        assert_eq!(
            parse_request(br#"{"jsonrpc":"2.0","id":"a","method":3}"#)
                .unwrap_err()
                .1
                .code(),
            -32600
        );
        assert_eq!(
            parse_request(br#"{"jsonrpc":"2.0","id":"a","method":"GetTask","params":[1]}"#)
                .unwrap_err()
                .1
                .code(),
            -32602
        );
        let r = parse_request(br#"{"jsonrpc":"2.0","id":"a","method":"GetTask"}"#).unwrap();
        assert_eq!((r.id, r.method.as_str()), (json!("a"), "GetTask"));
        assert_eq!(method("message/send").unwrap_err().code(), -32601);
        assert_eq!(
            method("GetTaskPushNotificationConfig").unwrap_err().code(),
            -32003
        );
    }

    #[test]
    fn versions() {
        assert!(check_version(Some("1.0")).is_ok());
        assert!(check_version(Some(" 1.0.2 ")).is_ok());
        for v in [
            None,
            Some(""),
            Some("0.3"),
            Some("1.1"),
            Some("2.0"),
            Some("1"),
            Some("1.0.x"),
        ] {
            assert_eq!(check_version(v).unwrap_err().code(), -32009, "{v:?}");
        }
    }

    #[test]
    fn messages_are_checked() {
        let (m, c) = send(msg(
            json!([{"text": "hi"}, {"data": {"a": 1}}, {"text": "there"}]),
        ))
        .unwrap();
        assert_eq!(m.text.as_deref(), Some("hi\nthere"));
        assert_eq!(m.message_id, "m1");
        assert!(!c.return_immediately);
        assert_eq!(send(msg(json!([]))).unwrap_err().code(), -32602);
        assert_eq!(
            send(msg(json!([{"text": "a", "data": 1}])))
                .unwrap_err()
                .code(),
            -32602
        );
        assert_eq!(
            send(msg(json!([{"raw": "AAAA"}]))).unwrap_err().code(),
            -32005
        );
        assert_eq!(
            send(msg(json!([{"url": "https://x", "mediaType": "image/png"}])))
                .unwrap_err()
                .code(),
            -32005
        );
        assert!(send(msg(
            json!([{"raw": "e30=", "mediaType": "application/json"}])
        ))
        .is_ok());
        assert!(send(msg(
            json!([{"text": "x", "mediaType": "text/plain; charset=utf-8"}])
        ))
        .is_ok());
        let mut bad_role = msg(json!([{"text": "x"}]));
        bad_role["role"] = json!("ROLE_AGENT");
        assert_eq!(send(bad_role).unwrap_err().code(), -32602);
        let params = json!({"message": msg(json!([{"text": "x"}])),
            "configuration": {"acceptedOutputModes": ["image/png"]}});
        assert_eq!(
            parse_send(params.as_object().unwrap()).unwrap_err().code(),
            -32005
        );
        let params = json!({"message": msg(json!([{"text": "x"}])),
            "configuration": {"returnImmediately": true, "historyLength": 0}});
        let (_, c) = parse_send(params.as_object().unwrap()).unwrap();
        assert_eq!((c.return_immediately, c.history_length), (true, Some(0)));
    }

    #[test]
    fn tasks_render_states_artifacts_and_history() {
        let mut t = Task::new(
            "ns/a".parse().unwrap(),
            json!({"message": msg(json!([{"text": "q"}]))}),
            Source::default(),
        );
        let v = task(&t, None, true, "u");
        assert_eq!(v["status"]["state"], "TASK_STATE_SUBMITTED");
        assert_eq!(v["contextId"], t.id.to_string());
        assert_eq!(v["artifacts"], json!([]));
        assert_eq!(v["history"].as_array().unwrap().len(), 1);
        assert!(task(&t, Some(0), false, "u").get("history").is_none());
        assert!(task(&t, None, false, "u").get("artifacts").is_none());
        t.status = TaskStatus::Success;
        t.result = Some(json!({"response": "done"}).into());
        let v = task(&t, None, true, "u");
        assert_eq!(v["artifacts"][0]["parts"], json!([{"text": "done"}]));
        t.result = Some(json!({"response": {"n": 1}}).into());
        assert_eq!(
            artifact_update(&t).unwrap()["artifactUpdate"]["artifact"]["parts"],
            json!([{"data": {"n": 1}}])
        );
    }

    #[test]
    fn every_status_has_a_state_whose_filter_matches_it() {
        use TaskStatus::*;
        for s in [
            Pending,
            Started,
            Retry,
            AwaitingInput,
            Success,
            Failure,
            Revoked,
        ] {
            assert!(statuses(state(s)).unwrap().contains(&s), "{s:?}");
        }
        assert_eq!(statuses("TASK_STATE_REJECTED"), Some(&[][..]));
        assert_eq!(statuses("completed"), None);
    }

    proptest! {
        #[test]
        fn any_body_gets_a_request_or_a_json_rpc_error(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Err((_, e)) = parse_request(&body) {
                prop_assert!([-32700, -32600, -32602].contains(&e.code()));
            }
        }

        #[test]
        fn any_version_string_is_decided_without_panicking(v in ".{0,12}") {
            let ok = check_version(Some(&v)).is_ok();
            let t = v.trim();
            let patch = t.strip_prefix("1.0.");
            prop_assert_eq!(ok, t == "1.0" || patch.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())));
        }

        #[test]
        fn any_json_message_is_accepted_or_refused_with_an_a2a_code(
            parts in proptest::collection::vec(
                prop_oneof![
                    ".{0,8}".prop_map(|t| json!({"text": t})),
                    any::<i64>().prop_map(|n| json!({"data": n})),
                    ".{0,8}".prop_map(|m| json!({"raw": "AA==", "mediaType": m})),
                    Just(json!({})),
                    Just(json!(3)),
                ],
                0..4,
            ),
            role in prop_oneof![Just("ROLE_USER"), Just("ROLE_AGENT"), Just("")],
        ) {
            let m = json!({"messageId": "id", "role": role, "parts": parts});
            match send(m) {
                Ok((inc, _)) => prop_assert_eq!(inc.message_id, "id"),
                Err(e) => prop_assert!([-32602, -32005].contains(&e.code())),
            }
        }
    }
}
