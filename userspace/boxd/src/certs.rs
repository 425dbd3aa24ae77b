//! Certificates for the HTTPS proxy.
//!
//! By default an internal CA, made at a cluster's first start and kept in the replicated
//! state, signs a wildcard certificate for the zone (`<zone>` and `*.<zone>`), so a fresh
//! offline install serves HTTPS at once; clients trust it by importing the CA
//! (`ssh host ca`, or `http://<host>/.well-known/boxd/ca.pem`). The CA carries a name
//! constraint: it can only vouch for names in the zone, so importing it does not let
//! its key impersonate anyone else. ACME certificates (for public zones) are stored the
//! same way and preferred when present.
//!
//! The proxy asks a [`Store`] for the certificate of each TLS handshake's server name:
//! the exact name first, then the wildcard of its parent domain.

use boxd_control::types::CertRow;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The internal CA is stored as `ca:internal:<zone>` (CAs are never served).
pub const INTERNAL_CA: &str = "ca:internal";
/// Internal certificates are renewed when they have less than this left.
pub const RENEW_BEFORE_MS: u64 = 30 * 86400 * 1000;
/// Lifetime of an internal leaf certificate.
const LEAF_DAYS: i64 = 397;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("certificate {name}: {why}")]
    Bad { name: String, why: String },
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ms(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

/// A new internal CA for `zone` (ECDSA P-256, ten years, limited to the zone).
pub fn new_ca(zone: &str) -> Result<Issued, CertError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("boxd internal CA for {zone}"));
    dn.push(DnType::OrganizationName, "boxd");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(zone.to_string())],
        excluded_subtrees: Vec::new(),
    });
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after_ms: ms(p.not_after),
    })
}

/// A server certificate for `names`, signed by `ca`.
pub fn issue(ca: &Issued, names: &[String]) -> Result<Issued, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(LEAF_DAYS);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after_ms: ms(p.not_after),
    })
}

/// A certificate signing request for `names` (ECDSA P-256, no subject: the names are
/// in the SAN) and its key, PEM: what an ACME order is finalized with.
pub fn csr(names: &[String]) -> Result<(Vec<u8>, String), CertError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name = DistinguishedName::new();
    let req = p.serialize_request(&key)?;
    Ok((req.der().to_vec(), key.serialize_pem()))
}

/// When the first (leaf) certificate of a PEM chain expires, in ms since the epoch.
pub fn not_after_ms(chain_pem: &str) -> Result<u64, CertError> {
    let bad = |why: String| CertError::Bad {
        name: "ACME chain".into(),
        why,
    };
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| bad("no certificate in the PEM".into()))?
        .map_err(|e| bad(format!("certificate PEM: {e}")))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| bad(format!("certificate: {e}")))?;
    Ok((cert.validity().not_after.timestamp().max(0) as u64) * 1000)
}

/// Whether a stored certificate should be replaced now.
pub fn due(not_after_ms: u64) -> bool {
    not_after_ms <= now_ms() + RENEW_BEFORE_MS
}

/// A certificate chain and key, ready for rustls.
pub fn certified_key(name: &str, cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, CertError> {
    let bad = |why: String| CertError::Bad {
        name: name.to_string(),
        why,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| bad(format!("key PEM: {e}")))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| bad(format!("key: {e}")))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// The certificates the proxy serves, by name; swapped whole when the state changes.
#[derive(Default, Debug)]
pub struct Store {
    by_name: RwLock<Arc<HashMap<String, Arc<CertifiedKey>>>>,
    ca_pem: RwLock<Option<String>>,
    /// Served when the server name has no certificate of its own (or there is none).
    default: RwLock<Option<Arc<CertifiedKey>>>,
}

impl Store {
    /// Replaces the served set from the stored rows (ACME rows win over internal ones
    /// for the same name); the CA row named `ca` is kept for download, never served.
    pub fn load(&self, rows: &[CertRow], ca: &str) -> Vec<String> {
        let mut map = HashMap::new();
        let mut errors = Vec::new();
        let mut rows: Vec<&CertRow> = rows.iter().collect();
        // "acme" sorts before "internal": insert internal first, then acme over it.
        rows.sort_by(|a, b| b.issuer.cmp(&a.issuer));
        for r in rows {
            if r.name.starts_with("ca:") {
                if r.name == ca {
                    *self.ca_pem.write().unwrap_or_else(|e| e.into_inner()) =
                        Some(r.cert_pem.clone());
                }
                continue;
            }
            // An expired certificate is never served: a name without one falls back to
            // the zone's wildcard (an exact match would otherwise shadow it).
            if r.not_after_ms <= now_ms() {
                errors.push(format!("certificate {} has expired; not served", r.name));
                continue;
            }
            match certified_key(&r.name, &r.cert_pem, &r.key_pem) {
                Ok(k) => {
                    let k = Arc::new(k);
                    let name = r.name.to_ascii_lowercase();
                    // A zone's wildcard certificate names the apex too.
                    if let Some(apex) = name.strip_prefix("*.") {
                        map.entry(apex.to_string()).or_insert_with(|| k.clone());
                    }
                    map.insert(name, k);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        *self.by_name.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        errors
    }

    /// The certificate for a server name: exact, then `*.<parent>`.
    pub fn find(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self
            .by_name
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = map.get(&name) {
            return Some(k.clone());
        }
        let (_, parent) = name.split_once('.')?;
        map.get(&format!("*.{parent}")).cloned()
    }

    /// Sets the certificate for handshakes whose name has none of its own.
    pub fn set_default(&self, key: CertifiedKey) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(key));
    }

    pub fn set_default_arc(&self, key: Arc<CertifiedKey>) {
        *self.default.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    pub fn default_cert(&self) -> Option<Arc<CertifiedKey>> {
        self.default
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The internal CA's certificate (PEM), for clients to trust.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_find() {
        let ca = new_ca("boxd.test").unwrap();
        let leaf = issue(&ca, &["boxd.test".into(), "*.boxd.test".into()]).unwrap();
        assert!(!due(leaf.not_after_ms));
        let rows = vec![
            CertRow {
                name: "ca:internal:boxd.test".into(),
                cert_pem: ca.cert_pem.clone(),
                key_pem: ca.key_pem.clone(),
                not_after_ms: ca.not_after_ms,
                issuer: "internal".into(),
                updated_ms: 0,
            },
            CertRow {
                name: "*.boxd.test".into(),
                cert_pem: leaf.cert_pem.clone(),
                key_pem: leaf.key_pem.clone(),
                not_after_ms: leaf.not_after_ms,
                issuer: "internal".into(),
                updated_ms: 0,
            },
            CertRow {
                name: "broken.example".into(),
                cert_pem: "not pem".into(),
                key_pem: "not pem".into(),
                not_after_ms: 0,
                issuer: "acme".into(),
                updated_ms: 0,
            },
        ];
        let store = Store::default();
        let errors = store.load(&rows, "ca:internal:boxd.test");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(store.find("app.boxd.test").is_some());
        assert!(store.find("boxd.test").is_some(), "the apex");
        assert!(store.find("APP.boxd.test.").is_some());
        assert!(
            store.find("a.b.boxd.test").is_none(),
            "a wildcard covers one label"
        );
        assert!(store.find("example.com").is_none());
        assert!(store.ca_pem().unwrap().contains("BEGIN CERTIFICATE"));
    }
}
