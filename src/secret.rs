//! Secrets (tokens, activation codes, credentials) as a type whose `Debug`
//! and `Display` never show the value, and constant-time comparison.
//!
//! Not here: storage or hashing policy; the hub hashes what it stores.

use std::fmt;

/// A secret string. Printing it shows `<redacted>`; use [`Secret::expose`]
/// where the value must really go out (an HTTP header, a file).
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself. Every call site is a place the secret leaves.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time equality with another value.
    pub fn matches(&self, other: &str) -> bool {
        ct_eq(self.0.as_bytes(), other.as_bytes())
    }

    /// A fresh random secret: `bytes` random bytes, URL-safe base64.
    pub fn random(bytes: usize) -> Self {
        use base64::Engine as _;
        use ring::rand::SecureRandom as _;
        let mut buf = vec![0u8; bytes];
        ring::rand::SystemRandom::new().fill(&mut buf).expect("the OS random source works");
        Secret(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Hex SHA-256 of a secret: what the hub stores instead of the secret.
pub fn sha256_hex(value: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
    // By table, not `format!` per byte: the hub hashes the bearer token of
    // every request, and 32 formatter calls were a few percent of its
    // instructions per request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(<redacted>) <redacted>");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!s.matches("hunter"));
    }

    #[test]
    fn random_secrets_differ() {
        let (a, b) = (Secret::random(32), Secret::random(32));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 43);
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
