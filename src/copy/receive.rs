//! The receiving side of a copy: only partners, a bounded share each, only below
//! `--copy-root`.
//!
//! A copy is staged in `<copy-root>/.oc-copy/` as `<peer>-<copy id>.part` (the bytes so far:
//! its length is the offset to resume from) beside `<peer>-<copy id>.json` (the offer it
//! belongs to). Each chunk is checked against the expected offset, written and fsynced
//! before it is acknowledged. Once the whole arrived, its SHA-256 is checked; a file is then
//! renamed into place, a directory's tar checked (plain files and directories under safe
//! relative paths only), unpacked beside it and renamed into place. A wrong hash, a refused
//! tar or a full disk removes the partial data; the sender's next offer starts again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{Mutex as AsyncMutex, Notify};

use super::archive::{self, ArchiveError};
use super::ledger::ReceiveCursor;
use super::{CopyService, PLACE};
use crate::contract::ErrorCode;
use crate::p2p::wire::{self, CopyFrame, ErrorFrame, ErrorOnly};

/// The staging directory inside `--copy-root` (never a destination).
pub const STAGING_DIR: &str = ".oc-copy";
/// Largest chunk this node accepts (smaller when its frame cap needs it).
const MAX_CHUNK: u64 = super::job::CHUNK_BYTES;
/// Room for the JSON around a chunk's base64 in its frame.
const FRAME_ROOM: u64 = 1024;

/// The largest chunk whose base64 frame fits below `max_frame`.
fn max_chunk(max_frame: usize) -> u64 {
    ((max_frame as u64).saturating_sub(FRAME_ROOM) / 4 * 3).clamp(1, MAX_CHUNK)
}

/// Copies (partial or finished) one peer keeps staged; beyond, its oldest is dropped.
const MAX_STAGED_PER_PEER: usize = 16;
/// Longest copy id accepted.
const MAX_COPY_ID: usize = 64;
/// A stream that sends no chunk for this many times `io_timeout` is dropped (the partial
/// stays for the sender's next attempt).
const IDLE_FACTOR: u32 = 3;

/// The offer a staged copy belongs to, and whether it is already in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    peer: String,
    copy_id: String,
    kind: String,
    destination: String,
    total: u64,
    sha256: String,
    done: bool,
}

/// The one stream receiving a copy: a new stream of the same copy asks it to stop, then
/// takes the lock.
pub(crate) struct Slot {
    lock: Arc<AsyncMutex<()>>,
    stop: Arc<Notify>,
}

/// Why a copy stream ends without the copy in place: the frame to send.
struct Refused {
    code: ErrorCode,
    message: String,
    /// Whether the partial data is removed.
    discard: bool,
}

fn refused(code: ErrorCode, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
        discard: false,
    }
}

/// Takes a copy stream: refused at once (error frame) when copies are off, the peer is no
/// partner or holds its share; served on a task otherwise.
pub(super) fn incoming(service: &Arc<CopyService>, peer: PeerId, stream: Stream) {
    let refusal = if service.env.settings.root.is_none() {
        Some((
            ErrorCode::UnsupportedAction,
            "this node accepts no copies: it runs without --copy-root".to_owned(),
        ))
    } else if !service.env.partners.contains(&peer) {
        Some((
            ErrorCode::NotPartner,
            "this node accepts copies from partners only".to_owned(),
        ))
    } else {
        None
    };
    if let Some((code, message)) = refusal {
        service.refused(peer, code, &message);
        refuse(service, peer, stream, code, message);
        return;
    }
    match service.inbound.try_acquire(peer) {
        Ok(permit) => {
            let service = service.clone();
            tokio::spawn(async move {
                serve(&service, peer, stream).await;
                drop(permit);
            });
        }
        Err(full) => {
            let message = format!("too many copies from you at once ({full}); retry later");
            service.refused(peer, ErrorCode::Busy, &message);
            refuse(service, peer, stream, ErrorCode::Busy, message);
        }
    }
}

/// Writes an `error` frame and closes, within `io_timeout`, on a refusal permit (a bounded
/// share per peer); without one, the stream is dropped (reset) with no frame.
fn refuse(service: &CopyService, peer: PeerId, mut stream: Stream, code: ErrorCode, message: String) {
    let Ok(permit) = service.refusals.try_acquire(peer) else {
        return;
    };
    let timeout = service.env.tuning.io_timeout;
    tokio::spawn(async move {
        let frame = ErrorOnly::Error(ErrorFrame::new(None, code, message));
        let _ = tokio::time::timeout(timeout, async {
            let _ = wire::write_frame(&mut stream, &frame).await;
            let _ = stream.close().await;
        })
        .await;
        drop(permit);
    });
}

async fn serve(service: &Arc<CopyService>, peer: PeerId, mut stream: Stream) {
    let t = &service.env.tuning;
    let timeout = t.io_timeout;
    let result = receive(service, peer, &mut stream).await;
    if let Err(r) = result {
        service.refused(peer, r.code, &r.message);
        let frame = CopyFrame::Error(ErrorFrame::new(None, r.code, r.message));
        let _ = tokio::time::timeout(timeout, async {
            let _ = wire::write_frame(&mut stream, &frame).await;
            let _ = stream.close().await;
        })
        .await;
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_COPY_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks that no existing part of `dest` below `root` is a symlink, and what `dest` is.
fn check_destination(root: &Path, rel: &Path, kind: &str) -> Result<PathBuf, Refused> {
    let invalid = |m: String| refused(ErrorCode::InvalidField, m);
    if rel
        .components()
        .next()
        .is_some_and(|c| c.as_os_str() == STAGING_DIR)
    {
        return Err(invalid(format!(
            "destination: {STAGING_DIR} is this node's staging directory"
        )));
    }
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        let Ok(meta) = std::fs::symlink_metadata(&at) else {
            // Missing from here on: created below the root.
            break;
        };
        let last = i + 1 == parts.len();
        if meta.file_type().is_symlink() {
            return Err(invalid(format!("destination: {} is a symlink", rel.display())));
        }
        if !last && !meta.is_dir() {
            return Err(invalid(format!(
                "destination: a part of {} is not a directory",
                rel.display()
            )));
        }
        if last && kind == "file" && !meta.is_file() {
            return Err(invalid(format!(
                "destination: {} exists and is not a file",
                rel.display()
            )));
        }
        if last && kind == "dir" && !meta.is_dir() {
            return Err(invalid(format!(
                "destination: {} exists and is not a directory",
                rel.display()
            )));
        }
    }
    Ok(root.join(rel))
}

/// A disk error as a refusal: `no_space` for a full disk, the partial data removed.
fn disk(e: &std::io::Error, what: &str) -> Refused {
    let full = e.raw_os_error() == Some(28) || e.kind() == std::io::ErrorKind::StorageFull;
    Refused {
        code: if full {
            ErrorCode::NoSpace
        } else {
            ErrorCode::StoreUnavailable
        },
        message: format!("{what}: {e}"),
        discard: full,
    }
}

async fn read_frame(
    stream: &mut Stream,
    max: usize,
    timeout: Duration,
) -> Result<Option<CopyFrame>, Refused> {
    match tokio::time::timeout(timeout, wire::read_frame::<CopyFrame, _>(stream, max)).await {
        Ok(Ok(frame)) => Ok(frame),
        // A broken stream has nobody to answer: the partial waits for the next offer.
        Ok(Err(wire::FrameError::Io(_))) => Ok(None),
        Ok(Err(e @ wire::FrameError::TooLarge { .. })) => {
            Err(refused(ErrorCode::PayloadTooLarge, e.to_string()))
        }
        Ok(Err(e)) => Err(refused(ErrorCode::InvalidJson, format!("not a copy frame: {e}"))),
        // Nothing to answer on a stream that went quiet: the partial waits for the next offer.
        Err(_) => Ok(None),
    }
}

async fn write_frame(stream: &mut Stream, frame: &CopyFrame, timeout: Duration) -> Result<bool, Refused> {
    Ok(matches!(
        tokio::time::timeout(timeout, wire::write_frame(stream, frame)).await,
        Ok(Ok(()))
    ))
}

/// Takes over the slot of `key` (asking a stale stream of the same copy to stop).
async fn take_slot(
    service: &CopyService,
    key: &str,
    timeout: Duration,
) -> Result<(Arc<Slot>, tokio::sync::OwnedMutexGuard<()>), Refused> {
    let slot = {
        let Ok(mut map) = service.receiving.lock() else {
            return Err(refused(ErrorCode::Busy, "retry later"));
        };
        map.retain(|_, s| Arc::strong_count(s) > 1 || s.lock.try_lock().is_err());
        map.entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    lock: Arc::new(AsyncMutex::new(())),
                    stop: Arc::new(Notify::new()),
                })
            })
            .clone()
    };
    slot.stop.notify_one();
    match tokio::time::timeout(timeout, slot.lock.clone().lock_owned()).await {
        Ok(guard) => {
            // A stop meant for the stream we replaced is not ours.
            let fresh = Arc::new(Notify::new());
            let slot = Arc::new(Slot {
                lock: slot.lock.clone(),
                stop: fresh,
            });
            if let Ok(mut map) = service.receiving.lock() {
                map.insert(key.to_owned(), slot.clone());
            }
            Ok((slot, guard))
        }
        Err(_) => Err(refused(
            ErrorCode::Busy,
            "another stream of this copy is still open; retry later",
        )),
    }
}

/// Drops the oldest staged copies of `peer` beyond [`MAX_STAGED_PER_PEER`] (but `keep`).
fn bound_staged(staging: &Path, peer: &str, keep: &str) {
    let Ok(entries) = std::fs::read_dir(staging) else {
        return;
    };
    let prefix = format!("{peer}-");
    let mut mine: Vec<(std::time::SystemTime, String)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name.strip_suffix(".json")?.to_owned();
            if !key.starts_with(&prefix) || key == keep {
                return None;
            }
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, key))
        })
        .collect();
    if mine.len() < MAX_STAGED_PER_PEER {
        return;
    }
    mine.sort();
    let excess = mine.len() + 1 - MAX_STAGED_PER_PEER;
    for (_, key) in mine.into_iter().take(excess) {
        remove_staged(staging, &key);
    }
}

fn remove_staged(staging: &Path, key: &str) {
    let _ = std::fs::remove_file(staging.join(format!("{key}.part")));
    let _ = std::fs::remove_file(staging.join(format!("{key}.json")));
    let _ = std::fs::remove_dir_all(staging.join(format!("{key}.dir")));
    let _ = std::fs::remove_dir_all(staging.join(format!("{key}.old")));
}

/// [`remove_staged`] on a blocking thread (an unpacked directory may be large).
async fn remove_staged_async(staging: &Path, key: &str) {
    let (staging, key) = (staging.to_path_buf(), key.to_owned());
    let _ = tokio::task::spawn_blocking(move || remove_staged(&staging, &key)).await;
}

fn write_staged(path: &Path, staged: &Staged) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(staged).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn receive(service: &Arc<CopyService>, peer: PeerId, stream: &mut Stream) -> Result<(), Refused> {
    let env = &service.env;
    let Some(root) = env.settings.root.clone() else {
        return Err(refused(ErrorCode::UnsupportedAction, "no --copy-root"));
    };
    let timeout = env.tuning.io_timeout;
    let max_frame = env.tuning.max_frame_bytes;
    let Some(first) = read_frame(stream, max_frame, timeout).await? else {
        return Ok(());
    };
    let CopyFrame::CopyOffer {
        copy_id,
        kind,
        destination,
        total,
        sha256,
    } = first
    else {
        return Err(refused(
            ErrorCode::InvalidField,
            "the first frame must be copy_offer",
        ));
    };
    let invalid = |m: &str| refused(ErrorCode::InvalidField, m);
    if !valid_id(&copy_id) {
        return Err(invalid("copy_id: 1 to 64 letters, digits, - or _"));
    }
    if kind != "file" && kind != "dir" {
        return Err(invalid("kind: file or dir"));
    }
    if !is_hex64(&sha256) {
        return Err(invalid("sha256: 64 lowercase hex digits"));
    }
    if total > env.settings.max_bytes {
        return Err(refused(
            ErrorCode::PayloadTooLarge,
            format!(
                "total: {total} bytes, more than this node's --copy-max-bytes {}",
                env.settings.max_bytes
            ),
        ));
    }
    let rel = archive::safe_relative(&destination).map_err(|_| {
        invalid("destination: a relative path without `..` is required (absolute paths are refused)")
    })?;
    let dest = check_destination(&root, &rel, &kind)?;
    let staging = root.join(STAGING_DIR);
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(|e| disk(&e, "staging directory"))?;
    let key = format!("{peer}-{copy_id}");
    let (slot, _guard) = take_slot(service, &key, timeout).await?;
    let meta_path = staging.join(format!("{key}.json"));
    let part_path = staging.join(format!("{key}.part"));
    let offer = Staged {
        peer: peer.to_string(),
        copy_id: copy_id.clone(),
        kind: kind.clone(),
        destination: rel.display().to_string(),
        total,
        sha256: sha256.clone(),
        done: false,
    };
    let known: Option<Staged> = tokio::fs::read(&meta_path)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let held = match known {
        Some(s)
            if s.done
                && Staged {
                    done: false,
                    ..s.clone()
                } == offer =>
        {
            // Already in place (the sender missed our copy_done): tell it again.
            let _ = write_frame(stream, &CopyFrame::CopyDone { sha256 }, timeout).await;
            return Ok(());
        }
        Some(s) if s == offer => tokio::fs::metadata(&part_path)
            .await
            .map(|m| m.len())
            .unwrap_or(0),
        _ => {
            bound_staged(&staging, &peer.to_string(), &key);
            remove_staged(&staging, &key);
            write_staged(&meta_path, &offer).map_err(|e| disk(&e, "staging"))?;
            0
        }
    };
    let held = held.min(total);
    let chunk_cap = max_chunk(max_frame);
    let mut cursor = ReceiveCursor::new(held, total, chunk_cap).map_err(|e| invalid(&e.to_string()))?;
    let mut part = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&part_path)
        .await
        .map_err(|e| disk(&e, "partial file"))?;
    // Bytes past the offset (none, unless a write was torn) are dropped.
    part.set_len(held).await.map_err(|e| disk(&e, "partial file"))?;
    tokio::io::AsyncSeekExt::seek(&mut part, std::io::SeekFrom::Start(held))
        .await
        .map_err(|e| disk(&e, "partial file"))?;
    if !write_frame(
        stream,
        &CopyFrame::CopyAccept {
            offset: held,
            max_chunk: chunk_cap,
        },
        timeout,
    )
    .await?
    {
        return Ok(());
    }
    tracing::info!(%peer, copy_id, offset = held, total, kind, destination = %rel.display(), "receiving copy");
    let idle = timeout.saturating_mul(IDLE_FACTOR);
    let result: Result<(), Refused> = async {
        while !cursor.is_complete() {
            let frame = tokio::select! {
                f = read_frame(stream, max_frame, idle) => f?,
                _ = slot.stop.notified() => {
                    tracing::info!(%peer, copy_id, "a new stream of this copy takes over");
                    return Ok(());
                }
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            let CopyFrame::CopyChunk { offset, data } = frame else {
                return Err(invalid("copy_chunk expected"));
            };
            // The frame cap bounds `data`; its decoded length is checked before it is written.
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data.as_bytes())
                .map_err(|_| invalid("data: not base64"))?;
            cursor
                .check(offset, bytes.len() as u64)
                .map_err(|e| invalid(&format!("chunk refused: {e}")))?;
            part.write_all(&bytes).await.map_err(|e| disk(&e, "writing"))?;
            part.sync_data().await.map_err(|e| disk(&e, "writing"))?;
            let acked = cursor.advance(bytes.len() as u64);
            service.metrics.bytes_received.inc_by(bytes.len() as u64);
            if !write_frame(stream, &CopyFrame::CopyAck { offset: acked }, timeout).await? {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    drop(part);
    match result {
        Err(mut r) => {
            if r.discard {
                remove_staged_async(&staging, &key).await;
            }
            r.discard = false;
            return Err(r);
        }
        Ok(()) if !cursor.is_complete() => return Ok(()),
        Ok(()) => {}
    }
    match finish(&staging, &key, &part_path, &dest, &offer).await {
        Ok(()) => {
            let done = Staged { done: true, ..offer };
            let _ = write_staged(&meta_path, &done);
            service.metrics.received_done.inc();
            tracing::info!(%peer, copy_id, total, kind, destination = %rel.display(), "copy received and in place");
            let _ = write_frame(stream, &CopyFrame::CopyDone { sha256 }, timeout).await;
            let _ = tokio::time::timeout(timeout, stream.close()).await;
            Ok(())
        }
        Err(r) => {
            remove_staged_async(&staging, &key).await;
            tracing::warn!(%peer, copy_id, place = PLACE, code = r.code.as_str(), reason = %r.message, "copy data removed");
            Err(r)
        }
    }
}

/// Checks the hash and puts the copy in place (blocking steps on a blocking thread).
async fn finish(staging: &Path, key: &str, part: &Path, dest: &Path, offer: &Staged) -> Result<(), Refused> {
    let (staging, key, part, dest, offer) = (
        staging.to_path_buf(),
        key.to_owned(),
        part.to_path_buf(),
        dest.to_path_buf(),
        offer.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let sha = super::sha256_file(&part).map_err(|e| disk(&e, "reading the copy"))?;
        if sha != offer.sha256 {
            return Err(refused(
                ErrorCode::HashMismatch,
                format!(
                    "the bytes received hash to {sha}, not the announced {}",
                    offer.sha256
                ),
            ));
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| disk(&e, "destination"))?;
        }
        if offer.kind == "file" {
            std::fs::rename(&part, &dest).map_err(|e| disk(&e, "destination"))?;
        } else {
            archive::check_tar(&part).map_err(tar_refusal)?;
            let unpacked = staging.join(format!("{key}.dir"));
            let _ = std::fs::remove_dir_all(&unpacked);
            archive::unpack_tar(&part, &unpacked).map_err(tar_refusal)?;
            if dest.exists() {
                let old = staging.join(format!("{key}.old"));
                let _ = std::fs::remove_dir_all(&old);
                std::fs::rename(&dest, &old).map_err(|e| disk(&e, "destination"))?;
                std::fs::rename(&unpacked, &dest).map_err(|e| disk(&e, "destination"))?;
                let _ = std::fs::remove_dir_all(&old);
            } else {
                std::fs::rename(&unpacked, &dest).map_err(|e| disk(&e, "destination"))?;
            }
            let _ = std::fs::remove_file(&part);
        }
        if let Some(parent) = dest.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| refused(ErrorCode::StoreUnavailable, e.to_string()))?
}

fn tar_refusal(e: ArchiveError) -> Refused {
    match e {
        ArchiveError::Io { source, path } => disk(&source, &path.display().to_string()),
        e => refused(ErrorCode::InvalidField, format!("tar: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_no_space_and_drops_the_partial() {
        let full = disk(&std::io::Error::from_raw_os_error(28), "writing");
        assert_eq!(full.code, ErrorCode::NoSpace);
        assert!(full.discard);
        let other = disk(&std::io::Error::other("eio"), "writing");
        assert_eq!(other.code, ErrorCode::StoreUnavailable);
        assert!(!other.discard);
    }

    #[test]
    fn the_chunk_limit_fits_the_frame_cap() {
        assert_eq!(max_chunk(1024 * 1024), MAX_CHUNK);
        let small = max_chunk(4096);
        assert!(small.div_ceil(3) * 4 + FRAME_ROOM <= 4096 + 4);
        assert_eq!(max_chunk(0), 1);
    }

    #[cfg(unix)]
    #[test]
    fn destinations_through_symlinks_or_of_another_kind_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("l")).unwrap();
        let check = |rel: &str, kind: &str| check_destination(root, Path::new(rel), kind).map(|_| ());
        assert!(check("d/new", "file").is_ok());
        assert!(check("f", "file").is_ok(), "a file replaces a file");
        assert!(check("d", "dir").is_ok(), "a directory replaces a directory");
        for (rel, kind) in [
            ("l/x", "file"),
            ("l", "dir"),
            ("f/x", "file"),
            ("d", "file"),
            ("f", "dir"),
            (".oc-copy/x", "file"),
        ] {
            let refused = check(rel, kind).expect_err(rel);
            assert_eq!(refused.code, ErrorCode::InvalidField, "{rel}");
        }
    }

    #[test]
    fn ids_and_hashes_are_well_formed() {
        assert!(valid_id("0123456789abcdef"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(is_hex64(&"a".repeat(64)));
        assert!(!is_hex64(&"A".repeat(64)));
        assert!(!is_hex64(&"a".repeat(63)));
    }
}
