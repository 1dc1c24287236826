//! ID token verification: the JOSE subset an OpenID Connect relying party
//! needs (JWS compact serialization, RS256 and ES256, JWK sets), written
//! on ring, serde_json and base64 rather than a general JOSE crate.
//!
//! ```text
//!  token ─► split (3 parts) ─► header: alg allowed? never `none`; kid
//!        ─► key: the JWK named by kid (kty/crv/alg must fit alg)
//!        ─► signature over `header.payload` (ring)
//!        ─► claims: iss, aud (+ azp), exp, nbf, iat (± skew), nonce
//! ```
//!
//! Pure: keys, expectations and the current time come in; a verified
//! claim set or a precise [`TokenError`] comes out. No I/O, no clock.
//!
//! Not here: fetching keys or mapping claims to a person (both [`super`]),
//! encryption (JWE) or any algorithm beyond RS256/ES256.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const SKEW_SECS: i64 = 60;
/// Longest token accepted; real ID tokens are a few KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A signature algorithm the hub can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 §3.3), 2048–8192-bit keys.
    Rs256,
    /// ECDSA P-256 with SHA-256 (RFC 7518 §3.4), signature `r || s`.
    Es256,
}

impl Alg {
    /// `RS256`, `ES256`; anything else (`none` included) is `None`.
    pub fn parse(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// Why a token was refused. Each says what was wrong, never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts with JSON header and payload.
    Malformed(&'static str),
    /// `alg: none`: an unsigned token is never accepted.
    AlgNone,
    /// An algorithm the hub was not configured to accept.
    AlgNotAllowed(String),
    /// No key with this `kid` (or, without a `kid`, no key fits) in the
    /// provider's key set, even after fetching it again.
    UnknownKey(Option<String>),
    /// The signature does not verify with the named key.
    BadSignature,
    /// `iss` is not the configured issuer.
    WrongIssuer(String),
    /// `aud` does not contain the hub's client id.
    WrongAudience,
    /// Several audiences and `azp` is absent or another client.
    WrongAuthorizedParty,
    /// `exp` (seconds) is past, beyond the skew.
    Expired { exp: i64, now: i64 },
    /// `nbf` (seconds) is ahead, beyond the skew.
    NotYetValid { nbf: i64, now: i64 },
    /// `iat` (seconds) is ahead, beyond the skew.
    IssuedInFuture { iat: i64, now: i64 },
    /// A required claim (`iss`, `aud`, `exp`, `iat`, `sub`) is missing or
    /// has the wrong type.
    MissingClaim(&'static str),
    /// The browser flow's nonce does not match the one the hub sent.
    WrongNonce,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "the ID token is malformed: {why}"),
            TokenError::AlgNone => f.write_str("the ID token is unsigned (alg none); it is never accepted"),
            TokenError::AlgNotAllowed(a) => write!(f, "the ID token's algorithm {a:?} is not allowed on this hub"),
            TokenError::UnknownKey(Some(kid)) => {
                write!(f, "the ID token names key {kid:?}, which is not in the identity provider's key set")
            }
            TokenError::UnknownKey(None) => {
                f.write_str("the ID token names no key and no key of the identity provider fits it")
            }
            TokenError::BadSignature => f.write_str("the ID token's signature does not verify"),
            TokenError::WrongIssuer(iss) => write!(f, "the ID token was issued by {iss:?}, not this hub's provider"),
            TokenError::WrongAudience => f.write_str("the ID token is not meant for this hub (audience)"),
            TokenError::WrongAuthorizedParty => {
                f.write_str("the ID token has several audiences and was not issued to this hub (azp)")
            }
            TokenError::Expired { exp, now } => {
                write!(f, "the ID token expired {}s ago; sign in again", now - exp)
            }
            TokenError::NotYetValid { nbf, now } => write!(f, "the ID token is not valid for another {}s", nbf - now),
            TokenError::IssuedInFuture { iat, now } => {
                write!(f, "the ID token is issued {}s in the future; check the clocks", iat - now)
            }
            TokenError::MissingClaim(c) => write!(f, "the ID token lacks the claim {c:?}"),
            TokenError::WrongNonce => f.write_str("the ID token's nonce does not match this sign-in (replayed?)"),
        }
    }
}

impl std::error::Error for TokenError {}

/// One public key of the provider (RFC 7517), kept decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The `alg` member, if the provider pins one.
    pub alg: Option<String>,
    pub key: PublicKey,
}

#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// Modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// P-256 point, uncompressed (`04 || x || y`).
    P256(Vec<u8>),
}

impl fmt::Debug for Jwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.key {
            PublicKey::Rsa { .. } => "RSA",
            PublicKey::P256(_) => "EC P-256",
        };
        write!(f, "Jwk({kind}, kid={:?})", self.kid)
    }
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parses a JWK set. Keys the hub cannot use (encryption keys, other key
/// types or curves) are skipped, not errors: providers publish them.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("the JWKS is not a JWK set: {e}"))?;
    let b64 = |s: &Option<String>| s.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    let mut keys = Vec::new();
    for raw in set.keys {
        let Ok(k) = serde_json::from_value::<RawJwk>(raw) else { continue };
        if k.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => match (b64(&k.n), b64(&k.e)) {
                (Some(n), Some(e)) => PublicKey::Rsa { n, e },
                _ => continue,
            },
            ("EC", Some("P-256")) => match (b64(&k.x), b64(&k.y)) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    let mut point = vec![4u8];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    PublicKey::P256(point)
                }
                _ => continue,
            },
            _ => continue,
        };
        keys.push(Jwk { kid: k.kid, alg: k.alg, key });
    }
    Ok(keys)
}

/// What the hub expects of an ID token.
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub algorithms: &'a [Alg],
    /// The browser flow's nonce; `None` for bearer tokens (kubectl).
    pub nonce: Option<&'a str>,
    /// Unix seconds.
    pub now: i64,
}

/// A token's header, read before any key is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

/// The three parts of a compact JWS, decoded.
struct Parts {
    header: Header,
    claims: Map<String, Value>,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn split(token: &str) -> Result<Parts, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("longer than 16 KiB"));
    }
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(TokenError::Malformed("not three dot-separated parts"));
    };
    let dec = |part: &str, what| URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed(what));
    let header: Value = serde_json::from_slice(&dec(h, "header is not base64url")?)
        .map_err(|_| TokenError::Malformed("header is not JSON"))?;
    let alg = header.get("alg").and_then(Value::as_str).ok_or(TokenError::Malformed("header has no alg"))?;
    let kid = header.get("kid").and_then(Value::as_str).map(str::to_string);
    let claims = match serde_json::from_slice(&dec(p, "payload is not base64url")?) {
        Ok(Value::Object(m)) => m,
        _ => return Err(TokenError::Malformed("payload is not a JSON object")),
    };
    Ok(Parts {
        header: Header { alg: alg.to_string(), kid },
        claims,
        signed: token.as_bytes()[..h.len() + 1 + p.len()].to_vec(),
        signature: dec(s, "signature is not base64url")?,
    })
}

/// Reads a token's header without verifying anything (to see whether
/// its key is known before fetching the key set again).
pub fn peek_header(token: &str) -> Result<Header, TokenError> {
    split(token).map(|p| p.header)
}

/// Whether a bearer token is shaped like a JWS (three base64url parts),
/// as opposed to a hub token (`uh_...`).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|&b| b == b'.').count() == 2
}

/// Verifies signature and claims; returns the claims.
pub fn verify(token: &str, keys: &[Jwk], expect: &Expect<'_>) -> Result<Map<String, Value>, TokenError> {
    let parts = split(token)?;
    let alg_name = parts.header.alg.as_str();
    if alg_name.eq_ignore_ascii_case("none") {
        return Err(TokenError::AlgNone);
    }
    let alg = Alg::parse(alg_name)
        .filter(|a| expect.algorithms.contains(a))
        .ok_or_else(|| TokenError::AlgNotAllowed(alg_name.to_string()))?;
    let fits = |k: &&Jwk| {
        k.alg.as_deref().is_none_or(|a| a == alg.name())
            && matches!((&k.key, alg), (PublicKey::Rsa { .. }, Alg::Rs256) | (PublicKey::P256(_), Alg::Es256))
    };
    let candidates: Vec<&Jwk> = match &parts.header.kid {
        Some(kid) => keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).filter(fits).collect(),
        None => keys.iter().filter(fits).collect(),
    };
    if candidates.is_empty() {
        return Err(TokenError::UnknownKey(parts.header.kid.clone()));
    }
    if !candidates.iter().any(|k| signature_ok(k, alg, &parts.signed, &parts.signature)) {
        return Err(TokenError::BadSignature);
    }
    check_claims(&parts.claims, expect)?;
    Ok(parts.claims)
}

fn signature_ok(key: &Jwk, alg: Alg, signed: &[u8], sig: &[u8]) -> bool {
    use ring::signature;
    match (&key.key, alg) {
        (PublicKey::Rsa { n, e }, Alg::Rs256) => signature::RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, sig)
            .is_ok(),
        (PublicKey::P256(point), Alg::Es256) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(signed, sig).is_ok()
        }
        _ => false,
    }
}

fn check_claims(c: &Map<String, Value>, expect: &Expect<'_>) -> Result<(), TokenError> {
    let iss = c.get("iss").and_then(Value::as_str).ok_or(TokenError::MissingClaim("iss"))?;
    if iss != expect.issuer {
        return Err(TokenError::WrongIssuer(iss.to_string()));
    }
    c.get("sub").and_then(Value::as_str).ok_or(TokenError::MissingClaim("sub"))?;
    let audiences: Vec<&str> = match c.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => return Err(TokenError::MissingClaim("aud")),
    };
    if !audiences.contains(&expect.client_id) {
        return Err(TokenError::WrongAudience);
    }
    // OIDC Core §3.1.3.7 (4, 5): with several audiences the authorized
    // party must be present and be us; when present it must be us.
    let azp = c.get("azp").and_then(Value::as_str);
    if (audiences.len() > 1 && azp.is_none()) || azp.is_some_and(|a| a != expect.client_id) {
        return Err(TokenError::WrongAuthorizedParty);
    }
    let now = expect.now;
    let exp = c.get("exp").and_then(Value::as_i64).ok_or(TokenError::MissingClaim("exp"))?;
    if now > exp + SKEW_SECS {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = c.get("nbf").and_then(Value::as_i64)
        && nbf > now + SKEW_SECS
    {
        return Err(TokenError::NotYetValid { nbf, now });
    }
    let iat = c.get("iat").and_then(Value::as_i64).ok_or(TokenError::MissingClaim("iat"))?;
    if iat > now + SKEW_SECS {
        return Err(TokenError::IssuedInFuture { iat, now });
    }
    if let Some(want) = expect.nonce {
        let got = c.get("nonce").and_then(Value::as_str).unwrap_or("");
        if !crate::secret::ct_eq(got.as_bytes(), want.as_bytes()) {
            return Err(TokenError::WrongNonce);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    use serde_json::json;

    const ISS: &str = "https://idp.example.com";
    const NOW: i64 = 1_800_000_000;

    struct Signer {
        pair: EcdsaKeyPair,
        kid: String,
    }

    impl Signer {
        fn new(kid: &str) -> Signer {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
            Signer { pair, kid: kid.into() }
        }
        fn jwk(&self) -> Jwk {
            Jwk {
                kid: Some(self.kid.clone()),
                alg: Some("ES256".into()),
                key: PublicKey::P256(self.pair.public_key().as_ref().to_vec()),
            }
        }
        fn sign(&self, header: Value, claims: Value) -> String {
            let h = URL_SAFE_NO_PAD.encode(header.to_string());
            let p = URL_SAFE_NO_PAD.encode(claims.to_string());
            let sig = self.pair.sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes()).unwrap();
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
        }
        fn token(&self, claims: Value) -> String {
            self.sign(json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}), claims)
        }
    }

    fn claims() -> Value {
        json!({"iss": ISS, "sub": "42", "aud": "hub", "exp": NOW + 300, "iat": NOW - 10, "email": "a@example.com"})
    }

    fn expect(nonce: Option<&str>) -> Expect<'_> {
        Expect { issuer: ISS, client_id: "hub", algorithms: &[Alg::Es256, Alg::Rs256], nonce, now: NOW }
    }

    fn with(f: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut c = claims();
        f(c.as_object_mut().unwrap());
        c
    }

    #[test]
    fn a_good_token_verifies_and_each_bad_one_has_its_error() {
        let s = Signer::new("k1");
        let keys = [s.jwk()];
        let ok = verify(&s.token(claims()), &keys, &expect(None)).unwrap();
        assert_eq!(ok["sub"], "42");

        let cases: Vec<(Value, TokenError)> = vec![
            (with(|c| drop(c.insert("exp".into(), json!(NOW - 61)))), TokenError::Expired { exp: NOW - 61, now: NOW }),
            (
                with(|c| drop(c.insert("nbf".into(), json!(NOW + 61)))),
                TokenError::NotYetValid { nbf: NOW + 61, now: NOW },
            ),
            (
                with(|c| drop(c.insert("iat".into(), json!(NOW + 61)))),
                TokenError::IssuedInFuture { iat: NOW + 61, now: NOW },
            ),
            (with(|c| drop(c.insert("aud".into(), json!("other")))), TokenError::WrongAudience),
            (with(|c| drop(c.insert("aud".into(), json!(["other", "hub"])))), TokenError::WrongAuthorizedParty),
            (with(|c| drop(c.insert("azp".into(), json!("other")))), TokenError::WrongAuthorizedParty),
            (
                with(|c| drop(c.insert("iss".into(), json!("https://evil")))),
                TokenError::WrongIssuer("https://evil".into()),
            ),
            (with(|c| drop(c.remove("exp"))), TokenError::MissingClaim("exp")),
            (with(|c| drop(c.remove("sub"))), TokenError::MissingClaim("sub")),
        ];
        for (c, want) in cases {
            assert_eq!(verify(&s.token(c.clone()), &keys, &expect(None)), Err(want), "{c}");
        }
        // Within the skew is fine; several audiences with azp = us too.
        verify(&s.token(with(|c| drop(c.insert("exp".into(), json!(NOW - 59))))), &keys, &expect(None)).unwrap();
        let multi = with(|c| {
            c.insert("aud".into(), json!(["other", "hub"]));
            c.insert("azp".into(), json!("hub"));
        });
        verify(&s.token(multi), &keys, &expect(None)).unwrap();
    }

    #[test]
    fn unsigned_foreign_and_tampered_tokens_are_refused() {
        let s = Signer::new("k1");
        let keys = [s.jwk()];
        let h = URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string());
        let p = URL_SAFE_NO_PAD.encode(claims().to_string());
        assert_eq!(verify(&format!("{h}.{p}."), &keys, &expect(None)), Err(TokenError::AlgNone));
        let rs = s.sign(json!({"alg": "HS256", "kid": "k1"}), claims());
        assert_eq!(verify(&rs, &keys, &expect(None)), Err(TokenError::AlgNotAllowed("HS256".into())));
        let only_rs = Expect { algorithms: &[Alg::Rs256], ..expect(None) };
        assert_eq!(verify(&s.token(claims()), &keys, &only_rs), Err(TokenError::AlgNotAllowed("ES256".into())));

        let stranger = Signer::new("k2");
        assert_eq!(
            verify(&stranger.token(claims()), &keys, &expect(None)),
            Err(TokenError::UnknownKey(Some("k2".into())))
        );
        // Same kid, another key: the signature fails.
        let impostor = Signer::new("k1");
        assert_eq!(verify(&impostor.token(claims()), &keys, &expect(None)), Err(TokenError::BadSignature));
        // A changed payload under the original signature.
        let good = s.token(claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(with(|c| drop(c.insert("sub".into(), json!("0")))).to_string());
        parts[1] = &forged;
        assert_eq!(verify(&parts.join("."), &keys, &expect(None)), Err(TokenError::BadSignature));
        assert!(matches!(verify("a.b", &keys, &expect(None)), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn nonce_must_match_in_the_browser_flow() {
        let s = Signer::new("k1");
        let keys = [s.jwk()];
        let t = s.token(with(|c| drop(c.insert("nonce".into(), json!("n-1")))));
        verify(&t, &keys, &expect(Some("n-1"))).unwrap();
        assert_eq!(verify(&t, &keys, &expect(Some("n-2"))), Err(TokenError::WrongNonce));
        assert_eq!(verify(&s.token(claims()), &keys, &expect(Some("n-1"))), Err(TokenError::WrongNonce));
    }

    #[test]
    fn jwks_keeps_usable_signing_keys() {
        let body = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "a", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])},
            {"kty": "RSA", "kid": "b", "n": "AQAB", "e": "AQAB", "use": "sig"},
            {"kty": "RSA", "kid": "c", "n": "AQAB", "e": "AQAB", "use": "enc"},
            {"kty": "EC", "crv": "P-384", "kid": "d", "x": "AA", "y": "AA"},
            {"kty": "oct", "k": "c2VjcmV0"}
        ]});
        let keys = parse_jwks(body.to_string().as_bytes()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.clone().unwrap()).collect();
        assert_eq!(kids, ["a", "b"]);
        assert!(parse_jwks(b"{}").is_err());
    }
}
