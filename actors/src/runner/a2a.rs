//! The `a2a` runner: a tick is one exchange with a remote agent over the Agent2Agent protocol
//! (A2A 1.0, JSON-RPC binding), so that a webhook, a schedule or another agent's A2A call can
//! drive an agent that lives somewhere else and only speaks A2A.
//!
//! One tick, as SPEC section 10 describes it:
//! 1. the agent card at the configured `url` is read (once; the chosen interface is cached) and
//!    its JSON-RPC interface for protocol version 1.x is picked;
//! 2. `SendMessage` carries one message: a data part holding the whole tick input and, when the
//!    task has a title, a text part with it. A continuation tick (the task was resumed) instead
//!    sends a data part holding `resume.response` as the next message of the same remote task;
//! 3. a remote task that is not finished yet is polled with `GetTask`, all within the agent's
//!    `tick_timeout`; on timeout a best-effort `CancelTask` tells the remote to stop;
//! 4. `completed` → the artifacts' parts become `response`; `failed`, `rejected`, `canceled` →
//!    the tick fails with the remote's reason; `input-required` → the tick asks to park the task
//!    (`await`) with the remote's status message as the request.
//!
//! The remote task id and context id live in that request: it is the remote's own status message
//! with `taskId` and `contextId` filled in, so the continuation tick finds them in
//! `resume.request` and nothing else (memory, a side table) has to be kept in step with the task.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use reqwest::{Client, Url};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::http::{causes, read_body, safe_url, shown_url};
use super::{A2aSpec, RunnerError};
use crate::model::{preview, AwaitRequest, JsonText, TaskId, TickInput, TickOutput};

/// The protocol version this runner speaks, sent as `A2A-Version` on every call.
const VERSION: &str = "1.0";

/// Largest agent card or JSON-RPC answer read; a bigger one fails the tick.
const MAX_BODY: usize = 16 << 20;

/// Longest piece of remote text (error messages, reasons) copied into a task's `error`.
const MAX_REMOTE_TEXT: usize = 300;

/// First and longest pause between two `GetTask` polls of an unfinished remote task.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_secs(1);

/// How long the best-effort `CancelTask` after a timed-out tick may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Talks to one remote A2A agent. Like the `http` runner, everything that can be checked without
/// a request (URL, token variable, TLS set-up) is checked once here, and a broken config fails
/// each tick with the same clear error rather than the agent's start.
pub struct A2aRunner {
    /// The card URL as errors show it: no credentials, no query string.
    shown_url: String,
    prepared: Result<Prepared, String>,
    /// The JSON-RPC endpoint picked from the card, kept until a call to it fails.
    endpoint: Mutex<Option<Url>>,
}

struct Prepared {
    client: Client,
    card_url: Url,
    /// `Authorization: Bearer …`, marked sensitive so that it is never printed.
    bearer: Option<HeaderValue>,
}

/// Where a remote task stands after one answer.
enum Step {
    /// Finished, failed or parked: the tick's outcome.
    Done(Result<TickOutput, RunnerError>),
    /// Submitted or working: poll again.
    Running { id: String },
}

impl A2aRunner {
    /// Reads the bearer token from the variable named by `token_env` now, so that a missing
    /// variable is reported on every tick rather than discovered half-way through one.
    pub fn new(spec: A2aSpec) -> Self {
        let shown_url = shown_url(&spec.url);
        let prepared = prepare(&spec, &shown_url);
        Self {
            shown_url,
            prepared,
            endpoint: Mutex::new(None),
        }
    }

    /// Runs one tick against the remote agent; `timeout` bounds everything, card included.
    pub async fn tick(
        &self,
        input: &TickInput,
        timeout: Duration,
    ) -> Result<TickOutput, RunnerError> {
        let prepared = self
            .prepared
            .as_ref()
            .map_err(|e| RunnerError::A2a(e.clone()))?;
        // The remote task the exchange is waiting on, so that a timeout can cancel it.
        let running: Mutex<Option<(Url, String)>> = Mutex::new(None);
        match tokio::time::timeout(timeout, self.exchange(prepared, input, &running)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let running = running.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some((endpoint, id)) = running {
                    let call = Call::new(prepared, endpoint);
                    tokio::spawn(async move {
                        let cancelled = tokio::time::timeout(
                            CANCEL_TIMEOUT,
                            call.invoke("CancelTask", json!({ "id": id })),
                        )
                        .await;
                        if !matches!(cancelled, Ok(Ok(_))) {
                            tracing::info!(remote_task = %id, "the timed-out remote A2A task could not be cancelled");
                        }
                    });
                }
                Err(RunnerError::Timeout(timeout))
            }
        }
    }

    async fn exchange(
        &self,
        prepared: &Prepared,
        input: &TickInput,
        running: &Mutex<Option<(Url, String)>>,
    ) -> Result<TickOutput, RunnerError> {
        let endpoint = self.endpoint(prepared).await?;
        let call = Call::new(prepared, endpoint.clone());
        let message = message_for(input)?;
        let answer = call
            .invoke("SendMessage", json!({ "message": message }))
            .await
            .inspect_err(|_| self.forget_endpoint())?;
        let mut step = step_of_send(answer)?;
        let mut pause = POLL_FIRST;
        loop {
            let id = match step {
                Step::Done(outcome) => return outcome,
                Step::Running { id } => id,
            };
            *running.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((endpoint.clone(), id.clone()));
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
            let task = call.invoke("GetTask", json!({ "id": id })).await?;
            step = step_of_task(&task)?;
        }
    }

    /// The cached JSON-RPC endpoint, or the one the agent card names.
    async fn endpoint(&self, prepared: &Prepared) -> Result<Url, RunnerError> {
        if let Some(url) = self
            .endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(url);
        }
        let response = prepared
            .client
            .get(prepared.card_url.clone())
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                RunnerError::A2a(format!("agent card {}: {}", self.shown_url, causes(e)))
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(RunnerError::A2a(format!(
                "agent card {} answered {status}",
                self.shown_url
            )));
        }
        let (body, complete) = read_body(response, MAX_BODY).await.map_err(|e| {
            RunnerError::A2a(format!("agent card {}: {}", self.shown_url, causes(e)))
        })?;
        if !complete {
            return Err(RunnerError::A2a(format!(
                "agent card {} is larger than {} MiB",
                self.shown_url,
                MAX_BODY >> 20
            )));
        }
        let card: Value = serde_json::from_slice(&body).map_err(|e| {
            RunnerError::A2a(format!(
                "agent card {} is not JSON ({e}); it started with {:?}",
                self.shown_url,
                preview(&body)
            ))
        })?;
        let url = pick_interface(&card, &prepared.card_url)
            .map_err(|e| RunnerError::A2a(format!("agent card {}: {e}", self.shown_url)))?;
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(url.clone());
        Ok(url)
    }

    /// Drops the cached endpoint after a failed call, so that the next tick reads the card
    /// again (the agent may have moved).
    fn forget_endpoint(&self) {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn prepare(spec: &A2aSpec, shown_url: &str) -> Result<Prepared, String> {
    let card_url =
        Url::parse(&spec.url).map_err(|e| format!("invalid agent card URL {shown_url:?}: {e}"))?;
    if !matches!(card_url.scheme(), "http" | "https") {
        return Err(format!("agent card URL {shown_url:?} is not http or https"));
    }
    let bearer = match &spec.token_env {
        None => None,
        Some(var) => {
            let token = std::env::var(var)
                .map_err(|_| format!("runner.token_env: the variable {var} is not set"))?;
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                format!("runner.token_env: the variable {var} does not hold a usable token")
            })?;
            value.set_sensitive(true);
            Some(value)
        }
    };
    let client = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tickgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client could not be set up: {}", causes(e)))?;
    Ok(Prepared {
        client,
        card_url,
        bearer,
    })
}

/// One JSON-RPC endpoint with the headers every call carries.
struct Call {
    client: Client,
    endpoint: Url,
    shown: String,
    headers: HeaderMap,
}

impl Call {
    fn new(prepared: &Prepared, endpoint: Url) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("A2A-Version", HeaderValue::from_static(VERSION));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(bearer) = &prepared.bearer {
            headers.insert(AUTHORIZATION, bearer.clone());
        }
        Self {
            client: prepared.client.clone(),
            shown: safe_url(&endpoint),
            endpoint,
            headers,
        }
    }

    /// Calls `method` and returns its `result`; transport failures, HTTP errors and JSON-RPC
    /// errors all become one sentence naming the method and the endpoint.
    async fn invoke(&self, method: &str, params: Value) -> Result<Value, RunnerError> {
        let request = json!({
            "jsonrpc": "2.0",
            "id": TaskId::random().to_string(),
            "method": method,
            "params": params,
        });
        let fail = |what: String| RunnerError::A2a(format!("{method} to {}: {what}", self.shown));
        let response = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .json(&request)
            .send()
            .await
            .map_err(|e| fail(causes(e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(fail(format!(
                "the remote agent refused the credentials ({status}); check runner.token_env"
            )));
        }
        if !status.is_success() {
            let body = read_body(response, 1024)
                .await
                .map(|(body, _)| body)
                .unwrap_or_default();
            return Err(fail(format!("answered {status}: {:?}", preview(&body))));
        }
        let (body, complete) = read_body(response, MAX_BODY)
            .await
            .map_err(|e| fail(causes(e)))?;
        if !complete {
            return Err(fail(format!(
                "the answer is larger than {} MiB",
                MAX_BODY >> 20
            )));
        }
        let mut answer: Value = serde_json::from_slice(&body).map_err(|e| {
            fail(format!(
                "the answer is not JSON ({e}); it started with {:?}",
                preview(&body)
            ))
        })?;
        if let Some(error) = answer.get("error").filter(|e| !e.is_null()) {
            let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(fail(format!("JSON-RPC error {code}: {}", clip(message))));
        }
        match answer.get_mut("result").map(Value::take) {
            Some(result) if !result.is_null() => Ok(result),
            _ => Err(fail(
                "the answer is neither a JSON-RPC result nor an error".to_string(),
            )),
        }
    }
}

/// The card's JSON-RPC interface for A2A 1.x, resolved against the card's own URL (an
/// interface URL may be relative).
fn pick_interface(card: &Value, card_url: &Url) -> Result<Url, String> {
    let interfaces = card
        .get("supportedInterfaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let chosen = interfaces.iter().find(|i| {
        let binding = i.get("protocolBinding").and_then(Value::as_str);
        let version = i.get("protocolVersion").and_then(Value::as_str);
        binding.is_some_and(|b| b.eq_ignore_ascii_case("JSONRPC"))
            && version.is_some_and(|v| v == "1" || v.starts_with("1."))
    });
    let Some(chosen) = chosen else {
        let offered: Vec<String> = interfaces
            .iter()
            .map(|i| {
                format!(
                    "{} {}",
                    i.get("protocolBinding")
                        .and_then(Value::as_str)
                        .unwrap_or("?"),
                    i.get("protocolVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                )
            })
            .collect();
        return Err(if offered.is_empty() {
            "the card lists no supportedInterfaces (an A2A 1.0 card does)".to_string()
        } else {
            format!(
                "the card offers no JSON-RPC interface for A2A 1.x, only: {}",
                offered.join(", ")
            )
        });
    };
    let raw = chosen.get("url").and_then(Value::as_str).unwrap_or("");
    let url = card_url
        .join(raw)
        .map_err(|e| format!("the JSON-RPC interface URL {raw:?} is unusable: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the JSON-RPC interface URL {} is not http or https",
            safe_url(&url)
        ));
    }
    Ok(url)
}

/// The message a tick sends: the first message of a new remote task, or, on a continuation
/// tick, the answer as the next message of the remote task the task parked on.
///
/// A first message gets a random `messageId`: a retried or re-run tick must start a new remote
/// task (its input differs anyway: `attempt` changes). An answer's `messageId` is derived from
/// this task, the question and the answer, so that a continuation tick re-run after a crash sends
/// the very same message again, which a remote that deduplicates on message ids (tickgate's own
/// A2A server does) recognises instead of refusing it as a message to a task no longer waiting.
fn message_for(input: &TickInput) -> Result<Value, RunnerError> {
    let Some(resume) = &input.resume else {
        let message_id = TaskId::random().to_string();
        let tick = serde_json::to_value(input)
            .map_err(|e| RunnerError::A2a(format!("the tick input could not be encoded: {e}")))?;
        let mut parts = vec![json!({ "data": tick })];
        if let Some(title) = &input.title {
            parts.push(json!({ "text": title }));
        }
        return Ok(json!({ "messageId": message_id, "role": "ROLE_USER", "parts": parts }));
    };
    let task_id = resume
        .request
        .get("taskId")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            RunnerError::A2a(
                "this task was resumed, but the request it parked with names no remote A2A taskId to continue"
                    .to_string(),
            )
        })?;
    let digest = Sha256::new()
        .chain_update(input.task_id.as_bytes())
        .chain_update([0])
        .chain_update(resume.request.to_string().as_bytes())
        .chain_update([0])
        .chain_update(resume.response.to_string().as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let mut message = json!({
        "messageId": format!("tickgate-answer-{hex}"),
        "role": "ROLE_USER",
        "taskId": task_id,
        "parts": [{ "data": resume.response }],
    });
    if let Some(context) = resume.request.get("contextId").and_then(Value::as_str) {
        message["contextId"] = json!(context);
    }
    Ok(message)
}

/// Reads a `SendMessage` result: a task, or a message (a direct, final answer).
fn step_of_send(result: Value) -> Result<Step, RunnerError> {
    if let Some(task) = result.get("task") {
        return step_of_task(task);
    }
    if let Some(message) = result.get("message") {
        let parts = message
            .get("parts")
            .and_then(Value::as_array)
            .map(|p| p.iter().collect::<Vec<_>>())
            .unwrap_or_default();
        return Ok(Step::Done(Ok(completed(response_of_parts(&parts), None))));
    }
    Err(RunnerError::A2a(
        "SendMessage answered with neither a task nor a message".to_string(),
    ))
}

/// Reads a remote task: its state decides the tick's outcome, or that it must be polled again.
fn step_of_task(task: &Value) -> Result<Step, RunnerError> {
    let id = task
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| RunnerError::A2a("the remote answered with a task without an id".into()))?;
    let raw_state = task
        .pointer("/status/state")
        .and_then(Value::as_str)
        .unwrap_or("");
    let state = normalize_state(raw_state);
    let context = task.get("contextId").and_then(Value::as_str);
    let status_message = task.pointer("/status/message").filter(|m| m.is_object());
    let outcome = match state.as_str() {
        "submitted" | "working" => return Ok(Step::Running { id: id.to_string() }),
        "completed" => {
            let mut parts: Vec<&Value> = task
                .get("artifacts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.get("parts").and_then(Value::as_array))
                .flatten()
                .collect();
            if parts.is_empty() {
                // No artifact: agents that answer in the status message alone are common.
                parts = status_message
                    .and_then(|m| m.get("parts"))
                    .and_then(Value::as_array)
                    .map(|p| p.iter().collect())
                    .unwrap_or_default();
            }
            Ok(completed(
                response_of_parts(&parts),
                Some(remote_ref(id, context, "completed")),
            ))
        }
        "input-required" => {
            let mut request = status_message
                .cloned()
                .unwrap_or_else(|| json!({ "role": "ROLE_AGENT", "parts": [] }));
            request["taskId"] = json!(id);
            if let Some(context) = context {
                request["contextId"] = json!(context);
            }
            let mut extra = Map::new();
            extra.insert("a2a".into(), remote_ref(id, context, "input-required"));
            Ok(TickOutput {
                status: Some("ok".into()),
                await_input: Some(AwaitRequest {
                    request,
                    timeout: None,
                }),
                extra,
                ..TickOutput::default()
            })
        }
        "failed" | "rejected" | "canceled" => {
            let reason = status_message.map(message_text).unwrap_or_default();
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(": {}", clip(&reason))
            };
            Err(RunnerError::A2a(format!(
                "the remote task {id} ended {}{reason}",
                state.to_uppercase()
            )))
        }
        "auth-required" => Err(RunnerError::A2a(format!(
            "the remote task {id} asks for more authentication, which this runner cannot give"
        ))),
        _ => Err(RunnerError::A2a(format!(
            "the remote task {id} is in an unknown state {:?}",
            clip(raw_state)
        ))),
    };
    Ok(Step::Done(outcome))
}

/// `TASK_STATE_INPUT_REQUIRED` (1.0) and `input-required` (0.3) both become `input-required`.
fn normalize_state(raw: &str) -> String {
    raw.strip_prefix("TASK_STATE_")
        .unwrap_or(raw)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// Where a finished exchange took place, kept in the task's `result` for whoever debugs it.
fn remote_ref(id: &str, context: Option<&str>, state: &str) -> Value {
    json!({ "taskId": id, "contextId": context, "state": state })
}

fn completed(response: Value, remote: Option<Value>) -> TickOutput {
    let mut extra = Map::new();
    if let Some(remote) = remote {
        extra.insert("a2a".into(), remote);
    }
    TickOutput {
        response: Some(JsonText::from(response)),
        status: Some("ok".into()),
        extra,
        ..TickOutput::default()
    }
}

/// One text part → that string; one data part → that value; otherwise the list of parts as the
/// remote sent them (none → `null`).
fn response_of_parts(parts: &[&Value]) -> Value {
    match parts {
        [] => Value::Null,
        [one] => {
            if let Some(text) = one.get("text").and_then(Value::as_str) {
                json!(text)
            } else if let Some(data) = one.get("data") {
                data.clone()
            } else {
                (*one).clone()
            }
        }
        many => Value::Array(many.iter().map(|p| (*p).clone()).collect()),
    }
}

/// The text parts of a message, joined, for error messages.
fn message_text(message: &Value) -> String {
    message
        .get("parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Remote text cut to a length that keeps a task's `error` readable.
fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_REMOTE_TEXT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::command::test_support::input;
    use super::*;
    use crate::model::Resume;

    fn task(state: &str, extra: Value) -> Value {
        let mut t = json!({ "id": "r-1", "contextId": "c-1", "status": { "state": state } });
        if let Value::Object(more) = extra {
            t.as_object_mut().unwrap().extend(more);
        }
        t
    }

    fn done(step: Result<Step, RunnerError>) -> Result<TickOutput, RunnerError> {
        match step.unwrap() {
            Step::Done(outcome) => outcome,
            Step::Running { id } => panic!("still running: {id}"),
        }
    }

    #[test]
    fn the_first_message_holds_the_tick_input_and_the_title() {
        let mut tick = input(json!({ "q": 1 }));
        tick.title = Some("Check the weather".into());
        let m = message_for(&tick).unwrap();
        assert_eq!(m["role"], "ROLE_USER");
        assert!(m.get("taskId").is_none());
        assert_eq!(m["parts"][0]["data"]["inputs"], json!({ "q": 1 }));
        assert_eq!(m["parts"][0]["data"]["task_id"], json!(tick.task_id));
        assert_eq!(m["parts"][1]["text"], "Check the weather");
        tick.title = None;
        assert_eq!(
            message_for(&tick).unwrap()["parts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_resume_continues_the_remote_task_it_parked_on() {
        let mut tick = input(json!({}));
        tick.resume = Some(Resume {
            request: json!({ "taskId": "r-9", "contextId": "c-9", "parts": [] }),
            response: json!({ "city": "Oslo" }),
        });
        let m = message_for(&tick).unwrap();
        assert_eq!(
            (m["taskId"].clone(), m["contextId"].clone()),
            (json!("r-9"), json!("c-9"))
        );
        assert_eq!(m["parts"], json!([{ "data": { "city": "Oslo" } }]));
        // The same answer to the same question is the same message; another answer is not.
        assert_eq!(message_for(&tick).unwrap()["messageId"], m["messageId"]);
        tick.resume.as_mut().unwrap().response = json!({ "city": "Bergen" });
        assert_ne!(message_for(&tick).unwrap()["messageId"], m["messageId"]);
        tick.resume.as_mut().unwrap().request = json!({ "question": "?" });
        assert!(matches!(message_for(&tick), Err(RunnerError::A2a(m)) if m.contains("taskId")));
    }

    #[test]
    fn states_map_to_outcomes() {
        let text = json!({ "artifacts": [{ "artifactId": "a", "parts": [{ "text": "hi" }] }] });
        let out = done(step_of_task(&task("TASK_STATE_COMPLETED", text))).unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!("hi"))
        );
        assert_eq!(out.extra["a2a"]["taskId"], "r-1");
        let two = json!({ "artifacts": [
            { "artifactId": "a", "parts": [{ "text": "hi" }] },
            { "artifactId": "b", "parts": [{ "data": { "n": 1 } }] },
        ] });
        let out = done(step_of_task(&task("completed", two))).unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!([{ "text": "hi" }, { "data": { "n": 1 } }]))
        );
        let by_message = json!({ "status": { "state": "TASK_STATE_COMPLETED",
            "message": { "role": "ROLE_AGENT", "parts": [{ "text": "done" }] } } });
        let out = done(step_of_task(&task("", by_message))).unwrap();
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!("done"))
        );

        for state in ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "working"] {
            assert!(
                matches!(step_of_task(&task(state, json!({}))), Ok(Step::Running { id }) if id == "r-1")
            );
        }
        for (state, shown) in [
            ("TASK_STATE_FAILED", "FAILED"),
            ("TASK_STATE_REJECTED", "REJECTED"),
            ("TASK_STATE_CANCELED", "CANCELED"),
        ] {
            let why = json!({ "status": { "state": state,
                "message": { "role": "ROLE_AGENT", "parts": [{ "text": "quota exceeded" }] } } });
            let err = done(step_of_task(&task("", why))).unwrap_err().to_string();
            assert!(
                err.contains(shown) && err.contains("quota exceeded"),
                "{err}"
            );
        }
        let err = done(step_of_task(&task("TASK_STATE_BORED", json!({})))).unwrap_err();
        assert!(err.to_string().contains("unknown state"), "{err}");
        assert!(step_of_task(&json!({ "status": { "state": "TASK_STATE_WORKING" } })).is_err());
    }

    #[test]
    fn input_required_parks_with_the_remote_message_and_its_ids() {
        let ask = json!({ "status": { "state": "TASK_STATE_INPUT_REQUIRED",
            "message": { "messageId": "m", "role": "ROLE_AGENT", "parts": [{ "text": "Which city?" }] } } });
        let out = done(step_of_task(&task("", ask))).unwrap();
        let request = out.await_input.unwrap().request;
        assert_eq!(request["parts"][0]["text"], "Which city?");
        assert_eq!(
            (request["taskId"].clone(), request["contextId"].clone()),
            (json!("r-1"), json!("c-1"))
        );
        let bare = done(step_of_task(&task("TASK_STATE_INPUT_REQUIRED", json!({})))).unwrap();
        assert_eq!(bare.await_input.unwrap().request["taskId"], "r-1");
    }

    #[test]
    fn a_direct_message_is_a_final_answer() {
        let result = json!({ "message": { "role": "ROLE_AGENT", "parts": [{ "data": [1, 2] }] } });
        let Step::Done(Ok(out)) = step_of_send(result).unwrap() else {
            panic!("not done");
        };
        assert_eq!(
            out.response.as_ref().map(crate::model::JsonText::to_value),
            Some(json!([1, 2]))
        );
        assert!(step_of_send(json!({ "other": 1 })).is_err());
    }

    #[test]
    fn the_json_rpc_interface_for_1_x_is_picked() {
        let base = Url::parse("https://agents.example/a2a/x/.well-known/agent-card.json").unwrap();
        let card = json!({ "supportedInterfaces": [
            { "url": "https://agents.example/grpc", "protocolBinding": "GRPC", "protocolVersion": "1.0" },
            { "url": "https://agents.example/old", "protocolBinding": "JSONRPC", "protocolVersion": "0.3" },
            { "url": "../../rpc", "protocolBinding": "JSONRPC", "protocolVersion": "1.0" },
        ] });
        assert_eq!(
            pick_interface(&card, &base).unwrap().as_str(),
            "https://agents.example/a2a/rpc"
        );
        let old = json!({ "supportedInterfaces": [{ "url": "x", "protocolBinding": "JSONRPC", "protocolVersion": "0.3" }] });
        let err = pick_interface(&old, &base).unwrap_err();
        assert!(err.contains("JSONRPC 0.3"), "{err}");
        assert!(pick_interface(&json!({ "url": "x" }), &base)
            .unwrap_err()
            .contains("supportedInterfaces"));
    }

    #[test]
    fn a_missing_token_variable_fails_ticks_by_name() {
        let runner = A2aRunner::new(A2aSpec {
            url: "http://127.0.0.1:9/card".into(),
            token_env: Some("TICKGATE_TEST_A2A_TOKEN_UNSET".into()),
        });
        let err = runner.prepared.as_ref().err().unwrap();
        assert!(err.contains("TICKGATE_TEST_A2A_TOKEN_UNSET"), "{err}");
    }

    proptest! {
        #[test]
        fn one_part_round_trips_to_its_value(text in "\\PC{0,40}", n in any::<i64>()) {
            let t = json!({ "text": text });
            prop_assert_eq!(response_of_parts(&[&t]), json!(text));
            let d = json!({ "data": { "n": n, "s": text } });
            prop_assert_eq!(response_of_parts(&[&d]), json!({ "n": n, "s": text }));
        }

        #[test]
        fn any_state_string_is_read_without_panic(raw in "\\PC{0,30}") {
            let state = normalize_state(&raw);
            prop_assert_eq!(normalize_state(&state), state.clone());
            let _ = step_of_task(&task(&raw, json!({})));
        }

        #[test]
        fn clipped_text_is_bounded(text in "\\PC{0,600}") {
            prop_assert!(clip(&text).chars().count() <= MAX_REMOTE_TEXT + 1);
        }
    }
}
