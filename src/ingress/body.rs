//! Turns a trigger's raw body into the task's `inputs` and the optional controls a caller may put
//! in it (`title`, `env`, `wait`). The raw bytes are checked once, here, after any signature check
//! has seen them untouched; a JSON body is kept as its text, never built into a tree (#16).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tickgate_actors::model::{value_depth, JsonText, Members, TextError};

/// A parsed trigger body.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerBody {
    /// The payload the tick will see: the whole JSON body as sent, or the form fields as an object.
    pub inputs: JsonText,
    /// Caller-supplied task title.
    pub title: Option<String>,
    /// Caller environment overrides, still to be checked against `allow_env`.
    pub env: BTreeMap<String, String>,
    /// Caller's wait request from the body.
    pub wait: Option<Duration>,
}

/// Why a body was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BodyError {
    /// 415.
    #[error("unsupported content type {0:?}")]
    UnsupportedType(String),
    /// 400, malformed JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// 400, a control field of the wrong shape.
    #[error("{0}")]
    InvalidField(String),
}

/// Deepest nesting of arrays and objects a trigger's `inputs` may have (`{}` is 1, `{"a":[]}` is
/// 2). serde_json refuses more than 128 levels, but a stored task wraps `inputs` a level or two
/// deeper and every later reader (the store, runners, callers of `GET /tasks`) must be able to
/// read it back; 64 leaves that margin and is far beyond what real webhook payloads use.
pub const MAX_DEPTH: usize = 64;

/// The wait that `"wait": true` asks for.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Parses `body` according to its `Content-Type`. An empty body is an empty object whatever the
/// type, so `curl -X POST <url>` works. A body without a type is read as JSON.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<TriggerBody, BodyError> {
    let inputs = inputs(content_type, body)?;
    let Controls { title, env, wait } = controls(&inputs.members())?;
    Ok(TriggerBody {
        inputs,
        title,
        env,
        wait,
    })
}

/// The payload of `body` alone: [`parse`] without the controls, for a caller that reads them from
/// members it also needs for other things ([`controls`]).
pub fn inputs(content_type: Option<&str>, body: &[u8]) -> Result<JsonText, BodyError> {
    let mime = content_type
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(JsonText::empty_object());
    }
    if mime.is_empty() || mime == "application/json" || mime.ends_with("+json") {
        JsonText::parse_limited(body, MAX_DEPTH).map_err(|e| match e {
            TextError::Invalid(e) => BodyError::InvalidJson(e),
            TextError::TooDeep(depth) => BodyError::InvalidJson(format!(
                "the JSON body nests arrays and objects {depth} levels deep; at most {MAX_DEPTH} are accepted"
            )),
        })
    } else if mime == "application/x-www-form-urlencoded" {
        form_to_object(body).map(|v| JsonText::from_value(&v))
    } else {
        Err(BodyError::UnsupportedType(mime))
    }
}

/// Form fields become an object (a repeated field becomes an array); a `payload` field holding
/// JSON, as GitHub sends with its form content type, is parsed in place.
fn form_to_object(body: &[u8]) -> Result<Value, BodyError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| BodyError::InvalidField(format!("the form body is malformed: {e}")))?;
    let mut obj = Map::new();
    for (k, v) in pairs {
        let value = if k == "payload" {
            let payload: Value = serde_json::from_str(&v).map_err(|e| {
                BodyError::InvalidJson(format!("the form field `payload` is not valid JSON: {e}"))
            })?;
            // The payload sits inside the form's object, one level down.
            let depth = value_depth(&payload);
            if depth > MAX_DEPTH - 1 {
                return Err(BodyError::InvalidJson(format!(
                    "the form field `payload` nests arrays and objects {depth} levels deep; at most {} are accepted ({MAX_DEPTH} with the form's own object)",
                    MAX_DEPTH - 1
                )));
            }
            payload
        } else {
            Value::String(v)
        };
        match obj.get_mut(&k) {
            None => {
                obj.insert(k, value);
            }
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        }
    }
    Ok(Value::Object(obj))
}

/// What a caller may ask for inside a JSON object body, beside the payload.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Controls {
    /// Caller-supplied task title.
    pub title: Option<String>,
    /// Caller environment overrides, still to be checked against `allow_env`.
    pub env: BTreeMap<String, String>,
    /// Caller's wait request from the body.
    pub wait: Option<Duration>,
}

/// The caller's `title`, `env` and `wait`, read from the top-level members of the payload (none
/// when it is not an object). Each is a small value, parsed on its own.
pub fn controls(members: &Members<'_>) -> Result<Controls, BodyError> {
    let value = |name: &str| {
        members
            .get(name)
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
    };
    let title = match value("title") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(BodyError::InvalidField("`title` must be a string".into())),
    };
    let env = match value("env") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => parse_env(&v)?,
    };
    let wait = match value("wait") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(DEFAULT_WAIT),
        Some(Value::Number(n)) => seconds(n.as_f64())?,
        Some(_) => {
            return Err(BodyError::InvalidField(
                "`wait` must be true, false or a number of seconds".into(),
            ))
        }
    };
    Ok(Controls { title, env, wait })
}

fn parse_env(v: &Value) -> Result<BTreeMap<String, String>, BodyError> {
    let bad = || {
        BodyError::InvalidField("`env` must be a list of {\"name\", \"value\"} string pairs".into())
    };
    let items = v.as_array().ok_or_else(bad)?;
    let mut env = BTreeMap::new();
    for item in items {
        let name = item.get("name").and_then(Value::as_str).ok_or_else(bad)?;
        let value = item.get("value").and_then(Value::as_str).ok_or_else(bad)?;
        env.insert(name.to_string(), value.to_string());
    }
    Ok(env)
}

/// A wait given in seconds; zero means "do not wait".
pub fn seconds(n: Option<f64>) -> Result<Option<Duration>, BodyError> {
    match n {
        Some(s) if s.is_finite() && s >= 0.0 => {
            Ok((s > 0.0).then(|| Duration::from_secs_f64(s.min(1e9))))
        }
        _ => Err(BodyError::InvalidField(
            "`wait` must be a non-negative number of seconds".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn json_body_is_kept_whole_and_controls_read() {
        let b = parse(
            Some("application/json; charset=utf-8"),
            br#"{"title":"t","wait":true,"env":[{"name":"A","value":"1"}],"x":1}"#,
        )
        .unwrap();
        assert_eq!(b.title.as_deref(), Some("t"));
        assert_eq!(b.wait, Some(DEFAULT_WAIT));
        assert_eq!(b.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(b.inputs.to_value()["x"], json!(1));
        assert_eq!(b.inputs.to_value()["title"], json!("t"));
    }

    #[test]
    fn form_fields_and_github_payload() {
        let b = parse(
            Some("application/x-www-form-urlencoded"),
            b"a=1&a=2&payload=%7B%22action%22%3A%22opened%22%7D",
        )
        .unwrap();
        assert_eq!(
            b.inputs,
            json!({"a": ["1", "2"], "payload": {"action": "opened"}})
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            parse(Some("text/plain"), b"hi"),
            Err(BodyError::UnsupportedType(_))
        ));
        assert!(matches!(
            parse(Some("application/json"), b"{"),
            Err(BodyError::InvalidJson(_))
        ));
        assert!(matches!(
            parse(None, b"{\"wait\":\"x\"}"),
            Err(BodyError::InvalidField(_))
        ));
        assert!(matches!(
            parse(None, b"{\"wait\":-1}"),
            Err(BodyError::InvalidField(_))
        ));
        assert!(matches!(
            parse(None, b"{\"env\":{\"A\":1}}"),
            Err(BodyError::InvalidField(_))
        ));
        assert_eq!(parse(Some("text/plain"), b"").unwrap().inputs, json!({}));
    }

    fn nested(levels: usize) -> String {
        format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn depth_counts_levels() {
        assert_eq!(value_depth(&json!(1)), 0);
        assert_eq!(value_depth(&json!({})), 1);
        assert_eq!(value_depth(&json!({"a": [1, {"b": []}], "c": 2})), 4);
    }

    #[test]
    fn json_deeper_than_the_limit_is_refused_naming_it() {
        assert!(parse(None, nested(MAX_DEPTH).as_bytes()).is_ok());
        let Err(BodyError::InvalidJson(msg)) = parse(None, nested(MAX_DEPTH + 1).as_bytes()) else {
            panic!("accepted")
        };
        assert!(msg.contains(&MAX_DEPTH.to_string()), "{msg}");
    }

    #[test]
    fn form_payload_deeper_than_the_limit_is_refused_naming_it() {
        let form =
            |levels: usize| serde_urlencoded::to_string([("payload", nested(levels))]).unwrap();
        let ok = parse(
            Some("application/x-www-form-urlencoded"),
            form(MAX_DEPTH - 1).as_bytes(),
        )
        .unwrap();
        assert_eq!(value_depth(&ok.inputs.to_value()), MAX_DEPTH);
        let Err(BodyError::InvalidJson(msg)) = parse(
            Some("application/x-www-form-urlencoded"),
            form(MAX_DEPTH).as_bytes(),
        ) else {
            panic!("accepted")
        };
        assert!(
            msg.contains("payload") && msg.contains(&MAX_DEPTH.to_string()),
            "{msg}"
        );
    }

    proptest! {
        #[test]
        fn depth_matches_a_recursive_count(levels in 0usize..100, wide in 0usize..4) {
            let mut v = json!(1);
            for i in 0..levels {
                v = if i % 2 == 0 { json!([v]) } else { json!({"k": v, "w": vec![0; wide]}) };
            }
            prop_assert_eq!(value_depth(&v), levels);
        }

        #[test]
        fn never_panics(ct in proptest::option::of("[a-z/+;= -]{0,40}"), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(ct.as_deref(), &body);
        }

        #[test]
        fn any_json_object_round_trips(obj in proptest::collection::btree_map("k_[a-z]{1,8}", any::<i64>(), 0..8)) {
            let body = serde_json::to_vec(&obj).unwrap();
            let parsed = parse(Some("application/json"), &body).unwrap();
            prop_assert_eq!(parsed.inputs, serde_json::to_value(&obj).unwrap());
        }
    }
}
