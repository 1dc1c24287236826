//! Reaching the cluster's API server: where it is, how the agent
//! authenticates to it, and the few calls the agent makes as itself.
//!
//! Discovery, first match wins:
//! 1. explicit flags (`--kube-url`, `--kube-token-file`, `--kube-ca`);
//! 2. `--kubeconfig PATH`;
//! 3. in-cluster: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service
//!    account's token and CA under
//!    `/var/run/secrets/kubernetes.io/serviceaccount`;
//! 4. `/etc/rancher/k3s/k3s.yaml` when readable (k3s's admin kubeconfig,
//!    client certificate);
//! 5. `$KUBECONFIG` (first entry), then `~/.kube/config`.
//!
//! A token file is re-read whenever its modification time or size changes
//! (projected service-account tokens rotate, by an atomic symlink swap),
//! so a rotated token is used without a restart. The file is looked at
//! (one `statx`) at most once per [`TOKEN_RECHECK`], not per request.
//!
//! Submodules: [`headers`] (what is forwarded), [`proxy`] (one tunnel
//! stream to one API-server exchange).

pub mod headers;
pub mod proxy;

use super::http1::{self, Pool};
use super::net::Target;
use super::yaml;
use crate::proto::Header;
use crate::secret::Secret;
use crate::tls::{self, ClientIdentity, Trust};
use base64::Engine as _;
use serde::Deserialize;
use std::cell::RefCell;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The service account's files in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// k3s's admin kubeconfig.
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

/// Most warm connections kept to the API server.
pub const POOL_IDLE: usize = 32;

/// How the agent was told to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct KubeFlags {
    pub kubeconfig: Option<PathBuf>,
    pub url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// How long a token read from its file is used before the file is looked
/// at again. Kubelet rotates projected tokens at 80 % of their lifetime
/// (an hour or more) and the old one stays valid, so a second's delay is
/// nothing; client-go waits a minute. A `statx` per request was ~2 % of
/// the agent's CPU per small request.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(1);

/// A bearer token that follows its file.
pub struct TokenFile {
    path: PathBuf,
    cache: RefCell<Option<CachedToken>>,
}

struct CachedToken {
    modified: Option<SystemTime>,
    len: u64,
    token: Secret,
    /// `Bearer TOKEN`, built once per token rather than per request.
    header: Secret,
    checked: Instant,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        TokenFile { path, cache: RefCell::new(None) }
    }

    /// The token now: re-read when the file changed since the last read,
    /// which is checked at most once per [`TOKEN_RECHECK`].
    pub fn current(&self) -> io::Result<Secret> {
        self.with_current(|c| c.token.clone())
    }

    /// Runs `f` on the current token and its `Authorization` value, as
    /// [`TokenFile::current`] finds them, without copying either out.
    fn with_current<R>(&self, f: impl FnOnce(&CachedToken) -> R) -> io::Result<R> {
        let now = Instant::now();
        if let Some(c) = &*self.cache.borrow() {
            if now.saturating_duration_since(c.checked) < TOKEN_RECHECK {
                return Ok(f(c));
            }
        }
        let meta = std::fs::metadata(&self.path)?;
        let (modified, len) = (meta.modified().ok(), meta.len());
        if let Some(c) = &mut *self.cache.borrow_mut() {
            if (c.modified, c.len) == (modified, len) {
                c.checked = now;
                return Ok(f(c));
            }
        }
        let text = std::fs::read_to_string(&self.path)?;
        let token = Secret::new(text.trim());
        if self.cache.borrow().is_some() {
            log::info!("token file {} changed; using the new token", self.path.display());
        }
        let header = bearer(&token);
        let cached = CachedToken { modified, len, token, header, checked: now };
        let r = f(&cached);
        *self.cache.borrow_mut() = Some(cached);
        Ok(r)
    }
}

/// `Bearer TOKEN`, the `Authorization` value for a token.
fn bearer(token: &Secret) -> Secret {
    let mut v = String::with_capacity(7 + token.expose().len());
    v.push_str("Bearer ");
    v.push_str(token.expose());
    Secret::new(v)
}

/// How the agent authenticates to the API server.
pub enum Auth {
    /// A client certificate in the TLS configuration (k3s), or nothing.
    Tls,
    /// A fixed token, kept as its `Authorization` value (`Bearer TOKEN`).
    Token(Secret),
    TokenFile(TokenFile),
}

/// The API server and the agent's way in.
pub struct Kube {
    pub pool: Pool,
    pub auth: Auth,
    /// Where the settings came from, for logs.
    pub source: String,
}

impl fmt::Debug for Kube {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kube({} via {})", self.pool.target, self.source)
    }
}

/// Why the API server settings could not be found or used.
#[derive(Debug)]
pub struct KubeError(pub String);

impl fmt::Display for KubeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn read_text(path: &Path, what: &str) -> Result<String, KubeError> {
    std::fs::read_to_string(path).map_err(|e| KubeError(format!("cannot read {what} {}: {e}", path.display())))
}

impl Kube {
    /// Finds the API server as the module docs describe.
    pub fn discover(flags: &KubeFlags) -> Result<Kube, KubeError> {
        let env = |name: &str| std::env::var_os(name);
        Kube::discover_in(flags, &env, Path::new(SERVICE_ACCOUNT_DIR), Path::new(K3S_KUBECONFIG))
    }

    /// [`Kube::discover`] with the environment and the well-known paths
    /// given, so each branch can be tested.
    pub fn discover_in(
        flags: &KubeFlags,
        env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
        service_account_dir: &Path,
        k3s: &Path,
    ) -> Result<Kube, KubeError> {
        let var = |name: &str| env(name).and_then(|v| v.into_string().ok()).filter(|v| !v.is_empty());
        if let Some(url) = &flags.url {
            let target = Target::parse(url).map_err(|e| KubeError(format!("--kube-url: {e}")))?;
            let trust = match &flags.ca {
                Some(p) => Trust::CaPem(read_text(p, "the API server CA (--kube-ca)")?),
                None => Trust::WebPki,
            };
            let auth = match &flags.token_file {
                Some(p) => {
                    let tf = TokenFile::new(p.clone());
                    tf.current()
                        .map_err(|e| KubeError(format!("cannot read --kube-token-file {}: {e}", p.display())))?;
                    Auth::TokenFile(tf)
                }
                None => Auth::Tls,
            };
            return Kube::build(target, &trust, None, auth, "command-line flags".into());
        }
        if let Some(p) = &flags.kubeconfig {
            return Kube::from_kubeconfig(p);
        }
        if let Some(host) = var("KUBERNETES_SERVICE_HOST") {
            let port = var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            let target = Target::parse(&format!("https://{host}:{port}")).map_err(KubeError)?;
            let dir = service_account_dir;
            let ca = read_text(&dir.join("ca.crt"), "the service-account CA")?;
            let tf = TokenFile::new(dir.join("token"));
            tf.current().map_err(|e| KubeError(format!("cannot read the service-account token: {e}")))?;
            return Kube::build(
                target,
                &Trust::CaPem(ca),
                None,
                Auth::TokenFile(tf),
                "in-cluster service account".into(),
            );
        }
        if std::fs::File::open(k3s).is_ok() {
            return Kube::from_kubeconfig(k3s);
        }
        if let Some(first) = env("KUBECONFIG").and_then(|v| std::env::split_paths(&v).next()) {
            if !first.as_os_str().is_empty() {
                return Kube::from_kubeconfig(&first);
            }
        }
        if let Some(home) = env("HOME") {
            let p = Path::new(&home).join(".kube/config");
            if p.exists() {
                return Kube::from_kubeconfig(&p);
            }
        }
        Err(KubeError(
            "no way to reach the Kubernetes API server: not in a pod, no /etc/rancher/k3s/k3s.yaml, no $KUBECONFIG or \
             ~/.kube/config; pass --kubeconfig PATH or --kube-url URL"
                .into(),
        ))
    }

    pub fn from_kubeconfig(path: &Path) -> Result<Kube, KubeError> {
        let text = read_text(path, "kubeconfig")?;
        let s = kubeconfig_settings(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| KubeError(format!("kubeconfig {}: {e}", path.display())))?;
        let target =
            Target::parse(&s.server).map_err(|e| KubeError(format!("kubeconfig {}: server {e}", path.display())))?;
        let trust = s.ca_pem.map(Trust::CaPem).unwrap_or(Trust::WebPki);
        let identity = match (s.client_cert_pem, s.client_key_pem) {
            (Some(c), Some(k)) => {
                let chain = tls::certs_from_pem(&c, "the kubeconfig's client certificate")
                    .map_err(|e| KubeError(format!("kubeconfig {}: {e}", path.display())))?;
                let key = tls::key_from_pem(&k, "the kubeconfig's client key")
                    .map_err(|e| KubeError(format!("kubeconfig {}: {e}", path.display())))?;
                Some(ClientIdentity { chain, key })
            }
            _ => None,
        };
        let auth = match (s.token, s.token_file) {
            (Some(t), _) => Auth::Token(bearer(&t)),
            (None, Some(f)) => Auth::TokenFile(TokenFile::new(f)),
            _ => Auth::Tls,
        };
        Kube::build(target, &trust, identity, auth, format!("kubeconfig {}", path.display()))
    }

    fn build(
        target: Target,
        trust: &Trust,
        identity: Option<ClientIdentity>,
        auth: Auth,
        source: String,
    ) -> Result<Kube, KubeError> {
        let tls = if target.tls {
            Some(tls::client_config(trust, identity, &[b"http/1.1"]).map_err(|e| KubeError(format!("{source}: {e}")))?)
        } else {
            None
        };
        Ok(Kube { pool: Pool::new(target, tls, None, POOL_IDLE), auth, source })
    }

    /// The `Authorization` value to send now, if the agent uses a token.
    pub fn authorization(&self) -> io::Result<Option<String>> {
        self.with_authorization(|a| a.map(str::to_string))
    }

    /// Runs `f` on the `Authorization` value to send now (`None`: the
    /// agent authenticates with its client certificate), without a copy
    /// of it per request.
    pub fn with_authorization<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> io::Result<R> {
        match &self.auth {
            Auth::Tls => Ok(f(None)),
            Auth::Token(header) => Ok(f(Some(header.expose()))),
            Auth::TokenFile(file) => file.with_current(|c| f(Some(c.header.expose()))),
        }
    }

    /// A request as the agent itself (no impersonation); whole answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<http1::Answer> {
        let mut headers = vec![Header::new("Accept", "application/json"), Header::new("User-Agent", user_agent())];
        if body.is_some() {
            headers.push(Header::new("Content-Type", "application/json"));
        }
        if let Some(a) = self.authorization()? {
            headers.push(Header::new("Authorization", a));
        }
        http1::exchange(&self.pool, method, path, &headers, body.unwrap_or(&[]), 8 << 20).await
    }

    /// The server's `gitVersion`, e.g. `v1.31.2+k3s1`.
    pub async fn version(&self) -> io::Result<String> {
        let a = self.call("GET", "/version", None).await?;
        if a.status != 200 {
            return Err(io::Error::other(format!("GET /version answered {}", a.status)));
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(io::Error::other)?;
        Ok(v["gitVersion"].as_str().unwrap_or_default().to_string())
    }

    /// How many nodes the cluster has, from one small list call
    /// (`limit=1` plus `remainingItemCount`).
    pub async fn node_count(&self) -> io::Result<u32> {
        let a = self.call("GET", "/api/v1/nodes?limit=1", None).await?;
        if a.status != 200 {
            return Err(io::Error::other(format!("listing nodes answered {}", a.status)));
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(io::Error::other)?;
        let items = v["items"].as_array().map_or(0, Vec::len) as u64;
        let rest = v["metadata"]["remainingItemCount"].as_u64().unwrap_or(0);
        Ok((items + rest).min(u32::MAX as u64) as u32)
    }
}

pub fn user_agent() -> String {
    format!("uplink/{} ({}; {})", env!("CARGO_PKG_VERSION"), std::env::consts::OS, std::env::consts::ARCH)
}

/// What a kubeconfig's current context says.
#[derive(Debug, Default)]
pub struct KubeconfigSettings {
    pub server: String,
    pub ca_pem: Option<String>,
    pub client_cert_pem: Option<String>,
    pub client_key_pem: Option<String>,
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct KubeconfigFile {
    clusters: Vec<Named<ClusterEntry>>,
    users: Vec<NamedUser>,
    contexts: Vec<Named<ContextEntry>>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "context")]
    inner: Option<T>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    user: Option<UserEntry>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct ClusterEntry {
    server: Option<String>,
    certificate_authority_data: Option<String>,
    certificate_authority: Option<String>,
    insecure_skip_tls_verify: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContextEntry {
    cluster: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct UserEntry {
    client_certificate_data: Option<String>,
    client_key_data: Option<String>,
    client_certificate: Option<String>,
    client_key: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    exec: Option<serde_json::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_json::Value>,
}

fn b64(field: &str, v: &str) -> Result<String, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.split_whitespace().collect::<String>())
        .map_err(|_| format!("{field} is not valid base64"))?;
    String::from_utf8(raw).map_err(|_| format!("{field} is not PEM text"))
}

/// Reads the current context of a kubeconfig; relative file paths are
/// relative to `dir`.
pub fn kubeconfig_settings(text: &str, dir: &Path) -> Result<KubeconfigSettings, String> {
    // JSON is YAML too, and some tools write kubeconfigs as JSON.
    let value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("not readable as JSON: {e}"))?
    } else {
        yaml::parse(text).map_err(|e| format!("not readable as YAML: {e}"))?
    };
    let file: KubeconfigFile = serde_json::from_value(value).map_err(|e| format!("unexpected structure: {e}"))?;
    let ctx_name = file.current_context.clone().filter(|c| !c.is_empty());
    let ctx = match &ctx_name {
        Some(n) => file
            .contexts
            .iter()
            .find(|c| &c.name == n)
            .ok_or_else(|| format!("current-context {n:?} is not among the contexts"))?
            .inner
            .as_ref(),
        None if file.contexts.len() == 1 => file.contexts[0].inner.as_ref(),
        None if file.contexts.is_empty() && file.clusters.len() == 1 => None,
        None => return Err("no current-context set and several contexts to choose from".into()),
    };
    let cluster_name = ctx.and_then(|c| c.cluster.clone());
    let cluster = match &cluster_name {
        Some(n) => file.clusters.iter().find(|c| &c.name == n).ok_or_else(|| format!("cluster {n:?} not found"))?,
        None => file.clusters.first().ok_or("no clusters")?,
    };
    let cluster = cluster.inner.as_ref().ok_or("cluster entry without settings")?;
    let server = cluster.server.clone().ok_or("cluster has no server")?;
    if cluster.insecure_skip_tls_verify.as_deref() == Some("true") {
        return Err("insecure-skip-tls-verify is set; the agent always verifies the API server: give it the CA".into());
    }
    let resolve = |p: &str| -> PathBuf { if Path::new(p).is_absolute() { PathBuf::from(p) } else { dir.join(p) } };
    let read = |p: &str, what: &str| -> Result<String, String> {
        let path = resolve(p);
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    let ca_pem = match (&cluster.certificate_authority_data, &cluster.certificate_authority) {
        (Some(d), _) => Some(b64("certificate-authority-data", d)?),
        (None, Some(p)) => Some(read(p, "certificate-authority")?),
        _ => None,
    };
    let mut s = KubeconfigSettings { server, ca_pem, ..Default::default() };
    let user_name = ctx.and_then(|c| c.user.clone());
    let user = match &user_name {
        Some(n) => Some(file.users.iter().find(|u| &u.name == n).ok_or_else(|| format!("user {n:?} not found"))?),
        None => file.users.first(),
    };
    if let Some(u) = user.and_then(|u| u.user.as_ref()) {
        if u.exec.is_some() || u.auth_provider.is_some() {
            return Err(
                "exec and auth-provider credentials are not supported; use a token or client certificate".into()
            );
        }
        s.client_cert_pem = match (&u.client_certificate_data, &u.client_certificate) {
            (Some(d), _) => Some(b64("client-certificate-data", d)?),
            (None, Some(p)) => Some(read(p, "client-certificate")?),
            _ => None,
        };
        s.client_key_pem = match (&u.client_key_data, &u.client_key) {
            (Some(d), _) => Some(b64("client-key-data", d)?),
            (None, Some(p)) => Some(read(p, "client-key")?),
            _ => None,
        };
        if s.client_cert_pem.is_some() != s.client_key_pem.is_some() {
            return Err("a client certificate needs both the certificate and the key".into());
        }
        s.token = u.token.clone().filter(|t| !t.is_empty()).map(Secret::new);
        s.token_file = u.token_file.as_deref().map(resolve);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K3S: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: Y2VydA==
    client-key-data: a2V5
";

    #[test]
    fn k3s_kubeconfig() {
        let s = kubeconfig_settings(K3S, Path::new("/etc/rancher/k3s")).unwrap();
        assert_eq!(s.server, "https://127.0.0.1:6443");
        assert_eq!(s.ca_pem.as_deref(), Some("-----BEGIN CERTIFICATE-----"));
        assert_eq!(s.client_cert_pem.as_deref(), Some("cert"));
        assert_eq!(s.client_key_pem.as_deref(), Some("key"));
        assert!(s.token.is_none());
    }

    #[test]
    fn token_contexts_and_errors() {
        let doc = "clusters:
- name: a
  cluster: {server: x}
- name: b
  cluster:
    server: https://b.example:443
    certificate-authority: ca.pem
users:
- name: u
  user:
    tokenFile: tok
contexts:
- name: one
  context:
    cluster: b
    user: u
current-context: one
";
        // The flow mapping above is refused: the reader supports only `{}`.
        assert!(kubeconfig_settings(doc, Path::new("/x")).is_err());
        let doc = doc.replace("  cluster: {server: x}", "  cluster:\n    server: x");
        let err = kubeconfig_settings(&doc, Path::new("/nonexistent")).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let doc = doc.replace("    certificate-authority: ca.pem\n", "");
        let s = kubeconfig_settings(&doc, Path::new("/x")).unwrap();
        assert_eq!(s.server, "https://b.example:443");
        assert_eq!(s.token_file, Some(PathBuf::from("/x/tok")));
        let bad = doc.replace("current-context: one", "current-context: two");
        assert!(kubeconfig_settings(&bad, Path::new("/x")).unwrap_err().contains("\"two\""));
        let exec = doc.replace("    tokenFile: tok", "    exec:\n      command: aws");
        assert!(kubeconfig_settings(&exec, Path::new("/x")).unwrap_err().contains("exec"));
    }

    #[test]
    fn discovery_order() {
        let dir = std::env::temp_dir().join(format!("uplink-discover-{}", std::process::id()));
        let sa = dir.join("sa");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::write(sa.join("token"), "sa-token\n").unwrap();
        // Any PEM certificate will do for the trust store.
        let ca = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap().cert.pem();
        std::fs::write(sa.join("ca.crt"), &ca).unwrap();
        let no_k3s = dir.join("no-k3s.yaml");
        let flags = KubeFlags::default();

        // In a pod.
        let pod_env = |n: &str| match n {
            "KUBERNETES_SERVICE_HOST" => Some("10.43.0.1".into()),
            "KUBERNETES_SERVICE_PORT" => Some("443".into()),
            _ => None,
        };
        let k = Kube::discover_in(&flags, &pod_env, &sa, &no_k3s).unwrap();
        assert_eq!(k.pool.target.authority(), "10.43.0.1");
        assert_eq!(k.authorization().unwrap().as_deref(), Some("Bearer sa-token"));
        assert_eq!(k.source, "in-cluster service account");
        let v6 = |n: &str| (n == "KUBERNETES_SERVICE_HOST").then(|| "fd00::1".into());
        assert_eq!(Kube::discover_in(&flags, &v6, &sa, &no_k3s).unwrap().pool.target.host, "fd00::1");

        // Beside k3s: its kubeconfig, client certificate.
        let k3s = dir.join("k3s.yaml");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["admin".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(
            &k3s,
            K3S.replace("LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t", &b64(&ca))
                .replace("Y2VydA==", &b64(&cert.pem()))
                .replace("a2V5", &b64(&key.serialize_pem())),
        )
        .unwrap();
        let none = |_: &str| None;
        let k = Kube::discover_in(&flags, &none, &sa, &k3s).unwrap();
        assert_eq!(k.pool.target.authority(), "127.0.0.1:6443");
        assert!(k.authorization().unwrap().is_none(), "k3s authenticates with its client certificate");

        // Nothing at all: says what to pass.
        let home = |n: &str| (n == "HOME").then(|| dir.join("home").into_os_string());
        let e = Kube::discover_in(&flags, &home, &sa, &no_k3s).unwrap_err();
        assert!(e.0.contains("--kubeconfig"), "{e}");
        // Flags win over everything.
        let f = KubeFlags { url: Some("https://10.0.0.5:6443".into()), ..Default::default() };
        assert_eq!(Kube::discover_in(&f, &pod_env, &sa, &k3s).unwrap().source, "command-line flags");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn token_file_follows_changes() {
        let dir = std::env::temp_dir().join(format!("uplink-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, "one\n").unwrap();
        let tf = TokenFile::new(p.clone());
        assert_eq!(tf.current().unwrap().expose(), "one");
        std::fs::write(&p, "two-longer\n").unwrap();
        // Within TOKEN_RECHECK the file is not looked at again.
        assert_eq!(tf.current().unwrap().expose(), "one");
        std::thread::sleep(TOKEN_RECHECK + Duration::from_millis(50));
        assert_eq!(tf.current().unwrap().expose(), "two-longer");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
