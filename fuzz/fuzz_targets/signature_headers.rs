//! Arbitrary headers and bodies through every scheme's `Verifier::verify`.
//!
//! Besides "never panics", two oracles:
//! - unsigned mode: the fuzzer does not know the secrets, so any `Ok` is a
//!   forgery;
//! - signed mode: the harness signs the fuzzed body (and fuzzed id) the way
//!   the provider would, which also drives execution past the MAC check into
//!   timestamp and body parsing; for schemes whose outcome is then fully
//!   determined, the result must be `Ok` inside the window and
//!   `OutsideTolerance` outside it.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use tickgate_fuzz::signature::{
    Encoding, OneOrMany, Scheme, SignatureConfig, SignatureError, Verifier,
};

const SECRETS: [&str; 2] = ["fuzz-secret-old", "fuzz-secret-new"];

const NAMES: [&str; 10] = [
    "x-hub-signature-256",
    "linear-signature",
    "stripe-signature",
    "x-slack-signature",
    "x-slack-request-timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "x-signature",
    "x-signature-b64",
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Github,
    Linear,
    Stripe,
    Slack,
    Standard,
    GenericHex,
    GenericBase64,
}

const KINDS: [Kind; 7] = [
    Kind::Github,
    Kind::Linear,
    Kind::Stripe,
    Kind::Slack,
    Kind::Standard,
    Kind::GenericHex,
    Kind::GenericBase64,
];

fn secret_text(kind: Kind, secret: &str) -> String {
    if kind == Kind::Standard {
        format!("whsec_{}", STANDARD.encode(secret))
    } else {
        secret.to_owned()
    }
}

fn build(kind: Kind) -> Verifier {
    let scheme = match kind {
        Kind::Github => Scheme::Github,
        Kind::Linear => Scheme::Linear,
        Kind::Stripe => Scheme::Stripe,
        Kind::Slack => Scheme::Slack,
        Kind::Standard => Scheme::Standard,
        Kind::GenericHex | Kind::GenericBase64 => Scheme::HmacSha256,
    };
    let base64 = kind == Kind::GenericBase64;
    let config = SignatureConfig {
        scheme,
        secret_env: Some(OneOrMany::Many(vec!["S0".into(), "S1".into()])),
        secret_file: None,
        tolerance: None,
        header: base64.then(|| "X-Signature-B64".to_owned()),
        encoding: base64.then_some(Encoding::Base64),
        prefix: base64.then(|| "sha256=".to_owned()),
    };
    let env = |name: &str| match name {
        "S0" => Some(secret_text(kind, SECRETS[0])),
        "S1" => Some(secret_text(kind, SECRETS[1])),
        _ => None,
    };
    config.build(&env).expect("fuzz verifier config is valid")
}

fn verifiers() -> &'static [(Kind, Verifier)] {
    static CELL: OnceLock<Vec<(Kind, Verifier)>> = OnceLock::new();
    CELL.get_or_init(|| KINDS.iter().map(|k| (*k, build(*k))).collect())
}

fn mac(secret: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns true when the outcome for this kind is fully determined by the
/// timestamp alone (so the oracle can check it).
fn sign(
    kind: Kind,
    secret: &str,
    headers: &mut HashMap<String, String>,
    body: &[u8],
    ts: &str,
    stripe_soup: bool,
) -> bool {
    match kind {
        Kind::Github => {
            let sig = hex(&mac(secret, &[body]));
            headers.insert(NAMES[0].into(), format!("sha256={sig}"));
            true
        }
        Kind::Linear => {
            headers.insert(NAMES[1].into(), hex(&mac(secret, &[body])));
            false
        }
        Kind::Stripe => {
            let sig = hex(&mac(secret, &[ts.as_bytes(), b".", body]));
            let mut value = format!("t={ts},v1={sig}");
            if stripe_soup {
                if let Some(extra) = headers.get(NAMES[2]) {
                    value = format!("{extra},{value}");
                }
            }
            headers.insert(NAMES[2].into(), value);
            !stripe_soup
        }
        Kind::Slack => {
            let sig = hex(&mac(secret, &[b"v0:", ts.as_bytes(), b":", body]));
            headers.insert(NAMES[3].into(), format!("v0={sig}"));
            headers.insert(NAMES[4].into(), ts.to_owned());
            true
        }
        Kind::Standard => {
            let id = headers
                .get(NAMES[5])
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "msg_fuzz".to_owned());
            let sig = mac(secret, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
            headers.insert(NAMES[5].into(), id);
            headers.insert(NAMES[6].into(), ts.to_owned());
            headers.insert(NAMES[7].into(), format!("v1,{}", STANDARD.encode(sig)));
            true
        }
        Kind::GenericHex => {
            headers.insert(NAMES[8].into(), hex(&mac(secret, &[body])));
            true
        }
        Kind::GenericBase64 => {
            let sig = STANDARD.encode(mac(secret, &[body]));
            headers.insert(NAMES[9].into(), format!("sha256={sig}"));
            true
        }
    }
}

fuzz_target!(|input: (u8, u64, i16, Vec<(u8, String)>, Vec<u8>)| {
    let (mode, now_secs, skew, raw_headers, body) = input;
    let signed = mode & 1 != 0;
    let before_epoch = !signed && mode & 2 != 0;
    let secret_index = usize::from(mode & 4 != 0);
    let stripe_soup = mode & 8 != 0;

    let offset = Duration::from_secs(now_secs);
    let now = if before_epoch {
        UNIX_EPOCH.checked_sub(offset)
    } else {
        UNIX_EPOCH.checked_add(offset)
    };
    let Some(now) = now else { return };

    let mut fuzzed: HashMap<String, String> = HashMap::new();
    for (selector, value) in raw_headers {
        let name = NAMES[usize::from(selector) % NAMES.len()];
        fuzzed.entry(name.to_owned()).or_insert(value);
    }

    let ts_value = i128::from(now_secs) + i128::from(skew);
    let ts = u64::try_from(ts_value).ok();

    for (kind, verifier) in verifiers() {
        let mut headers = fuzzed.clone();
        let mut determined = false;
        if signed {
            let ts_text = ts.map(|t| t.to_string()).unwrap_or_else(|| "0".into());
            let secret = SECRETS[secret_index];
            determined =
                sign(*kind, secret, &mut headers, &body, &ts_text, stripe_soup) && ts.is_some();
        }
        let result = verifier.verify(&|name: &str| headers.get(name).cloned(), &body, now);
        if !signed {
            assert!(result.is_err(), "unsigned request accepted: {result:?}");
        } else if determined {
            let timed = !matches!(kind, Kind::Github | Kind::GenericHex | Kind::GenericBase64);
            if !timed || i32::from(skew).abs() <= 300 {
                assert_eq!(result, Ok(()), "correctly signed request refused");
            } else {
                assert_eq!(result, Err(SignatureError::OutsideTolerance));
            }
        }
    }
});
