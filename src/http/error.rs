//! The edge's one error type. Every 4xx/5xx tickgate sends, including actix's own extractor
//! errors and unknown routes, has the body `{"error":{"code":"…","message":"…"}}`, so clients
//! need one error parser. Messages never contain tokens, secrets or request bodies.

use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::ErrorHandlerResponse;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;
use tickgate_actors::intake::Refused;
use tickgate_actors::model::TaskId;
use tickgate_actors::store::StoreError;

/// Every way a request can fail at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No agent has this webhook token.
    #[error("no webhook matches this URL")]
    UnknownToken,
    /// The named resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The token does not belong to the agent named in the URL.
    #[error("the token is not valid for this agent")]
    WrongToken,
    /// Signature verification failed.
    #[error("signature check failed: {0}")]
    BadSignature(String),
    /// Admin endpoints need the admin bearer token.
    #[error("a valid admin bearer token is required")]
    Unauthorized,
    /// The client address is outside the agent's `allow_cidrs`.
    #[error("this source address may not trigger this agent")]
    Forbidden,
    /// The body exceeds `max_body_bytes`.
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Only JSON and form bodies are accepted.
    #[error("content type {0:?} is not accepted; send application/json or application/x-www-form-urlencoded")]
    UnsupportedMediaType(String),
    /// The body is not valid JSON.
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A request field or parameter is unusable.
    #[error("{0}")]
    BadRequest(String),
    /// A caller environment override is not in the agent's `allow_env`.
    #[error("environment variable {0:?} may not be set by callers of this agent")]
    EnvNotAllowed(String),
    /// The idempotency key was used before with a different body.
    #[error("idempotency key was already used with a different body (task {0})")]
    IdempotencyConflict(TaskId),
    /// The token cannot be rotated through the API.
    #[error("{0}")]
    Conflict(String),
    /// The method is not served on this path.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// The agent's queue is full.
    #[error("the agent's mailbox is full; retry later")]
    MailboxFull,
    /// Too many requests from this sender.
    #[error("rate limit exceeded; retry later")]
    RateLimited {
        /// Seconds until a request would be admitted.
        retry_after: u64,
    },
    /// The agent's circuit breaker is open.
    #[error("the agent is failing and its circuit breaker is open; retry later")]
    BreakerOpen {
        /// Seconds until the breaker lets a trial through.
        retry_after: u64,
    },
    /// The server is draining for shutdown.
    #[error("the server is shutting down; retry later")]
    ShuttingDown,
    /// The store could not read or write.
    #[error("the task store is unavailable; retry later")]
    Store(#[source] StoreError),
    /// A bug or an unexpected failure; details are in the log only.
    #[error("internal error")]
    Internal(String),
    /// The body declares a `Content-Encoding`; bodies are not decoded.
    #[error("content encoding {0:?} is not accepted; send the body unencoded")]
    UnsupportedEncoding(String),
    /// The body did not arrive within `server.body_timeout`.
    #[error("the request body did not arrive within {}", humantime::format_duration(*.after))]
    RequestTimeout {
        /// The configured body timeout.
        after: std::time::Duration,
    },
    /// Bodies being received already hold `server.max_inflight_body_bytes`.
    #[error("the server is receiving too many request bodies; retry later")]
    Overloaded,
}

impl ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownToken | ApiError::NotFound(_) => "not_found",
            ApiError::WrongToken | ApiError::Unauthorized => "unauthorized",
            ApiError::BadSignature(_) => "invalid_signature",
            ApiError::Forbidden => "forbidden",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::EnvNotAllowed(_) => "env_not_allowed",
            ApiError::IdempotencyConflict(_) => "idempotency_conflict",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::MailboxFull => "mailbox_full",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::BreakerOpen { .. } => "breaker_open",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::Store(_) => "store_unavailable",
            ApiError::Internal(_) => "internal",
            ApiError::UnsupportedEncoding(_) => "unsupported_media_type",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::Overloaded => "overloaded",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::MailboxFull
            | ApiError::ShuttingDown
            | ApiError::Store(_)
            | ApiError::Overloaded => Some(1),
            ApiError::RateLimited { retry_after } | ApiError::BreakerOpen { retry_after } => {
                Some((*retry_after).max(1))
            }
            _ => None,
        }
    }
}

/// The intake's refusals are the only way a trigger fails after ingress: one status each.
impl From<Refused> for ApiError {
    fn from(e: Refused) -> Self {
        match e {
            Refused::UnknownAgent(agent) => ApiError::NotFound(format!("no agent {agent}")),
            Refused::ShuttingDown => ApiError::ShuttingDown,
            Refused::BreakerOpen { retry_after } => ApiError::BreakerOpen {
                retry_after: retry_after.as_secs_f64().ceil() as u64,
            },
            Refused::MailboxFull => ApiError::MailboxFull,
            Refused::Conflict(id) => ApiError::IdempotencyConflict(id),
            Refused::StoreUnavailable(e) => ApiError::Store(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError::Internal(format!("actor unavailable: {e}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::UnknownToken | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::WrongToken | ApiError::BadSignature(_) | ApiError::Unauthorized => {
                StatusCode::UNAUTHORIZED
            }
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidJson(_) | ApiError::BadRequest(_) | ApiError::EnvNotAllowed(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::IdempotencyConflict(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::MailboxFull | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BreakerOpen { .. } | ApiError::ShuttingDown | ApiError::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Internal(detail) => tracing::error!(detail = %detail, "internal error"),
            ApiError::Store(e) => tracing::error!(error = %e, "store unavailable"),
            _ => {}
        }
        let mut resp = HttpResponse::build(self.status_code());
        if let Some(secs) = self.retry_after() {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if matches!(self, ApiError::RequestTimeout { .. }) {
            // The rest of a stalled body may still come; the connection is not reusable.
            resp.force_close();
        }
        resp.json(error_body(self.code(), &self.to_string()))
    }
}

/// The one error body shape.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message } })
}

/// Middleware hook: rewrites any error response that is not already ours (actix's extractor
/// errors, its 404 and 405) into the standard shape, keeping the status code.
pub fn normalize<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let message = match status {
        StatusCode::NOT_FOUND => "no such route".to_string(),
        _ => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase(),
    };
    let body = error_body(code, &message).to_string();
    let (req, mut resp) = res.into_parts();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let resp = resp.set_body(body).map_into_boxed_body();
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, resp).map_into_right_body(),
    ))
}
