//! Limits on what a trigger may make the server hold or pass on: the time and memory a request
//! body may take while it is received, the encodings accepted, and the caller's environment
//! overrides. Kept apart from the trigger flow so that each limit is one call there.
//!
//! A body is read against three bounds at once: its own size (`server.max_body_bytes`), a
//! deadline for the whole body (`server.body_timeout`), and a budget of bytes held by all bodies
//! still being received (`server.max_inflight_body_bytes`). Memory is reserved as bytes arrive,
//! never from `Content-Length`, so a client that declares a large body and sends it slowly holds
//! only what it has sent, and only until the deadline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use prometheus::IntGauge;

use super::error::ApiError;

/// The longest value a caller may give one environment override. Runners get these in their
/// environment; the kernel limits a single variable to 128 KiB and the whole environment too.
pub const MAX_ENV_VALUE: usize = 4 * 1024;

/// The most overrides one trigger may carry.
pub const MAX_ENV_VARS: usize = 64;

/// Bytes held by request bodies still being received, across all connections, with a ceiling.
/// Shared by every worker so that the ceiling is global, and mirrored in a gauge so operators
/// can see slow senders pile up.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
    gauge: IntGauge,
}

impl BodyBudget {
    /// A budget of `limit` bytes reported through `gauge`.
    pub fn new(limit: usize, gauge: IntGauge) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            gauge,
        }
    }

    /// Bytes currently held by bodies being received.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `n` more bytes for `held`, or refuses without taking any.
    fn reserve(&self, held: &mut Reservation<'_>, n: usize) -> bool {
        let took = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if took {
            held.bytes += n;
            self.gauge.add(n as i64);
        }
        took
    }
}

/// What one body holds of the budget; given back when the read ends, however it ends (the
/// future can also be dropped when the client disconnects).
struct Reservation<'a> {
    budget: &'a BodyBudget,
    bytes: usize,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.budget.gauge.sub(self.bytes as i64);
        }
    }
}

/// How a body may be received.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body accepted.
    pub max_bytes: usize,
    /// Time allowed for the whole body, from the first read.
    pub timeout: Duration,
}

/// Reads the body once within its limits: 415 for a content encoding (bodies are not decoded,
/// so signatures and size limits apply to what the sender meant), 413 as soon as the body is
/// known to exceed `max_bytes`, 408 when it does not arrive within `timeout`, 503 when the
/// global budget of bodies in flight is spent.
pub async fn read_body(
    mut payload: web::Payload,
    req: &HttpRequest,
    limits: BodyLimits,
    budget: &BodyBudget,
) -> Result<web::Bytes, ApiError> {
    if let Some(encoding) = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .map(|e| e.chars().take(64).collect::<String>())
        .filter(|e| !e.is_empty() && e != "identity")
    {
        return Err(ApiError::UnsupportedEncoding(encoding));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(ApiError::PayloadTooLarge {
            limit: limits.max_bytes,
        });
    }
    let mut held = Reservation { budget, bytes: 0 };
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::BadRequest(format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(ApiError::PayloadTooLarge {
                    limit: limits.max_bytes,
                });
            }
            if !budget.reserve(&mut held, chunk.len()) {
                return Err(ApiError::Overloaded);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(body) => body,
        Err(_) => Err(ApiError::RequestTimeout {
            after: limits.timeout,
        }),
    }
}

/// Refuses environment overrides a runner should never receive: names that are not portable
/// variable names, values with NUL or control characters (tab excepted), values longer than
/// [`MAX_ENV_VALUE`], more than [`MAX_ENV_VARS`] of them. Values never appear in the message.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ApiError::BadRequest(format!(
            "`env` sets {} variables; at most {MAX_ENV_VARS} are accepted",
            env.len()
        )));
    }
    for (name, value) in env {
        if !crate::config::is_env_name(name) {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::BadRequest(format!(
                "`env`: {shown:?} is not a valid environment variable name"
            )));
        }
        if value.len() > MAX_ENV_VALUE {
            return Err(ApiError::BadRequest(format!(
                "`env`: the value of {name} is longer than {MAX_ENV_VALUE} bytes"
            )));
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(ApiError::BadRequest(format!(
                "`env`: the value of {name} contains a NUL or control character"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_values_are_checked() {
        assert!(check_env(&env(&[("A", "x\ty"), ("B_2", "")])).is_ok());
        assert!(check_env(&env(&[("A", "x\0y")])).is_err());
        assert!(check_env(&env(&[("A", "x\ny")])).is_err());
        assert!(check_env(&env(&[("A", &"x".repeat(MAX_ENV_VALUE + 1))])).is_err());
        assert!(check_env(&env(&[("A", &"x".repeat(MAX_ENV_VALUE))])).is_ok());
        assert!(check_env(&env(&[("1A", "x")])).is_err());
        assert!(check_env(&env(&[("A=B", "x")])).is_err());
        assert!(check_env(&env(&[("", "x")])).is_err());
    }

    #[test]
    fn budget_refuses_past_its_limit_and_gives_back_on_drop() {
        let gauge = IntGauge::new("t", "t").unwrap();
        let budget = BodyBudget::new(10, gauge.clone());
        {
            let mut a = Reservation {
                budget: &budget,
                bytes: 0,
            };
            assert!(budget.reserve(&mut a, 6));
            let mut b = Reservation {
                budget: &budget,
                bytes: 0,
            };
            assert!(!budget.reserve(&mut b, 5));
            assert!(budget.reserve(&mut b, 4));
            assert_eq!((budget.used(), gauge.get()), (10, 10));
        }
        assert_eq!((budget.used(), gauge.get()), (0, 0));
    }

    proptest! {
        #[test]
        fn accepted_env_is_printable(name in "\\PC{0,12}", value in "\\PC{0,40}") {
            let e = env(&[(&name, &value)]);
            if check_env(&e).is_ok() {
                prop_assert!(crate::config::is_env_name(&name));
                prop_assert!(!value.contains('\0'));
            }
        }

        #[test]
        fn budget_never_exceeds_limit(sizes in proptest::collection::vec(0usize..50, 0..40)) {
            let budget = BodyBudget::new(100, IntGauge::new("t", "t").unwrap());
            let mut held = Reservation { budget: &budget, bytes: 0 };
            for n in sizes {
                let before = budget.used();
                let took = budget.reserve(&mut held, n);
                prop_assert!(budget.used() <= 100);
                prop_assert_eq!(took, before + n <= 100);
            }
            drop(held);
            prop_assert_eq!(budget.used(), 0);
        }
    }
}
