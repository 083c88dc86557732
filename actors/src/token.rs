//! Webhook tokens: the secret part of an agent's URL. Only their SHA-256 digests are kept, in the
//! store and in memory, so a leaked store or heap dump does not hand out working URLs.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The shortest token accepted from `token_env`; shorter ones are guessable.
pub const MIN_PINNED_LEN: usize = 32;

/// A fresh token: 256 bits from the OS CSPRNG, URL-safe base64 without padding (43 characters).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the OS random source is unavailable");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored and compared form of a token.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_url_safe_chars_and_unique() {
        let a = generate();
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(a, generate());
        assert_eq!(digest(&a), digest(&a));
    }
}
