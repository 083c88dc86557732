//! The few types that travel through the whole system: who an agent is, what a task is, and what
//! goes into and comes out of a tick. Keeping them in one module means the HTTP edge, the store and
//! the runners all agree on field names, which are tickgate's public API (SPEC sections 1, 3, 4).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub use crate::text::{scalar_text, value_depth, JsonText, Members, TextError};

/// `namespace/name`, both DNS labels. The id is the stable key for memory, queues and tokens, so it
/// is validated once at parse time and never re-checked downstream.
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct AgentId {
    /// `namespace/name`, shared: an id is copied into every task, message and map key on the
    /// accept path, and sharing makes each copy a reference count and each hash one string (#16).
    full: Arc<str>,
    /// Where the `/` is in `full`.
    slash: usize,
}

// `full` decides both parts (labels hold no `/`), so equality and hashing use it alone; the
// order stays that of the parts, namespace first, which is what sorted listings show.
impl PartialEq for AgentId {
    fn eq(&self, other: &Self) -> bool {
        self.full == other.full
    }
}

impl Eq for AgentId {}

impl std::hash::Hash for AgentId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.full.hash(state);
    }
}

impl Ord for AgentId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.namespace(), self.name()).cmp(&(other.namespace(), other.name()))
    }
}

impl PartialOrd for AgentId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// As its `namespace/name` string, written from the shared one (no copy).
impl Serialize for AgentId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.full)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentId")
            .field("namespace", &self.namespace())
            .field("name", &self.name())
            .finish()
    }
}

/// Why a string is not an acceptable agent id; shown to operators in config errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AgentIdError(String);

impl AgentId {
    /// Builds an id from its two parts, checking both are DNS labels.
    pub fn new(namespace: &str, name: &str) -> Result<Self, AgentIdError> {
        check_label("namespace", namespace)?;
        check_label("name", name)?;
        Ok(Self {
            full: format!("{namespace}/{name}").into(),
            slash: namespace.len(),
        })
    }

    /// The namespace part, used in the `/webhooks/{namespace}/{agent}/{token}` route.
    pub fn namespace(&self) -> &str {
        &self.full[..self.slash]
    }

    /// The name part.
    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }
}

fn check_label(what: &str, s: &str) -> Result<(), AgentIdError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentIdError(format!(
            "agent {what} {s:?} is not a DNS label (1-63 of a-z, 0-9, '-', not starting or ending with '-')"
        )))
    }
}

impl FromStr for AgentId {
    type Err = AgentIdError;

    /// Accepts `namespace/name` or a bare `name` in the `default` namespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) => Self::new(ns, name),
            None => Self::new("default", s),
        }
    }
}

impl TryFrom<String> for AgentId {
    type Error = AgentIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// 128 random bits rendered as a UUID string. Random rather than sequential so that task ids leak
/// nothing about traffic volume and cannot be guessed to poll someone else's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TaskId(uuid::Uuid);

/// As its hyphenated lower-case string (its `Display`), formatted on the stack.
impl Serialize for TaskId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = uuid::Uuid::encode_buffer();
        serializer.serialize_str(self.0.hyphenated().encode_lower(&mut buf))
    }
}

/// How many bytes of OS randomness a thread reads at a time for task ids (16 ids' worth).
const ID_BLOCK: usize = 256;

thread_local! {
    /// The unused part of this thread's block of OS randomness, and where it starts.
    static ID_RANDOM: std::cell::RefCell<([u8; ID_BLOCK], usize)> =
        const { std::cell::RefCell::new(([0; ID_BLOCK], ID_BLOCK)) };
}

/// Sixteen bytes from the OS CSPRNG, never handed out twice.
fn random_id_bytes() -> [u8; 16] {
    ID_RANDOM.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (block, used) = &mut *guard;
        if *used + 16 > ID_BLOCK {
            getrandom::getrandom(block).expect("the OS random source is unavailable");
            *used = 0;
        }
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&block[*used..*used + 16]);
        // Wiped as it is taken, so the block never holds an id already given out.
        block[*used..*used + 16].fill(0);
        *used += 16;
        bytes
    })
}

impl TaskId {
    /// A fresh id from the OS CSPRNG. The bytes are taken from a per-thread block read from the
    /// OS [`ID_BLOCK`] bytes at a time: one `getrandom` system call per id was one of the 8.7
    /// system calls of a fire-and-forget request (#16). The bytes are the OS's own, used once.
    pub fn random() -> Self {
        Self(uuid::Builder::from_random_bytes(random_id_bytes()).into_uuid())
    }

    /// The 16 raw bytes, used as the store key.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from a store key.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

impl TryFrom<String> for TaskId {
    type Error = uuid::Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl TaskId {
    /// The id as [`Display`](fmt::Display) writes it, into a buffer of the caller's: for the
    /// fire-and-forget answer, which writes it twice per request without the formatting
    /// machinery (#16).
    pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

/// The task life cycle of SPEC sections 1 and 8. `SUCCESS`, `FAILURE` and `REVOKED` are terminal;
/// `AWAITING_INPUT` is a stopping point (a sync wait returns there) but not an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TaskStatus {
    /// Accepted and on disk, waiting in the agent's queue.
    Pending,
    /// Its tick is running (or was running when the process died).
    Started,
    /// An attempt failed and the next one is scheduled at `next_attempt_at`.
    Retry,
    /// The tick asked for input; the task is parked until someone answers or it expires.
    AwaitingInput,
    /// The tick finished and reported success.
    Success,
    /// The tick failed, timed out, or produced unusable output, with no retry left.
    Failure,
    /// Cancelled by an operator before it finished.
    Revoked,
}

impl TaskStatus {
    /// Whether nothing will change this task any more; SSE streams close here.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Success | TaskStatus::Failure | TaskStatus::Revoked
        )
    }

    /// Whether a synchronous wait returns here: a terminal status, or a task waiting for input
    /// (nothing more happens until someone answers).
    pub fn is_stopping_point(self) -> bool {
        self.is_terminal() || self == TaskStatus::AwaitingInput
    }

    /// The `phase` field that DocsGPT-style clients poll instead of `status`.
    pub fn phase(self) -> &'static str {
        match self {
            TaskStatus::Pending | TaskStatus::Started | TaskStatus::Retry => "Running",
            TaskStatus::AwaitingInput => "Waiting",
            TaskStatus::Success => "Complete",
            TaskStatus::Failure => "Error",
            TaskStatus::Revoked => "Canceled",
        }
    }
}

/// One attempt of a task's tick, kept on the record so a retried task shows its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first try.
    pub attempt: u32,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unix milliseconds; `None` while it runs.
    pub finished_at: Option<u64>,
    /// Why it failed; `None` when it succeeded (or parked for input).
    pub error: Option<String>,
}

/// What a parked task is waiting for (SPEC section 8, ticks that wait for input).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Awaiting {
    /// The tick's `await.request`, shown to whoever answers.
    pub request: Value,
    /// When the task parked, Unix milliseconds.
    pub since: u64,
    /// When an unanswered task fails, Unix milliseconds.
    pub expires_at: u64,
}

/// The question and its answer, handed to the continuation tick of a resumed task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// The `await.request` the task parked with.
    pub request: Value,
    /// The answer from `POST /tasks/{id}/resume` (or an A2A message).
    pub response: Value,
}

/// A tick output's request for input: `"await": {"request": …, "timeout": "1h"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AwaitRequest {
    /// Anything the answering party needs to see.
    #[serde(default)]
    pub request: Value,
    /// How long to wait for the answer (humantime, e.g. `"1h"`); 24 h when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Where a trigger came from, as the runner sees it. Headers are kept so that a runner can read
/// provider event types itself; tickgate strips credentials before they get here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// HTTP method of the trigger (`POST`, or `GET` for query-string triggers).
    pub method: String,
    /// The client address after trusted-proxy resolution.
    pub remote_ip: String,
    /// The provider's event type, when one is known (for example `X-GitHub-Event`).
    pub event: Option<String>,
    /// Request headers with lower-case names, minus credentials.
    pub headers: BTreeMap<String, String>,
    /// For `SCHEDULE` tasks, the entry's expression as written (`"0 9 * * 1-5"`, `"5m"`);
    /// `null` otherwise. Defaulted so that records stored before schedules existed still read.
    #[serde(default)]
    pub schedule: Option<String>,
    /// For `SCHEDULE` tasks, the slot the task was fired for (RFC 3339), which may be earlier
    /// than `created_at` for a catch-up; lets an agent tell which run it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<String>,
}

/// One accepted trigger and, once it ran, its outcome. This is the stored record and, rendered by
/// the HTTP layer, the task resource callers poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Random id, the handle callers poll with.
    pub id: TaskId,
    /// The agent whose mailbox holds this task.
    pub agent: AgentId,
    /// Where in its life cycle the task is.
    pub status: TaskStatus,
    /// Queue position: tasks of one agent tick in increasing `seq` order, across restarts too.
    pub seq: u64,
    /// The agent's tick number this task ran as; 0 until it starts.
    pub tick: u64,
    /// How many times its tick has been started; above 1 after a crash interrupted a tick.
    pub attempt: u32,
    /// Optional human label from the caller or derived from the provider payload.
    pub title: Option<String>,
    /// The payload, exactly as the tick will see it; kept as text, never parsed on the way (#16).
    pub inputs: JsonText,
    /// Request metadata for the tick.
    pub source: Source,
    /// Caller environment overrides that passed `allow_env`.
    pub env: BTreeMap<String, String>,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub created_at: u64,
    /// When its latest attempt started, if it did.
    pub started_at: Option<u64>,
    /// When it reached a terminal status.
    pub finished_at: Option<u64>,
    /// The full tick output; the answer callers want is its `response` ([`Task::response`]).
    /// Held once: a tick's payload-sized answer is neither copied beside it in memory nor
    /// stored twice, and kept as text (#16).
    pub result: Option<JsonText>,
    /// Why the task failed.
    pub error: Option<String>,
    /// The idempotency key it was accepted under, so the purge can drop the key with the task.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Every attempt so far, oldest first (SPEC section 8).
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// When a task in `RETRY` re-enters its agent's queue, Unix milliseconds.
    #[serde(default)]
    pub next_attempt_at: Option<u64>,
    /// Set while the task is `AWAITING_INPUT`.
    #[serde(default)]
    pub awaiting: Option<Awaiting>,
    /// The answer the next (continuation) tick receives; set by a resume.
    #[serde(default)]
    pub resume: Option<Resume>,
    /// The task this one replays, when it was created by a replay.
    #[serde(default)]
    pub replay_of: Option<TaskId>,
}

impl Task {
    /// A new PENDING task; `seq` is assigned by the store when it is accepted.
    pub fn new(agent: AgentId, inputs: impl Into<JsonText>, source: Source) -> Self {
        Self {
            id: TaskId::random(),
            agent,
            status: TaskStatus::Pending,
            seq: 0,
            tick: 0,
            attempt: 0,
            title: None,
            inputs: inputs.into(),
            source,
            env: BTreeMap::new(),
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            result: None,
            error: None,
            idempotency_key: None,
            attempts: Vec::new(),
            next_attempt_at: None,
            awaiting: None,
            resume: None,
            replay_of: None,
        }
    }

    /// `response` of the tick output, for callers that only want the answer: borrowed from
    /// [`Task::result`]'s text, where the output keeps it, so it costs no copy.
    pub fn response(&self) -> Option<&RawValue> {
        self.result
            .as_ref()
            .and_then(|r| r.members().get("response"))
    }

    /// [`Task::response`] as a tree, for the readers that look inside it (the A2A edge).
    pub fn response_value(&self) -> Option<Value> {
        self.response()
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }
}

/// The JSON object a runner receives for one tick (SPEC section 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickInput {
    /// `namespace/name` of the agent.
    pub agent: String,
    /// The task this tick serves.
    pub task_id: String,
    /// The agent's tick counter for this run, starting at 1.
    pub tick: u64,
    /// 1 normally, higher when a crash interrupted an earlier attempt of the same task.
    pub attempt: u32,
    /// The task's title, if any.
    pub title: Option<String>,
    /// The trigger payload.
    pub inputs: JsonText,
    /// Where the trigger came from.
    pub source: Source,
    /// The agent's fixed environment plus allowed caller overrides.
    pub env: BTreeMap<String, String>,
    /// The agent's memory as the previous tick left it.
    pub memory: Value,
    /// On a continuation tick: the question the task parked with and its answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// What a runner returns; every field is optional so that a minimal program can answer `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TickOutput {
    /// The answer for the caller, as text: what the echo runner answers with is its inputs'
    /// text, and a command's answer is encoded once, here, not again for the store (#16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<JsonText>,
    /// `"ok"` or `"error"`; `"error"` fails the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// How many steps the agent took, for observability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Approvals the agent is waiting on, passed through to the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_approvals: Option<Vec<Value>>,
    /// When present, replaces the agent's memory atomically with the task's completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Value>,
    /// Parks the task as `AWAITING_INPUT` until someone answers (SPEC section 8).
    #[serde(rename = "await", default, skip_serializing_if = "Option::is_none")]
    pub await_input: Option<AwaitRequest>,
    /// Fields tickgate does not know, kept so that `result` shows the runner's whole output.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl TickOutput {
    /// Parses runner output, which must be one JSON object; anything else is a runner failure
    /// described in words an operator can act on.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "runner output is not JSON ({e}); it started with {:?}",
                preview(bytes)
            )
        })?;
        if !value.is_object() {
            return Err(format!(
                "runner output must be a JSON object, got {}",
                json_kind(&value)
            ));
        }
        let out: TickOutput = serde_json::from_value(value)
            .map_err(|e| format!("runner output has a field of the wrong type: {e}"))?;
        if let Some(memory) = &out.memory {
            if !memory.is_object() {
                return Err("runner output `memory` must be a JSON object".to_string());
            }
        }
        Ok(out)
    }

    /// The output as the JSON text a task's `result` shows: its fields in declaration order
    /// (absent ones left out), then the unknown ones, written once into one string. `response`
    /// goes in as the text it already is, so a payload-sized answer is copied, not re-encoded
    /// (#16).
    pub fn into_result(self) -> JsonText {
        JsonText::encode(&ResultFields(&self))
    }

    /// The fields [`TickOutput`] names; an unknown field of the same name is not written twice.
    const KNOWN: [&'static str; 6] = [
        "response",
        "status",
        "steps",
        "pending_approvals",
        "memory",
        "await",
    ];
}

/// [`TickOutput`] written as a task's `result` (see [`TickOutput::into_result`]).
struct ResultFields<'a>(&'a TickOutput);

impl Serialize for ResultFields<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let out = self.0;
        let mut map = s.serialize_map(None)?;
        if let Some(v) = &out.response {
            map.serialize_entry("response", v)?;
        }
        if let Some(v) = &out.status {
            map.serialize_entry("status", v)?;
        }
        if let Some(v) = &out.steps {
            map.serialize_entry("steps", v)?;
        }
        if let Some(v) = &out.pending_approvals {
            map.serialize_entry("pending_approvals", v)?;
        }
        if let Some(v) = &out.memory {
            map.serialize_entry("memory", v)?;
        }
        if let Some(v) = &out.await_input {
            map.serialize_entry("await", v)?;
        }
        for (k, v) in &out.extra {
            if !TickOutput::KNOWN.contains(&k.as_str()) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// Short printable preview of bytes for error messages.
pub fn preview(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(60)]);
    s.into_owned()
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Wall-clock milliseconds since the Unix epoch; the unit of every stored timestamp.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Renders a stored timestamp as RFC 3339 with milliseconds (`2026-12-03T22:43:15.426Z`), the
/// format of every time in the HTTP API. Written digit by digit: a task record has up to five
/// times, and formatting each through `humantime`'s `Display` cost about 650 instructions (#16).
/// A time past year 9999, which only a damaged record can hold and RFC 3339 cannot write, is
/// written as the last one it can (`humantime`, used before, panicked on it).
pub fn rfc3339(ms: u64) -> String {
    /// 9999-12-31T23:59:59.999Z.
    const LAST: u64 = 253_402_300_799_999;
    let ms = ms.min(LAST);
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = [0u8; 24];
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 3, millis);
    for (at, sep) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[at] = sep;
    }
    // Digits and separators: always ASCII, so the default is never taken.
    std::str::from_utf8(&out)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The digit-by-digit rendering is humantime's, up to the end of year 9999.
        #[test]
        fn times_render_as_humantime_renders_them(ms in 0u64..=253_402_300_799_999) {
            let expected =
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
            proptest::prop_assert_eq!(rfc3339(ms), expected);
        }
    }

    #[test]
    fn edge_times_render_as_humantime_renders_them() {
        for ms in [
            0,
            999,
            1_000,
            86_399_999,
            86_400_000,
            951_782_400_000,
            4_107_542_400_000,
            253_402_300_799_999,
        ] {
            let expected = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
                .to_string();
            assert_eq!(rfc3339(ms), expected, "{ms}");
        }
        assert_eq!(rfc3339(253_402_300_800_000), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    proptest::proptest! {
        /// The shared representation orders, compares and prints as the two parts do.
        #[test]
        fn agent_ids_order_and_compare_by_their_parts(
            a in "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", b in "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?",
            c in "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", d in "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?",
        ) {
            let x = AgentId::new(&a, &b).unwrap();
            let y = AgentId::new(&c, &d).unwrap();
            proptest::prop_assert_eq!(x.cmp(&y), (&a, &b).cmp(&(&c, &d)));
            proptest::prop_assert_eq!(x == y, (&a, &b) == (&c, &d));
            proptest::prop_assert_eq!((x.namespace(), x.name()), (a.as_str(), b.as_str()));
            proptest::prop_assert_eq!(x.to_string().parse::<AgentId>().unwrap(), x.clone());
            let json = serde_json::to_string(&x).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<AgentId>(&json).unwrap(), x);
        }
    }

    #[test]
    fn agent_id_defaults_namespace_and_rejects_bad_labels() {
        assert_eq!(
            "echo".parse::<AgentId>().unwrap().to_string(),
            "default/echo"
        );
        assert_eq!("gh/ci".parse::<AgentId>().unwrap().namespace(), "gh");
        assert!("Bad/ci".parse::<AgentId>().is_err());
        assert!("a/b/c".parse::<AgentId>().is_err());
        assert!("-x".parse::<AgentId>().is_err());
        assert!("".parse::<AgentId>().is_err());
    }

    #[test]
    fn task_id_round_trips_as_uuid() {
        let id = TaskId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s.parse::<TaskId>().unwrap(), id);
        assert_ne!(TaskId::random(), id);
        // Serialized as its Display, and read back.
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), id);
    }

    #[test]
    fn task_ids_from_a_block_of_randomness_are_all_different_random_uuids() {
        // Several blocks' worth on this thread and on another, across block boundaries.
        let here: Vec<TaskId> = (0..5 * ID_BLOCK / 16 + 3)
            .map(|_| TaskId::random())
            .collect();
        let there: Vec<TaskId> = std::thread::spawn(|| (0..40).map(|_| TaskId::random()).collect())
            .join()
            .unwrap();
        let all: std::collections::HashSet<TaskId> = here.iter().chain(&there).copied().collect();
        assert_eq!(all.len(), here.len() + there.len());
        for id in &all {
            assert_eq!(id.0.get_version_num(), 4);
            assert_ne!(id.as_bytes(), &[0; 16]);
        }
    }

    #[test]
    fn a_tick_output_becomes_the_result_serde_would_make() {
        let out = TickOutput::parse(
            br#"{"response":{"a":[1,2]},"status":"ok","steps":2,"pending_approvals":[{"x":1}],
                "memory":{"m":1},"await":{"request":{"q":1},"timeout":"5s"},"extra":true}"#,
        )
        .unwrap();
        assert_eq!(
            out.clone().into_result(),
            serde_json::to_value(&out).unwrap()
        );
        let empty = TickOutput::default();
        assert_eq!(
            empty.clone().into_result(),
            serde_json::to_value(&empty).unwrap()
        );
    }

    #[test]
    fn tick_output_parse_rejects_non_objects() {
        assert!(TickOutput::parse(b"[1]").is_err());
        assert!(TickOutput::parse(b"garbage").is_err());
        assert!(TickOutput::parse(b"{\"memory\":3}").is_err());
        let out = TickOutput::parse(b"{\"response\":1,\"x\":2}").unwrap();
        assert_eq!(out.response.unwrap(), Value::from(1));
        assert_eq!(out.extra.get("x"), Some(&Value::from(2)));
    }
}
