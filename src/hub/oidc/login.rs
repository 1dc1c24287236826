//! `uplink-hub login`: a kubectl `exec` credential plugin
//! (`client.authentication.k8s.io/v1`) that signs a person in with the
//! identity provider and prints an `ExecCredential` holding their ID
//! token.
//!
//! ```text
//!  cached ID token valid > 60 s more? ──yes──► print it
//!        │ no
//!  cached refresh token? ──► token endpoint (refresh_token) ──ok──► cache, print
//!        │ none / refused
//!  device authorization (RFC 8628): verification URI + user code on
//!  stderr, poll the token endpoint (authorization_pending, slow_down)
//!        └──► cache, print
//! ```
//!
//! The cache is one JSON file per issuer and client under
//! `$XDG_CACHE_HOME/uplink/` (else `~/.cache/uplink/`), mode 0600 in a
//! 0700 directory, replaced atomically. Standard output carries only the
//! `ExecCredential`; everything for the person goes to standard error
//! (kubectl shows it).
//!
//! The token's expiry is read from its payload without verifying it:
//! the client only decides when to fetch a new one; the hub verifies.
//!
//! Not here: the browser flow (the console's, [`super::browser`]).

use super::{ClientAuth, FetchError, discover, post_form};
use crate::secret::{Secret, sha256_hex};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A cached ID token is used while it has this much life left.
const MIN_LIFE_SECS: i64 = 60;
/// The device grant's poll interval when the provider names none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: u64 = 5;
/// What `slow_down` adds to the interval (RFC 8628 §3.5).
const SLOW_DOWN_SECS: u64 = 5;

/// Which provider and client `login` signs in with.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    pub issuer: String,
    /// The hub's client id (a public client: no secret on people's machines).
    pub client_id: String,
    pub scopes: Vec<String>,
    /// PEM CA of the provider; `None` trusts the public roots.
    pub ca_pem: Option<String>,
}

impl LoginConfig {
    fn client(&self) -> ClientAuth<'_> {
        ClientAuth { id: &self.client_id, secret: None, ca_pem: self.ca_pem.as_deref() }
    }
}

/// What `login` keeps between runs.
#[derive(Serialize, Deserialize, Default)]
struct Cache {
    id_token: Option<Secret>,
    refresh_token: Option<Secret>,
}

/// Why signing in failed.
#[derive(Debug)]
pub enum LoginError {
    Fetch(FetchError),
    /// The provider offers no device authorization endpoint.
    NoDeviceEndpoint,
    /// The provider refused (`access_denied`, `expired_token`, ...).
    Refused(String),
    /// The token answer had no `id_token` (scope `openid` missing?).
    NoIdToken,
    /// The cache could not be written.
    Cache(String),
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Fetch(e) => e.fmt(f),
            LoginError::NoDeviceEndpoint => f.write_str(
                "the identity provider offers no device authorization endpoint; enable the device grant \
                 for this client, or use kubelogin (kubectl oidc-login) for the browser flow",
            ),
            LoginError::Refused(e) => write!(f, "the identity provider refused the sign-in: {e}"),
            LoginError::NoIdToken => {
                f.write_str("the identity provider returned no ID token; is the scope `openid` requested?")
            }
            LoginError::Cache(e) => write!(f, "cannot write the token cache: {e}"),
        }
    }
}

impl From<FetchError> for LoginError {
    fn from(e: FetchError) -> Self {
        LoginError::Fetch(e)
    }
}

/// `$XDG_CACHE_HOME/uplink` or `~/.cache/uplink`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("uplink"))
}

fn cache_path(dir: &Path, cfg: &LoginConfig) -> PathBuf {
    let key = sha256_hex(&format!("{}\n{}", cfg.issuer, cfg.client_id));
    dir.join(format!("oidc-{}.json", &key[..16]))
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// `exp` of a JWT, read without verification.
pub fn unverified_exp(token: &str) -> Option<i64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?.get("exp")?.as_i64()
}

fn read_cache(path: &Path) -> Cache {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write_cache(path: &Path, cache: &Cache) -> Result<(), LoginError> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let err = |e: std::io::Error| LoginError::Cache(format!("{}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(&serde_json::to_vec(cache).unwrap_or_default()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// The `ExecCredential` kubectl reads from standard output.
pub fn exec_credential(id_token: &str) -> Value {
    let mut status = json!({ "token": id_token });
    if let Some(exp) = unverified_exp(id_token) {
        status["expirationTimestamp"] = json!(crate::time::rfc3339(exp * 1000));
    }
    json!({ "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status })
}

fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn oauth_error(v: &Value) -> String {
    let code = v.get("error").and_then(Value::as_str).unwrap_or("unknown_error");
    match v.get("error_description").and_then(Value::as_str) {
        Some(d) => format!("{code} ({d})"),
        None => code.to_string(),
    }
}

/// Keeps what a token answer carries (a refresh answer may omit a new
/// refresh token: the old one stays).
fn take_tokens(answer: &Value, cache: &mut Cache) -> Result<Secret, LoginError> {
    let id = answer.get("id_token").and_then(Value::as_str).ok_or(LoginError::NoIdToken)?;
    if let Some(r) = answer.get("refresh_token").and_then(Value::as_str) {
        cache.refresh_token = Some(Secret::new(r));
    }
    cache.id_token = Some(Secret::new(id));
    Ok(Secret::new(id))
}

/// Signs in (cache, refresh, or device grant) and returns the ID token.
pub fn id_token(cfg: &LoginConfig, dir: &Path) -> Result<Secret, LoginError> {
    let path = cache_path(dir, cfg);
    let mut cache = read_cache(&path);
    if let Some(t) = &cache.id_token
        && unverified_exp(t.expose()).is_some_and(|exp| exp - now_secs() > MIN_LIFE_SECS)
    {
        return Ok(t.clone());
    }
    let meta = discover(&cfg.issuer, cfg.ca_pem.as_deref())?;
    if let Some(refresh) = cache.refresh_token.clone() {
        let f = form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh.expose()),
            ("client_id", &cfg.client_id),
        ]);
        match post_form(&meta.token_endpoint, &cfg.client(), &f)? {
            (200, answer) => {
                let t = take_tokens(&answer, &mut cache)?;
                write_cache(&path, &cache)?;
                return Ok(t);
            }
            (_, answer) => {
                eprintln!(
                    "uplink-hub login: the refresh token was refused ({}); signing in again",
                    oauth_error(&answer)
                );
                cache.refresh_token = None;
            }
        }
    }
    let device_url = meta.device_authorization_endpoint.clone().ok_or(LoginError::NoDeviceEndpoint)?;
    let scopes = cfg.scopes.join(" ");
    let (status, start) =
        post_form(&device_url, &cfg.client(), &form(&[("client_id", &cfg.client_id), ("scope", &scopes)]))?;
    if status != 200 {
        return Err(LoginError::Refused(oauth_error(&start)));
    }
    let field = |n: &str| start.get(n).and_then(Value::as_str).map(str::to_string);
    let device_code = field("device_code").ok_or(LoginError::Refused("no device_code in the answer".into()))?;
    let user_code = field("user_code").unwrap_or_default();
    let uri = field("verification_uri").unwrap_or_default();
    match field("verification_uri_complete") {
        Some(full) => eprintln!("To sign in, open {full}\n(or open {uri} and enter the code {user_code})"),
        None => eprintln!("To sign in, open {uri} and enter the code {user_code}"),
    }
    let mut interval = start.get("interval").and_then(Value::as_u64).unwrap_or(DEFAULT_INTERVAL).max(1);
    let expires = start.get("expires_in").and_then(Value::as_u64).unwrap_or(600);
    let deadline = Instant::now() + Duration::from_secs(expires);
    let poll = form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
        ("device_code", &device_code),
        ("client_id", &cfg.client_id),
    ]);
    loop {
        if Instant::now() >= deadline {
            return Err(LoginError::Refused("the code expired before the sign-in was approved".into()));
        }
        std::thread::sleep(Duration::from_secs(interval));
        match post_form(&meta.token_endpoint, &cfg.client(), &poll)? {
            (200, answer) => {
                let t = take_tokens(&answer, &mut cache)?;
                write_cache(&path, &cache)?;
                eprintln!("uplink-hub login: signed in");
                return Ok(t);
            }
            (_, answer) => match answer.get("error").and_then(Value::as_str) {
                Some("authorization_pending") => {}
                Some("slow_down") => interval += SLOW_DOWN_SECS,
                _ => return Err(LoginError::Refused(oauth_error(&answer))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_credentials_carry_the_token_and_its_expiry() {
        use base64::Engine as _;
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1796378400}"#);
        let token = format!("eyJhbGciOiJFUzI1NiJ9.{p}.sig");
        let v = exec_credential(&token);
        assert_eq!(v["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(v["status"]["token"], token.as_str());
        assert_eq!(v["status"]["expirationTimestamp"], "2026-12-04T10:00:00Z");
        assert!(exec_credential("opaque")["status"].get("expirationTimestamp").is_none());
    }

    #[test]
    fn the_cache_is_private_and_keyed_by_issuer_and_client() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("uplink-login-{}", Secret::random(6).expose()));
        let cfg = |client: &str| LoginConfig {
            issuer: "https://idp".into(),
            client_id: client.into(),
            scopes: vec!["openid".into()],
            ca_pem: None,
        };
        let path = cache_path(&dir.join("uplink"), &cfg("a"));
        assert_ne!(path, cache_path(&dir.join("uplink"), &cfg("b")));
        let c = Cache { id_token: Some(Secret::new("t")), refresh_token: Some(Secret::new("r")) };
        write_cache(&path, &c).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(read_cache(&path).refresh_token.unwrap().expose(), "r");
        write_cache(&path, &Cache::default()).unwrap();
        assert!(read_cache(&path).id_token.is_none(), "replaced, not appended");
        let _ = std::fs::remove_dir_all(dir);
    }
}
