//! Delivery ids, provider handshakes and fixed acknowledgements: what a webhook sender expects of
//! the answer, as opposed to what becomes of the task.
//!
//! - **Delivery ids** make redeliveries idempotent. In order: the agent's configured
//!   `webhook.delivery_id` (a JSON pointer into the body, or `header:Name`), then the caller's
//!   `Idempotency-Key` and the providers' delivery headers, then the id the agent's signature
//!   scheme puts in the body (Stripe's event `id`, Slack's `event_id`). Every id becomes the same
//!   kind of idempotency key, so body ids follow every rule of header ids (scoped per agent,
//!   `422` for the same id with another body, `400` when longer than 255 bytes).
//! - **Handshakes**: Slack's `url_verification` is answered with its challenge and creates no
//!   task, once the signature has been checked.
//! - **Ack**: `webhook.ack` replaces the fire-and-forget answer (and a duplicate's) for senders
//!   that insist on a fixed reply.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tickgate_actors::model::Members;
use tickgate_actors::store::IdempotencyKey;

use super::signature::Scheme;

/// Headers whose value identifies a delivery, in order of preference. Provider delivery ids make
/// redeliveries idempotent without the sender doing anything; `svix-id` is Svix's name for
/// Standard Webhooks' `webhook-id`.
const DELIVERY_HEADERS: [&str; 5] = [
    "idempotency-key",
    "x-github-delivery",
    "webhook-id",
    "svix-id",
    "linear-delivery",
];

/// Longest accepted delivery id, in bytes.
pub const MAX_DELIVERY_ID: usize = 255;

/// Where an agent's sender puts its delivery id (`webhook.delivery_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryIdRule {
    /// An RFC 6901 JSON pointer into the parsed body, e.g. `/event/id`.
    Pointer(String),
    /// A request header, stored lower-case.
    Header(String),
}

impl DeliveryIdRule {
    /// Parses `"/json/pointer"` or `"header:Name"`; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(name) = text.strip_prefix("header:") {
            let name = name.trim();
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid {
                return Err(format!("{text:?}: {name:?} is not a header name"));
            }
            return Ok(Self::Header(name.to_ascii_lowercase()));
        }
        if text.starts_with('/') {
            return Ok(Self::Pointer(text.to_string()));
        }
        Err(format!(
            "{text:?} must be a JSON pointer (starting with '/') or \"header:Name\""
        ))
    }
}

/// `webhook.ack = { status = 200, body = "ok", content_type = "text/plain" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AckConfig {
    /// Status of the fixed answer; must be 2xx, since the task was accepted.
    pub status: u16,
    /// Body of the fixed answer, sent as it is.
    pub body: String,
    /// Its `Content-Type`.
    pub content_type: String,
}

impl Default for AckConfig {
    fn default() -> Self {
        Self {
            status: 200,
            body: String::new(),
            content_type: "text/plain".to_string(),
        }
    }
}

/// One agent's delivery rules, built once at start-up.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    rule: Option<DeliveryIdRule>,
    scheme: Option<Scheme>,
    ack: Option<AckConfig>,
}

/// Why a delivery id was refused (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The id is longer than [`MAX_DELIVERY_ID`].
    #[error("the idempotency key is longer than {MAX_DELIVERY_ID} characters")]
    TooLong,
}

impl Delivery {
    /// Validates the agent's `delivery_id` and `ack`; `scheme` is its signature scheme, which
    /// decides where body ids and handshakes are looked for. Errors name the offending key.
    pub fn new(
        delivery_id: Option<&str>,
        ack: Option<&AckConfig>,
        scheme: Option<Scheme>,
    ) -> Result<Self, String> {
        let rule = delivery_id
            .map(DeliveryIdRule::parse)
            .transpose()
            .map_err(|e| format!("webhook.delivery_id: {e}"))?;
        if let Some(ack) = ack {
            if !(200..300).contains(&ack.status) {
                return Err(format!(
                    "webhook.ack.status: {} must be a 2xx status (the task is accepted)",
                    ack.status
                ));
            }
            if actix_web::http::header::HeaderValue::from_str(&ack.content_type).is_err() {
                return Err(format!(
                    "webhook.ack.content_type: {:?} is not a valid header value",
                    ack.content_type
                ));
            }
        }
        Ok(Self {
            rule,
            scheme,
            ack: ack.cloned(),
        })
    }

    /// The idempotency key of a trigger: its delivery id (see the module docs for the order) with
    /// the SHA-256 of the raw body. `headers` looks a header up by lower-case name; `inputs` are
    /// the payload's members, read from its text (#16).
    pub fn key(
        &self,
        headers: &dyn Fn(&str) -> Option<String>,
        inputs: &Members<'_>,
        raw_body: &[u8],
    ) -> Result<Option<IdempotencyKey>, DeliveryError> {
        let Some(id) = self.id(headers, inputs) else {
            return Ok(None);
        };
        if id.len() > MAX_DELIVERY_ID {
            return Err(DeliveryError::TooLong);
        }
        Ok(Some(IdempotencyKey {
            key: id,
            body_sha256: Sha256::digest(raw_body).into(),
        }))
    }

    fn id(&self, headers: &dyn Fn(&str) -> Option<String>, inputs: &Members<'_>) -> Option<String> {
        let configured = match &self.rule {
            Some(DeliveryIdRule::Header(name)) => headers(name).and_then(non_empty),
            Some(DeliveryIdRule::Pointer(pointer)) => inputs.pointer(pointer).and_then(scalar),
            None => None,
        };
        configured
            .or_else(|| {
                DELIVERY_HEADERS
                    .iter()
                    .find_map(|name| headers(name).and_then(non_empty))
            })
            .or_else(|| {
                let field = match self.scheme? {
                    Scheme::Stripe => "id",
                    Scheme::Slack => "event_id",
                    _ => return None,
                };
                inputs.get(field).and_then(scalar)
            })
    }

    /// The answer to a provider handshake in `raw_body`, if it is one: Slack's
    /// `url_verification` on a `slack` agent gets `{"challenge": …}`. Call only after the
    /// signature was verified, so that nobody else can make tickgate echo a value.
    pub fn handshake(&self, raw_body: &[u8]) -> Option<Value> {
        if self.scheme != Some(Scheme::Slack) || !contains(raw_body, b"url_verification") {
            return None;
        }
        #[derive(Deserialize)]
        struct Verification {
            #[serde(rename = "type")]
            kind: String,
            challenge: Value,
        }
        let v: Verification = serde_json::from_slice(raw_body).ok()?;
        (v.kind == "url_verification").then(|| json!({ "challenge": v.challenge }))
    }

    /// The fixed answer configured in `webhook.ack`, which replaces the fire-and-forget answer
    /// and a duplicate's answer; `None` keeps the usual JSON answers.
    pub fn ack(&self) -> Option<HttpResponse> {
        let ack = self.ack.as_ref()?;
        let status = StatusCode::from_u16(ack.status).unwrap_or(StatusCode::OK);
        Some(
            HttpResponse::build(status)
                .content_type(ack.content_type.as_str())
                .body(ack.body.clone()),
        )
    }
}

fn non_empty(value: String) -> Option<String> {
    let trimmed = value.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// A body id as text: strings as they are (trimmed, none when blank), numbers in their JSON form;
/// anything else is no id.
fn scalar(raw: &RawValue) -> Option<String> {
    match serde_json::from_str(raw.get()).ok()? {
        Value::String(s) => non_empty(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;
    use tickgate_actors::model::JsonText;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn id_of(d: &Delivery, headers: &[(&str, &str)], inputs: Value) -> Option<String> {
        d.key(&lookup(headers), &JsonText::from(inputs).members(), b"{}")
            .unwrap()
            .map(|k| k.key)
    }

    #[test]
    fn rules_parse() {
        assert_eq!(
            DeliveryIdRule::parse("header:X-Request-Id"),
            Ok(DeliveryIdRule::Header("x-request-id".into()))
        );
        assert_eq!(
            DeliveryIdRule::parse("/event/id"),
            Ok(DeliveryIdRule::Pointer("/event/id".into()))
        );
        assert!(DeliveryIdRule::parse("header:").is_err());
        assert!(DeliveryIdRule::parse("header:bad name").is_err());
        assert!(DeliveryIdRule::parse("event.id").is_err());
    }

    #[test]
    fn configured_rule_then_headers_then_scheme_body_id() {
        let stripe = Delivery::new(None, None, Some(Scheme::Stripe)).unwrap();
        assert_eq!(
            id_of(&stripe, &[], json!({"id": "evt_1"})),
            Some("evt_1".into())
        );
        assert_eq!(
            id_of(&stripe, &[("idempotency-key", "k")], json!({"id": "evt_1"})),
            Some("k".into())
        );
        let slack = Delivery::new(None, None, Some(Scheme::Slack)).unwrap();
        assert_eq!(
            id_of(&slack, &[], json!({"event_id": "Ev1", "id": "x"})),
            Some("Ev1".into())
        );
        let plain = Delivery::new(None, None, None).unwrap();
        assert_eq!(id_of(&plain, &[], json!({"id": "evt_1"})), None);
        assert_eq!(
            id_of(&plain, &[("svix-id", "msg_1")], json!({})),
            Some("msg_1".into())
        );
        let pointer = Delivery::new(Some("/delivery/n"), None, None).unwrap();
        assert_eq!(
            id_of(
                &pointer,
                &[("webhook-id", "h")],
                json!({"delivery": {"n": 7}})
            ),
            Some("7".into())
        );
        assert_eq!(
            id_of(&pointer, &[("webhook-id", "h")], json!({})),
            Some("h".into())
        );
        let header = Delivery::new(Some("header:X-Request-Id"), None, None).unwrap();
        assert_eq!(
            id_of(
                &header,
                &[("x-request-id", "r1"), ("idempotency-key", "k")],
                json!({})
            ),
            Some("r1".into())
        );
    }

    #[test]
    fn long_ids_are_refused() {
        let d = Delivery::new(Some("/id"), None, None).unwrap();
        let long = "x".repeat(MAX_DELIVERY_ID + 1);
        assert_eq!(
            d.key(
                &lookup(&[]),
                &JsonText::from(json!({ "id": long })).members(),
                b""
            ),
            Err(DeliveryError::TooLong)
        );
    }

    #[test]
    fn slack_challenge_only_for_slack_agents() {
        let body = br#"{"token":"t","challenge":"abc123","type":"url_verification"}"#;
        let slack = Delivery::new(None, None, Some(Scheme::Slack)).unwrap();
        assert_eq!(slack.handshake(body), Some(json!({"challenge": "abc123"})));
        assert_eq!(
            slack.handshake(br#"{"type":"event_callback","x":"url_verification"}"#),
            None
        );
        let stripe = Delivery::new(None, None, Some(Scheme::Stripe)).unwrap();
        assert_eq!(stripe.handshake(body), None);
    }

    #[test]
    fn ack_is_validated() {
        let bad = AckConfig {
            status: 500,
            ..AckConfig::default()
        };
        assert!(Delivery::new(None, Some(&bad), None).is_err());
        let ok = AckConfig::default();
        assert!(Delivery::new(None, Some(&ok), None)
            .unwrap()
            .ack()
            .is_some());
        assert!(Delivery::new(None, None, None).unwrap().ack().is_none());
    }

    proptest! {
        #[test]
        fn rule_parsing_never_panics(text in ".{0,40}") {
            let _ = DeliveryIdRule::parse(&text);
        }

        #[test]
        fn ids_never_exceed_the_limit(id in ".{0,300}") {
            let d = Delivery::new(Some("/id"), None, None).unwrap();
            match d.key(&lookup(&[]), &JsonText::from(json!({ "id": id })).members(), b"") {
                Ok(Some(k)) => prop_assert!(k.key.len() <= MAX_DELIVERY_ID),
                Ok(None) | Err(DeliveryError::TooLong) => {}
            }
        }
    }
}
