//! Turns a trigger's raw body into the task's `inputs` and the optional controls a caller may put
//! in it (`title`, `env`, `wait`). The raw bytes are parsed once, here, after any signature check
//! has seen them untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

/// A parsed trigger body.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerBody {
    /// The payload the tick will see: the whole JSON body, or the form fields as an object.
    pub inputs: Value,
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

/// The wait that `"wait": true` asks for.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// Parses `body` according to its `Content-Type`. An empty body is an empty object whatever the
/// type, so `curl -X POST <url>` works. A body without a type is read as JSON.
pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<TriggerBody, BodyError> {
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
        return Ok(TriggerBody {
            inputs: Value::Object(Map::new()),
            title: None,
            env: BTreeMap::new(),
            wait: None,
        });
    }
    let inputs = if mime.is_empty() || mime == "application/json" || mime.ends_with("+json") {
        serde_json::from_slice(body).map_err(|e| BodyError::InvalidJson(e.to_string()))?
    } else if mime == "application/x-www-form-urlencoded" {
        form_to_object(body)?
    } else {
        return Err(BodyError::UnsupportedType(mime));
    };
    controls(inputs)
}

/// Form fields become an object (a repeated field becomes an array); a `payload` field holding
/// JSON, as GitHub sends with its form content type, is parsed in place.
fn form_to_object(body: &[u8]) -> Result<Value, BodyError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| BodyError::InvalidField(format!("the form body is malformed: {e}")))?;
    let mut obj = Map::new();
    for (k, v) in pairs {
        let value = if k == "payload" {
            serde_json::from_str(&v).map_err(|e| {
                BodyError::InvalidJson(format!("the form field `payload` is not valid JSON: {e}"))
            })?
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

fn controls(inputs: Value) -> Result<TriggerBody, BodyError> {
    let Some(obj) = inputs.as_object() else {
        return Ok(TriggerBody {
            inputs,
            title: None,
            env: BTreeMap::new(),
            wait: None,
        });
    };
    let title = match obj.get("title") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(BodyError::InvalidField("`title` must be a string".into())),
    };
    let env = match obj.get("env") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(v) => parse_env(v)?,
    };
    let wait = match obj.get("wait") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(DEFAULT_WAIT),
        Some(Value::Number(n)) => seconds(n.as_f64())?,
        Some(_) => {
            return Err(BodyError::InvalidField(
                "`wait` must be true, false or a number of seconds".into(),
            ))
        }
    };
    Ok(TriggerBody {
        inputs,
        title,
        env,
        wait,
    })
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
        assert_eq!(b.inputs["x"], json!(1));
        assert_eq!(b.inputs["title"], json!("t"));
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

    proptest! {
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
