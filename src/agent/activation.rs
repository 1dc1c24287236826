//! The activation: what `uplink-hub cluster register` hands out (JSON, in
//! a file or in a Secret mounted as a directory), checked before use, and
//! the one-time exchange `POST /v1/activate` that turns it into the
//! agent's long-lived credential.
//!
//! Every error names the file and says what to do; none shows the code.

use super::http1::{self, Pool};
use super::net::{ProxyEnv, Target};
use crate::proto::{AgentInfo, Header};
use crate::secret::Secret;
use crate::tls::{self, Trust};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The key (and file name) of the activation in a mounted Secret.
pub const ACTIVATION_KEY: &str = "activation.json";

/// An activation as the hub issued it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Activation {
    pub cluster: String,
    pub hub_url: String,
    pub activation_id: String,
    pub activation_code: Secret,
    /// RFC 3339, e.g. `2026-12-04T10:00:00Z`.
    pub expires_at: String,
    #[serde(default)]
    pub hub_ca_pem: Option<String>,
    #[serde(default)]
    pub hub_pin_sha256: Option<String>,
}

/// Why the activation cannot be used. Each message names the file.
#[derive(Debug)]
pub enum ActivationError {
    /// No file at the path (or no `activation.json` in the directory).
    Missing(PathBuf),
    /// The file exists but could not be read.
    Unreadable(PathBuf, String),
    /// Not JSON of the expected shape, or a field is invalid.
    Malformed(PathBuf, String),
    /// Past `expires_at`.
    Expired(PathBuf, String),
}

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActivationError::Missing(p) => write!(
                f,
                "activation {}: no such file; install the activation from `uplink-hub cluster register NAME` there, or \
                 pass --activation PATH",
                p.display()
            ),
            ActivationError::Unreadable(p, e) => write!(f, "activation {}: cannot read it: {e}", p.display()),
            ActivationError::Malformed(p, e) => write!(
                f,
                "activation {}: {e}; use the file exactly as `uplink-hub cluster register NAME` printed it",
                p.display()
            ),
            ActivationError::Expired(p, at) => write!(
                f,
                "activation {}: expired at {at}; renew it at the hub with `uplink-hub cluster renew NAME` \
                 and install the new activation",
                p.display()
            ),
        }
    }
}

impl std::error::Error for ActivationError {}

/// The file an `--activation` path names: itself, or `activation.json`
/// inside it when it is a directory (a mounted Secret).
pub fn activation_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join(ACTIVATION_KEY) } else { path.to_path_buf() }
}

impl Activation {
    /// Reads and checks an activation (not its expiry: see [`Activation::check_expiry`]).
    pub fn load(path: &Path) -> Result<(Activation, PathBuf), ActivationError> {
        let file = activation_file(path);
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ActivationError::Missing(file)),
            Err(e) => return Err(ActivationError::Unreadable(file, e.to_string())),
        };
        let act = Activation::parse(&text).map_err(|e| ActivationError::Malformed(file.clone(), e))?;
        Ok((act, file))
    }

    /// Parses and validates the JSON.
    pub fn parse(text: &str) -> Result<Activation, String> {
        if text.trim().is_empty() {
            return Err("the file is empty".into());
        }
        let act: Activation = serde_json::from_str(text).map_err(|e| format!("not a valid activation JSON: {e}"))?;
        if act.activation_id.trim().is_empty() {
            return Err("activation_id is empty".into());
        }
        if act.activation_code.expose().trim().is_empty() {
            return Err("activation_code is empty".into());
        }
        let target = Target::parse(&act.hub_url).map_err(|e| format!("hub_url: {e}"))?;
        if !target.tls {
            return Err("hub_url must be https://".into());
        }
        parse_rfc3339(&act.expires_at)
            .ok_or_else(|| format!("expires_at {:?} is not an RFC 3339 time", act.expires_at))?;
        act.trust().map_err(|e| format!("hub trust: {e}"))?;
        Ok(act)
    }

    /// Seconds since the epoch at which the activation expires.
    pub fn expires_unix(&self) -> i64 {
        parse_rfc3339(&self.expires_at).unwrap_or(i64::MIN)
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix(now) >= self.expires_unix()
    }

    pub fn check_expiry(&self, file: &Path, now: SystemTime) -> Result<(), ActivationError> {
        if self.is_expired(now) {
            return Err(ActivationError::Expired(file.to_path_buf(), self.expires_at.clone()));
        }
        Ok(())
    }

    /// How to verify the hub: its CA, its pin, or public roots.
    pub fn trust(&self) -> Result<Trust, String> {
        trust_from(self.hub_ca_pem.as_deref(), self.hub_pin_sha256.as_deref())
    }
}

/// Trust from an optional CA and an optional pin; the CA wins when both
/// are given. Both are checked so a typo shows now, not at dial time.
pub fn trust_from(ca: Option<&str>, pin: Option<&str>) -> Result<Trust, String> {
    let trust = match (ca.filter(|c| !c.trim().is_empty()), pin.filter(|p| !p.trim().is_empty())) {
        (Some(ca), _) => Trust::CaPem(ca.to_string()),
        (None, Some(pin)) => Trust::Pin(pin.trim().to_string()),
        (None, None) => Trust::WebPki,
    };
    tls::client_config(&trust, None, &[]).map_err(|e| e.to_string())?;
    Ok(trust)
}

pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Parses an RFC 3339 date-time (`2026-12-04T10:00:00Z`, fractions and
/// numeric offsets allowed) to seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    crate::time::parse_rfc3339(s.trim()).map(|t| t.unix_ms.div_euclid(1000))
}

/// What the hub answers to a successful activation.
#[derive(Debug, Deserialize)]
pub struct Activated {
    pub cluster_id: String,
    pub cluster: String,
    pub credential: Secret,
    #[serde(default)]
    pub hub_url: String,
}

/// Why `POST /v1/activate` did not give a credential.
#[derive(Debug)]
pub enum ExchangeError {
    /// The hub refused for good: the message says what to do.
    Refused(String),
    /// The cluster was deregistered: the agent must stop (exit 4).
    Deregistered(String),
    /// The code was already used; in Secret mode another replica may have
    /// used it a moment ago and saved the state.
    Used(String),
    /// The hub could not be reached, or failed; worth retrying.
    Transient(String),
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExchangeError::Refused(m) | ExchangeError::Deregistered(m) | ExchangeError::Used(m) => f.write_str(m),
            ExchangeError::Transient(m) => write!(f, "hub unreachable or failing: {m}"),
        }
    }
}

#[derive(Serialize)]
struct ActivateRequest<'a> {
    activation_id: &'a str,
    activation_code: &'a str,
    agent_version: &'a str,
    arch: &'a str,
    kube_version: &'a str,
    node_count: u32,
}

/// Exchanges the one-time code for the agent's credential.
pub async fn exchange(act: &Activation, info: &AgentInfo, proxies: &ProxyEnv) -> Result<Activated, ExchangeError> {
    let target = Target::parse(&act.hub_url).map_err(ExchangeError::Refused)?;
    let trust = act.trust().map_err(ExchangeError::Refused)?;
    let tls = tls::client_config(&trust, None, &[b"http/1.1"]).map_err(|e| ExchangeError::Refused(e.to_string()))?;
    let proxy = proxies.for_target(&target).map_err(ExchangeError::Refused)?;
    let pool = Pool::new(target.clone(), Some(tls), proxy, 0);
    let body = serde_json::to_vec(&ActivateRequest {
        activation_id: &act.activation_id,
        activation_code: act.activation_code.expose(),
        agent_version: &info.agent_version,
        arch: &info.arch,
        kube_version: &info.kube_version,
        node_count: info.node_count,
    })
    .expect("serialisable");
    let headers = [
        Header::new("Content-Type", "application/json"),
        Header::new("Accept", "application/json"),
        Header::new("User-Agent", super::kube::user_agent()),
        Header::new("Connection", "close"),
    ];
    let path = format!("{}/v1/activate", target.path_prefix);
    let answer = http1::exchange(&pool, "POST", &path, &headers, &body, 1 << 20)
        .await
        .map_err(|e| ExchangeError::Transient(format!("POST {target}{path}: {e}")))?;
    if answer.status == 200 {
        return serde_json::from_slice(&answer.body)
            .map_err(|e| ExchangeError::Transient(format!("the hub's activation answer is malformed: {e}")));
    }
    let (code, message) = error_body(&answer.body);
    let id = &act.activation_id;
    let register = "register the cluster again with `uplink-hub cluster register NAME` and install the new activation";
    Err(match (answer.status, code.as_str()) {
        (_, "cluster_deregistered") => ExchangeError::Deregistered(format!(
            "cluster {:?} was deregistered at the hub ({message}); the agent stops. To connect it again, {register}",
            act.cluster
        )),
        (_, "activation_used") | (409, _) => ExchangeError::Used(format!(
            "activation {id} was already used ({message}). If this agent lost its saved state, {register}"
        )),
        (_, "activation_expired") => ExchangeError::Refused(format!(
            "activation {id} expired at the hub ({message}); renew it with `uplink-hub cluster renew {}` and install \
             the new activation",
            act.cluster
        )),
        (_, "unknown_activation") | (404, _) => ExchangeError::Refused(format!(
            "the hub at {} does not know activation {id} ({message}); check the activation comes from this hub, or \
             {register}",
            act.hub_url
        )),
        (400..=499, _) => {
            ExchangeError::Refused(format!("the hub refused activation {id}: {} {message}", answer.status))
        }
        (s, _) => ExchangeError::Transient(format!("the hub answered {s}: {message}")),
    })
}

/// `{"error": CODE, "message": TEXT}`, tolerating other bodies.
pub fn error_body(body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => (
            v["error"].as_str().unwrap_or_default().to_string(),
            v["message"].as_str().map(str::to_string).unwrap_or_else(|| v["error"].as_str().unwrap_or("").to_string()),
        ),
        Err(_) => (String::new(), String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn json(expires: &str) -> String {
        format!(
            r#"{{"cluster":"edge-1","hub_url":"https://hub.example.com:8443","activation_id":"act_1",
                "activation_code":"s3cret","expires_at":"{expires}"}}"#
        )
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-12-04T10:00:00Z"), Some(1_796_378_400));
        assert_eq!(parse_rfc3339("2026-12-04T12:00:00.123+02:00"), Some(1_796_378_400));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(parse_rfc3339("2026-13-04T10:00:00Z"), None);
        assert_eq!(parse_rfc3339("2026-12-04 10:00"), None);
        assert_eq!(parse_rfc3339("tomorrow"), None);
    }

    #[test]
    fn parses_and_checks() {
        let a = Activation::parse(&json("2099-01-01T00:00:00Z")).unwrap();
        assert_eq!(a.cluster, "edge-1");
        assert!(!format!("{a:?}").contains("s3cret"));
        assert!(!a.is_expired(SystemTime::now()));
        let old = Activation::parse(&json("2001-01-01T00:00:00Z")).unwrap();
        assert!(old.is_expired(SystemTime::now()));
        let err = old.check_expiry(Path::new("/etc/uplink/activation.json"), SystemTime::now()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/uplink/activation.json") && msg.contains("expired at 2001-01-01T00:00:00Z"),
            "{msg}"
        );
        assert!(!old.is_expired(UNIX_EPOCH + Duration::from_secs(978_307_199)));
    }

    #[test]
    fn malformed_activations_say_why() {
        let cases = [
            ("", "empty"),
            ("{", "not a valid activation JSON"),
            (&json("soon"), "expires_at"),
            (&json("2099-01-01T00:00:00Z").replace("https://hub", "http://hub"), "https://"),
            (&json("2099-01-01T00:00:00Z").replace("\"s3cret\"", "\"\""), "activation_code is empty"),
            (
                &json("2099-01-01T00:00:00Z").replace("\"cluster\"", "\"hub_pin_sha256\":\"nope\",\"cluster\""),
                "hub trust",
            ),
        ];
        for (text, want) in cases {
            let e = Activation::parse(text).unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
            assert!(!e.contains("s3cret"));
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("uplink-act-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Activation::load(&dir).unwrap_err();
        assert!(matches!(&e, ActivationError::Missing(p) if p.ends_with("activation.json")), "{e}");
        std::fs::write(dir.join("activation.json"), "not json").unwrap();
        let e = Activation::load(&dir).unwrap_err().to_string();
        assert!(e.starts_with(&format!("activation {}/activation.json: not a valid", dir.display())), "{e}");
        std::fs::write(dir.join("activation.json"), json("2099-01-01T00:00:00Z")).unwrap();
        let (a, file) = Activation::load(&dir).unwrap();
        assert_eq!((a.activation_id.as_str(), file), ("act_1", dir.join("activation.json")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hub_error_bodies() {
        assert_eq!(
            error_body(br#"{"error":"activation_used","message":"already used"}"#),
            ("activation_used".to_string(), "already used".to_string())
        );
        assert_eq!(error_body(b"oops"), (String::new(), "oops".to_string()));
    }
}
