//! Signing people in with the organisation's OpenID Connect provider.
//!
//! ```text
//!  serve --oidc-issuer ... ─► Provider::load (discovery + JWKS, at start)
//!  request with Bearer eyJ... ─► Provider::prepare  (unknown kid? fetch the
//!                                 │                   JWKS again, rate-limited)
//!                                 ▼
//!                             Provider::identify  (jwt::verify, then claims →
//!                                 │                 name, groups, admin)
//!                                 ▼
//!                             api::authenticate   (store.oidc_sign_in: the
//!                                                  person's record; revoked?)
//! ```
//!
//! The hub is a relying party: it never issues ID tokens. It accepts the
//! provider's ID tokens as bearer tokens on the kube front end and the
//! REST API (kubectl gets them from `uplink-hub login`, [`login`], or
//! kubelogin), and runs the browser sign-in for the console
//! ([`browser`]). Every check OIDC Core §3.1.3.7 asks of a relying party
//! is made in [`jwt`].
//!
//! Keys: fetched at start, again every [`REFRESH_EVERY`], and again when
//! a token names a `kid` the hub does not know (at most once per
//! [`MIN_REFRESH`], so a stream of made-up kids cannot make the hub hammer
//! the provider). A key the provider removed stops verifying at the next
//! fetch.
//!
//! Not here: the hub's own tokens ([`super::api`]), grants, or which
//! groups a cluster may impersonate ([`super::kube`]).

pub mod browser;
pub mod jwt;
pub mod login;

use crate::names::{self, NameError};
use crate::secret::Secret;
use jwt::{Alg, Expect, Jwk, TokenError};
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::time::{Duration, Instant};

/// How often the key set is fetched even when no token asks for it.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3600);
/// Least time between two fetches caused by unknown kids.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Longest a discovery or JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest discovery document or key set read.
const MAX_DOC: usize = 1 << 20;

/// One provider, as the operator configured it (`serve --oidc-*`).
#[derive(Clone, Debug)]
pub struct OidcConfig {
    /// Exactly as the provider's `iss` says it, e.g. `https://idp.example.com/realms/acme`.
    pub issuer: String,
    pub client_id: String,
    /// `None` for a public client (PKCE only).
    pub client_secret: Option<Secret>,
    pub scopes: Vec<String>,
    /// The claim that names the person: `email`, `sub`, `preferred_username`.
    pub user_claim: String,
    /// The claim that lists the person's groups, if any.
    pub groups_claim: Option<String>,
    /// Put before every user name, e.g. `oidc:`.
    pub user_prefix: String,
    /// Put before every group name.
    pub group_prefix: String,
    pub algorithms: Vec<Alg>,
    /// Members of this group (as it reads after the prefix) are hub admins.
    pub admin_group: Option<String>,
    /// PEM CA to trust for the provider instead of the public roots.
    pub ca_pem: Option<String>,
}

impl OidcConfig {
    /// Checks what can be checked before the provider is asked.
    pub fn validate(&self) -> Result<(), String> {
        if !self.issuer.starts_with("https://") {
            return Err(format!("--oidc-issuer {:?} must be an https:// URL", self.issuer));
        }
        if self.client_id.is_empty() {
            return Err("--oidc-client-id is required with --oidc-issuer".into());
        }
        if self.algorithms.is_empty() {
            return Err("--oidc-algs needs at least one of RS256, ES256".into());
        }
        // Claims that name one person; `name` ("Ann Lee") does not.
        if !["email", "sub", "preferred_username"].contains(&self.user_claim.as_str()) {
            return Err(format!("--oidc-user-claim {:?}: use email, sub or preferred_username", self.user_claim));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err("--oidc-scopes must include openid".into());
        }
        Ok(())
    }

    /// Parses `RS256,ES256`; `none` and anything unknown are refused.
    pub fn parse_algorithms(list: &str) -> Result<Vec<Alg>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Alg::parse(a).ok_or_else(|| format!("algorithm {a:?} is not supported; use RS256 and/or ES256")))
            .collect()
    }
}

/// What discovery (`/.well-known/openid-configuration`) told the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    pub device_authorization_endpoint: Option<String>,
}

/// Why the provider's documents could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// Connecting or reading failed (network, TLS, timeout).
    Io(String),
    /// The provider answered with this status.
    Status(u16, String),
    /// The document is not what the specification says.
    Invalid(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Io(m) => write!(f, "cannot reach the identity provider: {m}"),
            FetchError::Status(s, url) => write!(f, "the identity provider answered {s} for {url}"),
            FetchError::Invalid(m) => write!(f, "the identity provider's answer is invalid: {m}"),
        }
    }
}

/// A client for one of the provider's URLs: its CA or the public roots,
/// and a bound on how long the provider may stay silent.
fn provider_client(url: &str, ca_pem: Option<&str>) -> Result<crate::hub::client::Client, FetchError> {
    Ok(crate::hub::client::Client::new(url, ca_pem, None)
        .map_err(FetchError::Invalid)?
        .with_read_timeout(FETCH_TIMEOUT))
}

/// GETs a JSON document over HTTPS (blocking; call from a thread).
pub fn get_json(url: &str, ca_pem: Option<&str>) -> Result<Value, FetchError> {
    let client = provider_client(url, ca_pem)?;
    let r = client
        .request("GET", "", &[("Accept", "application/json")], None)
        .map_err(|e| FetchError::Io(e.to_string()))?;
    if r.status != 200 {
        return Err(FetchError::Status(r.status, url.to_string()));
    }
    if r.body.len() > MAX_DOC {
        return Err(FetchError::Invalid(format!("{url} is larger than 1 MiB")));
    }
    serde_json::from_slice(&r.body).map_err(|e| FetchError::Invalid(format!("{url}: {e}")))
}

/// Reads discovery (OIDC Discovery §4) and checks it names this issuer.
pub fn discover(issuer: &str, ca_pem: Option<&str>) -> Result<Metadata, FetchError> {
    let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
    let doc = get_json(&url, ca_pem)?;
    let field = |name: &str| doc.get(name).and_then(Value::as_str).map(str::to_string);
    // §4.3: the issuer in the document must be exactly the one asked for.
    if field("issuer").as_deref() != Some(issuer) {
        return Err(FetchError::Invalid(format!("discovery names issuer {:?}, not {issuer:?}", field("issuer"))));
    }
    let https = |name: &str| -> Result<String, FetchError> {
        field(name)
            .filter(|u| u.starts_with("https://"))
            .ok_or_else(|| FetchError::Invalid(format!("discovery has no https {name}")))
    };
    Ok(Metadata {
        authorization_endpoint: https("authorization_endpoint")?,
        token_endpoint: https("token_endpoint")?,
        jwks_uri: https("jwks_uri")?,
        device_authorization_endpoint: https("device_authorization_endpoint").ok(),
    })
}

/// How a client presents itself to the provider's token and device
/// endpoints, and which CA it trusts for them.
pub struct ClientAuth<'a> {
    pub id: &'a str,
    /// `None`: a public client.
    pub secret: Option<&'a Secret>,
    pub ca_pem: Option<&'a str>,
}

impl OidcConfig {
    /// The hub as a client of its provider.
    pub fn client_auth(&self) -> ClientAuth<'_> {
        ClientAuth { id: &self.client_id, secret: self.client_secret.as_ref(), ca_pem: self.ca_pem.as_deref() }
    }
}

/// POSTs a form to the provider's token (or device) endpoint as this
/// client (RFC 6749 §2.3.1: `client_secret_basic` when there is a
/// secret, else `client_id` in the form as a public client). Returns the
/// status and the JSON answer (an OAuth error object on 400).
pub fn post_form(url: &str, client: &ClientAuth<'_>, form: &[(String, String)]) -> Result<(u16, Value), FetchError> {
    use crate::http::percent_encode;
    use base64::Engine as _;
    let http = provider_client(url, client.ca_pem)?;
    let body: Vec<String> = form.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect();
    let basic = client.secret.map(|s| {
        let pair = format!("{}:{}", percent_encode(client.id), percent_encode(s.expose()));
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
    });
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")];
    if let Some(b) = &basic {
        headers.push(("Authorization", b.as_str()));
    }
    let r = http
        .request("POST", "", &headers, Some(body.join("&").as_bytes()))
        .map_err(|e| FetchError::Io(e.to_string()))?;
    let v = serde_json::from_slice(&r.body)
        .map_err(|e| FetchError::Invalid(format!("{url} answered {} with no JSON: {e}", r.status)))?;
    Ok((r.status, v))
}

fn fetch_all(cfg: &OidcConfig) -> Result<(Metadata, Vec<Jwk>), FetchError> {
    let meta = discover(&cfg.issuer, cfg.ca_pem.as_deref())?;
    let jwks = get_json(&meta.jwks_uri, cfg.ca_pem.as_deref())?;
    let keys = jwt::parse_jwks(jwks.to_string().as_bytes()).map_err(FetchError::Invalid)?;
    Ok((meta, keys))
}

/// A person as the provider's token describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The mapped claim with the prefix.
    pub name: String,
    /// The groups claim, each with the group prefix.
    pub groups: Vec<String>,
    /// In the configured admin group.
    pub admin: bool,
}

/// Why a token was not turned into a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcError {
    /// The hub has no keys yet: the provider could not be reached.
    NoKeys,
    /// The token itself failed a check.
    Token(TokenError),
    /// The configured user claim is missing or not a string.
    NoUserClaim(String),
    /// The user claim is `email` and the provider did not say it verified it.
    EmailNotVerified,
    /// The name or a group cannot travel to a cluster (control characters…).
    BadName(NameError),
}

impl fmt::Display for OidcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OidcError::NoKeys => {
                f.write_str("the hub could not fetch the identity provider's keys yet; try again shortly")
            }
            OidcError::Token(e) => e.fmt(f),
            OidcError::NoUserClaim(c) => write!(f, "the ID token has no string claim {c:?} to name you by"),
            OidcError::EmailNotVerified => f.write_str("the identity provider has not verified your email"),
            OidcError::BadName(e) => e.fmt(f),
        }
    }
}

impl From<TokenError> for OidcError {
    fn from(e: TokenError) -> Self {
        OidcError::Token(e)
    }
}

#[derive(Default)]
struct Keys {
    meta: Option<Metadata>,
    keys: Vec<Jwk>,
}

/// The configured provider and what the hub last fetched from it.
pub struct Provider {
    pub config: OidcConfig,
    state: RefCell<Keys>,
    /// When the last fetch started (success or not): the rate limit.
    last_fetch: Cell<Option<Instant>>,
    /// Browser sign-ins in flight.
    pub browser: browser::Browser,
}

impl Provider {
    /// Fetches discovery and keys once (blocking; at start, before the
    /// event loop). A provider that is down does not stop the hub: it
    /// logs, and the fetch is tried again when a token arrives.
    pub fn load(config: OidcConfig) -> Provider {
        let p = Provider {
            config,
            state: RefCell::default(),
            last_fetch: Cell::new(None),
            browser: browser::Browser::default(),
        };
        p.last_fetch.set(Some(Instant::now()));
        let result = fetch_all(&p.config);
        p.apply(result);
        p
    }

    fn apply(&self, result: Result<(Metadata, Vec<Jwk>), FetchError>) {
        match result {
            Ok((meta, keys)) => {
                let kids: Vec<&str> = keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                log::info!("oidc keys fetched issuer={} keys={kids:?}", self.config.issuer);
                *self.state.borrow_mut() = Keys { meta: Some(meta), keys };
            }
            // Keep what we had: a provider hiccup must not sign everyone out.
            Err(e) => log::warn!("oidc fetch failed issuer={} error={e}", self.config.issuer),
        }
    }

    /// Fetches discovery and keys again, off the event loop.
    pub async fn refresh(&self) {
        use smol::future::FutureExt as _;
        self.last_fetch.set(Some(Instant::now()));
        let cfg = self.config.clone();
        let fetch = smol::unblock(move || fetch_all(&cfg));
        let timeout = async {
            smol::Timer::after(FETCH_TIMEOUT).await;
            Err(FetchError::Io(format!("no answer within {}s", FETCH_TIMEOUT.as_secs())))
        };
        self.apply(fetch.or(timeout).await);
    }

    /// Refreshes every [`REFRESH_EVERY`]; runs for the life of the hub.
    pub async fn refresh_periodically(&self) {
        loop {
            smol::Timer::after(REFRESH_EVERY).await;
            self.refresh().await;
        }
    }

    /// Before [`Provider::identify`]: if `token` is an ID token naming a
    /// key the hub does not have, fetch the key set again (rate-limited).
    pub async fn prepare(&self, token: &str) {
        if !jwt::looks_like_jwt(token) {
            return;
        }
        let Ok(header) = jwt::peek_header(token) else { return };
        let known = {
            let s = self.state.borrow();
            s.meta.is_some() && header.kid.as_ref().is_none_or(|kid| s.keys.iter().any(|k| k.kid.as_ref() == Some(kid)))
        };
        let may = self.last_fetch.get().is_none_or(|t| t.elapsed() >= MIN_REFRESH);
        if !known && may {
            log::info!("oidc unknown key, fetching the key set again kid={:?}", header.kid);
            self.refresh().await;
        }
    }

    /// The provider's endpoints, once discovery succeeded.
    pub fn metadata(&self) -> Option<Metadata> {
        self.state.borrow().meta.clone()
    }

    /// Verifies an ID token and maps it to a person.
    pub fn identify(&self, token: &str, nonce: Option<&str>, now_secs: i64) -> Result<Identity, OidcError> {
        let claims = {
            let s = self.state.borrow();
            if s.meta.is_none() {
                return Err(OidcError::NoKeys);
            }
            let expect = Expect {
                issuer: &self.config.issuer,
                client_id: &self.config.client_id,
                algorithms: &self.config.algorithms,
                nonce,
                now: now_secs,
            };
            jwt::verify(token, &s.keys, &expect)?
        };
        self.map_claims(&claims)
    }

    fn map_claims(&self, claims: &Map<String, Value>) -> Result<Identity, OidcError> {
        let c = &self.config;
        let raw = claims
            .get(&c.user_claim)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| OidcError::NoUserClaim(c.user_claim.clone()))?;
        // As Kubernetes' own OIDC authenticator: an email names a person
        // only once the provider has verified it.
        if c.user_claim == "email" && claims.get("email_verified") != Some(&Value::Bool(true)) {
            return Err(OidcError::EmailNotVerified);
        }
        let name = format!("{}{raw}", c.user_prefix);
        names::check_user(&name).map_err(OidcError::BadName)?;
        let raw_groups: Vec<&str> = match c.groups_claim.as_ref().and_then(|g| claims.get(g)) {
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(one)) => vec![one.as_str()],
            _ => Vec::new(),
        };
        let mut groups = Vec::with_capacity(raw_groups.len());
        for g in raw_groups {
            let g = format!("{}{g}", c.group_prefix);
            names::check_group(&g).map_err(OidcError::BadName)?;
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let admin = c.admin_group.as_ref().is_some_and(|a| groups.contains(a));
        Ok(Identity { name, groups, admin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider(claim: &str) -> Provider {
        Provider {
            config: OidcConfig {
                issuer: "https://idp".into(),
                client_id: "hub".into(),
                client_secret: None,
                scopes: vec!["openid".into()],
                user_claim: claim.into(),
                groups_claim: Some("groups".into()),
                user_prefix: "oidc:".into(),
                group_prefix: "oidc:".into(),
                algorithms: vec![Alg::Es256],
                admin_group: Some("oidc:hub-admins".into()),
                ca_pem: None,
            },
            state: RefCell::default(),
            last_fetch: Cell::new(None),
            browser: browser::Browser::default(),
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn claims_become_a_prefixed_person_with_groups() {
        let p = provider("email");
        let id = p
            .map_claims(&claims(json!({
                "email": "ann@example.com", "email_verified": true, "exp": 9,
                "groups": ["dev", "hub-admins", "dev"]
            })))
            .unwrap();
        assert_eq!(id.name, "oidc:ann@example.com");
        assert_eq!(id.groups, ["oidc:dev", "oidc:hub-admins"]);
        assert!(id.admin);
        let e = p.map_claims(&claims(json!({"email": "ann@example.com"}))).unwrap_err();
        assert_eq!(e, OidcError::EmailNotVerified);
        let e = provider("preferred_username").map_claims(&claims(json!({"sub": "1"}))).unwrap_err();
        assert_eq!(e, OidcError::NoUserClaim("preferred_username".into()));
        let e = provider("sub").map_claims(&claims(json!({"sub": "a\nb"}))).unwrap_err();
        assert!(matches!(e, OidcError::BadName(_)));
        let id = provider("sub").map_claims(&claims(json!({"sub": "42", "groups": "solo"}))).unwrap();
        assert_eq!(
            (id.name.as_str(), id.groups.as_slice(), id.admin),
            ("oidc:42", &["oidc:solo".to_string()][..], false)
        );
    }

    #[test]
    fn configurations_are_checked_before_the_hub_starts() {
        let ok = provider("email").config;
        ok.validate().unwrap();
        let bad = [
            (OidcConfig { issuer: "http://idp".into(), ..ok.clone() }, "must be an https:// URL"),
            (OidcConfig { client_id: String::new(), ..ok.clone() }, "--oidc-client-id is required"),
            (OidcConfig { algorithms: vec![], ..ok.clone() }, "--oidc-algs needs"),
            (OidcConfig { user_claim: "name".into(), ..ok.clone() }, "use email, sub or preferred_username"),
            (OidcConfig { scopes: vec!["email".into()], ..ok.clone() }, "must include openid"),
        ];
        for (cfg, want) in bad {
            let e = cfg.validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn none_is_never_an_algorithm() {
        assert_eq!(OidcConfig::parse_algorithms("RS256, ES256").unwrap(), [Alg::Rs256, Alg::Es256]);
        assert!(OidcConfig::parse_algorithms("RS256,none").is_err());
        assert!(OidcConfig::parse_algorithms("HS256").is_err());
    }

    #[test]
    fn no_keys_yet_is_its_own_error() {
        assert_eq!(provider("sub").identify("eyJ.x.y", None, 0), Err(OidcError::NoKeys));
    }
}
