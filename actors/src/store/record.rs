//! The stored form of a task: a hand-laid binary layout with a version byte first, JSON only for
//! the free-form values (`inputs`, the tick output, `await` requests and answers), which are kept
//! as the JSON text they are anyway.
//!
//! A task is one record, the **whole head** (`t/<id>`, version [`TASK_V2`]): the task's state
//! (status, times, attempts, the tick output, the error) first, then what never changes (agent,
//! inputs, source, env, title, time of creation, idempotency key). Every change (start,
//! completion, retry, park, resume, cancel) rewrites it. One key per task is what the single
//! writer can afford: each key a task adds to the tree costs it a leaf insert and a share of a
//! leaf split, more than the bytes of the inputs written again (#16). The tick output is stored
//! once: `response` is derived from `result` (`result.response`) unless a record says otherwise.
//!
//! Records of earlier releases are read as they are:
//! - a head of version [`TASK_V1`] (`t/<id>`) holds the state the task was accepted in, and a
//!   **state record** (version [`STATE_V1`], `u/<created_at><id>` or `u/<id>`) beside it, when
//!   there is one, holds the state since; a read merges the two;
//! - a JSON object (first byte `{`), the release before the binary layout, read the same way.
//!
//! The next change of such a task writes a whole head, and the state records beside it are from
//! then on stale: a whole head is never read together with one (they go with the task's purge).
//! The status is the second byte of every binary record, so the writer's outbox check (what was
//! the previous status?) does not decode the rest.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::model::{
    AgentId, Attempt, Awaiting, JsonText, Resume, Source, Task, TaskId, TaskStatus,
};

/// First byte of a head record of the first binary layout, which a state record may supersede.
pub(crate) const TASK_V1: u8 = 1;
/// First byte of a state record (the first binary layout; no longer written).
pub(crate) const STATE_V1: u8 = 2;
/// First byte of a whole head: the same layout as [`TASK_V1`], holding the task's current state,
/// so that no state record applies to it.
pub(crate) const TASK_V2: u8 = 3;
/// First byte of a record of the previous release (a JSON object).
const JSON_OBJECT: u8 = b'{';

/// Why a record cannot be read; turned into the store's "unreadable record" report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The record ends before its last field.
    #[error("the record ends early (at byte {0})")]
    Truncated(usize),
    /// A byte that is no known version, status, or tag.
    #[error("unknown {what} {value} at byte {at}")]
    Unknown {
        /// What was being read.
        what: &'static str,
        /// The byte found.
        value: u8,
        /// Where.
        at: usize,
    },
    /// Text that is not UTF-8, a JSON value that does not parse, an agent id that does not
    /// validate.
    #[error("{0}")]
    Invalid(String),
    /// Bytes left after the last field.
    #[error("{0} bytes after the end of the record")]
    Trailing(usize),
}

impl RecordError {
    /// In the shape the store reports unreadable records with.
    pub(crate) fn into_json(self) -> serde_json::Error {
        <serde_json::Error as serde::de::Error>::custom(self.to_string())
    }
}

fn status_byte(s: TaskStatus) -> u8 {
    match s {
        TaskStatus::Pending => 0,
        TaskStatus::Started => 1,
        TaskStatus::Retry => 2,
        TaskStatus::AwaitingInput => 3,
        TaskStatus::Success => 4,
        TaskStatus::Failure => 5,
        TaskStatus::Revoked => 6,
    }
}

fn status_of(b: u8, at: usize) -> Result<TaskStatus, RecordError> {
    Ok(match b {
        0 => TaskStatus::Pending,
        1 => TaskStatus::Started,
        2 => TaskStatus::Retry,
        3 => TaskStatus::AwaitingInput,
        4 => TaskStatus::Success,
        5 => TaskStatus::Failure,
        6 => TaskStatus::Revoked,
        value => {
            return Err(RecordError::Unknown {
                what: "status",
                value,
                at,
            })
        }
    })
}

/// Appends fields to a record buffer.
struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    fn u8(&mut self, b: u8) {
        self.0.push(b);
    }

    /// LEB128: small numbers (ticks, attempts, lengths) take one byte.
    fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }

    fn opt_uint(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.uint(v);
            }
        }
    }

    /// A JSON value as its text, length-prefixed; written in place (no intermediate string).
    fn json(&mut self, v: &Value) {
        let at = self.0.len();
        // A placeholder of the widest length prefix a record can need (up to 2^35 bytes), fixed
        // up below; a JSON value is never too large for it.
        self.0.extend_from_slice(&[0; 5]);
        serde_json::to_writer(&mut *self.0, v).expect("a serde_json::Value always serializes");
        let len = (self.0.len() - at - 5) as u64;
        let prefix = &mut self.0[at..at + 5];
        for (i, b) in prefix.iter_mut().enumerate() {
            let more = if i < 4 { 0x80 } else { 0 };
            *b = ((len >> (7 * i)) as u8 & 0x7f) | more;
        }
    }

    /// Only the tests write a value this way now (records of the first layout).
    #[cfg(test)]
    fn opt_json(&mut self, v: Option<&Value>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.json(v);
            }
        }
    }

    /// JSON kept as text: its bytes, length-prefixed like any other (#16).
    fn text(&mut self, t: &JsonText) {
        self.bytes(t.as_str().as_bytes());
    }

    fn opt_text(&mut self, t: Option<&JsonText>) {
        match t {
            None => self.u8(0),
            Some(t) => {
                self.u8(1);
                self.text(t);
            }
        }
    }

    fn map(&mut self, m: &BTreeMap<String, String>) {
        self.uint(m.len() as u64);
        for (k, v) in m {
            self.str(k);
            self.str(v);
        }
    }
}

/// Reads fields back in the order [`Out`] wrote them.
struct In<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> In<'a> {
    fn u8(&mut self) -> Result<u8, RecordError> {
        let b = *self
            .raw
            .get(self.at)
            .ok_or(RecordError::Truncated(self.at))?;
        self.at += 1;
        Ok(b)
    }

    fn uint(&mut self) -> Result<u64, RecordError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RecordError::Invalid(format!(
            "a number longer than 10 bytes at byte {}",
            self.at
        )))
    }

    fn bytes(&mut self) -> Result<&'a [u8], RecordError> {
        let len = self.uint()? as usize;
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.raw.len())
            .ok_or(RecordError::Truncated(self.raw.len()))?;
        let b = &self.raw[self.at..end];
        self.at = end;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, RecordError> {
        let at = self.at;
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| RecordError::Invalid(format!("text at byte {at} is not UTF-8")))
    }

    fn flag(&mut self) -> Result<bool, RecordError> {
        let at = self.at;
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(RecordError::Unknown {
                what: "option tag",
                value,
                at,
            }),
        }
    }

    fn opt_string(&mut self) -> Result<Option<String>, RecordError> {
        Ok(if self.flag()? {
            Some(self.string()?)
        } else {
            None
        })
    }

    fn opt_uint(&mut self) -> Result<Option<u64>, RecordError> {
        Ok(if self.flag()? {
            Some(self.uint()?)
        } else {
            None
        })
    }

    /// A JSON value, read without serde_json's nesting limit: what the store wrote it must read
    /// back, and the depth of what is written is bounded by the parsers in front of the store.
    fn json(&mut self) -> Result<Value, RecordError> {
        let at = self.at;
        let text = self.bytes()?;
        let mut de = serde_json::Deserializer::from_slice(text);
        de.disable_recursion_limit();
        let v = serde::Deserialize::deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| RecordError::Invalid(format!("JSON at byte {at}: {e}")))?;
        Ok(v)
    }

    fn opt_json(&mut self) -> Result<Option<Value>, RecordError> {
        Ok(if self.flag()? {
            Some(self.json()?)
        } else {
            None
        })
    }

    /// JSON kept as text, checked (a damaged record is reported, not handed on) but not parsed
    /// into a tree.
    fn text(&mut self) -> Result<JsonText, RecordError> {
        let at = self.at;
        let text = self.bytes()?;
        JsonText::from_stored(text)
            .map_err(|e| RecordError::Invalid(format!("JSON at byte {at}: {e}")))
    }

    fn opt_text(&mut self) -> Result<Option<JsonText>, RecordError> {
        Ok(if self.flag()? {
            Some(self.text()?)
        } else {
            None
        })
    }

    fn map(&mut self) -> Result<BTreeMap<String, String>, RecordError> {
        let n = self.uint()?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let k = self.string()?;
            m.insert(k, self.string()?);
        }
        Ok(m)
    }

    fn end(&self) -> Result<(), RecordError> {
        match self.raw.len() - self.at {
            0 => Ok(()),
            n => Err(RecordError::Trailing(n)),
        }
    }
}

/// How `response` relates to `result` in a state record.
const RESPONSE_NONE: u8 = 0;
/// `response` is `result.response` (what a tick's outcome always is): not stored again.
const RESPONSE_OF_RESULT: u8 = 1;
/// `response` is stored as its own value (a record that does not follow the rule above).
const RESPONSE_OWN: u8 = 2;

/// The state part of a task: everything a change after acceptance may touch. The status comes
/// first so that [`stored_status`] reads one byte.
fn put_state(o: &mut Out<'_>, t: &Task) {
    put_outcome(o, t);
    // `response` is always the result's now (`Task::response`); the tag stays, so that records
    // of the first layout with their own `response` still read. Whether the result holds a
    // `response` is not looked up for it: readers take the result's either way.
    o.u8(if t.result.is_some() {
        RESPONSE_OF_RESULT
    } else {
        RESPONSE_NONE
    });
    put_progress(o, t);
}

/// The state fields before the `response` tag.
fn put_outcome(o: &mut Out<'_>, t: &Task) {
    o.u8(status_byte(t.status));
    o.uint(t.seq);
    o.uint(t.tick);
    o.uint(u64::from(t.attempt));
    o.opt_uint(t.started_at);
    o.opt_uint(t.finished_at);
    o.opt_str(t.error.as_deref());
    o.opt_text(t.result.as_ref());
}

/// The state fields after the `response` tag.
fn put_progress(o: &mut Out<'_>, t: &Task) {
    o.uint(t.attempts.len() as u64);
    for a in &t.attempts {
        o.uint(u64::from(a.attempt));
        o.uint(a.started_at);
        o.opt_uint(a.finished_at);
        o.opt_str(a.error.as_deref());
    }
    o.opt_uint(t.next_attempt_at);
    match &t.awaiting {
        None => o.u8(0),
        Some(a) => {
            o.u8(1);
            o.json(&a.request);
            o.uint(a.since);
            o.uint(a.expires_at);
        }
    }
    match &t.resume {
        None => o.u8(0),
        Some(r) => {
            o.u8(1);
            o.json(&r.request);
            o.json(&r.response);
        }
    }
}

fn u32_of(v: u64, what: &str) -> Result<u32, RecordError> {
    u32::try_from(v).map_err(|_| RecordError::Invalid(format!("{what} {v} is out of range")))
}

/// Reads a `response` stored apart from `result` (tag [`RESPONSE_OWN`], which only the first
/// layout wrote, for a task whose two differed) into `result`, where `Task::response` finds it:
/// callers see the same `response` as before; `result` shows it too.
fn own_response(t: &mut Task, response: Option<Value>) {
    // Rare (records of the first layout only): worked on as a tree, then kept as text again.
    let mut result = t.result.as_ref().map(JsonText::to_value);
    match (&mut result, response) {
        (Some(Value::Object(map)), Some(r)) => {
            map.insert("response".into(), r);
        }
        (Some(Value::Object(map)), None) => {
            map.remove("response");
        }
        (result @ None, Some(r)) => {
            *result = Some(Value::Object(serde_json::Map::from_iter([(
                "response".to_string(),
                r,
            )])));
        }
        // A result that is not an object cannot hold it. No tick output is such a record (a
        // tick's result is always an object), so nothing that was ever stored is lost here.
        (_, _) => {}
    }
    t.result = result.map(JsonText::from);
}

/// The first fields of the state part, in the order [`put_outcome`] writes them; read by the
/// full decode and, alone, by the purge ([`state_finished`]).
struct Times {
    status: TaskStatus,
    seq: u64,
    tick: u64,
    attempt: u32,
    started_at: Option<u64>,
    finished_at: Option<u64>,
}

fn get_times(i: &mut In<'_>) -> Result<Times, RecordError> {
    let at = i.at;
    Ok(Times {
        status: status_of(i.u8()?, at)?,
        seq: i.uint()?,
        tick: i.uint()?,
        attempt: u32_of(i.uint()?, "attempt")?,
        started_at: i.opt_uint()?,
        finished_at: i.opt_uint()?,
    })
}

fn get_state(i: &mut In<'_>, t: &mut Task) -> Result<(), RecordError> {
    let times = get_times(i)?;
    t.status = times.status;
    t.seq = times.seq;
    t.tick = times.tick;
    t.attempt = times.attempt;
    t.started_at = times.started_at;
    t.finished_at = times.finished_at;
    t.error = i.opt_string()?;
    t.result = i.opt_text()?;
    let at = i.at;
    match i.u8()? {
        RESPONSE_NONE | RESPONSE_OF_RESULT => {}
        RESPONSE_OWN => own_response(t, i.opt_json()?),
        value => {
            return Err(RecordError::Unknown {
                what: "response tag",
                value,
                at,
            })
        }
    }
    let n = i.uint()?;
    t.attempts = Vec::with_capacity(n.min(128) as usize);
    for _ in 0..n {
        t.attempts.push(Attempt {
            attempt: u32_of(i.uint()?, "attempt")?,
            started_at: i.uint()?,
            finished_at: i.opt_uint()?,
            error: i.opt_string()?,
        });
    }
    t.next_attempt_at = i.opt_uint()?;
    t.awaiting = if i.flag()? {
        Some(Awaiting {
            request: i.json()?,
            since: i.uint()?,
            expires_at: i.uint()?,
        })
    } else {
        None
    };
    t.resume = if i.flag()? {
        Some(Resume {
            request: i.json()?,
            response: i.json()?,
        })
    } else {
        None
    };
    Ok(())
}

/// The whole head of a task, as it is now: version, state, then what never changes. Appended to
/// `buf`, so that the writer encodes every record into one reused buffer.
pub(crate) fn encode_task_into(buf: &mut Vec<u8>, t: &Task) {
    encode_head_into(buf, t, TASK_V2);
}

/// A head record with the given version byte; [`TASK_V1`] only in tests, which write what the
/// earlier layout did.
fn encode_head_into(buf: &mut Vec<u8>, t: &Task, version: u8) {
    let mut o = Out(buf);
    o.u8(version);
    put_state(&mut o, t);
    // `namespace/name`, written without building the string.
    let (ns, name) = (t.agent.namespace(), t.agent.name());
    o.uint((ns.len() + 1 + name.len()) as u64);
    o.0.extend_from_slice(ns.as_bytes());
    o.0.push(b'/');
    o.0.extend_from_slice(name.as_bytes());
    o.opt_str(t.title.as_deref());
    o.text(&t.inputs);
    let s = &t.source;
    o.str(&s.method);
    o.str(&s.remote_ip);
    o.opt_str(s.event.as_deref());
    o.map(&s.headers);
    o.opt_str(s.schedule.as_deref());
    o.opt_str(s.scheduled_at.as_deref());
    o.map(&t.env);
    o.uint(t.created_at);
    o.opt_str(t.idempotency_key.as_deref());
    match &t.replay_of {
        None => o.u8(0),
        Some(id) => {
            o.u8(1);
            o.0.extend_from_slice(id.as_bytes());
        }
    }
}

/// The state record of the first binary layout, as a task that changed after acceptance had
/// one; only tests write it now, to build a store of that layout.
#[cfg(test)]
pub(crate) fn encode_state_into(buf: &mut Vec<u8>, t: &Task) {
    let mut o = Out(buf);
    o.u8(STATE_V1);
    put_state(&mut o, t);
}

/// The head record of the first binary layout ([`TASK_V1`]), which a state record supersedes.
#[cfg(test)]
pub(crate) fn encode_task_v1(t: &Task) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_head_into(&mut buf, t, TASK_V1);
    buf
}

/// [`encode_task_into`] a buffer of its own.
#[cfg(test)]
pub(crate) fn encode_task(t: &Task) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_task_into(&mut buf, t);
    buf
}

/// [`encode_state_into`] a buffer of its own.
#[cfg(test)]
pub(crate) fn encode_state(t: &Task) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_state_into(&mut buf, t);
    buf
}

/// A task with every field empty, filled in by [`decode_task`]; built directly rather than with
/// `Task::new`, which draws a random id and reads the clock.
fn blank(id: TaskId) -> Task {
    Task {
        id,
        agent: AgentId::new("x", "x").expect("a valid agent id"),
        status: TaskStatus::Pending,
        seq: 0,
        tick: 0,
        attempt: 0,
        title: None,
        inputs: JsonText::null(),
        source: Source::default(),
        env: BTreeMap::new(),
        created_at: 0,
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

/// Whether a head record holds the task's current state: a whole head ([`TASK_V2`]). Any other
/// head may have a state record beside it that supersedes its state.
pub(crate) fn is_whole(raw: &[u8]) -> bool {
    raw.first() == Some(&TASK_V2)
}

/// Reads a head record of any layout (whole, the first binary one, or the JSON one before).
pub(crate) fn decode_task(id: TaskId, raw: &[u8]) -> Result<Task, RecordError> {
    match raw.first() {
        Some(&(TASK_V1 | TASK_V2)) => {}
        Some(&JSON_OBJECT) => {
            let mut de = serde_json::Deserializer::from_slice(raw);
            de.disable_recursion_limit();
            let task: Task = serde::Deserialize::deserialize(&mut de)
                .and_then(|t| de.end().map(|()| t))
                .map_err(|e| RecordError::Invalid(e.to_string()))?;
            return Ok(task);
        }
        Some(&value) => {
            return Err(RecordError::Unknown {
                what: "record version",
                value,
                at: 0,
            })
        }
        None => return Err(RecordError::Truncated(0)),
    }
    let mut i = In { raw, at: 1 };
    let mut t = blank(id);
    get_state(&mut i, &mut t)?;
    let agent = i.string()?;
    t.agent = agent
        .parse()
        .map_err(|e| RecordError::Invalid(format!("agent {agent:?}: {e}")))?;
    t.title = i.opt_string()?;
    t.inputs = i.text()?;
    t.source = Source {
        method: i.string()?,
        remote_ip: i.string()?,
        event: i.opt_string()?,
        headers: i.map()?,
        schedule: i.opt_string()?,
        scheduled_at: i.opt_string()?,
    };
    t.env = i.map()?;
    t.created_at = i.uint()?;
    t.idempotency_key = i.opt_string()?;
    t.replay_of = if i.flag()? {
        let at = i.at;
        let bytes = raw
            .get(at..at + 16)
            .ok_or(RecordError::Truncated(raw.len()))?;
        i.at += 16;
        Some(TaskId::from_bytes(bytes.try_into().expect("16 bytes")))
    } else {
        None
    };
    i.end()?;
    Ok(t)
}

/// Applies a state record over a task read from its head.
pub(crate) fn apply_state(t: &mut Task, raw: &[u8]) -> Result<(), RecordError> {
    let mut i = state_reader(raw)?;
    get_state(&mut i, t)?;
    i.end()
}

/// A reader placed after the version byte of a record whose state comes first and is current: a
/// state record or a whole head.
fn state_reader(raw: &[u8]) -> Result<In<'_>, RecordError> {
    match raw.first() {
        Some(&(STATE_V1 | TASK_V2)) => Ok(In { raw, at: 1 }),
        Some(&value) => Err(RecordError::Unknown {
            what: "state record version",
            value,
            at: 0,
        }),
        None => Err(RecordError::Truncated(0)),
    }
}

/// The status and `finished_at` of a state record or a whole head, read without decoding the
/// rest: what the retention purge needs to tell whether a task is due, for every task it walks.
pub(crate) fn state_finished(raw: &[u8]) -> Result<(TaskStatus, Option<u64>), RecordError> {
    let times = get_times(&mut state_reader(raw)?)?;
    Ok((times.status, times.finished_at))
}

/// The status in a binary record (head or state), from its second byte; `None` for a JSON record
/// (which needs a full decode).
pub(crate) fn stored_status(raw: &[u8]) -> Option<TaskStatus> {
    match raw {
        [TASK_V1 | STATE_V1 | TASK_V2, s, ..] => status_of(*s, 1).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn full() -> Task {
        let mut t = Task::new(
            "ns/agent-1".parse().unwrap(),
            json!({"deep": [[[1]]], "s": "é\u{0}"}),
            Source {
                method: "POST".into(),
                remote_ip: "127.0.0.1".into(),
                event: Some("push".into()),
                headers: BTreeMap::from([("x-a".into(), "b".into())]),
                schedule: Some("5m".into()),
                scheduled_at: Some("2026-01-01T00:00:00Z".into()),
            },
        );
        t.status = TaskStatus::AwaitingInput;
        t.seq = 1 << 40;
        t.tick = 7;
        t.attempt = 2;
        t.title = Some("title".into());
        t.env = BTreeMap::from([("K".into(), "V".into())]);
        t.started_at = Some(5);
        t.finished_at = Some(6);
        t.result = Some(json!({"response": {"a": 1}, "steps": 3}).into());
        t.error = Some("e".into());
        t.idempotency_key = Some("k".into());
        t.attempts = vec![
            Attempt {
                attempt: 1,
                started_at: 1,
                finished_at: Some(2),
                error: Some("boom".into()),
            },
            Attempt {
                attempt: 2,
                started_at: 3,
                finished_at: None,
                error: None,
            },
        ];
        t.next_attempt_at = Some(9);
        t.awaiting = Some(Awaiting {
            request: json!({"q": 1}),
            since: 1,
            expires_at: 2,
        });
        t.resume = Some(Resume {
            request: json!("r"),
            response: json!(null),
        });
        t.replay_of = Some(TaskId::random());
        t
    }

    #[test]
    fn a_task_reads_back_from_its_whole_head() {
        let t = full();
        let head = encode_task(&t);
        assert!(is_whole(&head));
        assert_eq!(decode_task(t.id, &head).unwrap(), t);
        let mut changed = t.clone();
        changed.status = TaskStatus::Success;
        changed.awaiting = None;
        let rewritten = encode_task(&changed);
        assert_eq!(stored_status(&rewritten), Some(TaskStatus::Success));
        assert_eq!(decode_task(t.id, &rewritten).unwrap(), changed);
    }

    #[test]
    fn a_task_of_the_first_layout_reads_back_from_its_head_and_its_state() {
        let t = full();
        let head = encode_task_v1(&t);
        assert!(!is_whole(&head));
        assert_eq!(decode_task(t.id, &head).unwrap(), t);
        let mut changed = t.clone();
        changed.status = TaskStatus::Success;
        changed.result = Some(json!({"response": "changed"}).into());
        changed.awaiting = None;
        let state = encode_state(&changed);
        assert_eq!(stored_status(&state), Some(TaskStatus::Success));
        let mut read = decode_task(t.id, &head).unwrap();
        apply_state(&mut read, &state).unwrap();
        assert_eq!(read, changed);
        assert_eq!(read.response_value(), Some(json!("changed")));
        // The two layouts differ in their version byte only.
        assert_eq!(head[1..], encode_task(&t)[1..]);
    }

    /// A state record of the first layout with a `response` of its own (tag `RESPONSE_OWN`).
    fn state_with_own_response(t: &Task, response: Option<&Value>) -> Vec<u8> {
        let mut buf = vec![STATE_V1];
        let mut o = Out(&mut buf);
        put_outcome(&mut o, t);
        o.u8(RESPONSE_OWN);
        o.opt_json(response);
        put_progress(&mut o, t);
        buf
    }

    #[test]
    fn a_response_stored_apart_from_the_result_is_read_as_the_results() {
        let t = full();
        let read = |state: &[u8]| {
            let mut read = decode_task(t.id, &encode_task_v1(&t)).unwrap();
            apply_state(&mut read, state).unwrap();
            read
        };
        let own = read(&state_with_own_response(&t, Some(&json!("own"))));
        assert_eq!(own.response_value(), Some(json!("own")));
        assert_eq!(
            own.result.as_ref().map(JsonText::to_value),
            Some(json!({"response": "own", "steps": 3}))
        );
        let none = read(&state_with_own_response(&t, None));
        assert_eq!(none.response_value(), None);
        assert_eq!(
            none.result.as_ref().map(JsonText::to_value),
            Some(json!({"steps": 3}))
        );
        let mut bare = t.clone();
        bare.result = None;
        let mut only = decode_task(t.id, &encode_task_v1(&bare)).unwrap();
        apply_state(&mut only, &state_with_own_response(&bare, Some(&json!(1)))).unwrap();
        assert_eq!(
            only.result.as_ref().map(JsonText::to_value),
            Some(json!({"response": 1}))
        );
        // Written again, the record holds the output once, in `result`.
        let rewritten = encode_state(&own);
        assert_eq!(read(&rewritten), own);
        assert!(
            rewritten.len() < state_with_own_response(&own, own.response_value().as_ref()).len()
        );
    }

    #[test]
    fn the_purge_reads_status_and_finish_time_without_decoding_the_rest() {
        let t = full();
        assert_eq!(
            state_finished(&encode_state(&t)).unwrap(),
            (TaskStatus::AwaitingInput, Some(6))
        );
        let mut open = t.clone();
        open.finished_at = None;
        open.status = TaskStatus::Started;
        assert_eq!(
            state_finished(&encode_state(&open)).unwrap(),
            (TaskStatus::Started, None)
        );
        assert_eq!(
            state_finished(&encode_task(&t)).unwrap(),
            (TaskStatus::AwaitingInput, Some(6)),
            "a whole head holds the current state"
        );
        assert!(
            state_finished(&encode_task_v1(&t)).is_err(),
            "the state of a first-layout head may be superseded"
        );
        assert!(state_finished(&encode_state(&t)[..4]).is_err());
    }

    #[test]
    fn records_of_the_previous_release_read_and_damage_is_an_error() {
        let t = full();
        let json = serde_json::to_vec(&t).unwrap();
        assert_eq!(decode_task(t.id, &json).unwrap(), t);
        assert_eq!(stored_status(&json), None);
        let head = encode_task(&t);
        for cut in [0, 1, 5, head.len() - 1] {
            assert!(decode_task(t.id, &head[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = head.clone();
        long.push(0);
        assert!(matches!(
            decode_task(t.id, &long),
            Err(RecordError::Trailing(1))
        ));
        assert!(decode_task(t.id, &[9, 0]).is_err());
        assert!(apply_state(&mut t.clone(), &head).is_err());
    }

    proptest! {
        #[test]
        fn any_task_round_trips(
            seq in any::<u64>(),
            tick in any::<u64>(),
            attempt in any::<u32>(),
            title in proptest::option::of(".*"),
            key in proptest::option::of(".*"),
            text in ".*",
            n in any::<i64>(),
            started in proptest::option::of(any::<u64>()),
            headers in proptest::collection::btree_map(".*", ".*", 0..4),
            status in 0u8..7,
        ) {
            let mut t = Task::new("a".parse().unwrap(), json!({"t": text, "n": n}), Source::default());
            t.seq = seq;
            t.tick = tick;
            t.attempt = attempt;
            t.title = title;
            t.idempotency_key = key;
            t.started_at = started;
            t.source.headers = headers;
            t.status = status_of(status, 0).unwrap();
            t.result = Some(json!({"response": n}).into());
            prop_assert_eq!(decode_task(t.id, &encode_task(&t)).unwrap(), t.clone());
            let mut read = Task::new("b".parse().unwrap(), Value::Null, Source::default());
            apply_state(&mut read, &encode_state(&t)).unwrap();
            prop_assert_eq!(read.status, t.status);
            prop_assert_eq!(read.response_value(), t.response_value());
        }

        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let id = TaskId::random();
            let _ = decode_task(id, &raw);
            let _ = apply_state(&mut Task::new("a".parse().unwrap(), Value::Null, Source::default()), &raw);
        }
    }
}
