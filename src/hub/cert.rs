//! The hub's TLS identity: the operator's certificate, or a private CA
//! and a server certificate made on first start and kept in the data
//! directory.
//!
//! ```text
//!   data-dir/ca.pem   CA certificate: what agents (activation hub_ca_pem)
//!                     and kubeconfigs (certificate-authority-data) trust
//!   data-dir/ca.key   CA key (0600)
//!   data-dir/hub.key  server key (0600), kept so the SPKI pin is stable
//!   data-dir/hub.pem  server certificate, re-issued at each start with the
//!                     current names (localhost, 127.0.0.1, hostname,
//!                     the public URL's host)
//! ```

use super::store::postgres::SharedIdentity;
use crate::secret::Secret;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use std::fs;
use std::io::Write;
use std::path::Path;

/// What the hub serves and what clients should trust.
pub struct TlsMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    /// The private CA's certificate, `None` for an operator certificate
    /// (then clients use their usual roots).
    pub ca_pem: Option<String>,
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let tmp = path.with_extension("tmp");
    let mut f = opts.open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(tmp, path)
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "uplink hub CA");
    dn.push(DnType::OrganizationName, "uplink");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn load_or_create_key(path: &Path) -> Result<KeyPair, String> {
    if let Ok(pem) = fs::read_to_string(path) {
        return KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    write_private(path, &key.serialize_pem()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(key)
}

/// The self-signed material in `dir`, created where missing. `names` are
/// the server certificate's subject alternative names.
pub fn self_signed(dir: &Path, names: &[String]) -> Result<TlsMaterial, String> {
    let ca_key = load_or_create_key(&dir.join("ca.key"))?;
    // The CA certificate is issued once; later starts rebuild an issuer
    // with the same name and key, which is all that signing needs.
    let ca_cert = ca_params().self_signed(&ca_key).map_err(|e| e.to_string())?;
    let ca_path = dir.join("ca.pem");
    let ca_pem = match fs::read_to_string(&ca_path) {
        Ok(pem) => pem,
        Err(_) => {
            let pem = ca_cert.pem();
            write_private(&ca_path, &pem).map_err(|e| format!("{}: {e}", ca_path.display()))?;
            pem
        }
    };
    let key = load_or_create_key(&dir.join("hub.key"))?;
    let material = issue(&ca_key, &ca_cert, ca_pem, &key, names)?;
    write_private(&dir.join("hub.pem"), &material.cert_pem).map_err(|e| e.to_string())?;
    Ok(material)
}

/// A new CA and server key, for a shared store to keep.
pub fn new_identity() -> Result<SharedIdentity, String> {
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let ca_pem = ca_params().self_signed(&ca_key).map_err(|e| e.to_string())?.pem();
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    Ok(SharedIdentity {
        ca_key_pem: Secret::new(ca_key.serialize_pem()),
        ca_pem,
        key_pem: Secret::new(key.serialize_pem()),
    })
}

/// The material of a shared identity, with a server certificate for
/// `names` issued now; `dir` gets a copy of the CA certificate (public)
/// for the operator to hand out.
pub fn from_identity(id: &SharedIdentity, dir: &Path, names: &[String]) -> Result<TlsMaterial, String> {
    let bad = |e: rcgen::Error| format!("the hub identity in the store is unreadable: {e}");
    let ca_key = KeyPair::from_pem(id.ca_key_pem.expose()).map_err(bad)?;
    let ca_cert = ca_params().self_signed(&ca_key).map_err(bad)?;
    let key = KeyPair::from_pem(id.key_pem.expose()).map_err(bad)?;
    let ca_path = dir.join("ca.pem");
    write_private(&ca_path, &id.ca_pem).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    issue(&ca_key, &ca_cert, id.ca_pem.clone(), &key, names)
}

fn issue(
    ca_key: &KeyPair,
    ca_cert: &rcgen::Certificate,
    ca_pem: String,
    key: &KeyPair,
    names: &[String],
) -> Result<TlsMaterial, String> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    params.distinguished_name.push(DnType::CommonName, "uplink-hub");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(key, ca_cert, ca_key).map_err(|e| e.to_string())?;
    Ok(TlsMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: Some(ca_pem) })
}

/// The host's name, for the certificate (best effort).
pub fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}
