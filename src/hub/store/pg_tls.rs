//! TLS from a hub replica to PostgreSQL: libpq's `sslmode` and
//! `sslrootcert` over rustls with the crate's one provider (ring).
//!
//! ```text
//!  sslmode      TLS                         server certificate
//!  disable      never                       -
//!  prefer       if the server offers it     not checked (as libpq)
//!  require      always                      not checked, unless sslrootcert is given: then as verify-ca (as libpq)
//!  verify-ca    always                      signed by a CA in sslrootcert
//!  verify-full  always                      signed by a CA in sslrootcert, and names the host
//! ```
//!
//! `sslrootcert=PATH` is a PEM file of CA certificates (default, as
//! libpq: `~/.postgresql/root.crt`); `sslrootcert=system` trusts the
//! public web roots the crate ships. `PGSSLMODE` and `PGSSLROOTCERT` apply
//! when the connection string does not say.
//!
//! Not here: client certificates (`sslcert`/`sslkey`) and SCRAM channel
//! binding (`-PLUS`): the stream reports no binding, so the server's
//! SCRAM-SHA-256 without it is used. The driver (tokio-postgres, inside
//! the sync `postgres` client) does the `SSLRequest` negotiation; this
//! module only hands it a rustls connector.

use crate::tls::CertCheck;
use ::postgres::Socket;
use ::postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries plain first; a hub has no reason to.
            other => {
                return Err(format!(
                    "invalid sslmode \"{other}\" in the PostgreSQL connection string: \
                     use disable, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What the driver must do: it knows only disable, prefer and require
    /// (the checks beyond are ours, in the verifier).
    pub fn driver(self) -> ::postgres::config::SslMode {
        match self {
            SslMode::Disable => ::postgres::config::SslMode::Disable,
            SslMode::Prefer => ::postgres::config::SslMode::Prefer,
            _ => ::postgres::config::SslMode::Require,
        }
    }
}

/// The connector handed to the driver: one rustls configuration, built
/// once from the connection string.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    /// The connector for `mode`, trusting `rootcert` (a PEM file, or
    /// `system`) where the mode checks the server. `None` for `disable`.
    /// `mode` is returned as it takes effect (`require` with a root
    /// certificate is `verify-ca`, as in libpq).
    pub fn new(mode: SslMode, rootcert: Option<&str>) -> Result<(Option<MakeRustls>, SslMode), String> {
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to PostgreSQL: {e}"))?;
        let (verifier, mode): (Arc<dyn ServerCertVerifier>, _) = match mode {
            SslMode::Disable => return Ok((None, mode)),
            // `prefer` and `require` without a root certificate:
            // encryption against a passive listener, no check of who
            // answers (libpq's meaning). The handshake's signatures are
            // still verified.
            SslMode::Prefer | SslMode::Require if rootcert.is_none() => {
                (Arc::new(CertCheck::new(|_, _, _, _, _| Ok(ServerCertVerified::assertion()))), mode)
            }
            _ => {
                let mode = if mode == SslMode::VerifyFull { mode } else { SslMode::VerifyCa };
                let roots = Arc::new(load_roots(rootcert, mode)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| format!("sslrootcert: {e}"))?;
                if mode == SslMode::VerifyFull { (webpki, mode) } else { (Arc::new(chain_only(webpki)), mode) }
            }
        };
        let mut config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        // PostgreSQL 17 checks the protocol name when a client sends one.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok((Some(MakeRustls { config: Arc::new(config) }), mode))
    }
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in the
/// certificate is not compared with the host. WebPKI checks the chain
/// before the name, so a name error means the chain was good.
fn chain_only(webpki: Arc<WebPkiServerVerifier>) -> impl ServerCertVerifier {
    CertCheck::new(move |end_entity, intermediates, name, ocsp, now| {
        match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    })
}

/// The CA certificates `sslrootcert` names.
fn load_roots(rootcert: Option<&str>, mode: SslMode) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if rootcert == Some("system") {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(roots);
    }
    let path = match rootcert {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(h) => Path::new(&h).join(".postgresql/root.crt"),
            None => PathBuf::from(".postgresql/root.crt"),
        },
    };
    let pem = std::fs::read(&path).map_err(|e| {
        format!(
            "sslmode={} needs the CA that signed the server's certificate: sslrootcert {}: {e} \
             (give sslrootcert=FILE, or sslrootcert=system for public CAs)",
            mode.as_str(),
            path.display()
        )
    })?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|_| io::Error::other(format!("\"{domain}\" is not a host name TLS can check")))?;
        Ok(RustlsConnect { config: self.config.clone(), name })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let host = match &self.name {
                ServerName::DnsName(d) => d.as_ref().to_string(),
                ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                _ => String::new(),
            };
            tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await.map(RustlsStream).map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::InvalidCertificate(why)) => io::Error::other(format!(
                        "the server's certificate was refused ({why:?}): sslrootcert must hold the CA that \
                         signed it, and with sslmode=verify-full it must name {host}"
                    )),
                    _ => e,
                },
            )
        })
    }
}

/// A TLS session to PostgreSQL, as the driver reads and writes it.
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(SslMode::parse("verify-full").unwrap(), SslMode::VerifyFull);
        assert!(SslMode::parse("allow").unwrap_err().contains("invalid sslmode \"allow\""));
        assert!(MakeRustls::new(SslMode::Disable, None).unwrap().0.is_none());
        let (_, mode) = MakeRustls::new(SslMode::Require, None).unwrap();
        assert_eq!(mode, SslMode::Require);
        let e = MakeRustls::new(SslMode::VerifyFull, Some("/nonexistent/root.crt")).err().unwrap();
        assert!(e.contains("sslmode=verify-full needs the CA") && e.contains("/nonexistent/root.crt"), "{e}");
        let (_, mode) = MakeRustls::new(SslMode::Require, Some("system")).unwrap();
        assert_eq!(mode, SslMode::VerifyCa, "require with a root certificate checks the chain, as libpq");
    }
}
