//! HTTPS of the admin API: the rustls server configuration built from the PEM files of
//! `--admin-tls-cert` and `--admin-tls-key`. With it the API serves HTTPS only.
//!
//! The crypto provider is named (ring) rather than taken from a process default, so the
//! choice does not depend on which rustls features other crates enable.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// PEM files of the admin API's HTTPS certificate chain and private key
/// (`--admin-tls-cert`, `--admin-tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Largest PEM file read (a certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why the admin API's TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum TlsSetupError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is larger than {MAX_PEM_BYTES} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    #[error("--admin-tls-cert {path}: no PEM certificate in it ({reason})")]
    NoCertificate { path: PathBuf, reason: String },
    #[error("--admin-tls-key {path}: no PEM private key in it ({reason})")]
    NoKey { path: PathBuf, reason: String },
    #[error("the admin TLS certificate and key cannot be used together: {0}")]
    Rejected(String),
}

/// Builds the server configuration from the certificate chain and key files.
///
/// # Errors
/// A file is unreadable or too large, holds no PEM certificate (or key), or rustls refuses
/// the pair (a key that does not match the certificate, an unsupported key type).
pub(crate) fn server_config(files: &AdminTlsFiles) -> Result<ServerConfig, TlsSetupError> {
    let cert_pem = read_pem(&files.cert)?;
    let no_cert = |reason: String| TlsSetupError::NoCertificate {
        path: files.cert.clone(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| no_cert(e.to_string()))?;
    if chain.is_empty() {
        return Err(no_cert("no CERTIFICATE section".to_owned()));
    }
    let key_pem = read_pem(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsSetupError::NoKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let rejected = |e: rustls::Error| TlsSetupError::Rejected(e.to_string());
    ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(rejected)
}

pub(crate) fn read_pem(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    let read = |source| TlsSetupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsSetupError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}
