//! The agent's persisted registration: what activation gave it (cluster
//! id, credential, hub URL and trust), so restarts and rescheduling never
//! activate again.
//!
//! Encoding: postcard of [`StateFile`], whose enum tag is the format
//! version (a varint: `0` is version 1). A later version appends a
//! variant; an older agent reading it says so instead of misreading.
//!
//! Stores: a file (systemd hosts; mode 0600, written to a temporary file,
//! fsynced, renamed over the old one and the directory fsynced, so a crash
//! leaves the old state or the new one, never half of one), or the
//! pre-created Secret `uplink-state` (pods), key `state`, base64'd by the
//! API, replaced with the `resourceVersion` read so two replicas never
//! overwrite each other blindly.

use super::kube::Kube;
use crate::secret::Secret;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The agent's registration with the hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub cluster_id: String,
    pub cluster: String,
    /// The activation this registration came from: a different one in the
    /// activation file means the cluster was registered again.
    pub activation_id: String,
    pub credential: Secret,
    pub hub_url: String,
    pub hub_ca_pem: Option<String>,
    pub hub_pin_sha256: Option<String>,
    /// Seconds since the epoch.
    pub activated_at: i64,
}

/// The versioned container. Append variants only.
#[derive(Serialize, Deserialize)]
enum StateFile {
    V1(Registration),
}

pub fn encode(reg: &Registration) -> Vec<u8> {
    postcard::to_allocvec(&StateFile::V1(reg.clone())).expect("state serialises")
}

pub fn decode(bytes: &[u8]) -> Result<Registration, String> {
    if bytes.first().is_some_and(|&tag| tag > 0) {
        return Err(format!("written in state format {} by a newer agent; upgrade this agent", bytes[0] as u32 + 1));
    }
    match postcard::from_bytes::<StateFile>(bytes) {
        Ok(StateFile::V1(r)) => Ok(r),
        Err(e) => Err(format!("not a readable agent state ({e})")),
    }
}

/// Where the state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateStore {
    File(PathBuf),
    Secret { namespace: String, name: String },
}

/// Why the state could not be read or written.
#[derive(Debug)]
pub struct StateError(pub String);

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for StateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateStore::File(p) => write!(f, "state file {}", p.display()),
            StateStore::Secret { namespace, name } => write!(f, "state Secret {namespace}/{name}"),
        }
    }
}

impl StateStore {
    /// Parses `--state-secret NAMESPACE/NAME`.
    pub fn secret(spec: &str) -> Result<StateStore, String> {
        match spec.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(StateStore::Secret { namespace: ns.into(), name: name.into() })
            }
            _ => Err(format!("--state-secret {spec:?}: expected NAMESPACE/NAME, e.g. uplink/uplink-state")),
        }
    }

    fn secret_path(namespace: &str, name: &str) -> String {
        format!("/api/v1/namespaces/{namespace}/secrets/{name}")
    }

    /// The saved registration, `None` when nothing was saved yet.
    pub async fn load(&self, kube: &Kube) -> Result<Option<Registration>, StateError> {
        match self {
            StateStore::File(p) => load_file(p),
            StateStore::Secret { namespace, name } => {
                let (obj, _) = self.get_secret(kube, namespace, name).await?;
                let Some(b64) = obj["data"]["state"].as_str().filter(|s| !s.is_empty()) else { return Ok(None) };
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| StateError(format!("{self}: key `state` is not base64")))?;
                decode(&bytes).map(Some).map_err(|e| StateError(format!("{self}: {e}")))
            }
        }
    }

    /// Saves the registration, replacing any earlier one.
    pub async fn save(&self, kube: &Kube, reg: &Registration) -> Result<(), StateError> {
        let bytes = encode(reg);
        match self {
            StateStore::File(p) => {
                save_file(p, &bytes).map_err(|e| StateError(format!("{self}: cannot write it: {e}")))
            }
            StateStore::Secret { namespace, name } => {
                let path = Self::secret_path(namespace, name);
                for _ in 0..5 {
                    let (mut obj, _) = self.get_secret(kube, namespace, name).await?;
                    if !obj["data"].is_object() {
                        obj["data"] = serde_json::json!({});
                    }
                    obj["data"]["state"] = base64::engine::general_purpose::STANDARD.encode(&bytes).into();
                    if let Some(meta) = obj["metadata"].as_object_mut() {
                        meta.remove("managedFields");
                    }
                    let body = serde_json::to_vec(&obj).expect("serialisable");
                    let a = kube
                        .call("PUT", &path, Some(&body))
                        .await
                        .map_err(|e| StateError(format!("{self}: cannot reach the API server: {e}")))?;
                    match a.status {
                        200 | 201 => return Ok(()),
                        409 => continue, // changed since read: read again
                        403 => {
                            return Err(StateError(format!(
                                "{self}: the agent may not update it (403); apply the Role `uplink-state` from the \
                                 manifest"
                            )));
                        }
                        s => return Err(StateError(format!("{self}: update answered {s}: {}", short(&a.body)))),
                    }
                }
                Err(StateError(format!("{self}: kept changing under the agent; giving up")))
            }
        }
    }

    async fn get_secret(
        &self,
        kube: &Kube,
        namespace: &str,
        name: &str,
    ) -> Result<(serde_json::Value, u16), StateError> {
        let a = kube
            .call("GET", &Self::secret_path(namespace, name), None)
            .await
            .map_err(|e| StateError(format!("{self}: cannot reach the API server: {e}")))?;
        match a.status {
            200 => serde_json::from_slice(&a.body)
                .map(|v| (v, 200))
                .map_err(|e| StateError(format!("{self}: unreadable answer: {e}"))),
            404 => Err(StateError(format!(
                "{self} does not exist; it must be created beforehand (apply the manifest from `uplink-hub cluster \
                 register`)"
            ))),
            403 => Err(StateError(format!(
                "{self}: the agent may not read it (403); apply the Role `uplink-state` from the manifest"
            ))),
            s => Err(StateError(format!("{self}: read answered {s}: {}", short(&a.body)))),
        }
    }
}

fn short(body: &[u8]) -> String {
    let v: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    match v.as_ref().and_then(|v| v["message"].as_str()) {
        Some(m) => m.to_string(),
        None => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

fn load_file(path: &Path) -> Result<Option<Registration>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).map(Some).map_err(|e| StateError(format!("state file {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError(format!("state file {}: cannot read it: {e}", path.display()))),
    }
}

/// Atomic replace: temp file (0600) + fsync + rename + fsync of the dir.
pub fn save_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn reg() -> Registration {
        Registration {
            cluster_id: "c_1".into(),
            cluster: "edge-1".into(),
            activation_id: "act_1".into(),
            credential: Secret::new("cred"),
            hub_url: "https://hub:8443".into(),
            hub_ca_pem: None,
            hub_pin_sha256: Some("pin".into()),
            activated_at: 1,
        }
    }

    #[test]
    fn round_trip_and_version_byte() {
        let bytes = encode(&reg());
        assert_eq!(bytes[0], 0, "version 1 is tag 0");
        assert_eq!(decode(&bytes).unwrap(), reg());
        let mut future = bytes.clone();
        future[0] = 1;
        assert!(decode(&future).unwrap_err().contains("newer agent"));
        assert!(decode(&bytes[..bytes.len() - 3]).unwrap_err().contains("not a readable agent state"));
        assert!(decode(b"").is_err());
    }

    #[test]
    fn file_is_private_and_replaced_atomically() {
        let dir = std::env::temp_dir().join(format!("uplink-state-{}", std::process::id()));
        let path = dir.join("sub/state");
        save_file(&path, &encode(&reg())).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_file(&path).unwrap(), Some(reg()));
        let mut r2 = reg();
        r2.cluster_id = "c_2".into();
        save_file(&path, &encode(&r2)).unwrap();
        assert_eq!(load_file(&path).unwrap(), Some(r2));
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
        // A failed write (directory in the way of the temp file's rename
        // target) leaves the old state intact.
        assert!(save_file(&dir.join("sub"), b"x").is_err());
        assert_eq!(load_file(&path).unwrap().unwrap().cluster_id, "c_2");
        assert_eq!(load_file(&dir.join("missing")).unwrap(), None);
        std::fs::write(&path, b"garbage!").unwrap();
        assert!(load_file(&path).unwrap_err().to_string().contains(&path.display().to_string()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_spec() {
        assert_eq!(
            StateStore::secret("uplink/uplink-state").unwrap(),
            StateStore::Secret { namespace: "uplink".into(), name: "uplink-state".into() }
        );
        assert!(StateStore::secret("uplink-state").is_err());
        assert!(StateStore::secret("a/b/c").is_err());
    }
}
