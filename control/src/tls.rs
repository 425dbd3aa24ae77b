//! The cluster's own PKI: a CA made at `cluster init`, one certificate per node whose
//! name pins it to the node's id (`node-<id>.boxd`), mutual TLS on every connection, and
//! the one-time join token that lets a new node check the cluster before it has a
//! certificate of its own.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

use crate::types::NodeId;

/// ALPN of node-to-node RPC.
pub const ALPN: &[u8] = b"boxd-cluster/1";
/// The name every node certificate also carries, used while joining (before the
/// joiner knows any node's id).
pub const CLUSTER_NAME: &str = "cluster.boxd";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error(
        "join token is malformed ({0}); copy it whole from `boxd cluster token` (it starts with `boxd1.`)"
    )]
    BadToken(String),
}

pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.boxd")
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM certificate and key.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Creates the cluster CA.
pub fn new_ca() -> Result<Identity, TlsError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "boxd cluster CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    let cert = p.self_signed(&key)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn node_params(id: NodeId) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![node_name(id), CLUSTER_NAME.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, node_name(id));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Issues node `id`'s certificate for a key generated here (the first node, at init).
pub fn issue_node(ca: &Identity, id: NodeId) -> Result<Identity, TlsError> {
    let key = KeyPair::generate()?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let cert = node_params(id)?.signed_by(&key, &issuer)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A joining node's key and certificate request (the key never leaves the node).
pub fn new_request() -> Result<(KeyPair, String), TlsError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// Signs a joining node's request: only its public key is taken; the names are ours.
pub fn sign_request(ca: &Identity, csr_pem: &str, id: NodeId) -> Result<String, TlsError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    Ok(node_params(id)?.signed_by(&csr.public_key, &issuer)?.pem())
}

fn der_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn der_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TlsError::Verifier(format!("private key: {e}")))
}

/// SHA-256 of the CA certificate (DER), hex: what a join token pins.
pub fn ca_fingerprint(ca_cert_pem: &str) -> String {
    der_certs(ca_cert_pem)
        .first()
        .map(|c| hex::encode(Sha256::digest(c)))
        .unwrap_or_default()
}

fn roots(ca_cert_pem: &str) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in der_certs(ca_cert_pem) {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

/// The server side of node RPC: presents the node's certificate (and the CA, so a joiner
/// can check it against its token), verifies client certificates against the CA, and
/// lets certificate-less clients in for the join RPC only (checked per request).
pub fn server_config(ca_cert_pem: &str, me: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(ca_cert_pem)?,
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut chain = der_certs(&me.cert_pem);
    chain.extend(der_certs(ca_cert_pem));
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, der_key(&me.key_pem)?)?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// The client side of node RPC: our certificate, the CA as the only root; the server
/// name we dial (`node-<id>.boxd`) pins the peer to the id we meant.
pub fn client_config(ca_cert_pem: &str, me: &Identity) -> Result<rustls::ClientConfig, TlsError> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_cert_pem)?)
        .with_client_auth_cert(der_certs(&me.cert_pem), der_key(&me.key_pem)?)?;
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// The client side while joining: no certificate yet; the server must present a chain
/// whose CA has the fingerprint the token carries.
pub fn join_client_config(ca_fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: ca_fingerprint.to_string(),
            provider,
        }))
        .with_no_client_auth();
    c.alpn_protocols = vec![ALPN.to_vec()];
    Ok(c)
}

/// Verifies a server chain against the CA the join token pins: the CA must be in the
/// presented chain with the pinned SHA-256, and the leaf must chain to it.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c)) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA is not the one in the join token (wrong cluster?)".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(CLUSTER_NAME).expect("valid name");
        inner.verify_server_cert(end_entity, &[], &name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The node id a verified peer certificate names (`node-<id>.boxd`), if any.
pub fn peer_node_id(certs: &[CertificateDer<'_>]) -> Option<NodeId> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(certs.first()?).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => d.strip_prefix("node-")?.strip_suffix(".boxd")?.parse().ok(),
        _ => None,
    })
}

/// A join token: `boxd1.<address>.<CA fingerprint>.<secret>`. The cluster stores only
/// the secret's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub addr: String,
    pub ca_fingerprint: String,
    pub secret: String,
}

impl JoinToken {
    pub fn new(addr: &str, ca_cert_pem: &str) -> Self {
        let secret: [u8; 32] = rand::random();
        Self {
            addr: addr.to_string(),
            ca_fingerprint: ca_fingerprint(ca_cert_pem),
            secret: hex::encode(secret),
        }
    }

    pub fn hash(&self) -> String {
        secret_hash(&self.secret)
    }

    pub fn parse(s: &str) -> Result<Self, TlsError> {
        let s = s.trim();
        let rest = s
            .strip_prefix("boxd1.")
            .ok_or_else(|| TlsError::BadToken("missing the boxd1. prefix".into()))?;
        // The address may contain dots; fingerprint and secret are the last two fields.
        let mut parts = rest.rsplitn(3, '.');
        let secret = parts.next().unwrap_or_default();
        let fp = parts.next().unwrap_or_default();
        let addr = parts.next().unwrap_or_default();
        let hex64 = |x: &str| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex64(secret) || !hex64(fp) {
            return Err(TlsError::BadToken(
                "fingerprint or secret is not 64 hex digits".into(),
            ));
        }
        if addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(TlsError::BadToken(format!(
                "{addr:?} is not an address:port"
            )));
        }
        Ok(Self {
            addr: addr.to_string(),
            ca_fingerprint: fp.to_string(),
            secret: secret.to_string(),
        })
    }
}

pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "boxd1.{}.{}.{}",
            self.addr, self.ca_fingerprint, self.secret
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_pin_ids_and_tokens_round_trip() {
        let ca = new_ca().unwrap();
        let n1 = issue_node(&ca, 1).unwrap();
        assert_eq!(peer_node_id(&der_certs(&n1.cert_pem)), Some(1));
        let (_key, csr) = new_request().unwrap();
        let n7 = sign_request(&ca, &csr, 7).unwrap();
        assert_eq!(peer_node_id(&der_certs(&n7)), Some(7));
        let t = JoinToken::new("10.0.0.1:7000", &ca.cert_pem);
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        assert!(JoinToken::parse("boxd1.x.y.z").is_err());
        assert!(JoinToken::parse(&t.to_string().replace("boxd1.", "")).is_err());
        server_config(&ca.cert_pem, &n1).unwrap();
        client_config(&ca.cert_pem, &n1).unwrap();
        join_client_config(&t.ca_fingerprint).unwrap();
    }
}
