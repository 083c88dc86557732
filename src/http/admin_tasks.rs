//! Admin task routes (SPEC section 8, "Listing, replay, cancel"): the task listing with its
//! stable cursors, replay of one task or of an agent's matching tasks through the intake, and
//! cancellation of a task that has not started.
//!
//! Every route takes [`Admin`], so the admin token is checked before anything else runs.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use tickgate_actors::intake::{Accepted, Refused};
use tickgate_actors::model::{now_ms, AgentId, Source, Task, TaskId, TaskStatus};
use tickgate_actors::store::{
    write_async, CancelOutcome, ListCursor, ListQuery, TaskPage, Write, Written,
};

use super::admin::Admin;
use super::error::ApiError;
use super::tasks::{load, TaskRecord};
use super::{agent_in_path, AppState};

/// Page size when `limit` is absent.
const DEFAULT_LIMIT: usize = 100;
/// Largest accepted `limit`.
const MAX_LIMIT: usize = 1000;
/// Most listing index entries one page examines. Without a `status` filter every examined entry
/// is returned, so this never shortens a page; with one, a page whose matches are sparse stops
/// here and returns what it found with a cursor to continue, so no request reads more than this
/// many records however many tasks are stored.
const SCAN_LIMIT: usize = 5000;
/// Most tasks one bulk replay submits (or reports refused); the answer's `next_cursor`
/// continues with older matches.
const BULK_REPLAY_MAX: usize = 1000;
/// Most index entries one bulk replay examines, so one call stays bounded with a sparse filter.
const BULK_SCAN_MAX: usize = 100_000;

/// The listing's query string; every filter is optional.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only this agent's tasks (`namespace/name`).
    agent: Option<String>,
    /// Only tasks with this status.
    #[param(value_type = Option<crate::http::schemas::TaskStatusName>)]
    status: Option<String>,
    /// Only tasks created at or after this time (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only tasks created before this time (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Page size (default 100).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// A `next_cursor` from the previous page.
    cursor: Option<String>,
}

/// The filters of a listing or a bulk replay, checked.
struct Filters {
    status: Option<TaskStatus>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    cursor: Option<ListCursor>,
}

fn parse_status(raw: &str) -> Result<TaskStatus, ApiError> {
    serde_json::from_value(serde_json::Value::String(raw.to_string())).map_err(|_| {
        ApiError::BadRequest(format!(
            "status {raw:?} is not one of PENDING, STARTED, RETRY, AWAITING_INPUT, SUCCESS, FAILURE, REVOKED"
        ))
    })
}

/// An RFC 3339 time (`Z` or a `±hh:mm` offset, optional fraction) as Unix milliseconds.
fn parse_time(name: &str, raw: &str) -> Result<u64, ApiError> {
    let bad = || ApiError::BadRequest(format!("{name} {raw:?} is not an RFC 3339 time"));
    // humantime reads UTC times only; an offset is split off and applied here.
    // The offset is the last six bytes; a split inside a multi-byte character is no offset.
    let split = raw
        .len()
        .checked_sub(6)
        .filter(|i| raw.is_char_boundary(*i));
    let (utc, offset_ms): (String, i64) = match split.map(|i| raw.split_at(i)) {
        Some((head, tail))
            if head.len() > 10
                && tail.is_ascii()
                && (tail.starts_with('+') || tail.starts_with('-'))
                && tail.as_bytes()[3] == b':' =>
        {
            let hours: i64 = tail[1..3].parse().map_err(|_| bad())?;
            let minutes: i64 = tail[4..6].parse().map_err(|_| bad())?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (
                format!("{head}Z"),
                sign * (hours * 3600 + minutes * 60) * 1000,
            )
        }
        _ => (raw.to_string(), 0),
    };
    if !utc.ends_with(['Z', 'z']) {
        return Err(bad());
    }
    let t = humantime::parse_rfc3339_weak(&utc[..utc.len() - 1]).map_err(|_| bad())?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_millis();
    let ms = i64::try_from(ms).map_err(|_| bad())? - offset_ms;
    u64::try_from(ms).map_err(|_| bad())
}

fn parse_cursor(raw: &str) -> Result<ListCursor, ApiError> {
    ListCursor::decode(raw).ok_or_else(|| {
        ApiError::BadRequest("cursor is not a next_cursor returned by this listing".into())
    })
}

fn filters(
    status: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
    cursor: Option<&str>,
) -> Result<Filters, ApiError> {
    fn nonempty(v: Option<&str>) -> Option<&str> {
        v.filter(|s| !s.is_empty())
    }
    Ok(Filters {
        status: nonempty(status).map(parse_status).transpose()?,
        since_ms: nonempty(since)
            .map(|s| parse_time("since", s))
            .transpose()?,
        until_ms: nonempty(until)
            .map(|s| parse_time("until", s))
            .transpose()?,
        cursor: nonempty(cursor).map(parse_cursor).transpose()?,
    })
}

/// `GET /admin/tasks`: tasks newest first (by `created_at`, ties by id), filtered by agent,
/// status and creation time, one page at a time.
#[utoipa::path(
    get,
    path = "/admin/tasks",
    tag = "admin",
    operation_id = "list_tasks",
    params(
        ListParams
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Tasks, newest first", body = crate::http::schemas::TaskPage),
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
    params: web::Query<ListParams>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let p = params.into_inner();
    let agent = match p.agent.as_deref().filter(|a| !a.is_empty()) {
        Some(a) => Some(
            a.parse::<AgentId>()
                .map_err(|e| ApiError::BadRequest(format!("agent: {e}")))?,
        ),
        None => None,
    };
    let f = filters(
        p.status.as_deref(),
        p.since.as_deref(),
        p.until.as_deref(),
        p.cursor.as_deref(),
    )?;
    let limit = match p.limit.as_deref().filter(|l| !l.is_empty()) {
        None => DEFAULT_LIMIT,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "limit {raw:?} is not a number from 1 to {MAX_LIMIT}"
                )))
            }
        },
    };
    let page = state
        .store
        .list_tasks(ListQuery {
            agent,
            status: f.status,
            since_ms: f.since_ms,
            until_ms: f.until_ms,
            cursor: f.cursor,
            limit,
            scan_limit: SCAN_LIMIT,
        })
        .await?;
    let tasks: Vec<TaskRecord<'_>> = page
        .tasks
        .iter()
        .map(|t| TaskRecord::new(t, &state))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "tasks": tasks,
        "next_cursor": page.next_cursor.map(|c| c.encode()),
    })))
}

/// A new task with the original's inputs, title and environment, marked as its replay.
fn replay_of(original: &Task) -> Task {
    let source = Source {
        method: "REPLAY".into(),
        ..original.source.clone()
    };
    let mut task = Task::new(original.agent.clone(), original.inputs.clone(), source);
    task.title = original.title.clone();
    task.env = original.env.clone();
    task.replay_of = Some(original.id);
    task
}

fn task_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound(format!("no task with id {raw:?}")))
}

/// `POST /admin/tasks/{id}/replay`: the task again, as a new task, through the intake (so the
/// mailbox bound, the breaker and draining apply as to any trigger).
#[utoipa::path(
    post,
    path = "/admin/tasks/{id}/replay",
    tag = "admin",
    operation_id = "replay_task",
    params(
        ("id" = String, Path, description = "The task id"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 202, description = "The new task, a replay of this one", body = TaskRecord,
            headers(("Location" = String, description = "The new task's poll URL"))),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client, or the agent's mailbox is full", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The agent's breaker is open, the server is shutting down, or the store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn replay(
    _: Admin,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let original = load(&state, task_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task with id {:?}", id.as_str())))?;
    match state.intake.accept(replay_of(&original), None).await? {
        Accepted::New(task) => {
            tracing::info!(task_id = %task.id, replay_of = %original.id, "task replayed by admin");
            Ok(HttpResponse::Accepted()
                .insert_header((header::LOCATION, state.poll_url(&task.id)))
                .json(TaskRecord::new(&task, &state)))
        }
        // Replays carry no idempotency key, so the intake never answers with a duplicate.
        Accepted::Duplicate(dup) => Err(ApiError::Internal(format!(
            "a replay without an idempotency key was answered as a duplicate of {dup}"
        ))),
    }
}

/// Body of `POST /admin/agents/{namespace}/{agent}/replay`; every field is optional.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkReplay {
    /// Only tasks with this status.
    #[schema(value_type = Option<crate::http::schemas::TaskStatusName>)]
    status: Option<String>,
    /// Only tasks created at or after this time (RFC 3339).
    #[schema(format = DateTime)]
    since: Option<String>,
    /// Only tasks created before this time (RFC 3339).
    #[schema(format = DateTime)]
    until: Option<String>,
    /// A `next_cursor` from a previous bulk replay.
    cursor: Option<String>,
}

/// `POST /admin/agents/{namespace}/{agent}/replay`: replays the agent's tasks matching the
/// filters, up to [`BULK_REPLAY_MAX`] per call (the newest matches, submitted oldest first so
/// their original order is kept). Each goes through the intake; once one is refused (mailbox
/// full, breaker open, shutting down, store failing) the rest are not tried and are reported
/// refused with the same error, so nothing is dropped silently and nothing overtakes.
#[utoipa::path(
    post,
    path = "/admin/agents/{namespace}/{agent}/replay",
    tag = "admin",
    operation_id = "replay_agent",
    params(
        ("namespace" = String, Path, description = "The agent's namespace"),
        ("agent" = String, Path, description = "The agent's name"),
    ),
    request_body(content = BulkReplay, content_type = "application/json", description = "Optional filters; an empty body replays every task of the agent"),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "What was replayed and what was refused", body = crate::http::schemas::BulkReplayResult),
        (status = 400, description = "The body is not JSON, or a filter is unusable", body = crate::http::schemas::ErrorBody),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such agent", body = crate::http::schemas::ErrorBody),
        (status = 413, description = "The body is too large", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn replay_agent(
    _: Admin,
    path: web::Path<(String, String)>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let agent = agent_in_path(path)?;
    if state.intake.agent(&agent).is_none() {
        return Err(super::no_such_agent(&agent));
    }
    let b: BulkReplay = if body.iter().all(u8::is_ascii_whitespace) {
        BulkReplay::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?
    };
    let f = filters(
        b.status.as_deref(),
        b.since.as_deref(),
        b.until.as_deref(),
        b.cursor.as_deref(),
    )?;
    let started = now_ms();
    let mut matches: Vec<Task> = Vec::new();
    let mut cursor = f.cursor;
    let mut scanned = 0;
    let next_cursor = loop {
        let TaskPage {
            tasks,
            next_cursor: next,
        } = state
            .store
            .list_tasks(ListQuery {
                agent: Some(agent.clone()),
                status: f.status,
                since_ms: f.since_ms,
                // Never the replays this call makes (or anything newer than the call).
                until_ms: Some(f.until_ms.unwrap_or(u64::MAX).min(started + 1)),
                cursor,
                limit: BULK_REPLAY_MAX - matches.len(),
                scan_limit: SCAN_LIMIT,
            })
            .await?;
        scanned += SCAN_LIMIT;
        matches.extend(tasks);
        cursor = next;
        if next.is_none() || matches.len() >= BULK_REPLAY_MAX || scanned >= BULK_SCAN_MAX {
            break next;
        }
    };
    let mut task_ids = Vec::new();
    let mut refused = Vec::new();
    let mut stop: Option<String> = None;
    for original in matches.iter().rev() {
        if let Some(error) = &stop {
            refused.push(json!({ "task_id": original.id.to_string(), "error": error }));
            continue;
        }
        match state.intake.accept_id(replay_of(original), None).await {
            Ok(Accepted::New(id)) => task_ids.push(id.to_string()),
            Ok(Accepted::Duplicate(dup)) => task_ids.push(dup.to_string()),
            Err(e) => {
                let code = refusal_code(&e);
                refused.push(json!({ "task_id": original.id.to_string(), "error": code }));
                stop = Some(code.to_string());
            }
        }
    }
    tracing::info!(agent = %agent, replayed = task_ids.len(), refused = refused.len(), "bulk replay by admin");
    Ok(HttpResponse::Ok().json(json!({
        "replayed": task_ids.len(),
        "task_ids": task_ids,
        "refused": refused,
        "next_cursor": next_cursor.map(|c: ListCursor| c.encode()),
    })))
}

/// The error code a refused replay is reported with: the one a trigger would get.
fn refusal_code(e: &Refused) -> &'static str {
    match e {
        Refused::UnknownAgent(_) => "not_found",
        Refused::ShuttingDown => "shutting_down",
        Refused::BreakerOpen { .. } => "breaker_open",
        Refused::MailboxFull => "mailbox_full",
        Refused::Conflict(_) => "idempotency_conflict",
        Refused::StoreUnavailable(_) => "store_unavailable",
    }
}

/// `POST /admin/tasks/{id}/cancel`: revokes a task that is `PENDING`, `RETRY` or
/// `AWAITING_INPUT`. The store writer decides against the task's current status, so a cancel
/// and the task's start are ordered: a task whose tick started is `409` (a running tick is not
/// interrupted), and one revoked first never starts (the agent's start write is refused).
#[utoipa::path(
    post,
    path = "/admin/tasks/{id}/cancel",
    tag = "admin",
    operation_id = "cancel_task",
    params(
        ("id" = String, Path, description = "The task id"),
    ),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The task, now REVOKED", body = TaskRecord),
        (status = 401, description = "The admin bearer token is missing or wrong", body = crate::http::schemas::ErrorBody),
        (status = 404, description = "No such task", body = crate::http::schemas::ErrorBody),
        (status = 409, description = "The task has started or finished", body = crate::http::schemas::ErrorBody),
        (status = 429, description = "Too many failed credentials from this client", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "The store is unavailable", body = crate::http::schemas::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
    )
)]
pub async fn cancel(
    _: Admin,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let task_id = task_id(&id)?;
    let write = Write::Cancel {
        id: task_id,
        at_ms: now_ms(),
    };
    match write_async(state.store.as_ref(), write).await? {
        Written::Cancel(CancelOutcome::Revoked(task)) => {
            let task: Arc<Task> = Arc::from(task);
            // Durable now: waiters and event streams hear of it.
            state.events.publish(&task);
            tracing::info!(task_id = %task.id, agent = %task.agent, "task revoked by admin");
            Ok(HttpResponse::Ok().json(TaskRecord::new(&task, &state)))
        }
        Written::Cancel(CancelOutcome::NotCancellable(status)) => {
            Err(ApiError::Conflict(if status == TaskStatus::Started {
                "the task's tick is running and is not interrupted".to_string()
            } else {
                format!(
                    "the task is {} and can no longer be cancelled",
                    serde_json::to_value(status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                )
            }))
        }
        Written::Cancel(CancelOutcome::Unknown) => Err(ApiError::NotFound(format!(
            "no task with id {:?}",
            id.as_str()
        ))),
        other => Err(ApiError::Internal(format!(
            "store answered a cancel with {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filters_are_checked() {
        assert!(filters(Some("FAILURE"), None, None, None).is_ok());
        assert!(filters(Some("failure"), None, None, None).is_err());
        assert!(filters(None, Some("2026-01-01T00:00:00Z"), None, None).is_ok());
        assert!(filters(None, Some("yesterday"), None, None).is_err());
        assert!(filters(None, None, None, Some("abc")).is_err());
        let f = filters(None, None, Some("1970-01-01T00:00:01.5Z"), None).unwrap();
        assert_eq!(f.until_ms, Some(1500));
        assert_eq!(parse_time("t", "1970-01-01T01:00:01+01:00").unwrap(), 1000);
        assert_eq!(
            parse_time("t", "1970-01-01T00:00:01-00:30").unwrap(),
            1_801_000
        );
        assert!(parse_time("t", "1970-01-01T00:00:01").is_err());
        assert!(parse_time("t", "1969-12-31T23:59:59Z").is_err());
        // A character of several bytes across the offset's place (found by the API fuzz run).
        assert!(parse_time("since", "\u{80}00\u{800}").is_err());
    }

    proptest! {
        /// Found by the API fuzz run: a multi-byte character across the offset's place panicked.
        #[test]
        fn any_time_text_is_parsed_or_refused(raw in "\\PC{0,40}") {
            let _ = parse_time("since", &raw);
        }

        #[test]
        fn cursors_round_trip_and_garbage_is_refused(ms in any::<u64>(), id in any::<[u8; 16]>(), junk in ".{0,60}") {
            let c = ListCursor { created_ms: ms, id: TaskId::from_bytes(id) };
            prop_assert_eq!(ListCursor::decode(&c.encode()), Some(c));
            if junk.len() != 48 {
                prop_assert!(ListCursor::decode(&junk).is_none());
            }
        }
    }
}
