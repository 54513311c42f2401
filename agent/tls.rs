//! What every TLS connection of the agent trusts and how it does crypto: the `s3` and
//! `http` remotes (ureq) and MQTT (rumqttc) all use [`roots`] and [`provider`].
//!
//! Trusted roots by default: the operating system's trust store, read with
//! rustls-native-certs (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the distribution's
//! bundle, e.g. `/etc/ssl/certs/ca-certificates.crt` from Debian's `ca-certificates`).
//! Devices get CA additions and removals through the OS package manager with their other
//! security updates, and a site CA an administrator installs (`update-ca-certificates`) is
//! trusted by fieldsync as by every other program on the device; a list compiled into the
//! binary would only change when fieldsync itself is updated. A configured bundle
//! (`ca_bundle` of a remote, `mqtt.ca_file`) replaces the store: then only its CAs are
//! trusted.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why the trusted roots could not be had. `Display` starts with the bundle's path; the
/// caller puts the key that named it in front (`mqtt.ca_file /etc/ca.pem: …`).
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("no CA certificates in the system trust store")]
    NoSystemRoots,
}

/// The CA certificates to trust: those of the PEM file `bundle` when it is set, else the
/// operating system's trust store (see the module comment for why).
pub fn roots(bundle: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let Some(path) = bundle else {
        // Entries rustls cannot use are skipped later (`add_parsable_certificates`), as
        // every TLS client skips them.
        let certs = rustls_native_certs::load_native_certs().certs;
        if certs.is_empty() {
            return Err(RootsError::NoSystemRoots);
        }
        return Ok(certs);
    };
    let shown = || path.display().to_string();
    let pem = |message: String| RootsError::Pem {
        path: shown(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| RootsError::Read {
        path: shown(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem("no PEM certificate in the file".into()));
    }
    // A configured CA that cannot be used is a mistake to report now, not skip.
    let mut store = rustls::RootCertStore::empty();
    for c in &certs {
        store
            .add(c.clone())
            .map_err(|e| pem(format!("unusable CA: {e}")))?;
    }
    Ok(certs)
}

/// rustls' crypto: ring, not aws-lc-rs (which needs cmake and a C toolchain for every ARM
/// target and adds ~1 MB).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_replaces_the_store_and_its_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("ca.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let e = roots(Some(&bad)).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", bad.display())), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = roots(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem: ") && !e.contains('\n'), "{e}");
    }
}
