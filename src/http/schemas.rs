//! The shapes of answers that handlers build in place (with `json!`) rather than from a Rust
//! type, written down for the OpenAPI document. Nothing here is serialized by the server: the
//! handlers' attributes refer to these types, `openapi.rs` collects them, and the API fuzz run
//! (`benches/schemathesis.sh`) and `tests/openapi.rs` check them against real answers. Kept apart
//! from `openapi.rs` so that handlers depend on their schemas and the document on the handlers,
//! never both ways.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use super::record as tasks;
pub use super::record::{TaskPhase, TaskStatusName};

/// The one error body every 4xx and 5xx answer has.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong: a stable machine-readable code and a sentence for people.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// snake_case, e.g. `not_found`, `unauthorized`, `mailbox_full`.
    #[schema(pattern = "^[a-z_]+$")]
    code: String,
    /// A sentence; never holds tokens, secrets or request bodies.
    message: String,
}

/// A circuit breaker's state.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerStateName {
    /// Triggers are queued.
    Closed,
    /// Triggers are refused until `open_for` has passed.
    Open,
    /// One trial tick is let through.
    HalfOpen,
}

/// The fire-and-forget answer to a trigger (`202`). A synchronous wait that ran out answers
/// with the whole task record instead, which has these fields too.
#[derive(Serialize, ToSchema)]
pub struct TriggerAccepted {
    /// The new task's id (a UUID).
    task_id: String,
    /// `PENDING` when just accepted.
    status: TaskStatusName,
    /// `namespace/name`.
    agent: String,
    /// Where the task can be polled (also in `Location`).
    poll_url: String,
}

/// `{"ok": true}`.
#[derive(Serialize, ToSchema)]
pub struct OkBody {
    /// Always true.
    ok: bool,
}

/// `GET /webhooks/…`: a verification ping (no query string) or, with a synchronous wait, the
/// task record.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum GetTriggerAnswer {
    /// No query string: a sender's verification ping.
    Ping(OkBody),
    /// A trigger that waited for its task.
    Task(Box<tasks::TaskRecord<'static>>),
}

/// One Server-Sent Event of `GET /tasks/{id}/events` (the schema describes each event, as
/// OpenAPI 3.1 has no item schema for streams).
#[derive(Serialize, ToSchema)]
pub struct TaskEvent {
    /// Always `status`.
    #[schema(pattern = "^status$")]
    event: String,
    /// The task record (schema `TaskRecord`) as JSON text.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The body of `POST /tasks/{id}/resume`.
#[derive(Serialize, ToSchema)]
pub struct ResumeBody {
    /// The answer handed to the tick that asked for input; any JSON value.
    #[schema(value_type = Object)]
    response: serde_json::Value,
}

/// One page of `GET /admin/tasks`.
#[derive(Serialize, ToSchema)]
pub struct TaskPage {
    /// Newest first.
    tasks: Vec<tasks::TaskRecord<'static>>,
    /// Pass as `cursor` for the next page; `null` at the end.
    next_cursor: Option<String>,
}

/// A task a bulk replay did not submit.
#[derive(Serialize, ToSchema)]
pub struct RefusedReplay {
    /// The original task.
    task_id: String,
    /// The error code a trigger would have got (`mailbox_full`, `breaker_open`, …).
    error: String,
}

/// The answer to a bulk replay.
#[derive(Serialize, ToSchema)]
pub struct BulkReplayResult {
    /// How many tasks were submitted.
    replayed: usize,
    /// The new tasks' ids, oldest original first.
    task_ids: Vec<String>,
    /// Matches not submitted, with why.
    refused: Vec<RefusedReplay>,
    /// Continues with older matches; `null` when there are none.
    next_cursor: Option<String>,
}

/// A schedule entry's next slot.
#[derive(Serialize, ToSchema)]
pub struct ScheduleSlot {
    /// The cron or interval expression.
    expression: String,
    /// RFC 3339; `null` if the entry never fires again.
    next_at: Option<String>,
}

/// An agent as `GET /admin/agents` shows it; never a token.
#[derive(Serialize, ToSchema)]
pub struct AgentSummary {
    /// `namespace/name`.
    id: String,
    /// The namespace.
    namespace: String,
    /// The name.
    name: String,
    /// Its breaker.
    breaker: BreakerStateName,
    /// Tasks in its mailbox.
    queued: usize,
    /// Its mailbox capacity.
    mailbox: usize,
    /// Ticks run since start.
    ticks: u64,
    /// Schedule entries with their next slot.
    schedules: Vec<ScheduleSlot>,
    /// The node running its ticks (`[server] node_id`): this node on the sled store, the
    /// lease holder on the NATS store.
    owner: String,
}

/// `GET /admin/agents`.
#[derive(Serialize, ToSchema)]
pub struct AgentList {
    /// Every configured agent.
    agents: Vec<AgentSummary>,
}

/// A rotated token, shown in this answer only.
#[derive(Serialize, ToSchema)]
pub struct RotatedToken {
    /// `namespace/name`.
    agent: String,
    /// The new webhook token; the old one stops working.
    token: String,
    /// The new webhook URL.
    webhook_url: String,
}

/// A breaker closed by an operator.
#[derive(Serialize, ToSchema)]
pub struct BreakerReset {
    /// `namespace/name`.
    agent: String,
    /// `closed`.
    breaker: BreakerStateName,
}

/// A restart queued behind the agent's queued ticks.
#[derive(Serialize, ToSchema)]
pub struct RestartQueued {
    /// `namespace/name`.
    agent: String,
    /// `queued`.
    restart: String,
}

/// A status callback delivery; never the secret, the signature or the body.
#[derive(Serialize, ToSchema)]
pub struct DeliveryRecord {
    /// The delivery id (a decimal number).
    id: String,
    /// `namespace/name`.
    agent: String,
    /// Index of the agent's `[[agent.notify]]` endpoint.
    endpoint: usize,
    /// The task the event is about.
    task_id: String,
    /// The event type, e.g. `task.succeeded`.
    #[serde(rename = "type")]
    kind: String,
    /// The Standard Webhooks `webhook-id`.
    webhook_id: String,
    /// `pending`, `succeeded` or `failed`.
    status: String,
    /// Attempts made.
    attempts: u32,
    /// RFC 3339, while pending.
    next_attempt_at: Option<String>,
    /// The last attempt's error.
    last_error: Option<String>,
    /// RFC 3339.
    created_at: String,
}

/// One page of `GET /admin/deliveries`.
#[derive(Serialize, ToSchema)]
pub struct DeliveryPage {
    /// Oldest first.
    deliveries: Vec<DeliveryRecord>,
    /// Pass as `cursor` for the next page; `null` at the end.
    next_cursor: Option<String>,
}

/// A notify endpoint enabled again.
#[derive(Serialize, ToSchema)]
pub struct EndpointEnabled {
    /// `namespace/name`.
    agent: String,
    /// The endpoint index.
    endpoint: usize,
    /// Always true.
    enabled: bool,
}

/// One agent in a readiness answer.
#[derive(Serialize, ToSchema)]
pub struct AgentReadiness {
    /// Its breaker.
    breaker: BreakerStateName,
    /// Tasks in its mailbox.
    queued: usize,
}

/// The store's health in a readiness answer.
#[derive(Serialize, ToSchema)]
pub struct StoreHealth {
    /// False while the store fails.
    healthy: bool,
    /// Records that could not be decoded (each is logged with its key).
    unreadable_records: u64,
}

/// `GET /ready` and `GET /ready/{namespace}/{agent}` (`200` when ready, `503` when not).
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Whether the server (or the agent) takes triggers.
    ready: bool,
    /// Agent id → its state.
    agents: BTreeMap<String, AgentReadiness>,
    /// The store.
    store: StoreHealth,
}

/// An A2A Agent Card (A2A 1.0), as served for agents with `[agent.a2a] enabled`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct A2aAgentCard {
    /// `namespace/name`.
    name: String,
    /// The configured description.
    description: String,
    /// tickgate's version.
    version: String,
    /// One JSON-RPC interface at `/a2a/{namespace}/{agent}`.
    #[schema(value_type = Vec<Object>)]
    supported_interfaces: Vec<serde_json::Value>,
    /// Streaming yes, push notifications no.
    #[schema(value_type = Object)]
    capabilities: serde_json::Value,
    /// The bearer scheme (the agent's webhook token).
    #[schema(value_type = Object)]
    security_schemes: serde_json::Value,
    /// Requires the bearer scheme.
    #[schema(value_type = Vec<Object>)]
    security_requirements: Vec<serde_json::Value>,
    /// `text/plain`, `application/json`.
    default_input_modes: Vec<String>,
    /// `text/plain`, `application/json`.
    default_output_modes: Vec<String>,
    /// The configured skills (or one describing the agent).
    #[schema(value_type = Vec<Object>)]
    skills: Vec<serde_json::Value>,
}

/// The A2A 1.0 methods served.
#[derive(Serialize, ToSchema)]
pub enum A2aMethod {
    /// Sends a message: a new task, or the answer to one that requires input.
    SendMessage,
    /// The same, answered as a stream.
    SendStreamingMessage,
    /// One task.
    GetTask,
    /// Cancels a task that has not started.
    CancelTask,
    /// A task's updates as a stream.
    SubscribeToTask,
    /// The agent's tasks.
    ListTasks,
}

/// A JSON-RPC 2.0 request.
#[derive(Serialize, ToSchema)]
pub struct JsonRpcRequest {
    /// `2.0`.
    #[schema(pattern = "^2\\.0$")]
    jsonrpc: String,
    /// The request id (a string or a number).
    #[schema(value_type = serde_json::Value)]
    id: serde_json::Value,
    /// The A2A method.
    method: A2aMethod,
    /// The method's parameters.
    #[schema(value_type = Option<Object>)]
    params: Option<serde_json::Value>,
}

/// A JSON-RPC 2.0 response: `result` or `error`.
#[derive(Serialize, ToSchema)]
pub struct JsonRpcResponse {
    /// `2.0`.
    jsonrpc: String,
    /// The request's id (`null` when it could not be read).
    #[schema(value_type = serde_json::Value)]
    id: serde_json::Value,
    /// The method's result.
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<serde_json::Value>,
    /// A JSON-RPC error.
    error: Option<JsonRpcError>,
}

/// A JSON-RPC error object with A2A's `ErrorInfo` details.
#[derive(Serialize, ToSchema)]
pub struct JsonRpcError {
    /// The JSON-RPC or A2A error code (e.g. `-32001` TaskNotFound).
    code: i64,
    /// A sentence.
    message: String,
    /// `google.rpc.ErrorInfo` entries.
    #[schema(value_type = Option<Vec<Object>>)]
    data: Option<serde_json::Value>,
}

/// One Server-Sent Event of an A2A stream: `data` holds a JSON-RPC response whose `result` is a
/// `StreamResponse` (`task`, `statusUpdate` or `artifactUpdate`).
#[derive(Serialize, ToSchema)]
pub struct A2aStreamEvent {
    /// A JSON-RPC response as JSON text.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// A refused A2A call: the edge's error shape (auth-failure limit, body limits) or a JSON-RPC
/// error answered with 429/503 and `Retry-After`.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum A2aRefusal {
    /// Refused at the edge.
    Edge(ErrorBody),
    /// Refused by the A2A method (mailbox full, breaker open, store unavailable).
    Rpc(JsonRpcResponse),
}

/// One Server-Sent Event of `GET /admin/events`.
#[derive(Serialize, ToSchema)]
pub struct AdminEvent {
    /// `agents`, `task`, `deliveries` or `resync`.
    #[schema(pattern = "^(agents|task|deliveries|resync)$")]
    event: String,
    /// The frame as JSON text: the agents with their tick history, a task record, the failed
    /// deliveries, or how many task changes were missed.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// `GET /admin/stats`.
#[derive(Serialize, ToSchema)]
pub struct TickStatsAnswer {
    /// Seconds of history kept.
    window_secs: u64,
    /// Each agent's history.
    agents: Vec<AgentTickHistory>,
}

/// One agent's tick history.
#[derive(Serialize, ToSchema)]
pub struct AgentTickHistory {
    /// `namespace/name`.
    id: String,
    /// Per-second series from `start` (Unix seconds): `ticks`, `failures`, `avg_ms`, `max_ms`,
    /// and `last_tick_at`, `last_tick_ms`.
    #[schema(value_type = Object)]
    history: serde_json::Value,
}

/// `GET /admin/tasks/{id}`: the task record plus its `inputs`, which only operators see.
#[derive(Serialize, ToSchema)]
pub struct AdminTaskRecord {
    /// The task record's fields.
    #[serde(flatten)]
    record: tasks::TaskRecord<'static>,
    /// The task's inputs.
    #[schema(value_type = serde_json::Value)]
    inputs: serde_json::Value,
}
