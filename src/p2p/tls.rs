//! TLS of the `/wss` transport: the server certificate and key a node listening on `/wss`
//! presents (`--tls-cert`, `--tls-key`), and the certificates a node dialling `/wss`
//! trusts (the web's roots, plus `--tls-ca`). The peer is authenticated by Noise inside the
//! TLS tunnel whatever the certificate says; TLS is what lets the connection cross HTTPS
//! proxies and firewalls that allow only port 443.

use std::path::{Path, PathBuf};

use libp2p::websocket::tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::admin::tls::read_pem;

/// PEM files of the `/wss` listener (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WssTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the `/wss` TLS configuration cannot be built; each names the flag to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WssTlsError {
    #[error("{flag} {path}: {reason}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{flag} {path}: no PEM certificate in it ({reason})")]
    NoCertificate {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--tls-key {path}: no usable PEM private key in it ({reason})")]
    NoKey { path: PathBuf, reason: String },
    #[error("--tls-cert and --tls-key cannot be used together: {0}")]
    Rejected(String),
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, WssTlsError> {
    read_pem(path).map_err(|e| WssTlsError::Read {
        flag,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn certificates(flag: &'static str, path: &Path) -> Result<Vec<tls::Certificate>, WssTlsError> {
    let pem = read(flag, path)?;
    let no_cert = |reason: String| WssTlsError::NoCertificate {
        flag,
        path: path.to_path_buf(),
        reason,
    };
    let ders = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| no_cert(e.to_string()))?;
    if ders.is_empty() {
        return Err(no_cert("no CERTIFICATE section".to_owned()));
    }
    Ok(ders
        .into_iter()
        .map(|d| tls::Certificate::new(d.as_ref().to_vec()))
        .collect())
}

/// The websocket transport's TLS configuration: a server side when `server` is given, and
/// the client side trusting the web's roots and the certificates of `extra_ca`.
///
/// # Errors
/// A file is unreadable, holds no certificate or key, or the pair does not go together.
pub(crate) fn config(
    server: Option<&WssTlsFiles>,
    extra_ca: Option<&Path>,
) -> Result<tls::Config, WssTlsError> {
    let mut builder = tls::Config::builder();
    if let Some(ca) = extra_ca {
        for cert in certificates("--tls-ca", ca)? {
            builder.add_trust(&cert).map_err(|e| WssTlsError::NoCertificate {
                flag: "--tls-ca",
                path: ca.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
    }
    if let Some(files) = server {
        let chain = certificates("--tls-cert", &files.cert)?;
        let pem = read("--tls-key", &files.key)?;
        let no_key = |reason: String| WssTlsError::NoKey {
            path: files.key.clone(),
            reason,
        };
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| no_key(e.to_string()))?;
        let der = key.secret_der().to_vec();
        // `tls::PrivateKey::new` panics on bytes it cannot classify: check them first.
        PrivateKeyDer::try_from(der.clone()).map_err(|e| no_key(e.to_owned()))?;
        builder
            .server(tls::PrivateKey::new(der), chain)
            .map_err(|e| WssTlsError::Rejected(e.to_string()))?;
    }
    Ok(builder.finish())
}
