//! A small OpenID Connect provider for the tests, over real HTTPS with
//! its own local CA: discovery, JWKS with rotating keys, authorize (auto-
//! approves the configured person and redirects with a code), token
//! (`authorization_code` with the PKCE check, `refresh_token`, device
//! code) and device authorization (RFC 8628).
//!
//! Keys: ES256 keys made by ring (rotated with [`Idp::rotate`]), and one
//! RS256 key from `tests/fixtures/idp/rsa-2048.pem` (ring cannot make RSA
//! keys). [`Idp::mint`] signs anything, so tests can make every bad
//! token a provider could hand out or an attacker could forge.
//!
//! Threads, one per connection, keep-alive; not fast, not for anything
//! but tests.
#![allow(dead_code)]

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const CLIENT_ID: &str = "uplink-hub";

/// A signing key of the provider.
pub enum Key {
    Ec { kid: String, pair: EcdsaKeyPair },
    Rsa { kid: String, pair: RsaKeyPair },
}

impl Key {
    pub fn new_ec(kid: &str) -> Key {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        Key::Ec { kid: kid.into(), pair }
    }

    /// The fixed RSA key of `tests/fixtures/idp/rsa-2048.pem`.
    pub fn fixture_rsa(kid: &str) -> Key {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject as _;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/idp/rsa-2048.pem");
        let der = PrivateKeyDer::from_pem_file(path).expect("RSA fixture");
        let PrivateKeyDer::Pkcs8(p8) = der else { panic!("the RSA fixture is PKCS#8") };
        Key::Rsa { kid: kid.into(), pair: RsaKeyPair::from_pkcs8(p8.secret_pkcs8_der()).expect("RSA key") }
    }

    pub fn kid(&self) -> &str {
        match self {
            Key::Ec { kid, .. } | Key::Rsa { kid, .. } => kid,
        }
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Key::Ec { .. } => "ES256",
            Key::Rsa { .. } => "RS256",
        }
    }

    pub fn jwk(&self) -> Value {
        match self {
            Key::Ec { kid, pair } => {
                let p = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                       "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
            }
            Key::Rsa { kid, pair } => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                       "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
            }
        }
    }

    /// A compact JWS of `header` (alg and kid filled in unless given) and `claims`.
    pub fn sign(&self, mut header: Value, claims: &Value) -> String {
        if header.get("alg").is_none() {
            header["alg"] = json!(self.alg());
        }
        if header.get("kid").is_none() {
            header["kid"] = json!(self.kid());
        }
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let rng = SystemRandom::new();
        let sig = match self {
            Key::Ec { pair, .. } => pair.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Key::Rsa { pair, .. } => {
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig).unwrap();
                sig
            }
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// The person the provider signs in (auto-approved).
#[derive(Clone, Debug)]
pub struct Person {
    pub sub: String,
    pub email: String,
    pub groups: Vec<String>,
}

struct Grant {
    person: Person,
    nonce: Option<String>,
    challenge: Option<String>,
    redirect_uri: String,
}

#[derive(Default)]
struct State {
    /// Published in the JWKS, in order; the last signs new tokens.
    keys: Vec<Arc<Key>>,
    person: Option<Person>,
    codes: HashMap<String, Grant>,
    refresh: HashMap<String, Person>,
    /// device code → (person, polls so far)
    devices: HashMap<String, (Person, u32)>,
    /// If set, ID tokens from the code exchange carry this nonce instead
    /// of the one the client sent (a replayed token).
    forced_nonce: Option<String>,
    /// ID token lifetime in seconds.
    lifetime: i64,
    jwks_fetches: u32,
    next_kid: u32,
    /// (grant_type, ok) of every token request.
    token_requests: Vec<(String, bool)>,
}

/// A running provider. Stops serving when dropped (its port closes with
/// the process; threads are detached).
pub struct Idp {
    pub addr: SocketAddr,
    pub ca_pem: String,
    state: Arc<Mutex<State>>,
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn random(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

fn tls() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test-idp-ca");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let mut sp = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "test-idp");
    let key = KeyPair::generate().unwrap();
    let cert = sp.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), cfg)
}

impl Idp {
    /// Starts on `127.0.0.1:0` with one ES256 key (`k1`) and the fixture
    /// RSA key (`rsa-1`) published; `k1` signs.
    pub fn start(person: Person) -> Idp {
        let (ca_pem, cfg) = tls();
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            keys: vec![Arc::new(Key::fixture_rsa("rsa-1")), Arc::new(Key::new_ec("k1"))],
            person: Some(person),
            lifetime: 300,
            next_kid: 2,
            ..State::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for sock in listener.incoming().flatten() {
                let (st, cfg) = (st.clone(), cfg.clone());
                std::thread::spawn(move || serve(sock, cfg, st, addr));
            }
        });
        Idp { addr, ca_pem, state }
    }

    /// `https://127.0.0.1:PORT`, the issuer.
    pub fn issuer(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Adds a new ES256 key, which signs from now on; the old keys stay
    /// published. Returns the new kid.
    pub fn rotate(&self) -> String {
        let mut s = self.state.lock().unwrap();
        let kid = format!("k{}", s.next_kid);
        s.next_kid += 1;
        s.keys.push(Arc::new(Key::new_ec(&kid)));
        kid
    }

    /// Stops publishing a key.
    pub fn remove_key(&self, kid: &str) {
        self.state.lock().unwrap().keys.retain(|k| k.kid() != kid);
    }

    /// The published key `kid`.
    pub fn key(&self, kid: &str) -> Arc<Key> {
        self.state.lock().unwrap().keys.iter().find(|k| k.kid() == kid).cloned().expect("no such key")
    }

    /// The key that signs now.
    pub fn current_key(&self) -> Arc<Key> {
        self.state.lock().unwrap().keys.last().cloned().unwrap()
    }

    pub fn set_person(&self, p: Person) {
        self.state.lock().unwrap().person = Some(p);
    }

    /// ID tokens issued from now on live `secs` seconds.
    pub fn set_lifetime(&self, secs: i64) {
        self.state.lock().unwrap().lifetime = secs;
    }

    pub fn force_nonce(&self, nonce: Option<&str>) {
        self.state.lock().unwrap().forced_nonce = nonce.map(str::to_string);
    }

    pub fn jwks_fetches(&self) -> u32 {
        self.state.lock().unwrap().jwks_fetches
    }

    pub fn token_requests(&self) -> Vec<(String, bool)> {
        self.state.lock().unwrap().token_requests.clone()
    }

    /// The claims of a good ID token for `p`.
    pub fn claims(&self, p: &Person, nonce: Option<&str>) -> Value {
        let lifetime = self.state.lock().unwrap().lifetime;
        let t = now();
        let mut c = json!({
            "iss": self.issuer(), "sub": p.sub, "aud": CLIENT_ID, "iat": t, "exp": t + lifetime,
            "email": p.email, "email_verified": true, "groups": p.groups,
        });
        if let Some(n) = nonce {
            c["nonce"] = json!(n);
        }
        c
    }

    /// A good ID token for `p` from the current key.
    pub fn id_token(&self, p: &Person) -> String {
        self.current_key().sign(json!({"typ": "JWT"}), &self.claims(p, None))
    }

    /// Signs `claims` with `key` under `header` (alg/kid filled in unless given).
    pub fn mint(&self, key: &Key, header: Value, claims: &Value) -> String {
        key.sign(header, claims)
    }
}

fn issue(st: &mut State, issuer: &str, p: &Person, nonce: Option<&str>) -> Value {
    let t = now();
    let mut claims = json!({
        "iss": issuer, "sub": p.sub, "aud": CLIENT_ID, "iat": t, "exp": t + st.lifetime,
        "email": p.email, "email_verified": true, "groups": p.groups,
    });
    if let Some(n) = nonce {
        claims["nonce"] = json!(n);
    }
    let id_token = st.keys.last().unwrap().sign(json!({"typ": "JWT"}), &claims);
    let refresh = random(24);
    st.refresh.insert(refresh.clone(), p.clone());
    json!({"access_token": random(24), "token_type": "Bearer", "expires_in": st.lifetime,
           "id_token": id_token, "refresh_token": refresh})
}

fn form(body: &[u8]) -> HashMap<String, String> {
    let dec = |s: &str| uplink::http::percent_decode(&s.replace('+', " "));
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

fn oauth_error(code: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    (400, vec![("Content-Type".into(), "application/json".into())], json!({"error": code}).to_string().into_bytes())
}

fn json_ok(v: Value) -> (u16, Vec<(String, String)>, Vec<u8>) {
    (200, vec![("Content-Type".into(), "application/json".into())], v.to_string().into_bytes())
}

fn route(
    st: &Mutex<State>,
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let issuer = format!("https://{addr}");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut s = st.lock().unwrap();
    match (method, path) {
        ("GET", "/.well-known/openid-configuration") => json_ok(json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "device_authorization_endpoint": format!("{issuer}/device"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        })),
        ("GET", "/jwks") => {
            s.jwks_fetches += 1;
            json_ok(json!({ "keys": s.keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }))
        }
        ("GET", "/authorize") => {
            let q = form(query.as_bytes());
            let get = |k: &str| q.get(k).cloned().unwrap_or_default();
            if get("client_id") != CLIENT_ID || get("response_type") != "code" {
                return (400, vec![], b"bad client or response_type".to_vec());
            }
            if get("code_challenge_method") != "S256" {
                return (400, vec![], b"PKCE S256 required".to_vec());
            }
            let Some(person) = s.person.clone() else { return (403, vec![], b"nobody to sign in".to_vec()) };
            let code = random(24);
            let redirect_uri = get("redirect_uri");
            s.codes.insert(
                code.clone(),
                Grant {
                    person,
                    nonce: q.get("nonce").cloned(),
                    challenge: q.get("code_challenge").cloned(),
                    redirect_uri: redirect_uri.clone(),
                },
            );
            let enc = uplink::http::percent_encode;
            let location = format!("{redirect_uri}?code={}&state={}", enc(&code), enc(&get("state")));
            (302, vec![("Location".into(), location)], Vec::new())
        }
        ("POST", "/device") => {
            let f = form(body);
            if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return oauth_error("invalid_client");
            }
            let Some(person) = s.person.clone() else { return oauth_error("access_denied") };
            let code = random(24);
            s.devices.insert(code.clone(), (person, 0));
            json_ok(json!({
                "device_code": code, "user_code": "WDJB-MJHT",
                "verification_uri": format!("{issuer}/activate"),
                "verification_uri_complete": format!("{issuer}/activate?user_code=WDJB-MJHT"),
                "expires_in": 600, "interval": 1,
            }))
        }
        ("POST", "/token") => {
            let f = form(body);
            let grant = f.get("grant_type").cloned().unwrap_or_default();
            // Public client: client_id in the form; confidential: Basic.
            let basic = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("authorization")).map(|(_, v)| v.clone());
            let client_ok = f.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                || basic.is_some_and(|b| {
                    b.strip_prefix("Basic ")
                        .and_then(|x| STANDARD.decode(x).ok())
                        .is_some_and(|d| d.starts_with(format!("{CLIENT_ID}:").as_bytes()))
                });
            let answer = if !client_ok {
                oauth_error("invalid_client")
            } else {
                match grant.as_str() {
                    "authorization_code" => match s.codes.remove(f.get("code").map(String::as_str).unwrap_or("")) {
                        None => oauth_error("invalid_grant"),
                        Some(g) if Some(&g.redirect_uri) != f.get("redirect_uri") => oauth_error("invalid_grant"),
                        Some(g) => {
                            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
                            let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
                            if g.challenge.as_deref() != Some(&URL_SAFE_NO_PAD.encode(digest.as_ref())) {
                                oauth_error("invalid_grant")
                            } else {
                                let nonce = s.forced_nonce.clone().or(g.nonce);
                                json_ok(issue(&mut s, &issuer, &g.person, nonce.as_deref()))
                            }
                        }
                    },
                    "refresh_token" => match s.refresh.remove(f.get("refresh_token").map(String::as_str).unwrap_or(""))
                    {
                        None => oauth_error("invalid_grant"),
                        Some(p) => json_ok(issue(&mut s, &issuer, &p, None)),
                    },
                    "urn:ietf:params:oauth:grant-type:device_code" => {
                        let code = f.get("device_code").cloned().unwrap_or_default();
                        match s.devices.get_mut(&code) {
                            None => oauth_error("expired_token"),
                            // The person approves after the first poll.
                            Some((_, polls)) if *polls == 0 => {
                                *polls += 1;
                                oauth_error("authorization_pending")
                            }
                            Some(_) => {
                                let (p, _) = s.devices.remove(&code).unwrap();
                                json_ok(issue(&mut s, &issuer, &p, None))
                            }
                        }
                    }
                    _ => oauth_error("unsupported_grant_type"),
                }
            };
            s.token_requests.push((grant, answer.0 == 200));
            answer
        }
        _ => (404, vec![], b"not found".to_vec()),
    }
}

fn serve(sock: TcpStream, cfg: Arc<rustls::ServerConfig>, st: Arc<Mutex<State>>, addr: SocketAddr) {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read a head.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut fields);
        if !matches!(req.parse(&buf[..head_end]), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let method = req.method.unwrap_or("").to_string();
        let target = req.path.unwrap_or("").to_string();
        let headers: Vec<(String, String)> =
            req.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
        let find = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
        let len: usize = find("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        let close = find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        buf.drain(..head_end);
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match tls.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let (status, mut hdrs, out) = route(&st, addr, &method, &target, &headers, &body);
        hdrs.push(("Content-Length".into(), out.len().to_string()));
        hdrs.push(("Cache-Control".into(), "no-store".into()));
        if close {
            hdrs.push(("Connection".into(), "close".into()));
        }
        let mut msg = format!("HTTP/1.1 {status} X\r\n");
        for (n, v) in hdrs {
            msg.push_str(&format!("{n}: {v}\r\n"));
        }
        msg.push_str("\r\n");
        let mut bytes = msg.into_bytes();
        bytes.extend_from_slice(&out);
        if tls.write_all(&bytes).and_then(|_| tls.flush()).is_err() || close {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return;
        }
    }
}
