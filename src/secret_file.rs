//! Files holding secrets: the admin token (read here, bounded), and the warning given at
//! start-up when a secret file (admin token, identity key, PSK) is readable by group or
//! others.
//!
//! The node and the CLI read the admin token the same way: the file's bytes, trimmed; it
//! must be one non-empty run of visible ASCII (what an `Authorization: Bearer` header can
//! carry) of at most [`MAX_TOKEN_BYTES`].

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest admin token file accepted (whitespace included).
pub(crate) const MAX_TOKEN_BYTES: u64 = 4096;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenFileError {
    #[error("cannot read the admin token file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the admin token file {path} is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the admin token file {path}: {reason}")]
    Invalid { path: PathBuf, reason: &'static str },
}

/// A bearer token. Its `Debug` does not show it, so it never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A token from its text, trimmed.
    ///
    /// # Errors
    /// Empty once trimmed, or not one run of visible ASCII (the reason says which).
    pub fn new(text: &[u8]) -> Result<Token, &'static str> {
        let token = text.trim_ascii();
        if token.is_empty() {
            return Err("it is empty");
        }
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(
                "it must hold one token of visible ASCII characters (no spaces or line breaks inside)",
            );
        }
        // Visible ASCII is UTF-8.
        Ok(Token(String::from_utf8_lossy(token).into_owned()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// Reads an admin token file.
///
/// # Errors
/// The file is unreadable, larger than [`MAX_TOKEN_BYTES`], empty once trimmed, or holds
/// anything but one run of visible ASCII.
pub fn read_token(path: &Path) -> Result<Token, TokenFileError> {
    let read = |source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut raw = Vec::new();
    // One byte more than the limit tells a file at the limit from a larger one.
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(read)?;
    if raw.len() as u64 > MAX_TOKEN_BYTES {
        return Err(TokenFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Token::new(&raw).map_err(|reason| TokenFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

/// Logs a warning when `path` is readable, writable or executable by group or others
/// (`what` names the file: "admin token", "identity key", "PSK"). Silent when the file
/// cannot be inspected: whoever reads it reports that.
pub(crate) fn warn_if_shared(path: &Path, what: &str) {
    if let Some(mode) = shared_mode(path) {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{mode:04o}"),
            file = what,
            "secret file is accessible to group or others; make it private (chmod 600)"
        );
    }
}

/// The permission bits of `path` when group or others have any of them.
#[cfg(unix)]
fn shared_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn shared_mode(_path: &Path) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, bytes: &[u8]) -> PathBuf {
        let path = dir.join("token");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_token_file_is_trimmed_and_must_hold_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = read_token(&write(dir.path(), b"  s3cr3t-Token_1\n")).unwrap();
        assert_eq!(token.as_str(), "s3cr3t-Token_1");
        assert!(!format!("{token:?}").contains("s3cr3t"), "Debug hides the token");
        for (bytes, what) in [
            (&b""[..], "empty"),
            (b" \n\t\n", "empty"),
            (b"two words", "visible ASCII"),
            (b"line\nbreak", "visible ASCII"),
            ("caf\u{e9}".as_bytes(), "visible ASCII"),
        ] {
            let err = read_token(&write(dir.path(), bytes)).unwrap_err().to_string();
            assert!(err.contains(what), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn a_token_file_is_bounded_in_size() {
        let dir = tempfile::tempdir().unwrap();
        let at_limit = vec![b'a'; MAX_TOKEN_BYTES as usize];
        assert!(read_token(&write(dir.path(), &at_limit)).is_ok());
        let over = vec![b'a'; MAX_TOKEN_BYTES as usize + 1];
        let err = read_token(&write(dir.path(), &over)).unwrap_err();
        assert!(matches!(err, TokenFileError::TooLarge { .. }), "{err}");
        let missing = read_token(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().contains("cannot read"), "{missing}");
    }

    #[cfg(unix)]
    #[test]
    fn group_or_other_bits_make_a_file_shared() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), b"x");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(shared_mode(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(shared_mode(&path), Some(0o640));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert_eq!(shared_mode(&path), Some(0o604));
    }
}
