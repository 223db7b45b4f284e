//! The journal's write-ahead log (`<data-dir>/store.wal`): one record per journal batch,
//! appended and `fdatasync`ed **before** the batch is committed to redb, which then commits
//! it without syncing (`Durability::None`).
//!
//! Why: a durable redb commit writes every page the transaction dirtied where that page
//! lives, then syncs: 13–20 scattered pages for a one-entry batch, ≈ 3× the cost of
//! appending the same bytes to a file and syncing it (docs/PERFORMANCE.md, "The storage
//! floor"). An append is one sequential write.
//!
//! What makes it safe (docs/ARCHITECTURE.md, invariant 1):
//! - A batch is in the log, synced, before redb holds it, so whatever a reader of the store
//!   can see (a partner link, journal sync, the feed) is durable: no seq a partner saw is
//!   taken back by a crash.
//! - A record holds everything the batch's write needs, its seqs and its clock reading
//!   included: replaying it writes what the first write wrote ([`Batch`]).
//! - At open, every record whose entries are above the journal's durable head is written
//!   again; the others are skipped (redb made them durable itself, in a later durable
//!   commit of any operation). A record that does not start right after the head is
//!   corruption: the store does not open.
//! - A checkpoint (a durable redb commit, which makes every earlier commit durable) starts
//!   the log again at its beginning under a new generation, once it passed the size asked at
//!   open ([`CHECKPOINT_BYTES`]), and at open after the replay.
//! - A record whose redb write failed is cut off the log again ([`Wal::undo`]); when that
//!   fails too, the log refuses every later append until the node restarts and replays it.
//!
//! The file is written in place, never truncated: zeros are written ahead of the records
//! (the file grows 1 MiB at a time, once, up to its working size), so an append changes no
//! file metadata and its `fdatasync` is one data write, with no file system journal commit
//! (which would also flush whatever redb's unsynced commits wrote).
//!
//! Layout: two header slots at 0 and 512 (`"OCJWLOG1"`, generation u64, CRC-32 of both),
//! the one with the higher valid generation in force (a checkpoint writes the other slot, so
//! a torn header write leaves the previous one); records from byte 4096:
//! `magic u32 | payload length u32 | CRC-32 of generation and payload u32 | payload`, little
//! endian. A record of another generation, or torn or garbled (a crash during an append,
//! which was never acknowledged), or zeros end the replay.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::SyncSender;

use super::{corrupt, unavailable};
use crate::contract::Action;
use crate::store::{StoreError, StoreResult};

const MAGIC: u32 = 0x574a_434f; // "OCJW"
const HEADER: usize = 12;
const SLOT_MAGIC: &[u8; 8] = b"OCJWLOG1";
/// Where the header slots are, and where the records start.
const SLOTS: [u64; 2] = [0, 512];
const RECORDS_AT: u64 = 4096;
/// What the file grows by when a record does not fit.
const GROW_BYTES: u64 = 1024 * 1024;
/// A checkpoint starts the log again once it holds this much.
pub(super) const CHECKPOINT_BYTES: u64 = 2 * 1024 * 1024;

/// The open log.
pub(super) struct Wal {
    file: File,
    /// Where the next record goes.
    pos: u64,
    /// Bytes of the file written (zeros ahead of `pos`).
    size: u64,
    /// The generation in force: records of another one are not this log's.
    generation: u64,
    /// Why appends are refused: a record the store did not take could not be removed.
    broken: Option<String>,
    /// Wakes the checkpointer (a full channel: it is awake already).
    due: Option<SyncSender<()>>,
    /// The length at which it is woken.
    checkpoint_bytes: u64,
}

/// What a log held at open: its generation and the bytes from where the records start.
pub(super) struct Held {
    pub generation: u64,
    pub bytes: Vec<u8>,
}

impl Wal {
    /// Opens (or creates) the log; returns it and what it holds.
    ///
    /// # Errors
    /// The file cannot be read or written, or it holds records but no readable header.
    pub(super) fn open(path: &Path, due: SyncSender<()>, checkpoint_bytes: u64) -> StoreResult<(Wal, Held)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(unavailable)?;
        let mut all = Vec::new();
        file.read_to_end(&mut all).map_err(unavailable)?;
        let mut wal = Wal {
            file,
            pos: RECORDS_AT,
            size: all.len() as u64,
            generation: 0,
            broken: None,
            due: Some(due),
            checkpoint_bytes,
        };
        let generation = SLOTS.iter().filter_map(|&at| read_slot(&all, at)).max();
        let held = match generation {
            Some(generation) => Held {
                generation,
                bytes: all.split_off(RECORDS_AT as usize),
            },
            None if all.iter().all(|&b| b == 0) => Held {
                generation: 0,
                bytes: Vec::new(),
            },
            None => return Err(corrupt("journal log: no readable header, yet the file is not empty")),
        };
        wal.generation = held.generation;
        Ok((wal, held))
    }

    /// The generation records are written under ([`Record::finish`]).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Bytes of records in the log.
    pub(super) fn len(&self) -> u64 {
        self.pos - RECORDS_AT
    }

    /// Appends `record` (made by [`Record::finish`] for this generation) and syncs it;
    /// returns where it starts.
    pub(super) fn append(&mut self, record: &[u8]) -> StoreResult<u64> {
        if let Some(why) = &self.broken {
            return Err(StoreError::Unavailable(format!(
                "journal log refuses appends until a restart replays it: {why}"
            )));
        }
        let at = self.pos;
        let end = at.saturating_add(record.len() as u64);
        let written = self
            .room_for(end)
            .and_then(|()| self.file.write_all_at(record, at))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Part of it may be on disk: cut it off, or refuse until a restart.
            self.undo(at);
            return Err(unavailable(format!("journal log append: {e}")));
        }
        self.pos = end;
        Ok(at)
    }

    /// Writes zeros up to past `end` when the file is shorter, and syncs them (the one
    /// append that changes the file's size).
    fn room_for(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.size {
            return Ok(());
        }
        let target = end.saturating_add(GROW_BYTES);
        let zeros = vec![0u8; GROW_BYTES as usize];
        while self.size < target {
            let n = (target - self.size).min(GROW_BYTES) as usize;
            self.file.write_all_at(&zeros[..n], self.size)?;
            self.size += n as u64;
        }
        self.file.sync_data()
    }

    /// Cuts the log back to `at` (a record the store did not take): its header is zeroed.
    /// When that fails, the log refuses appends: at the next start the record is replayed,
    /// which is right, since its events were never acknowledged and come back as
    /// redeliveries recognised by their stream sequences.
    pub(super) fn undo(&mut self, at: u64) {
        let cut = self
            .file
            .write_all_at(&[0; HEADER], at)
            .and_then(|()| self.file.sync_data());
        match cut {
            Ok(()) => self.pos = at,
            Err(e) => {
                tracing::error!(cause = %e, at, "cannot cut the journal log back; journal appends refused until a restart");
                self.broken = Some(e.to_string());
            }
        }
    }

    /// Starts the log again: everything in it is durable in redb (a durable commit came
    /// after). The next generation's header goes in the other slot and is synced before
    /// any record of it is written.
    pub(super) fn restart(&mut self) -> StoreResult<()> {
        let next = self
            .generation
            .checked_add(1)
            .ok_or_else(|| corrupt("journal log generation overflow"))?;
        let slot = slot_bytes(next);
        let at = SLOTS[(next % 2) as usize];
        self.room_for(RECORDS_AT).map_err(unavailable)?;
        self.file
            .write_all_at(&slot, at)
            .and_then(|()| self.file.sync_data())
            .map_err(unavailable)?;
        self.generation = next;
        self.pos = RECORDS_AT;
        Ok(())
    }

    /// A batch went into the log and the store: wakes the checkpointer once the log is
    /// as long as asked at open ([`CHECKPOINT_BYTES`] but in tests).
    pub(super) fn appended(&self) {
        if self.len() >= self.checkpoint_bytes {
            if let Some(due) = &self.due {
                let _ = due.try_send(());
            }
        }
    }

    /// No checkpoint after this one: the checkpointer's thread ends.
    pub(super) fn stop_checkpoints(&mut self) {
        self.due = None;
    }
}

fn slot_bytes(generation: u64) -> [u8; 20] {
    let mut slot = [0u8; 20];
    slot[..8].copy_from_slice(SLOT_MAGIC);
    slot[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&slot[..16]);
    slot[16..].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// The generation of the header slot at `at`, when it is whole.
fn read_slot(all: &[u8], at: u64) -> Option<u64> {
    let slot = all.get(at as usize..)?.get(..20)?;
    if &slot[..8] != SLOT_MAGIC || crc32fast::hash(&slot[..16]).to_le_bytes() != slot[16..20] {
        return None;
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&slot[8..16]);
    Some(u64::from_le_bytes(g))
}

fn record_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The records of what a log held, up to the first that is not of its generation, torn or
/// garbled; and whether that end was something else than zeros (a torn append, or a record
/// of an earlier generation).
pub(super) fn records(held: &Held) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    let mut rest = held.bytes.as_slice();
    while rest.len() >= HEADER {
        let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (magic, len, crc) = (word(0), word(4) as usize, word(8));
        let Some(payload) = rest.get(HEADER..).and_then(|p| p.get(..len)) else {
            break;
        };
        if magic != MAGIC || record_crc(held.generation, payload) != crc {
            break;
        }
        out.push(payload);
        rest = &rest[HEADER + len..];
    }
    let ended_on_zeros = rest.iter().take(HEADER).all(|&b| b == 0);
    (out, !ended_on_zeros)
}

/// One journal batch as the log holds it: what [`super::write_batch`] needs to write it.
#[derive(Debug)]
pub(super) struct Batch<'a> {
    pub origin: &'a str,
    /// Seq of the first entry; the others follow it.
    pub first: u64,
    /// JetStream stream sequences of the batch's intake messages.
    pub intake: Vec<u64>,
    pub entries: Vec<Item<'a>>,
}

/// One entry of a [`Batch`].
#[derive(Debug)]
pub(super) struct Item<'a> {
    pub action: Action,
    pub data_type: &'a str,
    pub resource_id: &'a str,
    /// The journal value, as the journal stores it (action byte, then the entry's JSON).
    pub value: &'a [u8],
}

impl Batch<'_> {
    /// The seq of the last entry (`first - 1` for none).
    pub(super) fn last(&self) -> u64 {
        self.first.saturating_add(self.entries.len() as u64).saturating_sub(1)
    }
}

/// A record being written: the header's room, then the payload.
pub(super) struct Record {
    buf: Vec<u8>,
}

impl Record {
    /// A record of `entries` entries of `origin`'s journal from seq `first`, at `time_ms`,
    /// for the stream sequences `intake`.
    pub(super) fn new(origin: &str, first: u64, time_ms: u64, intake: &[u64], entries: usize) -> StoreResult<Record> {
        let mut buf = Vec::with_capacity(HEADER + 64 + intake.len() * 8 + entries * 1400);
        buf.extend_from_slice(&[0; HEADER]);
        put_str16(&mut buf, origin)?;
        buf.extend_from_slice(&first.to_le_bytes());
        buf.extend_from_slice(&time_ms.to_le_bytes());
        put_u32(&mut buf, intake.len())?;
        for seq in intake {
            buf.extend_from_slice(&seq.to_le_bytes());
        }
        put_u32(&mut buf, entries)?;
        Ok(Record { buf })
    }

    /// Adds an entry whose journal value `write` appends to the buffer it is given.
    pub(super) fn push(
        &mut self,
        data_type: &str,
        resource_id: &str,
        write: impl FnOnce(&mut Vec<u8>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        put_str16(&mut self.buf, data_type)?;
        put_str16(&mut self.buf, resource_id)?;
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        write(&mut self.buf)?;
        let len = u32::try_from(self.buf.len() - at - 4).map_err(|_| corrupt("journal value over 4 GiB"))?;
        self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// The record's bytes for the log's `generation`, header filled in.
    pub(super) fn finish(mut self, generation: u64) -> StoreResult<Vec<u8>> {
        let payload = &self.buf[HEADER..];
        let len = u32::try_from(payload.len()).map_err(|_| corrupt("journal batch over 4 GiB"))?;
        let crc = record_crc(generation, payload);
        self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..8].copy_from_slice(&len.to_le_bytes());
        self.buf[8..12].copy_from_slice(&crc.to_le_bytes());
        Ok(self.buf)
    }
}

/// The payload of a finished record (its header skipped).
pub(super) fn payload(record: &[u8]) -> &[u8] {
    record.get(HEADER..).unwrap_or_default()
}

fn put_str16(buf: &mut Vec<u8>, s: &str) -> StoreResult<()> {
    let len = u16::try_from(s.len()).map_err(|_| corrupt("journal log: a name over 64 KiB"))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_u32(buf: &mut Vec<u8>, n: usize) -> StoreResult<()> {
    let n = u32::try_from(n).map_err(|_| corrupt("journal log: a count over 2^32"))?;
    buf.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

/// Reads a payload; every length is checked against what is left before it is used.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> StoreResult<&'a [u8]> {
        if n > self.rest.len() {
            return Err(corrupt("journal log record ends early"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u16(&mut self) -> StoreResult<usize> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    }

    fn u32(&mut self) -> StoreResult<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> StoreResult<u64> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn str16(&mut self) -> StoreResult<&'a str> {
        let n = self.u16()?;
        std::str::from_utf8(self.take(n)?).map_err(corrupt)
    }
}

impl<'a> Batch<'a> {
    /// Reads the payload of a record.
    pub(super) fn parse(payload: &'a [u8]) -> StoreResult<Batch<'a>> {
        let mut r = Reader { rest: payload };
        let origin = r.str16()?;
        let first = r.u64()?;
        // The entries' time, which their JSON holds already.
        let _time_ms = r.u64()?;
        let intakes = r.u32()?;
        // Each count is bounded by the bytes left before anything is reserved.
        if intakes > r.rest.len() / 8 {
            return Err(corrupt("journal log record: more stream sequences than bytes"));
        }
        let mut intake = Vec::with_capacity(intakes);
        for _ in 0..intakes {
            intake.push(r.u64()?);
        }
        let count = r.u32()?;
        // An entry takes at least 8 bytes (two name lengths, a value length).
        if count > r.rest.len() / 8 {
            return Err(corrupt("journal log record: more entries than bytes"));
        }
        if first.checked_add(count as u64).is_none() {
            return Err(corrupt("journal log record: seqs past u64"));
        }
        let mut entries = Vec::with_capacity(count);
        for _ in 0..count {
            let data_type = r.str16()?;
            let resource_id = r.str16()?;
            let len = r.u32()?;
            let value = r.take(len)?;
            let action = match value.first() {
                Some(1) => Action::Create,
                Some(2) => Action::Update,
                Some(3) => Action::Delete,
                _ => return Err(corrupt("journal log record: an entry without its action")),
            };
            entries.push(Item {
                action,
                data_type,
                resource_id,
                value,
            });
        }
        if !r.rest.is_empty() {
            return Err(corrupt("journal log record: bytes after its entries"));
        }
        Ok(Batch {
            origin,
            first,
            intake,
            entries,
        })
    }
}

/// A log file holding `records` (finished for `generation`), as a test writes it.
#[cfg(test)]
pub(super) fn file_with(generation: u64, records: &[Vec<u8>]) -> Vec<u8> {
    let mut file = vec![0u8; RECORDS_AT as usize];
    let at = SLOTS[(generation % 2) as usize] as usize;
    file[at..at + 20].copy_from_slice(&slot_bytes(generation));
    for r in records {
        file.extend_from_slice(r);
    }
    file.extend_from_slice(&[0; 64]);
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(first: u64, values: &[&[u8]]) -> Vec<u8> {
        let mut r = Record::new("origin-a", first, 77, &[5, 6], values.len()).unwrap();
        for (i, v) in values.iter().enumerate() {
            r.push("dt", &format!("id{i}"), |out| {
                out.extend_from_slice(v);
                Ok(())
            })
            .unwrap();
        }
        r.finish(3).unwrap()
    }

    fn held(bytes: Vec<u8>) -> Held {
        Held { generation: 3, bytes }
    }

    #[test]
    fn a_record_reads_back_as_it_was_written() {
        let rec = record(10, &[b"\x01{}", b"\x03{\"x\":1}"]);
        let mut bytes = rec.clone();
        bytes.extend_from_slice(&[0; 100]);
        let held = held(bytes);
        let (found, garbage) = records(&held);
        assert_eq!((found.len(), garbage), (1, false));
        let b = Batch::parse(found[0]).unwrap();
        assert_eq!((b.origin, b.first, b.last()), ("origin-a", 10, 11));
        assert_eq!(b.intake, vec![5, 6]);
        assert_eq!(b.entries[1].action, Action::Delete);
        assert_eq!(b.entries[1].resource_id, "id1");
        assert_eq!(b.entries[1].value, b"\x03{\"x\":1}");
        assert_eq!(Batch::parse(payload(&rec)).unwrap().first, 10);
    }

    #[test]
    fn a_torn_garbled_or_older_record_ends_the_records() {
        let mut bytes = record(1, &[b"\x01{}"]);
        let second = record(2, &[b"\x02{}"]);
        bytes.extend_from_slice(&second[..second.len() - 3]);
        let torn = held(bytes);
        let (found, garbage) = records(&torn);
        assert_eq!((found.len(), garbage), (1, true), "torn: the append never returned");
        let mut garbled = record(1, &[b"\x01{}"]);
        let last = garbled.len() - 1;
        garbled[last] ^= 0xff;
        assert_eq!(records(&held(garbled)).0.len(), 0, "the CRC no longer matches");
        let older = Held {
            generation: 4,
            bytes: record(1, &[b"\x01{}"]),
        };
        assert_eq!(records(&older).0.len(), 0, "a record of generation 3 in a log of 4");
    }

    #[test]
    fn the_log_starts_again_under_a_new_generation_and_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.wal");
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let (mut wal, held) = Wal::open(&path, tx.clone(), 1 << 20).unwrap();
        assert!(held.bytes.is_empty());
        wal.restart().unwrap();
        let g = wal.generation();
        let rec = |first| {
            let mut r = Record::new("o", first, 1, &[], 1).unwrap();
            r.push("dt", "id", |out| {
                out.extend_from_slice(b"\x01{}");
                Ok(())
            })
            .unwrap();
            r.finish(g).unwrap()
        };
        wal.append(&rec(1)).unwrap();
        let second = wal.append(&rec(2)).unwrap();
        wal.append(&rec(3)).unwrap();
        wal.undo(second + rec(2).len() as u64);
        let size = std::fs::metadata(&path).unwrap().len();
        drop(wal);
        let (mut wal, held) = Wal::open(&path, tx.clone(), 1 << 20).unwrap();
        assert_eq!(held.generation, g);
        assert_eq!(records(&held).0.len(), 2, "the third record was cut off");
        wal.restart().unwrap();
        drop(wal);
        let (_, held) = Wal::open(&path, tx, 1 << 20).unwrap();
        assert_eq!(held.generation, g + 1);
        assert_eq!(records(&held), (Vec::new(), true), "the old records are of generation {g}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "written in place");
    }

    #[test]
    fn a_file_with_bytes_but_no_header_refuses_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.wal");
        std::fs::write(&path, b"not a log").unwrap();
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        assert!(matches!(Wal::open(&path, tx, 1 << 20), Err(StoreError::Corrupt(_))));
    }
    #[test]
    fn counts_and_lengths_beyond_the_payload_are_refused_before_anything_is_reserved() {
        let mut rec = record(1, &[b"\x01{}"]);
        // The entry count sits after origin (2 + 8), first, time, intake count and two seqs.
        let at = HEADER + 2 + 8 + 8 + 8 + 4 + 16;
        rec[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Batch::parse(payload(&rec)).is_err());
        let mut rec = record(1, &[b"\x01{}"]);
        let at = HEADER + 2 + 8 + 8 + 8;
        rec[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Batch::parse(payload(&rec)).is_err());
        let rec = record(u64::MAX, &[b"\x01{}", b"\x01{}"]);
        assert!(Batch::parse(payload(&rec)).is_err(), "seqs past u64");
    }
}
