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
    Sha256Hex::of(value).as_str().to_string()
}

/// [`sha256_hex`] on the stack, for a lookup that needs the hash only
/// for a moment (the hub hashes the bearer token of every request).
pub struct Sha256Hex([u8; 64]);

impl Sha256Hex {
    pub fn of(value: &str) -> Sha256Hex {
        let digest = ring::digest::digest(&ring::digest::SHA256, value.as_bytes());
        // By table, into a fixed buffer: `format!` per byte, and then a
        // `String::push` per digit (not inlined: 40 instructions each),
        // were a few percent of the hub's instructions per request.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (i, b) in digest.as_ref().iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 15) as usize];
        }
        Sha256Hex(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits were written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
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
