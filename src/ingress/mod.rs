//! Everything that decides whether a request may become a task, before any actor sees it:
//! client address, CIDR allowlists, signatures, rate limits, and body parsing. The checks are
//! plain functions over the request's parts, so they are tested without a server.

pub mod body;
pub mod client_ip;
pub mod delivery;
pub mod rate_limit;
pub mod signature;
pub mod title;

use std::net::IpAddr;
use std::time::SystemTime;

use ipnetwork::IpNetwork;

use rate_limit::RateLimiter;
use signature::Verifier;

/// One agent's ingress rules, built once at start-up.
pub struct Gate {
    allow_cidrs: Vec<IpNetwork>,
    signature: Option<Verifier>,
    rate: Option<RateLimiter>,
    /// Whether GET with a query string triggers a tick.
    pub allow_get: bool,
    /// Header names that carry credentials for this agent; kept out of the tick's `source`.
    pub secret_headers: Vec<String>,
    /// Delivery ids, provider handshakes and the fixed acknowledgement.
    pub delivery: delivery::Delivery,
}

/// Why the gate refused a request.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Source outside `allow_cidrs` (403).
    #[error("source address not allowed")]
    Forbidden,
    /// Signature missing or wrong (401).
    #[error("{0}")]
    Signature(signature::SignatureError),
    /// Agent rate limit (429).
    #[error("rate limited")]
    RateLimited(std::time::Duration),
}

/// An agent's validated ingress settings, as the gate needs them. Defined here rather than taken
/// from the config layer so that dependencies point one way: config → ingress.
pub struct GateRules<'a> {
    /// Allowed source networks; empty allows all.
    pub allow_cidrs: &'a [IpNetwork],
    /// Signature verification, if configured.
    pub signature: Option<&'a Verifier>,
    /// The custom signature header of an `hmac-sha256` scheme, kept out of the tick's `source`.
    pub signature_header: Option<&'a str>,
    /// Sustained triggers per second and burst, if rate-limited.
    pub rate_limit: Option<(f64, u32)>,
    /// GET with a query string triggers.
    pub allow_get: bool,
    /// Where delivery ids come from, and the fixed answer if one is configured.
    pub delivery: &'a delivery::Delivery,
}

impl Gate {
    /// Builds the gate from an agent's validated settings.
    pub fn new(setup: GateRules<'_>) -> Self {
        let mut secret_headers = vec![
            "authorization".to_string(),
            "cookie".to_string(),
            "proxy-authorization".to_string(),
            "x-hub-signature".to_string(),
            "x-hub-signature-256".to_string(),
            "linear-signature".to_string(),
            "stripe-signature".to_string(),
            "x-slack-signature".to_string(),
            "webhook-signature".to_string(),
            "svix-signature".to_string(),
            "x-signature".to_string(),
        ];
        if let Some(h) = setup.signature_header {
            secret_headers.push(h.to_ascii_lowercase());
        }
        Self {
            allow_cidrs: setup.allow_cidrs.to_vec(),
            signature: setup.signature.cloned(),
            rate: setup
                .rate_limit
                .map(|(per_second, burst)| RateLimiter::new(per_second, burst)),
            allow_get: setup.allow_get,
            secret_headers,
            delivery: setup.delivery.clone(),
        }
    }

    /// The immediate answer to a provider handshake (Slack's `url_verification`), if `body` is
    /// one; such a request creates no task. Only meaningful after [`Gate::check_signature`].
    pub fn handshake(&self, body: &[u8]) -> Option<serde_json::Value> {
        self.delivery.handshake(body)
    }

    /// Source address check.
    pub fn check_source(&self, client: IpAddr) -> Result<(), GateError> {
        if self.allow_cidrs.is_empty() || client_ip::in_any(client, &self.allow_cidrs) {
            Ok(())
        } else {
            Err(GateError::Forbidden)
        }
    }

    /// Signature check over the untouched body.
    pub fn check_signature(
        &self,
        headers: &dyn Fn(&str) -> Option<String>,
        body: &[u8],
    ) -> Result<(), GateError> {
        match &self.signature {
            Some(v) => v
                .verify(headers, body, SystemTime::now())
                .map_err(GateError::Signature),
            None => Ok(()),
        }
    }

    /// Takes a token from the agent's rate bucket.
    pub fn check_rate(&self) -> Result<(), GateError> {
        match &self.rate {
            Some(r) => r.admit().map_err(GateError::RateLimited),
            None => Ok(()),
        }
    }
}
