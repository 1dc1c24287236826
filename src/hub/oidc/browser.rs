//! The console's sign-in: OAuth 2.0 authorization code with PKCE (S256),
//! `state` and `nonce`, ending in a hub session cookie.
//!
//! ```text
//!  GET /auth/login ──► 302 provider/authorize?code_challenge=…&state=…&nonce=…
//!      sets uplink_auth (the state, HttpOnly, Lax, Path=/auth/, 10 min)
//!  provider ──► GET /auth/callback?code=…&state=…
//!      state: known, unused (removed now: single use), < 10 min old, and
//!             equal to this browser's uplink_auth cookie (no login CSRF)
//!      code ──► token endpoint (with the PKCE verifier) ──► ID token
//!      ID token verified, nonce = the one sent ──► person (store record)
//!  ◄── 303 /  sets uplink_session (random id, HttpOnly, Secure,
//!      SameSite=Strict, Path=/, 8 h); the hub keeps only its SHA-256
//!  POST /auth/logout (cookie + X-CSRF-Token) ──► session deleted
//! ```
//!
//! `SameSite=Strict` on the session: the console's HTML is static and
//! every call that needs the session is a same-origin `fetch`, so Strict
//! costs nothing and keeps the cookie off every cross-site request
//! (including WebSocket handshakes). The short-lived state cookie must be
//! `Lax`: it has to come back on the provider's top-level redirect.
//!
//! With the session cookie every state-changing call (anything but GET,
//! HEAD, OPTIONS) must carry the session's CSRF token in `X-CSRF-Token`
//! (compared in constant time; the console reads it from
//! `GET /api/v1/whoami`), and any request with an `Origin` must name this
//! hub. Bearer tokens (hub tokens, ID tokens) work beside the cookie and
//! need neither: a browser never adds them by itself.
//!
//! Sessions are kept in the store by the SHA-256 of their id, so they
//! survive a restart; revoking the person deletes them at once. Sign-ins
//! in flight (state, nonce, PKCE verifier: ten minutes at most) live in
//! the hub process: a restart, or with several replicas a callback that
//! lands on another one, asks the person to start again. The CSRF token
//! is derived from the session id, so nothing else is stored.
//!
//! Not here: verifying the ID token ([`super::jwt`]), the console's UI.

use super::super::Hub;
use super::super::api::error;
use super::super::clock::now_ms;
use super::super::http::{Request, Response, query_params};
use super::super::store::ConsoleSession;
use super::Provider;
use crate::http::percent_encode;
use crate::secret::{Secret, ct_eq, sha256_hex};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The session cookie.
pub const SESSION_COOKIE: &str = "uplink_session";
/// The sign-in state cookie.
const STATE_COOKIE: &str = "uplink_auth";
/// The CSRF header the console sends with the session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a browser has between `/auth/login` and the callback.
const STATE_TTL: Duration = Duration::from_secs(600);
/// How long a console session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sign-ins in flight and sessions kept (bounded memory).
const MAX_PENDING: usize = 4096;

/// A sign-in between `/auth/login` and `/auth/callback`.
struct Pending {
    nonce: Secret,
    verifier: Secret,
    started: Instant,
}

/// Sign-ins in flight, by SHA-256 of their state. (Sessions themselves
/// are in the store.)
#[derive(Default)]
pub struct Browser {
    pending: RefCell<HashMap<String, Pending>>,
}

/// A console session as a request presents it.
pub struct Session {
    pub user: ConsoleSession,
    /// The CSRF token the console must send back with this session.
    pub csrf: Secret,
}

/// Why a sign-in or a cookie was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The state is unknown: never issued, already used, or expired.
    UnknownState,
    /// The state does not match this browser's state cookie.
    StateMismatch,
    /// The provider sent the browser back with an error.
    Provider(String),
    /// The code exchange failed.
    Exchange(String),
    /// A state-changing call with the cookie lacks the right CSRF token.
    Csrf,
    /// The request's `Origin` is not this hub.
    Origin(String),
    /// The store failed looking the session up.
    Store(String),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::UnknownState => {
                f.write_str("this sign-in is unknown, already used or expired; start again at /auth/login")
            }
            SessionError::StateMismatch => {
                f.write_str("this sign-in was started in another browser; start again at /auth/login")
            }
            SessionError::Provider(e) => write!(f, "the identity provider refused the sign-in: {e}"),
            SessionError::Exchange(e) => write!(f, "the sign-in code could not be exchanged: {e}"),
            SessionError::Csrf => f.write_str("missing or wrong X-CSRF-Token for this session; reload the console"),
            SessionError::Origin(o) => write!(f, "requests from origin {o:?} may not use the console session"),
            SessionError::Store(e) => write!(f, "the hub could not check the session: {e}"),
        }
    }
}

/// The value of cookie `name`, from any `Cookie` field (RFC 6265 §5.4).
pub fn cookie<'a>(req: &'a Request, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .filter(|(n, _)| n == "cookie")
        .filter_map(|(_, v)| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `https://host:port` of a URL (scheme and authority).
fn origin_of(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..].find('/').map_or(url, |i| &url[..after + i])
}

fn pkce_challenge(verifier: &str) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

fn redirect_uri(hub: &Hub) -> String {
    format!("{}/auth/callback", hub.public_url)
}

/// What a browser shows when a sign-in fails: a small page (people land
/// here, not scripts) with the reason and the way on.
fn page(status: u16, message: &str) -> Response {
    let escaped: String = message
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect();
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sign-in failed · uplink</title></head>\n\
         <body><h1>Sign-in failed</h1>\n<p>{escaped}</p>\n\
         <p><a href=\"/auth/login\">Try again</a> · <a href=\"/\">Back to the console</a></p></body></html>\n"
    );
    Response::new(status, "text/html; charset=utf-8", body).with_header(
        "Content-Security-Policy",
        "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    )
}

impl Browser {
    /// Drops expired sign-ins; past the bound, the oldest goes.
    fn prune(&self) {
        let mut p = self.pending.borrow_mut();
        p.retain(|_, v| v.started.elapsed() < STATE_TTL);
        if p.len() >= MAX_PENDING
            && let Some(oldest) = p.iter().min_by_key(|(_, v)| v.started).map(|(k, _)| k.clone())
        {
            p.remove(&oldest);
        }
    }
}

/// The CSRF token of a session: derived from its id (SHA-256 with a
/// label), so the hub stores nothing more and only a holder of the
/// cookie's value could compute it; the console reads it from
/// `GET /api/v1/whoami`.
fn csrf_of(session_id: &str) -> Secret {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("uplink-csrf\0{session_id}").as_bytes());
    Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// `GET /auth/login`: start a sign-in.
pub fn login(hub: &Hub, p: &Provider) -> Response {
    let Some(meta) = p.metadata() else {
        return page(503, "the hub cannot reach the identity provider yet; try again shortly");
    };
    p.browser.prune();
    let (state, nonce, verifier) = (Secret::random(32), Secret::random(32), Secret::random(32));
    let challenge = pkce_challenge(verifier.expose());
    let c = &p.config;
    let sep = if meta.authorization_endpoint.contains('?') { '&' } else { '?' };
    let location = format!(
        "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={}&nonce={}\
         &code_challenge={challenge}&code_challenge_method=S256",
        meta.authorization_endpoint,
        percent_encode(&c.client_id),
        percent_encode(&redirect_uri(hub)),
        percent_encode(&c.scopes.join(" ")),
        state.expose(),
        nonce.expose(),
    );
    p.browser
        .pending
        .borrow_mut()
        .insert(sha256_hex(state.expose()), Pending { nonce, verifier, started: Instant::now() });
    Response::new(302, "text/plain; charset=utf-8", "signing in through the identity provider\n")
        .with_header("Location", location)
        .with_header(
            "Set-Cookie",
            format!("{STATE_COOKIE}={}; Path=/auth/; HttpOnly; Secure; SameSite=Lax; Max-Age=600", state.expose()),
        )
}

/// `GET /auth/callback`: finish a sign-in.
pub async fn callback(hub: &Hub, p: &Provider, req: &Request) -> Response {
    match finish(hub, p, req).await {
        Ok(r) => r,
        Err((status, message)) => {
            log::warn!("oidc browser sign-in refused reason={message:?}");
            page(status, &message).with_header("Set-Cookie", clear(STATE_COOKIE, "/auth/"))
        }
    }
}

fn clear(name: &str, path: &str) -> String {
    format!("{name}=; Path={path}; HttpOnly; Secure; SameSite=Lax; Max-Age=0")
}

async fn finish(hub: &Hub, p: &Provider, req: &Request) -> Result<Response, (u16, String)> {
    let q: HashMap<String, String> = query_params(req.target()).into_iter().collect();
    let state = q.get("state").map(String::as_str).unwrap_or("");
    // Single use: taken out before anything else can fail.
    let pending = p.browser.pending.borrow_mut().remove(&sha256_hex(state));
    let bad = |e: SessionError| (400, e.to_string());
    let pending = pending.filter(|v| v.started.elapsed() < STATE_TTL).ok_or_else(|| bad(SessionError::UnknownState))?;
    if !cookie(req, STATE_COOKIE).is_some_and(|c| ct_eq(c.as_bytes(), state.as_bytes())) {
        return Err(bad(SessionError::StateMismatch));
    }
    if let Some(e) = q.get("error") {
        let more = q.get("error_description").map_or(String::new(), |d| format!(" ({d})"));
        return Err(bad(SessionError::Provider(format!("{e}{more}"))));
    }
    let code = q.get("code").filter(|c| !c.is_empty()).ok_or_else(|| bad(SessionError::Exchange("no code".into())))?;
    let meta = p.metadata().ok_or((503, "the identity provider's metadata is not loaded".to_string()))?;
    let form = vec![
        ("grant_type".to_string(), "authorization_code".to_string()),
        ("code".to_string(), code.clone()),
        ("redirect_uri".to_string(), redirect_uri(hub)),
        ("client_id".to_string(), p.config.client_id.clone()),
        ("code_verifier".to_string(), pending.verifier.expose().to_string()),
    ];
    let (cfg, url) = (p.config.clone(), meta.token_endpoint.clone());
    let (status, answer) = smol::unblock(move || super::post_form(&url, &cfg.client_auth(), &form))
        .await
        .map_err(|e| (502, SessionError::Exchange(e.to_string()).to_string()))?;
    if status != 200 {
        let why = answer.get("error").and_then(Value::as_str).unwrap_or("no error code").to_string();
        return Err((502, SessionError::Exchange(format!("the token endpoint answered {status}: {why}")).to_string()));
    }
    let id_token = answer
        .get("id_token")
        .and_then(Value::as_str)
        .ok_or_else(|| (502, SessionError::Exchange("the answer has no id_token".into()).to_string()))?;
    p.prepare(id_token).await;
    let now = now_ms();
    let id = p.identify(id_token, Some(pending.nonce.expose()), now / 1000).map_err(|e| (401, e.to_string()))?;
    let user = hub.store.oidc_sign_in(&id.name, &id.groups, id.admin, now).map_err(|e| (403, e.to_string()))?;
    if user.revoked_at.is_some() {
        return Err((403, format!("user {} was revoked by a hub admin", user.name)));
    }
    let sid = Secret::random(32);
    let session = ConsoleSession {
        user: id.name.clone(),
        groups: id.groups,
        admin: id.admin,
        expires_at: now + SESSION_TTL.as_millis() as i64,
    };
    hub.store.create_session(&sha256_hex(sid.expose()), &session, now).map_err(|e| (503, e.to_string()))?;
    log::info!("oidc console sign-in user={:?}", id.name);
    Ok(Response::new(303, "text/plain; charset=utf-8", "signed in\n")
        .with_header("Location", "/")
        .with_header("Set-Cookie", clear(STATE_COOKIE, "/auth/"))
        .with_header(
            "Set-Cookie",
            format!(
                "{SESSION_COOKIE}={}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                sid.expose(),
                SESSION_TTL.as_secs()
            ),
        ))
}

/// The session a request's cookie names, with the CSRF and Origin checks
/// for the request. `Ok(None)` when there is no live session cookie
/// (none, expired, signed out, or its person revoked).
pub fn session_of(hub: &Hub, req: &Request) -> Result<Option<Session>, SessionError> {
    let Some(id) = cookie(req, SESSION_COOKIE) else { return Ok(None) };
    let user = match hub.store.session(&sha256_hex(id), now_ms()) {
        Ok(Some(u)) => u,
        Ok(None) => return Ok(None),
        Err(e) => return Err(SessionError::Store(e.to_string())),
    };
    if let Some(origin) = req.header_str("origin")
        && origin != origin_of(&hub.public_url)
    {
        return Err(SessionError::Origin(origin.to_string()));
    }
    let csrf = csrf_of(id);
    if !matches!(req.method.as_str(), "GET" | "HEAD" | "OPTIONS") {
        let sent = req.header_str(CSRF_HEADER).unwrap_or("");
        if !csrf.matches(sent) {
            return Err(SessionError::Csrf);
        }
    }
    Ok(Some(Session { user, csrf }))
}

/// `POST /auth/logout`: ends the session (CSRF-checked like any call).
pub fn logout(hub: &Hub, req: &Request) -> Response {
    match session_of(hub, req) {
        Ok(Some(s)) => {
            if let Some(id) = cookie(req, SESSION_COOKIE)
                && let Err(e) = hub.store.delete_session(&sha256_hex(id))
            {
                return error(503, "unavailable", &e.to_string());
            }
            log::info!("oidc console sign-out user={:?}", s.user.user);
        }
        Ok(None) => {}
        Err(e) => return error(403, "forbidden", &e.to_string()),
    }
    Response::json(200, &json!({ "signed_out": true }))
        .with_header("Set-Cookie", format!("{SESSION_COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_is_unpadded_base64url_of_sha256() {
        // Computed independently (Python hashlib + base64.urlsafe_b64encode).
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mJ0IAnwsoHC4yOj_gY8nmbwC45bM7g"),
            "sCkr_n_JKQVxmrWjitBUYz4TggyQ50SR1joCQgPffLc"
        );
    }

    /// Reasons may quote the token (an issuer): they are escaped.
    #[test]
    fn failure_pages_escape_the_reason() {
        let r = page(401, "the ID token was issued by \"<script>alert(1)</script>\", not this hub's provider");
        let body = String::from_utf8(r.body).unwrap();
        assert!(!body.contains("<script>"), "{body}");
        assert!(body.contains("&quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;"), "{body}");
        assert!(r.headers.iter().any(|(n, v)| n == "Content-Security-Policy" && v.starts_with("default-src 'none'")));
    }

    #[test]
    fn origins() {
        assert_eq!(origin_of("https://hub.example.com:8443"), "https://hub.example.com:8443");
        assert_eq!(origin_of("https://hub.example.com/x"), "https://hub.example.com");
    }
}
