//! The node's Ed25519 identity, kept at `<data-dir>/identity.key` (libp2p protobuf encoding).
//! Its libp2p `PeerId` is the node's id everywhere: journal origin, creator check, partners.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

pub(crate) const IDENTITY_FILE: &str = "identity.key";

#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a libp2p key: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Loads the identity from `data_dir`, creating the directory and a new key if missing.
///
/// # Errors
/// The directory is not writable or the file holds something that is not a key.
pub(crate) fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            crate::secret_file::warn_if_shared(&path, "identity key");
            Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| IdentityError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            // Write to a temporary file and rename, so a crash never leaves half a key.
            let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
            let mut f = open_private(&tmp).map_err(io)?;
            f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn identity_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = super::load_or_create(dir.path()).unwrap();
        let b = super::load_or_create(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[cfg(unix)]
    #[test]
    fn a_new_identity_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        super::load_or_create(dir.path()).unwrap();
        let meta = std::fs::metadata(dir.path().join(super::IDENTITY_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
