//! Directories as tar streams: the sender's deterministic tar of a directory (sorted
//! entries, zero times and owners, so a rebuilt tar is the same byte stream) written once
//! to a spool file, and the receiver's check and unpack of a tar that may come from a liar:
//! only plain files and directories under relative paths without `..`, everything checked
//! before anything is written.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Component, Path, PathBuf};

/// Most entries (files and directories) in one copied directory.
pub const MAX_TAR_ENTRIES: usize = 100_000;
/// Longest path accepted for a destination or a tar entry, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A path that would leave its root: absolute, with `..`, empty or too long.
    #[error("path {0:?} is not a plain relative path")]
    Unsafe(String),
    /// A symlink, hard link, device, FIFO or any entry that is not a file or a directory.
    #[error("{path:?} is a {what}: only files and directories are copied")]
    Unsupported { path: String, what: String },
    #[error("more than {max} bytes")]
    TooLarge { max: u64 },
    #[error("more than {max} entries")]
    TooManyEntries { max: usize },
    #[error("{0:?} changed while it was archived")]
    Changed(PathBuf),
    #[error("malformed tar: {0}")]
    Malformed(String),
}

impl ArchiveError {
    /// Whether the tar (or the path) itself is refused, rather than the disk failing.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ArchiveError::Io { .. })
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` as a relative path of plain names only (`.` parts dropped).
///
/// # Errors
/// [`ArchiveError::Unsafe`]: absolute, `..`, empty, a NUL byte or longer than
/// [`MAX_PATH_BYTES`].
pub fn safe_relative(path: &str) -> Result<PathBuf, ArchiveError> {
    let unsafe_path = || ArchiveError::Unsafe(path.chars().take(256).collect());
    if path.is_empty() || path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(unsafe_path());
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return Err(unsafe_path()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(unsafe_path());
    }
    Ok(out)
}

/// Counts what a reader gave.
struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let got = self.inner.read(buf)?;
        self.n = self.n.saturating_add(got as u64);
        Ok(got)
    }
}

/// Writes the deterministic tar of directory `src` to `out`; returns its size.
///
/// # Errors
/// A symlink or special file inside, more than `max_bytes` of tar or
/// [`MAX_TAR_ENTRIES`] entries, a file that changed size while read, I/O.
pub fn build_tar(src: &Path, out: &Path, max_bytes: u64) -> Result<u64, ArchiveError> {
    let file = File::create(out).map_err(io_at(out))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    let mut entries = 0usize;
    let mut bytes = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_at(&dir))?;
        names.sort();
        // Depth first, in name order: directories are pushed reversed so the first name
        // is visited first.
        let mut subdirs = Vec::new();
        for name in names {
            let rel_path = rel.join(&name);
            let full = src.join(&rel_path);
            let meta = fs::symlink_metadata(&full).map_err(io_at(&full))?;
            entries += 1;
            if entries > MAX_TAR_ENTRIES {
                return Err(ArchiveError::TooManyEntries { max: MAX_TAR_ENTRIES });
            }
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            let ft = meta.file_type();
            if ft.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel_path, io::empty())
                    .map_err(io_at(&full))?;
                subdirs.push(rel_path);
            } else if ft.is_file() {
                let size = meta.len();
                bytes = bytes.saturating_add(size).saturating_add(1024);
                if bytes > max_bytes {
                    return Err(ArchiveError::TooLarge { max: max_bytes });
                }
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if executable(&meta) { 0o755 } else { 0o644 });
                header.set_size(size);
                let f = File::open(&full).map_err(io_at(&full))?;
                let mut reader = Counted {
                    inner: f.take(size),
                    n: 0,
                };
                builder
                    .append_data(&mut header, &rel_path, &mut reader)
                    .map_err(io_at(&full))?;
                if reader.n != size {
                    return Err(ArchiveError::Changed(full));
                }
            } else {
                return Err(ArchiveError::Unsupported {
                    path: rel_path.display().to_string(),
                    what: if ft.is_symlink() {
                        "symlink"
                    } else {
                        "special file"
                    }
                    .to_owned(),
                });
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    let writer = builder.into_inner().map_err(io_at(out))?;
    let file = writer.into_inner().map_err(|e| ArchiveError::Io {
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_at(out))?;
    let size = file.metadata().map_err(io_at(out))?.len();
    if size > max_bytes {
        return Err(ArchiveError::TooLarge { max: max_bytes });
    }
    Ok(size)
}

#[cfg(unix)]
fn executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn executable(_: &fs::Metadata) -> bool {
    false
}

/// What an entry of a received tar may be.
enum Kind {
    File { executable: bool },
    Dir,
}

fn entry_kind<R: Read>(entry: &tar::Entry<'_, R>) -> Result<(PathBuf, Kind), ArchiveError> {
    let raw = entry.path_bytes().into_owned();
    let name = String::from_utf8(raw)
        .map_err(|e| ArchiveError::Unsafe(String::from_utf8_lossy(e.as_bytes()).into_owned()))?;
    let path = safe_relative(&name)?;
    let t = entry.header().entry_type();
    let kind = match t {
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File {
            executable: entry.header().mode().is_ok_and(|m| m & 0o111 != 0),
        },
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => return Err(unsupported(&name, "symlink")),
        tar::EntryType::Link => return Err(unsupported(&name, "hard link")),
        tar::EntryType::Char | tar::EntryType::Block => return Err(unsupported(&name, "device")),
        tar::EntryType::Fifo => return Err(unsupported(&name, "FIFO")),
        other => {
            return Err(unsupported(
                &name,
                &format!("tar entry of type {:?}", other.as_byte() as char),
            ))
        }
    };
    Ok((path, kind))
}

fn unsupported(path: &str, what: &str) -> ArchiveError {
    ArchiveError::Unsupported {
        path: path.chars().take(256).collect(),
        what: what.to_owned(),
    }
}

fn open_entries(tar_path: &Path) -> Result<tar::Archive<File>, ArchiveError> {
    let file = File::open(tar_path).map_err(io_at(tar_path))?;
    Ok(tar::Archive::new(file))
}

/// Checks every entry of the tar at `tar_path`: plain files and directories under safe
/// relative paths, at most [`MAX_TAR_ENTRIES`]. Writes nothing.
///
/// # Errors
/// The first entry refused, or a malformed tar.
pub fn check_tar(tar_path: &Path) -> Result<usize, ArchiveError> {
    let open = || {
        File::open(tar_path)
            .map(io::BufReader::new)
            .map_err(io_at(tar_path))
    };
    check_metadata(open()?)?;
    check_entries(open()?)
}

/// [`check_tar`] of a tar read from `reader` (read twice: hence `Clone`, e.g. a byte
/// slice); returns its number of entries.
///
/// # Errors
/// As [`check_tar`].
pub fn check_tar_from<R: Read + Clone>(reader: R) -> Result<usize, ArchiveError> {
    check_metadata(reader.clone())?;
    check_entries(reader)
}

/// Bytes a GNU long name / long link or PAX header entry may hold: the tar crate reads
/// such an entry whole into memory (by the size its header gives) before the name it
/// carries can be checked, so its size is checked first.
pub const MAX_METADATA_ENTRY_BYTES: u64 = MAX_PATH_BYTES as u64 + 4096;

/// The first pass: the tar's entries as raw headers, metadata entries bounded in size.
fn check_metadata<R: Read>(reader: R) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let raw = archive
        .entries()
        .map_err(|e| ArchiveError::Malformed(e.to_string()))?
        .raw(true);
    for (n, entry) in raw.enumerate() {
        let entry = entry.map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        // Each file may come with a long name, a long link and a PAX header.
        if n > MAX_TAR_ENTRIES.saturating_mul(4) {
            return Err(ArchiveError::TooManyEntries { max: MAX_TAR_ENTRIES });
        }
        let t = entry.header().entry_type();
        let metadata = t.is_gnu_longname()
            || t.is_gnu_longlink()
            || t.is_pax_local_extensions()
            || t.is_pax_global_extensions();
        let size = entry
            .header()
            .size()
            .map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        if metadata && size > MAX_METADATA_ENTRY_BYTES {
            return Err(ArchiveError::Malformed(format!(
                "a metadata entry (type {:?}) of {size} bytes: at most {MAX_METADATA_ENTRY_BYTES}",
                t.as_byte() as char
            )));
        }
    }
    Ok(())
}

/// The second pass: every entry (names merged) a plain file or directory under a safe path.
fn check_entries<R: Read>(reader: R) -> Result<usize, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let mut n = 0usize;
    for entry in archive
        .entries()
        .map_err(|e| ArchiveError::Malformed(e.to_string()))?
    {
        let entry = entry.map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        entry_kind(&entry)?;
        n += 1;
        if n > MAX_TAR_ENTRIES {
            return Err(ArchiveError::TooManyEntries { max: MAX_TAR_ENTRIES });
        }
    }
    Ok(n)
}

/// Unpacks a tar [`check_tar`] accepted into the new, empty directory `into`.
///
/// # Errors
/// An entry refused (checked again), two entries with one path, I/O.
pub fn unpack_tar(tar_path: &Path, into: &Path) -> Result<(), ArchiveError> {
    fs::create_dir(into).map_err(io_at(into))?;
    let mut archive = open_entries(tar_path)?;
    for entry in archive
        .entries()
        .map_err(|e| ArchiveError::Malformed(e.to_string()))?
    {
        let mut entry = entry.map_err(|e| ArchiveError::Malformed(e.to_string()))?;
        let (rel, kind) = entry_kind(&entry)?;
        let target = into.join(&rel);
        match kind {
            Kind::Dir => fs::create_dir_all(&target).map_err(io_at(&target))?,
            Kind::File { executable } => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_at(parent))?;
                }
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::AlreadyExists => {
                            ArchiveError::Malformed(format!("{} appears twice", rel.display()))
                        }
                        _ => ArchiveError::Io {
                            path: target.clone(),
                            source: e,
                        },
                    })?;
                io::copy(&mut entry, &mut out).map_err(io_at(&target))?;
                out.sync_all().map_err(io_at(&target))?;
                set_mode(&target, if executable { 0o755 } else { 0o644 });
            }
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    // The default mode is kept when it cannot be set: the content is what matters.
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_safe() {
        assert_eq!(safe_relative("a/./b").unwrap(), PathBuf::from("a/b"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", ".", "a\0b"] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
        assert!(safe_relative(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn a_tar_is_rebuilt_byte_for_byte_and_unpacks_to_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("b/c")).unwrap();
        fs::write(src.join("a.txt"), b"hello").unwrap();
        fs::write(src.join("b/c/d.bin"), vec![7u8; 10_000]).unwrap();
        fs::create_dir(src.join("empty")).unwrap();
        let one = dir.path().join("one.tar");
        let two = dir.path().join("two.tar");
        build_tar(&src, &one, 1 << 20).unwrap();
        build_tar(&src, &two, 1 << 20).unwrap();
        assert_eq!(fs::read(&one).unwrap(), fs::read(&two).unwrap());
        assert_eq!(check_tar(&one).unwrap(), 5);
        let out = dir.path().join("out");
        unpack_tar(&one, &out).unwrap();
        assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"hello");
        assert_eq!(fs::read(out.join("b/c/d.bin")).unwrap(), vec![7u8; 10_000]);
        assert!(out.join("empty").is_dir());
        assert!(matches!(
            build_tar(&src, &one, 100),
            Err(ArchiveError::TooLarge { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn links_are_refused_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("l")).unwrap();
        let tar_path = dir.path().join("x.tar");
        assert!(matches!(
            build_tar(&src, &tar_path, 1 << 20),
            Err(ArchiveError::Unsupported { .. })
        ));

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "l", "/etc/passwd").unwrap();
        fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
        assert!(matches!(
            check_tar(&tar_path),
            Err(ArchiveError::Unsupported { .. })
        ));
    }

    #[test]
    fn a_long_name_entry_bigger_than_a_path_is_refused_before_it_is_read() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNULongName);
        header.set_size(MAX_METADATA_ENTRY_BYTES + 1);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.resize(
            bytes.len() + (MAX_METADATA_ENTRY_BYTES as usize + 1).div_ceil(512) * 512,
            b'a',
        );
        bytes.extend_from_slice(&[0u8; 1024]);
        assert!(matches!(
            check_tar_from(bytes.as_slice()),
            Err(ArchiveError::Malformed(_))
        ));
    }
}
