//! TLS for node and client: certificates, fingerprints, and the two verifiers.
//!
//! Both sides run TLS 1.3 only, over rustls with the ring provider.
//! - The node accepts any well-formed client certificate and checks its handshake
//!   signature: a device *is* its key, identified by [`key_id`], the SHA-256 of the
//!   certificate's SubjectPublicKeyInfo. Whether that key belongs to a registered
//!   device is the node's business, not TLS's. Because the proof is the TLS handshake
//!   itself, it cannot be replayed, and the node stores only public keys.
//! - The client pins the node's certificate by its SHA-256 [`Fingerprint`] instead of
//!   trusting a CA: a community node usually has a self-signed certificate.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::proto::ALPN;

/// What can go wrong with certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup failed: {0}")]
    Quic(String),
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
}

/// SHA-256 of a certificate's DER, written `sha256:<64 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.trim().strip_prefix("sha256:").ok_or_else(|| {
            format!("{s:?} is not a fingerprint: expected sha256: followed by 64 hex digits")
        })?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out).map_err(|_| {
            format!("{s:?} is not a fingerprint: expected sha256: followed by 64 hex digits")
        })?;
        Ok(Fingerprint(out))
    }
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Certificate and key as PEM text, for writing to disk.
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

impl Credentials {
    /// A 32-byte secret named `name`, derived (HKDF-SHA256) from the private key.
    /// Nodes that share the key derive the same secrets, and nothing of them needs
    /// to be stored anywhere: a cluster's nodes share their code-hash and OPRF keys
    /// this way, and the engine never holds them.
    pub fn derive_secret(&self, name: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(
            Some(b"switchboard node secrets v1"),
            self.key.secret_der(),
        );
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32: expand cannot fail.
        let _ = hk.expand(name.as_bytes(), &mut out);
        out
    }

    /// A fresh self-signed node certificate (ECDSA P-256) for `names`.
    pub fn generate_node(names: Vec<String>) -> Result<(Credentials, PemPair), TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Self::self_signed(names, key)
    }

    /// A fresh device key (Ed25519) in a self-signed certificate. The certificate is
    /// only a carrier for the key in the TLS handshake; nobody checks its names.
    pub fn generate_device() -> Result<(Credentials, PemPair), TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        Self::self_signed(vec!["switchboard-device".to_string()], key)
    }

    fn self_signed(
        names: Vec<String>,
        key: rcgen::KeyPair,
    ) -> Result<(Credentials, PemPair), TlsError> {
        let params = rcgen::CertificateParams::new(names)?;
        let cert = params.self_signed(&key)?;
        let pem = PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        };
        let creds = Credentials {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        };
        Ok((creds, pem))
    }

    /// Loads a PEM certificate chain and private key.
    pub fn load_pem(cert: &Path, key: &Path) -> Result<Credentials, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_bytes = read(cert)?;
        let key_bytes = read(key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                path: cert.display().to_string(),
                reason: "no CERTIFICATE block".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Credentials { chain, key })
    }

    /// Parses credentials from PEM text.
    pub fn from_pem(cert: &str, key: &str) -> Result<Credentials, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                path: "certificate".into(),
                reason: e.to_string(),
            })?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Pem {
            path: "key".into(),
            reason: e.to_string(),
        })?;
        Ok(Credentials { chain, key })
    }

    /// The fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.chain
            .first()
            .map(Fingerprint::of)
            .unwrap_or(Fingerprint([0; 32]))
    }
}

/// The device key id of a certificate (SHA-256 of its SubjectPublicKeyInfo) and the
/// SubjectPublicKeyInfo itself.
pub fn key_id(cert: &CertificateDer<'_>) -> Result<([u8; 32], Vec<u8>), TlsError> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TlsError::BadCertificate(format!("{e:?}")))?;
    let spki = ee.subject_public_key_info();
    Ok((Sha256::digest(spki.as_ref()).into(), spki.as_ref().to_vec()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node's rustls configuration: TLS 1.3, our ALPN, client certificates required.
pub fn server_crypto(
    creds: &Credentials,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(AnyDeviceKey {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    // Ours first (rustls picks the server's first that the client offers), then the
    // earlier versions, whose connections are closed with a clear reason.
    config.alpn_protocols = std::iter::once(ALPN)
        .chain(crate::proto::OUTDATED_ALPNS.iter().copied())
        .map(<[u8]>::to_vec)
        .collect();
    // Stateless session tickets (encrypted under a key that rotates, kept in memory
    // only), so a reconnecting device resumes its TLS session: no certificate, no
    // signature on either side, and nothing stored per device on the node. A
    // resumed session carries the client certificate of the handshake that made the
    // ticket, so the node knows the device as before. Tickets die with the process.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// What the client saw of the node's certificate, for a clear error on a mismatch.
#[derive(Debug, Default)]
pub struct PinObservation {
    seen: Mutex<Option<Fingerprint>>,
    /// Certificates checked: full handshakes (a resumed one shows none).
    verified: std::sync::atomic::AtomicU64,
}

impl PinObservation {
    /// How many times the node's certificate was checked.
    pub fn verified(&self) -> u64 {
        self.verified.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fingerprint the node presented, once the handshake got that far.
    pub fn seen(&self) -> Option<Fingerprint> {
        self.seen.lock().map(|s| *s).unwrap_or(None)
    }
}

/// The client's rustls configuration: TLS 1.3, our ALPN, the device key as client
/// certificate, and the node's certificate checked against `pin` (any certificate is
/// accepted, and observed, when `pin` is `None`: trust on first use).
pub fn client_crypto(
    creds: &Credentials,
    pin: Option<Fingerprint>,
) -> Result<
    (
        Arc<quinn::crypto::rustls::QuicClientConfig>,
        Arc<PinObservation>,
    ),
    TlsError,
> {
    client_crypto_speaking(creds, pin, ALPN)
}

/// [`client_crypto`] offering the ALPN id `alpn` (tests of other protocol versions).
pub fn client_crypto_speaking(
    creds: &Credentials,
    pin: Option<Fingerprint>,
    alpn: &[u8],
) -> Result<
    (
        Arc<quinn::crypto::rustls::QuicClientConfig>,
        Arc<PinObservation>,
    ),
    TlsError,
> {
    let provider = provider();
    let observation = Arc::new(PinObservation::default());
    let verifier = Arc::new(PinnedNode {
        pin,
        observation: observation.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok((Arc::new(quic), observation))
}

/// Accepts any well-formed client certificate whose key signs the handshake.
#[derive(Debug)]
struct AnyDeviceKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyDeviceKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
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

/// Accepts the node's certificate only if its fingerprint is the pinned one.
#[derive(Debug)]
struct PinnedNode {
    pin: Option<Fingerprint>,
    observation: Arc<PinObservation>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity);
        self.observation
            .verified
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut slot) = self.observation.seen.lock() {
            *slot = Some(seen);
        }
        match self.pin {
            Some(pin) if pin != seen => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_text_roundtrip() {
        let fp = Fingerprint([0xab; 32]);
        let text = fp.to_string();
        assert!(text.starts_with("sha256:abab"));
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        assert!("abab".parse::<Fingerprint>().is_err());
        assert!("sha256:zz".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn device_key_id_is_stable_across_pem_roundtrip() {
        let (creds, pem) = Credentials::generate_device().unwrap();
        let again = Credentials::from_pem(&pem.cert, &pem.key).unwrap();
        let (a, spki) = key_id(&creds.chain[0]).unwrap();
        let (b, _) = key_id(&again.chain[0]).unwrap();
        assert_eq!(a, b);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(&spki)), a);
        let (other, _) = Credentials::generate_device().unwrap();
        assert_ne!(key_id(&other.chain[0]).unwrap().0, a);
    }
}
