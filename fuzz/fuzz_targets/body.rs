//! Arbitrary bodies under every content type tickgate distinguishes, through `body::parse`.
//!
//! Oracles: parsing never panics; a refusal under a JSON type is always a 400-class error, never
//! "unsupported type"; an accepted JSON body's `inputs` is exactly what `serde_json` reads from the
//! same bytes (the body's text is kept, not rewritten), and a JSON body `serde_json` reads within
//! the nesting limit is accepted; an accepted form body is an object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate_fuzz::body::{parse, BodyError};

const TYPES: [Option<&str>; 6] = [
    None,
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("application/vnd.github+json"),
    Some("application/x-www-form-urlencoded"),
    Some("text/plain"),
];

fuzz_target!(|input: (u8, Vec<u8>)| {
    let (which, body) = input;
    let content_type = TYPES[which as usize % TYPES.len()];
    let blank = body.iter().all(u8::is_ascii_whitespace);
    match (content_type, parse(content_type, &body)) {
        (_, Ok(parsed)) if blank => assert_eq!(parsed.inputs.as_str(), "{}"),
        (Some("application/x-www-form-urlencoded"), Ok(parsed)) => assert!(parsed.inputs.is_object()),
        (Some("text/plain"), Ok(_)) => panic!("a text/plain body was accepted"),
        (_, Ok(parsed)) => {
            let direct: serde_json::Value =
                serde_json::from_slice(&body).expect("accepted JSON must be valid JSON");
            assert_eq!(parsed.inputs, direct);
        }
        (Some("application/x-www-form-urlencoded"), Err(e)) => {
            assert!(!matches!(e, BodyError::UnsupportedType(_)))
        }
        (Some("text/plain"), Err(e)) => assert!(matches!(e, BodyError::UnsupportedType(_))),
        (_, Err(e)) if !blank && serde_json::from_slice::<serde_json::Value>(&body).is_ok() => {
            // Refused though serde_json reads it: only for nesting past the limit.
            assert!(matches!(&e, BodyError::InvalidJson(m) if m.contains("levels deep")), "{e:?}")
        }
        (_, Err(e)) => assert!(!matches!(e, BodyError::UnsupportedType(_))),
    }
});
