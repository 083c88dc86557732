//! The task as the API shows it (SPEC section 4, Tasks): one rendering shared by the task
//! resource, the admin listing, SSE frames, the A2A edge and the status callbacks' `data`. Its own
//! module so that the OpenAPI schemas can name it without depending on the handlers.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tickgate_actors::model::{rfc3339, JsonText, Task, TaskStatus};
use utoipa::ToSchema;

use super::AppState;

/// The task as the API shows it (SPEC section 4, Tasks).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = TaskRecord)]
pub struct TaskRecord<'a> {
    task_id: String,
    agent: String,
    #[schema(value_type = TaskStatusName)]
    status: TaskStatus,
    #[schema(value_type = TaskPhase)]
    phase: &'static str,
    tick: Option<u64>,
    attempt: u32,
    title: &'a Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    #[schema(value_type = Option<serde_json::Value>)]
    response: Option<&'a RawValue>,
    #[schema(value_type = Option<serde_json::Value>)]
    result: Option<&'a RawValue>,
    error: &'a Option<String>,
    poll_url: String,
    source: SourceRecord<'a>,
    attempts: Vec<AttemptRecord<'a>>,
    next_attempt_at: Option<String>,
    awaiting: Option<AwaitingRecord<'a>>,
    replay_of: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timed_out: Option<bool>,
}

/// Where a task came from, as the task record shows it (SPEC section 7): never headers or
/// addresses, which stay between tickgate and the runner.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct SourceRecord<'a> {
    method: &'a str,
    event: &'a Option<String>,
    schedule: &'a Option<String>,
}

/// One attempt as the task record shows it (SPEC section 8).
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AttemptRecord<'a> {
    attempt: u32,
    started_at: String,
    finished_at: Option<String>,
    error: &'a Option<String>,
}

/// What a parked task waits for, with the URL that answers it (SPEC section 8).
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AwaitingRecord<'a> {
    request: &'a Value,
    since: String,
    expires_at: String,
    resume_url: String,
}

impl<'a> TaskRecord<'a> {
    /// Renders a stored task.
    pub fn new(task: &'a Task, state: &AppState) -> Self {
        Self::at(task, &state.public_url)
    }

    /// Renders a stored task with links under `public_url`; for renderers without the handlers'
    /// state (the status callbacks' `data`).
    pub fn at(task: &'a Task, public_url: &str) -> Self {
        let poll_url = format!("{public_url}/tasks/{}", task.id);
        Self {
            task_id: task.id.to_string(),
            agent: task.agent.to_string(),
            status: task.status,
            phase: task.status.phase(),
            tick: (task.tick > 0).then_some(task.tick),
            attempt: task.attempt,
            title: &task.title,
            created_at: rfc3339(task.created_at),
            started_at: task.started_at.map(rfc3339),
            finished_at: task.finished_at.map(rfc3339),
            response: task.response(),
            result: task.result.as_ref().map(JsonText::raw),
            error: &task.error,
            poll_url: poll_url.clone(),
            source: SourceRecord {
                method: &task.source.method,
                event: &task.source.event,
                schedule: &task.source.schedule,
            },
            attempts: task
                .attempts
                .iter()
                .map(|a| AttemptRecord {
                    attempt: a.attempt,
                    started_at: rfc3339(a.started_at),
                    finished_at: a.finished_at.map(rfc3339),
                    error: &a.error,
                })
                .collect(),
            next_attempt_at: task.next_attempt_at.map(rfc3339),
            awaiting: task.awaiting.as_ref().map(|w| AwaitingRecord {
                request: &w.request,
                since: rfc3339(w.since),
                expires_at: rfc3339(w.expires_at),
                resume_url: format!("{poll_url}/resume"),
            }),
            replay_of: task.replay_of.map(|id| id.to_string()),
            duplicate: None,
            timed_out: None,
        }
    }

    /// Marks the answer to a repeated idempotency key.
    pub fn duplicate(mut self) -> Self {
        self.duplicate = Some(true);
        self
    }

    /// Marks a synchronous wait that ran out before the task finished.
    pub fn timed_out(mut self, timed_out: bool) -> Self {
        if timed_out {
            self.timed_out = Some(true);
        }
        self
    }
}

/// A task status (SPEC section 8).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatusName {
    /// Accepted, waiting in the agent's queue.
    Pending,
    /// Its tick is running.
    Started,
    /// An attempt failed; the next is scheduled.
    Retry,
    /// The tick asked for input.
    AwaitingInput,
    /// Finished successfully.
    Success,
    /// Failed with no retry left.
    Failure,
    /// Canceled.
    Revoked,
}

/// The coarse phase of a task status.
#[derive(Serialize, ToSchema)]
pub enum TaskPhase {
    /// PENDING, STARTED, RETRY.
    Running,
    /// AWAITING_INPUT.
    Waiting,
    /// SUCCESS.
    Complete,
    /// FAILURE.
    Error,
    /// REVOKED.
    Canceled,
}
