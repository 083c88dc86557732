//! Webhook signature verification.
//!
//! Every byte handled here is attacker-supplied, so verification is
//! fail-closed (anything unexpected is a refusal), compares MACs in constant
//! time, runs over the raw body bytes exactly as received, and never panics.
//! Error messages are safe to send back to the caller: they name headers but
//! never echo a secret or an expected signature.
//!
//! The MAC is checked before the timestamp, so only a holder of the secret
//! learns that a request was refused for being stale, and the Linear body is
//! only parsed once it is known to be authentic.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

const MAC_LEN: usize = 32;

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const GITHUB_SIGNATURE: &str = "X-Hub-Signature-256";
const LINEAR_SIGNATURE: &str = "Linear-Signature";
const STRIPE_SIGNATURE: &str = "Stripe-Signature";
const SLACK_SIGNATURE: &str = "X-Slack-Signature";
const SLACK_TIMESTAMP: &str = "X-Slack-Request-Timestamp";
const STANDARD_ID: &str = "webhook-id";
const STANDARD_TIMESTAMP: &str = "webhook-timestamp";
const STANDARD_SIGNATURE: &str = "webhook-signature";
/// Svix sends Standard Webhooks under its own header names.
const SVIX_ID: &str = "svix-id";
const SVIX_TIMESTAMP: &str = "svix-timestamp";
const SVIX_SIGNATURE: &str = "svix-signature";
const GENERIC_DEFAULT_HEADER: &str = "X-Signature";

/// Names the provider convention a route's webhooks are signed with, so one
/// config key selects header names, signed content and replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Scheme {
    /// `X-Hub-Signature-256: sha256=<hex>` over the body.
    #[serde(rename = "github")]
    Github,
    /// `Linear-Signature: <hex>` over the body, freshness from the body's
    /// `webhookTimestamp` (milliseconds).
    #[serde(rename = "linear")]
    Linear,
    /// `Stripe-Signature: t=<secs>,v1=<hex>…` over `{t}.{body}`.
    #[serde(rename = "stripe")]
    Stripe,
    /// `X-Slack-Signature: v0=<hex>` over `v0:{ts}:{body}`.
    #[serde(rename = "slack")]
    Slack,
    /// Standard Webhooks: `webhook-signature: v1,<base64>…` over
    /// `{id}.{ts}.{body}` with a base64 (`whsec_`) key.
    #[serde(rename = "standard")]
    Standard,
    /// A single configurable header carrying HMAC-SHA256 of the body.
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Github => "github",
            Scheme::Linear => "linear",
            Scheme::Stripe => "stripe",
            Scheme::Slack => "slack",
            Scheme::Standard => "standard",
            Scheme::HmacSha256 => "hmac-sha256",
        }
    }

    fn default_tolerance(self) -> Option<Duration> {
        match self {
            Scheme::Linear => Some(Duration::from_secs(60)),
            Scheme::Stripe | Scheme::Slack | Scheme::Standard => Some(Duration::from_secs(300)),
            Scheme::Github | Scheme::HmacSha256 => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Lets the generic scheme match senders that emit the MAC as hex or as
/// base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Case-insensitive hexadecimal.
    #[default]
    Hex,
    /// Standard alphabet, padding optional.
    Base64,
}

/// Lets config files write a single secret source without list brackets
/// while still allowing several during a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// Several values, all active at once.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// Lets callers treat both spellings uniformly.
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(value) => std::slice::from_ref(value),
            OneOrMany::Many(values) => values,
        }
    }
}

/// The operator-facing description of how a route's webhooks are signed.
/// It names where secrets live rather than holding them, so it can be
/// logged and kept in version control.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureConfig {
    /// Provider convention.
    pub scheme: Scheme,
    /// Environment variables holding secrets; every one must be set.
    #[serde(default)]
    pub secret_env: Option<OneOrMany<String>>,
    /// Files holding secrets (trailing newlines trimmed); every one must be
    /// readable.
    #[serde(default)]
    pub secret_file: Option<OneOrMany<PathBuf>>,
    /// Replay window such as `"300s"` or `"2m"`, for schemes that carry a
    /// timestamp.
    #[serde(default)]
    pub tolerance: Option<String>,
    /// `hmac-sha256` only: header carrying the signature (default
    /// `X-Signature`).
    #[serde(default)]
    pub header: Option<String>,
    /// `hmac-sha256` only: signature encoding (default hex).
    #[serde(default)]
    pub encoding: Option<Encoding>,
    /// `hmac-sha256` only: literal text before the encoded MAC, e.g.
    /// `sha256=`.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// Says where a secret came from without revealing it, so configuration
/// errors can point the operator at the right variable or file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    /// An environment variable, by name.
    Env(String),
    /// A file, by path.
    File(PathBuf),
}

impl fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretOrigin::Env(var) => write!(f, "environment variable `{var}`"),
            SecretOrigin::File(path) => write!(f, "file `{}`", path.display()),
        }
    }
}

/// Stops startup on a signature config that could not be enforced as
/// written; each message names the offending key, variable or file and
/// never contains secret material.
#[derive(Debug, thiserror::Error)]
pub enum SignatureConfigError {
    /// Neither `secret_env` nor `secret_file` yields any secret.
    #[error("signature scheme `{scheme}` has no secret: set `secret_env` or `secret_file`")]
    NoSecret {
        /// The configured scheme.
        scheme: Scheme,
    },
    /// A listed environment variable is not set (or not valid UTF-8).
    #[error("secret environment variable `{var}` is not set")]
    EnvMissing {
        /// Variable name.
        var: String,
    },
    /// A listed environment variable is set to the empty string.
    #[error("secret environment variable `{var}` is empty")]
    EnvEmpty {
        /// Variable name.
        var: String,
    },
    /// A listed secret file cannot be read.
    #[error("cannot read secret file `{}`: {error}", path.display())]
    FileUnreadable {
        /// File path.
        path: PathBuf,
        /// Why reading failed.
        error: std::io::Error,
    },
    /// A listed secret file holds nothing but newlines.
    #[error("secret file `{}` is empty", path.display())]
    FileEmpty {
        /// File path.
        path: PathBuf,
    },
    /// A `standard` secret is not base64 (after an optional `whsec_`).
    #[error("secret from {origin} is not valid base64 after the optional `whsec_` prefix (required by scheme `standard`)")]
    BadStandardSecret {
        /// Where the secret came from.
        origin: SecretOrigin,
    },
    /// The HMAC implementation refused the key.
    #[error("secret from {origin} cannot be used as an HMAC-SHA256 key")]
    UnusableKey {
        /// Where the secret came from.
        origin: SecretOrigin,
    },
    /// `tolerance` is not a positive duration.
    #[error("`tolerance` = {value:?} is invalid: {reason}")]
    BadTolerance {
        /// The configured text.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A key was set that the scheme would silently ignore.
    #[error("`{key}` is not supported by signature scheme `{scheme}`")]
    UnsupportedOption {
        /// Config key.
        key: &'static str,
        /// The configured scheme.
        scheme: Scheme,
    },
    /// `header` is not a valid HTTP header name.
    #[error("`header` = {header:?} is not a valid HTTP header name")]
    BadHeaderName {
        /// The configured text.
        header: String,
    },
}

/// Why a request was refused. Messages are safe to return to the client:
/// they never contain a secret or an expected signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A required header is absent.
    #[error("missing `{header}` header")]
    Missing {
        /// Header name.
        header: String,
    },
    /// A required header is present but cannot be parsed.
    #[error("malformed `{header}` header")]
    Malformed {
        /// Header name.
        header: String,
    },
    /// Linear: the authentic body has no usable `webhookTimestamp`.
    #[error("request body has no valid `webhookTimestamp`")]
    BodyTimestamp,
    /// No provided signature matches any configured secret.
    #[error("signature does not match")]
    Mismatch,
    /// Authentic, but signed too far in the past or future.
    #[error("timestamp is outside the allowed tolerance")]
    OutsideTolerance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GenericFormat {
    header: String,
    encoding: Encoding,
    prefix: String,
}

/// A ready-to-use check for one route, built once at startup so that
/// per-request work is only parsing and MAC computation. Holds keyed MAC
/// state; its `Debug` output shows only counts, never secrets.
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    keys: Vec<HmacSha256>,
    tolerance: Duration,
    generic: Option<GenericFormat>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field("secrets", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .field("generic", &self.generic)
            .finish()
    }
}

impl SignatureConfig {
    /// Resolves secrets and validates options once at startup, so a
    /// misconfigured route fails loudly instead of accepting or refusing
    /// everything at run time. `env` is the environment lookup (pass
    /// `&|k| std::env::var(k).ok()` in production).
    pub fn build(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Verifier, SignatureConfigError> {
        let scheme = self.scheme;
        let generic = if scheme == Scheme::HmacSha256 {
            let header = self
                .header
                .clone()
                .unwrap_or_else(|| GENERIC_DEFAULT_HEADER.to_owned());
            if !is_header_name(&header) {
                return Err(SignatureConfigError::BadHeaderName { header });
            }
            Some(GenericFormat {
                header,
                encoding: self.encoding.unwrap_or_default(),
                prefix: self.prefix.clone().unwrap_or_default(),
            })
        } else {
            let generic_only = [
                ("header", self.header.is_some()),
                ("encoding", self.encoding.is_some()),
                ("prefix", self.prefix.is_some()),
            ];
            if let Some((key, _)) = generic_only.iter().find(|(_, set)| *set) {
                return Err(SignatureConfigError::UnsupportedOption { key, scheme });
            }
            None
        };

        let tolerance = match (&self.tolerance, scheme.default_tolerance()) {
            (Some(raw), Some(_)) => parse_tolerance(raw)?,
            (Some(_), None) => {
                return Err(SignatureConfigError::UnsupportedOption {
                    key: "tolerance",
                    scheme,
                })
            }
            (None, Some(default)) => default,
            (None, None) => Duration::ZERO,
        };

        let mut keys = Vec::new();
        for (origin, secret) in self.load_secrets(env)? {
            let key = if scheme == Scheme::Standard {
                match decode_standard_secret(&secret) {
                    Some(key) => key,
                    None => return Err(SignatureConfigError::BadStandardSecret { origin }),
                }
            } else {
                secret
            };
            let mac = <HmacSha256 as Mac>::new_from_slice(&key)
                .map_err(|_| SignatureConfigError::UnusableKey { origin })?;
            keys.push(mac);
        }
        if keys.is_empty() {
            return Err(SignatureConfigError::NoSecret { scheme });
        }

        Ok(Verifier {
            scheme,
            keys,
            tolerance,
            generic,
        })
    }

    fn load_secrets(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<(SecretOrigin, Vec<u8>)>, SignatureConfigError> {
        let mut secrets = Vec::new();
        for var in self.secret_env.iter().flat_map(OneOrMany::as_slice) {
            let value =
                env(var).ok_or_else(|| SignatureConfigError::EnvMissing { var: var.clone() })?;
            if value.is_empty() {
                return Err(SignatureConfigError::EnvEmpty { var: var.clone() });
            }
            secrets.push((SecretOrigin::Env(var.clone()), value.into_bytes()));
        }
        for path in self.secret_file.iter().flat_map(OneOrMany::as_slice) {
            let mut bytes =
                std::fs::read(path).map_err(|error| SignatureConfigError::FileUnreadable {
                    path: path.clone(),
                    error,
                })?;
            while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                bytes.pop();
            }
            if bytes.is_empty() {
                return Err(SignatureConfigError::FileEmpty { path: path.clone() });
            }
            secrets.push((SecretOrigin::File(path.clone()), bytes));
        }
        Ok(secrets)
    }
}

fn parse_tolerance(raw: &str) -> Result<Duration, SignatureConfigError> {
    let bad = |reason: String| SignatureConfigError::BadTolerance {
        value: raw.to_owned(),
        reason,
    };
    let parsed = humantime::parse_duration(raw.trim()).map_err(|e| bad(e.to_string()))?;
    if parsed.is_zero() {
        return Err(bad("must be greater than zero".to_owned()));
    }
    Ok(parsed)
}

fn decode_standard_secret(secret: &[u8]) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(b"whsec_").unwrap_or(secret);
    BASE64.decode(encoded).ok().filter(|key| !key.is_empty())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl Verifier {
    /// The provider convention this verifier checks; it also tells where the provider puts
    /// delivery ids and which handshakes it sends.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Decides whether a webhook may be acted on. `headers` looks a header
    /// up by name (asked in lower case; it should return the first value,
    /// or `None` when absent or not valid UTF-8), `body` is the raw body
    /// exactly as received, `now` the current time (injected for tests and
    /// replay checks).
    pub fn verify(
        &self,
        headers: &dyn Fn(&str) -> Option<String>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), SignatureError> {
        match self.scheme {
            Scheme::Github => {
                let value = header(headers, GITHUB_SIGNATURE)?;
                let sig = value
                    .strip_prefix("sha256=")
                    .and_then(decode_hex_mac)
                    .ok_or_else(|| malformed(GITHUB_SIGNATURE))?;
                self.check_mac(&[body], &[sig])
            }
            Scheme::Linear => {
                let value = header(headers, LINEAR_SIGNATURE)?;
                let sig = decode_hex_mac(&value).ok_or_else(|| malformed(LINEAR_SIGNATURE))?;
                self.check_mac(&[body], &[sig])?;
                let millis = linear_timestamp(body).ok_or(SignatureError::BodyTimestamp)?;
                self.check_time(i128::from(millis), now)
            }
            Scheme::Stripe => {
                let value = header(headers, STRIPE_SIGNATURE)?;
                let parsed = parse_stripe(&value).ok_or_else(|| malformed(STRIPE_SIGNATURE))?;
                self.check_mac(&[parsed.t.as_bytes(), b".", body], &parsed.v1)?;
                self.check_time(secs_to_millis(parsed.t_secs), now)
            }
            Scheme::Slack => {
                let value = header(headers, SLACK_SIGNATURE)?;
                let ts = header(headers, SLACK_TIMESTAMP)?;
                let sig = value
                    .strip_prefix("v0=")
                    .and_then(decode_hex_mac)
                    .ok_or_else(|| malformed(SLACK_SIGNATURE))?;
                let secs = parse_unix_secs(&ts).ok_or_else(|| malformed(SLACK_TIMESTAMP))?;
                self.check_mac(&[b"v0:", ts.as_bytes(), b":", body], &[sig])?;
                self.check_time(secs_to_millis(secs), now)
            }
            Scheme::Standard => {
                // Svix-hosted senders use `svix-*` names for the same three headers.
                let (id_name, ts_name, sig_name) =
                    if headers(STANDARD_SIGNATURE).is_none() && headers(SVIX_SIGNATURE).is_some() {
                        (SVIX_ID, SVIX_TIMESTAMP, SVIX_SIGNATURE)
                    } else {
                        (STANDARD_ID, STANDARD_TIMESTAMP, STANDARD_SIGNATURE)
                    };
                let id = header(headers, id_name)?;
                let ts = header(headers, ts_name)?;
                let value = header(headers, sig_name)?;
                let secs = parse_unix_secs(&ts).ok_or_else(|| malformed(ts_name))?;
                let sigs = parse_standard_signatures(&value);
                if sigs.is_empty() {
                    return Err(malformed(sig_name));
                }
                self.check_mac(&[id.as_bytes(), b".", ts.as_bytes(), b".", body], &sigs)?;
                self.check_time(secs_to_millis(secs), now)
            }
            Scheme::HmacSha256 => {
                let Some(format) = &self.generic else {
                    return Err(SignatureError::Mismatch);
                };
                let value = header(headers, &format.header)?;
                let sig = value
                    .strip_prefix(format.prefix.as_str())
                    .and_then(|encoded| match format.encoding {
                        Encoding::Hex => decode_hex_mac(encoded),
                        Encoding::Base64 => decode_base64_mac(encoded),
                    })
                    .ok_or_else(|| malformed(&format.header))?;
                self.check_mac(&[body], &[sig])
            }
        }
    }

    fn check_mac(
        &self,
        signed: &[&[u8]],
        candidates: &[[u8; MAC_LEN]],
    ) -> Result<(), SignatureError> {
        let mut ok = Choice::from(0);
        for key in &self.keys {
            let mut mac = key.clone();
            for part in signed {
                mac.update(part);
            }
            let expected = mac.finalize().into_bytes();
            for candidate in candidates {
                ok |= expected.as_slice().ct_eq(candidate.as_slice());
            }
        }
        if bool::from(ok) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }

    fn check_time(&self, signed_at_ms: i128, now: SystemTime) -> Result<(), SignatureError> {
        let now_ms = match now.duration_since(UNIX_EPOCH) {
            Ok(after) => i128::try_from(after.as_millis()).unwrap_or(i128::MAX),
            Err(before) => i128::try_from(before.duration().as_millis())
                .map(|ms| -ms)
                .unwrap_or(i128::MIN),
        };
        if now_ms.abs_diff(signed_at_ms) <= self.tolerance.as_millis() {
            Ok(())
        } else {
            Err(SignatureError::OutsideTolerance)
        }
    }
}

fn header(headers: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, SignatureError> {
    let value = headers(&name.to_ascii_lowercase()).ok_or_else(|| SignatureError::Missing {
        header: name.to_owned(),
    })?;
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(malformed(name));
    }
    Ok(trimmed.to_owned())
}

fn malformed(name: &str) -> SignatureError {
    SignatureError::Malformed {
        header: name.to_owned(),
    }
}

fn secs_to_millis(secs: u64) -> i128 {
    i128::from(secs) * 1000
}

fn parse_unix_secs(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn decode_hex_mac(text: &str) -> Option<[u8; MAC_LEN]> {
    let bytes = text.as_bytes();
    if bytes.len() != MAC_LEN * 2 {
        return None;
    }
    let mut out = [0u8; MAC_LEN];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let (hi, lo) = match pair {
            [hi, lo] => (hex_digit(*hi)?, hex_digit(*lo)?),
            _ => return None,
        };
        *slot = (hi << 4) | lo;
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_base64_mac(text: &str) -> Option<[u8; MAC_LEN]> {
    if text.len() > 64 {
        return None;
    }
    BASE64.decode(text).ok()?.try_into().ok()
}

struct StripeHeader<'a> {
    t: &'a str,
    t_secs: u64,
    v1: Vec<[u8; MAC_LEN]>,
}

fn parse_stripe(value: &str) -> Option<StripeHeader<'_>> {
    let mut t = None;
    let mut v1 = Vec::new();
    for item in value.split(',') {
        let Some((key, val)) = item.split_once('=') else {
            continue;
        };
        let (key, val) = (key.trim(), val.trim());
        match key {
            "t" => {
                if t.is_some() {
                    return None;
                }
                t = Some((val, parse_unix_secs(val)?));
            }
            "v1" => {
                if let Some(sig) = decode_hex_mac(val) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let (t, t_secs) = t?;
    if v1.is_empty() {
        return None;
    }
    Some(StripeHeader { t, t_secs, v1 })
}

fn parse_standard_signatures(value: &str) -> Vec<[u8; MAC_LEN]> {
    value
        .split_ascii_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(decode_base64_mac)
        .collect()
}

fn linear_timestamp(body: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(rename = "webhookTimestamp")]
        webhook_timestamp: Option<serde_json::Value>,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    envelope.webhook_timestamp?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const ALL_SCHEMES: [Scheme; 6] = [
        Scheme::Github,
        Scheme::Linear,
        Scheme::Stripe,
        Scheme::Slack,
        Scheme::Standard,
        Scheme::HmacSha256,
    ];

    fn at_secs(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn config(scheme: Scheme, vars: &[&str]) -> SignatureConfig {
        SignatureConfig {
            scheme,
            secret_env: Some(OneOrMany::Many(
                vars.iter().map(|v| v.to_string()).collect(),
            )),
            secret_file: None,
            tolerance: None,
            header: None,
            encoding: None,
            prefix: None,
        }
    }

    fn build_with(cfg: &SignatureConfig, secrets: &[String]) -> Verifier {
        let env = |name: &str| {
            name.strip_prefix("SECRET_")
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| secrets.get(i).cloned())
        };
        cfg.build(&env).expect("test config builds")
    }

    fn verifier(scheme: Scheme, secrets: &[String]) -> Verifier {
        let names: Vec<String> = (0..secrets.len()).map(|i| format!("SECRET_{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        build_with(&config(scheme, &refs), secrets)
    }

    fn raw_key(scheme: Scheme, secret: &str) -> Vec<u8> {
        if scheme == Scheme::Standard {
            decode_standard_secret(secret.as_bytes()).expect("test standard secret")
        } else {
            secret.as_bytes().to_vec()
        }
    }

    fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("hmac key");
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    struct Signed {
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    fn run(
        v: &Verifier,
        headers: &HashMap<String, String>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), SignatureError> {
        v.verify(&|name: &str| headers.get(name).cloned(), body, now)
    }

    /// Signs like the provider would, `flip` XOR-ing one byte of the MAC.
    fn sign(
        scheme: Scheme,
        secret: &str,
        body: &[u8],
        ts_secs: u64,
        flip: Option<(usize, u8)>,
    ) -> Signed {
        let key = raw_key(scheme, secret);
        let ts = ts_secs.to_string();
        let body = if scheme == Scheme::Linear {
            let mut v =
                format!("{{\"webhookTimestamp\":{},\"data\":\"", ts_secs * 1000).into_bytes();
            v.extend(body.iter().map(|b| b'a' + (b % 26)));
            v.extend_from_slice(b"\"}");
            v
        } else {
            body.to_vec()
        };
        let mut sig = match scheme {
            Scheme::Github | Scheme::Linear | Scheme::HmacSha256 => mac(&key, &[&body]),
            Scheme::Stripe => mac(&key, &[ts.as_bytes(), b".", &body]),
            Scheme::Slack => mac(&key, &[b"v0:", ts.as_bytes(), b":", &body]),
            Scheme::Standard => mac(&key, &[b"msg_1", b".", ts.as_bytes(), b".", &body]),
        };
        if let Some((i, x)) = flip {
            sig[i % MAC_LEN] ^= x;
        }
        let mut h = HashMap::new();
        match scheme {
            Scheme::Github => {
                h.insert(
                    "x-hub-signature-256".into(),
                    format!("sha256={}", hex(&sig)),
                );
            }
            Scheme::Linear => {
                h.insert("linear-signature".into(), hex(&sig));
            }
            Scheme::Stripe => {
                h.insert(
                    "stripe-signature".into(),
                    format!("t={ts},v1={},v0={}", hex(&sig), hex(&[0u8; 32])),
                );
            }
            Scheme::Slack => {
                h.insert("x-slack-signature".into(), format!("v0={}", hex(&sig)));
                h.insert("x-slack-request-timestamp".into(), ts);
            }
            Scheme::Standard => {
                h.insert("webhook-id".into(), "msg_1".into());
                h.insert("webhook-timestamp".into(), ts);
                h.insert(
                    "webhook-signature".into(),
                    format!("v1,{}", BASE64.encode(sig)),
                );
            }
            Scheme::HmacSha256 => {
                h.insert("x-signature".into(), hex(&sig));
            }
        }
        Signed { headers: h, body }
    }

    fn secret_for(scheme: Scheme, seed: &str) -> String {
        if scheme == Scheme::Standard {
            format!("whsec_{}", BASE64.encode(seed.as_bytes()))
        } else {
            seed.to_owned()
        }
    }

    fn temp_file(contents: &[u8]) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tickgate-signature-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    #[test]
    fn github_documentation_example() {
        let v = verifier(Scheme::Github, &["It's a Secret to Everybody".into()]);
        let mut h = HashMap::new();
        h.insert(
            "x-hub-signature-256".to_string(),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".to_string(),
        );
        assert_eq!(run(&v, &h, b"Hello, World!", SystemTime::now()), Ok(()));
        assert_eq!(
            run(&v, &h, b"Hello, World?", SystemTime::now()),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn slack_documentation_example() {
        let v = verifier(Scheme::Slack, &["8f742231b10e8888abcd99yyyzzz85a5".into()]);
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let mut h = HashMap::new();
        h.insert(
            "x-slack-signature".to_string(),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503".to_string(),
        );
        h.insert(
            "x-slack-request-timestamp".to_string(),
            "1531420618".to_string(),
        );
        assert_eq!(
            run(&v, &h, body.as_bytes(), at_secs(1531420618 + 299)),
            Ok(())
        );
        assert_eq!(
            run(&v, &h, body.as_bytes(), at_secs(1531420618 + 301)),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            run(&v, &h, body.as_bytes(), at_secs(1531420618 - 301)),
            Err(SignatureError::OutsideTolerance)
        );
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        let mut h = HashMap::new();
        h.insert(
            "webhook-id".to_string(),
            "msg_p5jXN8AQM9LWM0D4loKWxJek".to_string(),
        );
        h.insert("webhook-timestamp".to_string(), "1614265330".to_string());
        h.insert(
            "webhook-signature".to_string(),
            "v1a,AAAA v1,bm90IHRoaXMgb25l v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .to_string(),
        );
        let body = br#"{"test": 2432232314}"#;
        for secret in [
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            let v = verifier(Scheme::Standard, &[secret.into()]);
            assert_eq!(run(&v, &h, body, at_secs(1614265330)), Ok(()));
            assert_eq!(
                run(&v, &h, body, at_secs(1614265330 + 301)),
                Err(SignatureError::OutsideTolerance)
            );
        }
        h.insert("webhook-signature".to_string(), "v2,abc".to_string());
        let v = verifier(
            Scheme::Standard,
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
        );
        assert_eq!(
            run(&v, &h, body, at_secs(1614265330)),
            Err(SignatureError::Malformed {
                header: "webhook-signature".into()
            })
        );
    }

    #[test]
    fn stripe_header_variants() {
        let secret = "whsec_stripe_test".to_string();
        let v = verifier(Scheme::Stripe, std::slice::from_ref(&secret));
        let body = br#"{"id":"evt_1"}"#;
        let good = hex(&mac(secret.as_bytes(), &[b"1700000000.", body]));
        let bad = hex(&[7u8; 32]);
        let now = at_secs(1_700_000_100);
        let check = |value: &str| {
            let mut h = HashMap::new();
            h.insert("stripe-signature".to_string(), value.to_string());
            run(&v, &h, body, now)
        };
        assert_eq!(check(&format!("t=1700000000,v1={good}")), Ok(()));
        assert_eq!(
            check(&format!("t=1700000000,v1={bad},v1={good},v0={bad}")),
            Ok(())
        );
        assert_eq!(
            check(&format!("v1={good}, t=1700000000, foo=bar, junk")),
            Ok(())
        );
        assert_eq!(
            check(&format!("t=1700000000,v1={}", good.to_uppercase())),
            Ok(())
        );
        assert_eq!(
            check(&format!("t=1700000000,v1={bad}")),
            Err(SignatureError::Mismatch)
        );
        let malformed = Err(SignatureError::Malformed {
            header: "Stripe-Signature".into(),
        });
        assert_eq!(check(&format!("v1={good}")), malformed);
        assert_eq!(check("t=1700000000"), malformed);
        assert_eq!(check(&format!("t=1700000000,v0={good}")), malformed);
        assert_eq!(
            check(&format!("t=1700000000,t=1700000000,v1={good}")),
            malformed
        );
        assert_eq!(check(&format!("t=+1700000000,v1={good}")), malformed);
        assert_eq!(
            check(&format!("t=1700000000,v1={}", &good[..62])),
            malformed
        );
        assert_eq!(
            check(&format!(
                "t=1699999000,v1={}",
                hex(&mac(secret.as_bytes(), &[b"1699999000.", body]))
            )),
            Err(SignatureError::OutsideTolerance)
        );
    }

    #[test]
    fn linear_requires_a_fresh_body_timestamp() {
        let secret = "lin_wh_secret".to_string();
        let v = verifier(Scheme::Linear, std::slice::from_ref(&secret));
        let now_ms: u64 = 1_700_000_000_000;
        let now = UNIX_EPOCH + Duration::from_millis(now_ms);
        let check = |body: &str| {
            let mut h = HashMap::new();
            h.insert(
                "linear-signature".to_string(),
                hex(&mac(secret.as_bytes(), &[body.as_bytes()])),
            );
            run(&v, &h, body.as_bytes(), now)
        };
        assert_eq!(
            check(&format!(
                r#"{{"action":"create","webhookTimestamp":{}}}"#,
                now_ms - 59_000
            )),
            Ok(())
        );
        assert_eq!(
            check(&format!(r#"{{"webhookTimestamp":{}}}"#, now_ms + 59_000)),
            Ok(())
        );
        assert_eq!(
            check(&format!(r#"{{"webhookTimestamp":{}}}"#, now_ms - 61_000)),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            check(&format!(r#"{{"webhookTimestamp":{}}}"#, now_ms + 61_000)),
            Err(SignatureError::OutsideTolerance)
        );
        for body in [
            r#"{"action":"create"}"#,
            r#"{"webhookTimestamp":"1700000000000"}"#,
            r#"{"webhookTimestamp":1.7e12}"#,
            r#"{"webhookTimestamp":-1}"#,
            r#"{"webhookTimestamp":null}"#,
            r#"[1,2,3]"#,
            "not json",
            r#"{"webhookTimestamp":1700000000000,"webhookTimestamp":1700000000000}"#,
        ] {
            assert_eq!(check(body), Err(SignatureError::BodyTimestamp), "{body}");
        }
    }

    #[test]
    fn generic_scheme_options() {
        let secret = "generic-secret".to_string();
        let body = b"payload";
        let sig = mac(secret.as_bytes(), &[body]);
        let mut cfg = config(Scheme::HmacSha256, &["SECRET_0"]);
        cfg.header = Some("X-Acme-Signature".into());
        cfg.encoding = Some(Encoding::Base64);
        cfg.prefix = Some("sha256=".into());
        let v = build_with(&cfg, std::slice::from_ref(&secret));
        let mut h = HashMap::new();
        h.insert(
            "x-acme-signature".to_string(),
            format!("sha256={}", BASE64.encode(sig)),
        );
        assert_eq!(run(&v, &h, body, SystemTime::now()), Ok(()));
        h.insert("x-acme-signature".to_string(), BASE64.encode(sig));
        assert_eq!(
            run(&v, &h, body, SystemTime::now()),
            Err(SignatureError::Malformed {
                header: "X-Acme-Signature".into()
            })
        );
        h.clear();
        assert_eq!(
            run(&v, &h, body, SystemTime::now()),
            Err(SignatureError::Missing {
                header: "X-Acme-Signature".into()
            })
        );

        let v = verifier(Scheme::HmacSha256, std::slice::from_ref(&secret));
        h.insert("x-signature".to_string(), hex(&sig));
        assert_eq!(run(&v, &h, body, SystemTime::UNIX_EPOCH), Ok(()));
    }

    #[test]
    fn any_rotated_secret_passes() {
        for scheme in ALL_SCHEMES {
            let secrets: Vec<String> = ["old-secret", "new-secret"]
                .iter()
                .map(|s| secret_for(scheme, s))
                .collect();
            let v = verifier(scheme, &secrets);
            for secret in &secrets {
                let s = sign(scheme, secret, b"body", 1_700_000_000, None);
                assert_eq!(run(&v, &s.headers, &s.body, at_secs(1_700_000_000)), Ok(()));
            }
            let other = secret_for(scheme, "unknown-secret");
            let s = sign(scheme, &other, b"body", 1_700_000_000, None);
            assert_eq!(
                run(&v, &s.headers, &s.body, at_secs(1_700_000_000)),
                Err(SignatureError::Mismatch)
            );
        }
    }

    #[test]
    fn missing_headers_are_named() {
        let expected = [
            (Scheme::Github, "X-Hub-Signature-256"),
            (Scheme::Linear, "Linear-Signature"),
            (Scheme::Stripe, "Stripe-Signature"),
            (Scheme::Slack, "X-Slack-Signature"),
            (Scheme::Standard, "webhook-id"),
            (Scheme::HmacSha256, "X-Signature"),
        ];
        for (scheme, name) in expected {
            let v = verifier(scheme, &[secret_for(scheme, "s")]);
            let err = v
                .verify(&|_| None, b"", SystemTime::now())
                .expect_err("no headers");
            assert_eq!(
                err,
                SignatureError::Missing {
                    header: name.into()
                }
            );
            let blank = v.verify(&|_| Some("  ".into()), b"", SystemTime::now());
            assert_eq!(
                blank,
                Err(SignatureError::Malformed {
                    header: name.into()
                })
            );
        }
    }

    #[test]
    fn headers_are_requested_in_lower_case() {
        for scheme in ALL_SCHEMES {
            let v = verifier(scheme, &[secret_for(scheme, "s")]);
            let asked = std::cell::RefCell::new(Vec::new());
            let _ = v.verify(
                &|name: &str| {
                    asked.borrow_mut().push(name.to_owned());
                    Some("x".into())
                },
                b"",
                SystemTime::now(),
            );
            for name in asked.borrow().iter() {
                assert_eq!(name, &name.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn errors_never_echo_the_expected_signature() {
        let secret = "topsecret".to_string();
        let v = verifier(Scheme::Github, std::slice::from_ref(&secret));
        let expected = hex(&mac(secret.as_bytes(), &[b"body"]));
        for value in [
            "sha256=00",
            "nonsense",
            &format!("sha256={}", hex(&[1u8; 32])),
        ] {
            let mut h = HashMap::new();
            h.insert("x-hub-signature-256".to_string(), value.to_string());
            let err = run(&v, &h, b"body", SystemTime::now()).expect_err("refused");
            let msg = err.to_string();
            assert!(!msg.contains(&expected) && !msg.contains(&secret), "{msg}");
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let v = verifier(Scheme::Github, &["hunter2-very-secret".into()]);
        let shown = format!("{v:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("secrets: 1"), "{shown}");
    }

    #[test]
    fn config_deserializes_one_or_many() {
        let one: SignatureConfig =
            serde_json::from_str(r#"{"scheme":"github","secret_env":"GH"}"#).expect("one");
        assert_eq!(one.secret_env, Some(OneOrMany::One("GH".into())));
        let many: SignatureConfig = serde_json::from_str(
            r#"{"scheme":"hmac-sha256","secret_file":["/a","/b"],"encoding":"base64","header":"X-Sig","prefix":"sha256=","tolerance":"1s"}"#,
        )
        .expect("many");
        assert_eq!(
            many.secret_file.as_ref().map(|f| f.as_slice().len()),
            Some(2)
        );
        assert_eq!(many.encoding, Some(Encoding::Base64));
        for (name, scheme) in [
            ("github", Scheme::Github),
            ("linear", Scheme::Linear),
            ("stripe", Scheme::Stripe),
            ("slack", Scheme::Slack),
            ("standard", Scheme::Standard),
            ("hmac-sha256", Scheme::HmacSha256),
        ] {
            let cfg: SignatureConfig =
                serde_json::from_str(&format!(r#"{{"scheme":"{name}"}}"#)).expect(name);
            assert_eq!(cfg.scheme, scheme);
            assert_eq!(scheme.to_string(), name);
        }
        for bad in [
            r#"{"scheme":"GitHub"}"#,
            r#"{"scheme":"hmac_sha256"}"#,
            r#"{"scheme":"github","secret":"inline"}"#,
            r#"{"scheme":"github","secret_env":1}"#,
            r#"{"scheme":"hmac-sha256","encoding":"HEX"}"#,
        ] {
            assert!(
                serde_json::from_str::<SignatureConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_source_not_the_secret() {
        let env = |name: &str| match name {
            "EMPTY" => Some(String::new()),
            "NOT_BASE64" => Some("whsec_!!!sekrit!!!".to_string()),
            "OK" => Some("value".to_string()),
            _ => None,
        };
        let mut cfg = config(Scheme::Github, &["OK", "ABSENT"]);
        let err = cfg.build(&env).expect_err("absent").to_string();
        assert!(err.contains("`ABSENT`"), "{err}");

        cfg.secret_env = Some(OneOrMany::One("EMPTY".into()));
        let err = cfg.build(&env).expect_err("empty").to_string();
        assert!(err.contains("`EMPTY`") && err.contains("empty"), "{err}");

        cfg.secret_env = None;
        let err = cfg.build(&env).expect_err("none");
        assert!(
            matches!(err, SignatureConfigError::NoSecret { .. }),
            "{err}"
        );
        cfg.secret_env = Some(OneOrMany::Many(Vec::new()));
        assert!(matches!(
            cfg.build(&env),
            Err(SignatureConfigError::NoSecret { .. })
        ));

        let mut std_cfg = config(Scheme::Standard, &["NOT_BASE64"]);
        let err = std_cfg.build(&env).expect_err("bad base64").to_string();
        assert!(
            err.contains("`NOT_BASE64`") && !err.contains("sekrit"),
            "{err}"
        );
        std_cfg.secret_env = Some(OneOrMany::One("OK".into()));
        assert!(
            std_cfg.build(&env).is_err(),
            "`value` is not base64 of a key"
        );

        let missing = PathBuf::from("/nonexistent/tickgate/secret");
        cfg.secret_env = None;
        cfg.secret_file = Some(OneOrMany::One(missing));
        let err = cfg.build(&env).expect_err("unreadable").to_string();
        assert!(err.contains("/nonexistent/tickgate/secret"), "{err}");

        let empty = temp_file(b"\n\r\n");
        cfg.secret_file = Some(OneOrMany::One(empty.clone()));
        let err = cfg.build(&env).expect_err("empty file").to_string();
        assert!(err.contains(&empty.display().to_string()), "{err}");
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn secret_files_are_trimmed_and_combined_with_env() {
        let file = temp_file(b"It's a Secret to Everybody\r\n");
        let mut cfg = config(Scheme::Github, &["OTHER"]);
        cfg.secret_file = Some(OneOrMany::Many(vec![file.clone()]));
        let v = cfg.build(&|_| Some("other-secret".into())).expect("builds");
        let _ = std::fs::remove_file(file);
        let mut h = HashMap::new();
        h.insert(
            "x-hub-signature-256".to_string(),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".to_string(),
        );
        assert_eq!(run(&v, &h, b"Hello, World!", SystemTime::now()), Ok(()));
    }

    #[test]
    fn tolerance_and_option_validation() {
        let env = |_: &str| Some("s".to_string());
        let mut cfg = config(Scheme::Stripe, &["S"]);
        for bad in ["", "soon", "0s", "-5s"] {
            cfg.tolerance = Some(bad.into());
            let err = cfg.build(&env).expect_err(bad);
            assert!(
                matches!(err, SignatureConfigError::BadTolerance { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("`tolerance`"), "{err}");
        }
        cfg.tolerance = Some("10s".into());
        let v = cfg.build(&env).expect("10s");
        assert_eq!(v.tolerance, Duration::from_secs(10));

        let mut gh = config(Scheme::Github, &["S"]);
        gh.tolerance = Some("10s".into());
        assert!(matches!(
            gh.build(&env),
            Err(SignatureConfigError::UnsupportedOption {
                key: "tolerance",
                ..
            })
        ));
        for (key, set) in [
            (
                "header",
                (|c: &mut SignatureConfig| c.header = Some("X".into())) as fn(&mut SignatureConfig),
            ),
            ("encoding", |c| c.encoding = Some(Encoding::Hex)),
            ("prefix", |c| c.prefix = Some("p=".into())),
        ] {
            let mut c = config(Scheme::Slack, &["S"]);
            set(&mut c);
            let err = c.build(&env).expect_err(key).to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains("`slack`"),
                "{err}"
            );
        }

        let mut generic = config(Scheme::HmacSha256, &["S"]);
        for bad in ["", "X Signature", "X-Sig:", "Ünïcode"] {
            generic.header = Some(bad.into());
            assert!(
                matches!(
                    generic.build(&env),
                    Err(SignatureConfigError::BadHeaderName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn times_before_epoch_and_far_future_are_refused() {
        for scheme in [Scheme::Stripe, Scheme::Slack, Scheme::Standard] {
            let secret = secret_for(scheme, "k");
            let v = verifier(scheme, std::slice::from_ref(&secret));
            let s = sign(scheme, &secret, b"b", u64::MAX / 1000, None);
            assert_eq!(
                run(&v, &s.headers, &s.body, at_secs(1_700_000_000)),
                Err(SignatureError::OutsideTolerance)
            );
            let s = sign(scheme, &secret, b"b", 0, None);
            let before_epoch = UNIX_EPOCH - Duration::from_secs(1_000_000);
            assert_eq!(
                run(&v, &s.headers, &s.body, before_epoch),
                Err(SignatureError::OutsideTolerance)
            );
            let s = sign(scheme, &secret, b"b", u64::MAX, None);
            assert!(run(&v, &s.headers, &s.body, at_secs(0)).is_err());
        }
    }

    fn scheme_strategy() -> impl Strategy<Value = Scheme> {
        proptest::sample::select(ALL_SCHEMES.to_vec())
    }

    fn verifiers_for_fuzz() -> Vec<Verifier> {
        let mut out: Vec<Verifier> = ALL_SCHEMES
            .iter()
            .map(|s| verifier(*s, &[secret_for(*s, "fuzz-secret")]))
            .collect();
        let mut cfg = config(Scheme::HmacSha256, &["SECRET_0"]);
        cfg.encoding = Some(Encoding::Base64);
        cfg.prefix = Some("sha256=".into());
        out.push(build_with(&cfg, &["fuzz-secret".into()]));
        out
    }

    const HEADER_NAMES: [&str; 9] = [
        "x-hub-signature-256",
        "linear-signature",
        "stripe-signature",
        "x-slack-signature",
        "x-slack-request-timestamp",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "x-signature",
    ];

    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[tv01=,. a-fA-F0-9]{0,100}",
            "(sha256=|v0=|v1,|t=)?[0-9a-f]{60,68}",
            "[0-9]{0,22}",
            "(v1,[A-Za-z0-9+/=]{40,48} ?){0,3}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verify_never_panics(
            values in proptest::collection::vec(proptest::option::of(header_value()), HEADER_NAMES.len()),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            now_secs in any::<u64>(),
            before_epoch in any::<bool>(),
        ) {
            let headers: HashMap<String, String> = HEADER_NAMES
                .iter()
                .zip(values)
                .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
                .collect();
            let offset = Duration::from_secs(now_secs);
            let now = if before_epoch { UNIX_EPOCH.checked_sub(offset) } else { UNIX_EPOCH.checked_add(offset) }
                .unwrap_or(UNIX_EPOCH);
            for v in verifiers_for_fuzz() {
                let _ = run(&v, &headers, &body, now);
            }
        }

        #[test]
        fn signed_bodies_verify(
            scheme in scheme_strategy(),
            seeds in proptest::collection::vec("[ -~]{1,40}", 1..4),
            signer in any::<prop::sample::Index>(),
            body in proptest::collection::vec(any::<u8>(), 0..512),
            now_secs in 1_000_000u64..4_000_000_000,
            skew in -59i64..=59,
        ) {
            let secrets: Vec<String> = seeds.iter().map(|s| secret_for(scheme, s)).collect();
            let v = verifier(scheme, &secrets);
            let ts = now_secs.saturating_add_signed(skew);
            let s = sign(scheme, signer.get(&secrets).as_str(), &body, ts, None);
            prop_assert_eq!(run(&v, &s.headers, &s.body, at_secs(now_secs)), Ok(()));
        }

        #[test]
        fn flipped_body_byte_fails(
            scheme in scheme_strategy(),
            seed in "[ -~]{1,40}",
            body in proptest::collection::vec(any::<u8>(), 1..256),
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let secret = secret_for(scheme, &seed);
            let v = verifier(scheme, std::slice::from_ref(&secret));
            let mut s = sign(scheme, &secret, &body, 1_700_000_000, None);
            let i = at.index(s.body.len());
            if let Some(b) = s.body.get_mut(i) {
                *b ^= mask;
            }
            prop_assert!(run(&v, &s.headers, &s.body, at_secs(1_700_000_000)).is_err());
        }

        #[test]
        fn flipped_signature_byte_fails(
            scheme in scheme_strategy(),
            seed in "[ -~]{1,40}",
            body in proptest::collection::vec(any::<u8>(), 0..256),
            at in 0usize..MAC_LEN,
            mask in 1u8..=255,
        ) {
            let secret = secret_for(scheme, &seed);
            let v = verifier(scheme, std::slice::from_ref(&secret));
            let s = sign(scheme, &secret, &body, 1_700_000_000, Some((at, mask)));
            prop_assert_eq!(
                run(&v, &s.headers, &s.body, at_secs(1_700_000_000)),
                Err(SignatureError::Mismatch)
            );
        }

        #[test]
        fn outside_tolerance_is_refused(
            scheme in proptest::sample::select(vec![Scheme::Stripe, Scheme::Slack, Scheme::Standard, Scheme::Linear]),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            now_secs in 1_000_000u64..4_000_000_000,
            excess in 1u64..1_000_000,
            future in any::<bool>(),
        ) {
            let secret = secret_for(scheme, "k");
            let v = verifier(scheme, std::slice::from_ref(&secret));
            let window = if scheme == Scheme::Linear { 60 } else { 300 };
            let ts = if future { now_secs + window + excess } else { now_secs - window - excess };
            let s = sign(scheme, &secret, &body, ts, None);
            prop_assert_eq!(
                run(&v, &s.headers, &s.body, at_secs(now_secs)),
                Err(SignatureError::OutsideTolerance)
            );
        }

        #[test]
        fn stripe_parser_survives_soup(value in prop_oneof![any::<String>(), "[tv01=, a-f0-9]{0,200}"]) {
            if let Some(parsed) = parse_stripe(&value) {
                prop_assert!(!parsed.v1.is_empty());
                prop_assert!(parsed.t.bytes().all(|b| b.is_ascii_digit()));
            }
            let v = verifier(Scheme::Stripe, &["k".into()]);
            let mut h = HashMap::new();
            h.insert("stripe-signature".to_string(), value);
            let outcome = run(&v, &h, b"{}", at_secs(1_700_000_000));
            prop_assert!(outcome.is_err());
        }
    }
}
