//! rustls configurations shared by the agent and the hub: which servers a
//! client trusts (public webpki roots, a private CA, or a public-key pin)
//! and the hub's server configuration; [`CertCheck`], a verifier that is
//! its certificate check alone (the pin; the hub's PostgreSQL `sslmode`s).
//! One crypto provider: ring.
//!
//! Not here: dialling, proxies, certificate generation (the hub does that
//! with rcgen).

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::fmt;
use std::sync::Arc;

/// Why a TLS configuration could not be built.
#[derive(Debug)]
pub enum TlsError {
    /// PEM input held no certificate.
    NoCertificate(String),
    /// PEM input held no private key.
    NoKey(String),
    /// A pin is not base64 of 32 bytes.
    BadPin(String),
    /// rustls refused the material.
    Rustls(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::NoCertificate(what) => write!(f, "no PEM certificate found in {what}"),
            TlsError::NoKey(what) => write!(f, "no PEM private key found in {what}"),
            TlsError::BadPin(pin) => write!(f, "public-key pin {pin:?} is not base64 of a SHA-256 digest"),
            TlsError::Rustls(e) => write!(f, "TLS configuration refused: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError::Rustls(e)
    }
}

/// How a client decides whether to trust a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The Mozilla roots compiled in (webpki-roots).
    WebPki,
    /// Only certificates chaining to these CAs (PEM).
    CaPem(String),
    /// Only a server whose certificate's SubjectPublicKeyInfo hashes (SHA-256)
    /// to this base64 value, whatever signed it.
    Pin(String),
}

/// The one crypto provider of this crate.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as Go's TLS does on hardware with AES
    // instructions: the same security level TLS 1.3 mandates, and 10
    // rounds of AES per block instead of 14.
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Parses every certificate in a PEM string.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM string.
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoKey(what.to_string()))
}

/// A client certificate to present (k3s's admin kubeconfig authenticates so).
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// A TLS 1.3/1.2 client configuration.
pub fn client_config(
    trust: &Trust,
    identity: Option<ClientIdentity>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match trust {
        Trust::WebPki => {
            let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            builder.with_root_certificates(roots)
        }
        Trust::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in certs_from_pem(pem, "the CA bundle")? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Pin(pin) => builder.dangerous().with_custom_certificate_verifier(pin_verifier(pin)?),
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A server configuration from a PEM chain and key, speaking HTTP/1.1.
pub fn server_config(cert_pem: &str, key_pem: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs_from_pem(cert_pem, "the server certificate")?;
    let key = key_from_pem(key_pem, "the server key")?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The base64 SHA-256 of a certificate's SubjectPublicKeyInfo: the value a
/// [`Trust::Pin`] names. `None` when the DER is not a certificate.
pub fn spki_pin(cert_der: &[u8]) -> Option<String> {
    let spki = spki_of(cert_der)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    Some(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

/// Finds the SubjectPublicKeyInfo inside an X.509 certificate by walking
/// the DER: Certificate ::= SEQ { tbs SEQ { [0] version OPTIONAL, serial,
/// signature, issuer, validity, subject, spki, ... }, ... }.
fn spki_of(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = der_element(der, 0x30)?;
    let (tbs, _) = der_element(der_contents(cert)?, 0x30)?;
    let mut rest = der_contents(tbs)?;
    if rest.first() == Some(&0xa0) {
        rest = der_skip(rest)?;
    }
    for _ in 0..5 {
        rest = der_skip(rest)?; // serial, signature, issuer, validity, subject
    }
    let (spki, _) = der_element(rest, 0x30)?;
    Some(spki)
}

/// Splits off the first DER element (tag, length and contents) if its tag is `tag`.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let len = der_total_len(input)?;
    Some((input.get(..len)?, input.get(len..)?))
}

fn der_skip(input: &[u8]) -> Option<&[u8]> {
    input.get(der_total_len(input)?..)
}

fn der_header(input: &[u8]) -> Option<(usize, usize)> {
    let first = *input.get(1)?;
    if first < 0x80 {
        return Some((2, first as usize));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for &b in input.get(2..2 + n)? {
        len = (len << 8) | b as usize;
    }
    Some((2 + n, len))
}

fn der_total_len(input: &[u8]) -> Option<usize> {
    let (hdr, len) = der_header(input)?;
    hdr.checked_add(len)
}

fn der_contents(element: &[u8]) -> Option<&[u8]> {
    let (hdr, len) = der_header(element)?;
    element.get(hdr..hdr.checked_add(len)?)
}

/// A server-certificate verifier made of its certificate check alone:
/// the handshake's signatures are verified with the crate's provider, the
/// same for every way of trusting a server (the pin here; PostgreSQL's
/// `sslmode`s in `hub::store::pg_tls`). `check` gets what rustls's
/// `verify_server_cert` gets: the end-entity certificate, the
/// intermediates, the name asked for, the OCSP response and the time.
pub struct CertCheck<F> {
    check: F,
    algorithms: WebPkiSupportedAlgorithms,
}

impl<F> CertCheck<F>
where
    F: Fn(&CertificateDer<'_>, &[CertificateDer<'_>], &ServerName<'_>, &[u8], UnixTime) -> CertVerdict + Send + Sync,
{
    pub fn new(check: F) -> Self {
        CertCheck { check, algorithms: provider().signature_verification_algorithms }
    }
}

/// What a [`CertCheck`]'s check says of a certificate.
pub type CertVerdict = Result<ServerCertVerified, rustls::Error>;

impl<F> fmt::Debug for CertCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertCheck").finish_non_exhaustive()
    }
}

impl<F> ServerCertVerifier for CertCheck<F>
where
    F: Fn(&CertificateDer<'_>, &[CertificateDer<'_>], &ServerName<'_>, &[u8], UnixTime) -> CertVerdict + Send + Sync,
{
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> CertVerdict {
        (self.check)(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Trusts exactly one public key. The certificate's signature chain and
/// name are not checked (the pin is the trust); its validity period is not
/// either, because a pinned key outlives certificate renewals. Handshake
/// signatures are verified, so the peer must hold the pinned key.
fn pin_verifier(pin: &str) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let raw =
        base64::engine::general_purpose::STANDARD.decode(pin.trim()).map_err(|_| TlsError::BadPin(pin.to_string()))?;
    if raw.len() != 32 {
        return Err(TlsError::BadPin(pin.to_string()));
    }
    Ok(Arc::new(CertCheck::new(move |end_entity, _, _, _, _| {
        let spki =
            spki_of(end_entity).ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        if crate::secret::ct_eq(digest.as_ref(), &raw) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handshake in memory between [`server_config`] and a client with
    /// `suites` in its order of preference; the suite they agreed on.
    fn agreed(suites: &[rustls::CipherSuite]) -> rustls::CipherSuite {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["hub.example.com".into()]).unwrap().self_signed(&key).unwrap();
        let server = server_config(&cert.pem(), &key.serialize_pem()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites.retain(|s| suites.contains(&s.suite()));
        p.cipher_suites.sort_by_key(|s| suites.iter().position(|x| *x == s.suite()));
        let client = ClientConfig::builder_with_provider(Arc::new(p))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("hub.example.com").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        s.negotiated_cipher_suite().unwrap().suite()
    }

    /// The hub picks AES-128-GCM whatever a client prefers (OpenSSL's
    /// clients, curl and wrk, put AES-256 first), and still serves a
    /// client that offers only AES-256.
    #[test]
    fn the_server_prefers_aes_128_and_serves_the_others() {
        use rustls::CipherSuite::*;
        assert_eq!(
            agreed(&[TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256]),
            TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(agreed(&[TLS13_AES_256_GCM_SHA384]), TLS13_AES_256_GCM_SHA384);
        assert_eq!(agreed(&[TLS13_CHACHA20_POLY1305_SHA256]), TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(provider().cipher_suites[0].suite(), TLS13_AES_128_GCM_SHA256, "clients (agent) offer it first");
    }
}
