//! The rules of journal sync as plain functions and types of their inputs, no store or
//! stream inside: how far an answer goes ([`plan_until`], [`RoundCap`]), which parts are sent
//! ([`wanted_parts`]), how a part is sized ([`chunk_bytes`]), and the puller's checks of an
//! answer before it keeps anything ([`Ask::check`], [`Assembly`], [`assemble`]).

use std::collections::BTreeMap;

use base64::Engine;

use crate::config::Tuning;
use crate::contract::JournalEntry;

use super::{invalid, SyncError};

/// Room left in each part for the frame's JSON envelope.
pub(crate) const PART_ENVELOPE: usize = 256;
/// Smallest part accepted from a puller (smaller would mean absurdly many parts).
pub(crate) const MIN_PART_BYTES: u64 = 1024;

/// Bytes of one part's payload before base64, for a part frame of at most `part_bytes`
/// (raised to [`MIN_PART_BYTES`]).
pub(crate) fn chunk_bytes(part_bytes: u64) -> usize {
    let capped = usize::try_from(part_bytes.max(MIN_PART_BYTES)).unwrap_or(usize::MAX);
    let usable = capped.saturating_sub(PART_ENVELOPE);
    (usable / 4).saturating_mul(3).max(1)
}

/// Round caps of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundCap {
    /// Most entries (`Tuning::sync_max_entries`).
    pub entries: u64,
    /// Most bytes of JSON lines, cut at an entry boundary; a first entry larger than this
    /// still travels alone.
    pub bytes: u64,
}

impl RoundCap {
    pub(crate) fn from_tuning(t: &Tuning) -> RoundCap {
        RoundCap {
            entries: t.sync_max_entries as u64,
            bytes: t.sync_max_bytes,
        }
    }
}

/// The last seq an answer may cover: `until` (default `since + cap`), never more than
/// `cap` entries after `since`, never beyond the head, never below `since`.
pub fn plan_until(since: u64, until: Option<u64>, head: u64, cap_entries: u64) -> u64 {
    let most = since.saturating_add(cap_entries);
    until.unwrap_or(most).min(most).min(head).max(since)
}

/// The part indexes to send for a request's `parts` (all when absent): each at most once,
/// in increasing order, those `>= total` left out.
///
/// # Errors
/// A list longer than `total`: no honest puller asks for more parts than there are.
pub fn wanted_parts(parts: Option<Vec<u32>>, total: u32) -> Result<Vec<u32>, String> {
    let Some(mut list) = parts else {
        return Ok((0..total).collect());
    };
    if list.len() > total as usize {
        return Err(format!(
            "{} part indexes asked, the answer has {total} parts",
            list.len()
        ));
    }
    list.retain(|i| *i < total);
    list.sort_unstable();
    list.dedup();
    Ok(list)
}

/// What a puller asks for, and the limits the answer must fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The puller's applied mark: entries `since < seq` are asked for.
    pub since: u64,
    /// Largest part frame the puller reads.
    pub part_bytes: u64,
    /// Most entries of a round (`Tuning::sync_max_entries`).
    pub max_entries: u64,
    /// Most bytes of a round (`--sync-max-bytes`), sent to the owner as `max_bytes`.
    pub max_bytes: u64,
}

impl Ask {
    pub(crate) fn new(since: u64, tuning: &Tuning) -> Ask {
        Ask {
            since,
            part_bytes: tuning.max_frame_bytes as u64,
            max_entries: tuning.sync_max_entries as u64,
            max_bytes: tuning.sync_max_bytes,
        }
    }

    /// Largest slice the owner may cut: that of our `part_bytes`.
    pub(crate) fn max_chunk(&self) -> usize {
        chunk_bytes(self.part_bytes)
    }

    /// Checks a `sync_header` against what was asked, before anything is kept for it:
    /// same `since`; `since <= until <= since + max_entries`; `until <= head`;
    /// `bytes <= max_bytes`; `total` the number of slices of `bytes` for a slice size the
    /// owner may use (between that of [`MIN_PART_BYTES`] and that of our `part_bytes`),
    /// so `0` exactly when `bytes` is `0`.
    ///
    /// # Errors
    /// [`SyncError::Invalid`] naming the first rule broken.
    pub(crate) fn check(&self, h: &Header) -> Result<(), SyncError> {
        if h.since != self.since {
            return Err(invalid(format!(
                "header since {} for a request since {}",
                h.since, self.since
            )));
        }
        let most = self.since.saturating_add(self.max_entries);
        if h.until < self.since || h.until > most {
            return Err(invalid(format!(
                "header until {} outside {}..={most}",
                h.until, self.since
            )));
        }
        if h.head < h.until {
            return Err(invalid(format!(
                "header head {} below its until {}",
                h.head, h.until
            )));
        }
        if h.bytes > self.max_bytes {
            return Err(invalid(format!(
                "header announces {} bytes, the round cap is {}",
                h.bytes, self.max_bytes
            )));
        }
        let (smallest, largest) = (chunk_bytes(MIN_PART_BYTES) as u64, self.max_chunk() as u64);
        let (fewest, most_parts) = (h.bytes.div_ceil(largest), h.bytes.div_ceil(smallest));
        if u64::from(h.total) < fewest || u64::from(h.total) > most_parts {
            return Err(invalid(format!(
                "header announces {} parts for {} bytes (between {fewest} and {most_parts})",
                h.total, h.bytes
            )));
        }
        Ok(())
    }
}

/// A `sync_header`'s fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub since: u64,
    pub until: u64,
    pub head: u64,
    pub total: u32,
    pub bytes: u64,
}

/// The parts of one answer being collected: what is held never passes `header.bytes`.
#[derive(Debug)]
pub struct Assembly {
    ask: Ask,
    header: Header,
    parts: BTreeMap<u32, Vec<u8>>,
    held: u64,
    /// The slice size, known from the first part that is not the last.
    chunk: Option<u64>,
}

impl Assembly {
    /// # Errors
    /// The header does not fit the ask ([`Ask::check`]).
    pub fn new(ask: Ask, header: Header) -> Result<Assembly, SyncError> {
        ask.check(&header)?;
        Ok(Assembly {
            ask,
            header,
            parts: BTreeMap::new(),
            held: 0,
            chunk: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Parts held.
    pub fn held(&self) -> usize {
        self.parts.len()
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.parts.len() == self.header.total as usize
    }

    /// The indexes still missing (at most `total`, which the header check bounds).
    pub fn missing(&self) -> Vec<u32> {
        (0..self.header.total)
            .filter(|i| !self.parts.contains_key(i))
            .collect()
    }

    /// Checks and keeps part `index` of `total`. Its size is checked from the base64
    /// length before decoding and again after: every slice but the last has the same size,
    /// within what the owner may cut; the last holds the rest; nothing is held twice.
    ///
    /// # Errors
    /// [`SyncError::Invalid`]: a part that does not belong to this header, sent twice, or
    /// of a size the header does not allow.
    pub fn add(&mut self, index: u32, total: u32, data: &str) -> Result<(), SyncError> {
        let h = self.header;
        if total != h.total || index >= h.total {
            return Err(invalid(format!(
                "part {index}/{total} out of place ({} parts)",
                h.total
            )));
        }
        if self.parts.contains_key(&index) {
            return Err(invalid(format!("part {index} sent twice")));
        }
        let max_chunk = self.ask.max_chunk() as u64;
        let room = h.bytes.saturating_sub(self.held);
        let limit = max_chunk.min(room);
        // Base64 of n bytes is 4 * ceil(n / 3) characters.
        if (data.len() as u64) > limit.div_ceil(3).saturating_mul(4) {
            return Err(invalid(format!(
                "part {index} of {} base64 characters, at most {limit} bytes may follow",
                data.len()
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| invalid(format!("part {index}: {e}")))?;
        let len = bytes.len() as u64;
        if len == 0 || len > limit {
            return Err(invalid(format!(
                "part {index} of {len} bytes, at most {limit} allowed"
            )));
        }
        let last = index == h.total.saturating_sub(1);
        if last {
            // The last slice holds what the others leave: exact once the size is known.
            if let Some(c) = self.chunk {
                let rest = h
                    .bytes
                    .saturating_sub(c.saturating_mul(u64::from(h.total.saturating_sub(1))));
                if len != rest {
                    return Err(invalid(format!("last part of {len} bytes, {rest} expected")));
                }
            } else if h.total == 1 && len != h.bytes {
                return Err(invalid(format!(
                    "only part of {len} bytes, header said {}",
                    h.bytes
                )));
            }
        } else {
            match self.chunk {
                Some(c) if c != len => {
                    return Err(invalid(format!(
                        "part {index} of {len} bytes, the others have {c}"
                    )));
                }
                Some(_) => {}
                None => {
                    // The slice size the owner chose must give exactly `total` slices.
                    if len < chunk_bytes(MIN_PART_BYTES) as u64 || h.bytes.div_ceil(len) != u64::from(h.total)
                    {
                        return Err(invalid(format!(
                            "parts of {len} bytes do not cut {} bytes into {} parts",
                            h.bytes, h.total
                        )));
                    }
                    self.chunk = Some(len);
                }
            }
        }
        self.held = self.held.saturating_add(len);
        self.parts.insert(index, bytes);
        Ok(())
    }

    /// Joins the parts and decodes the entries, part by part (each part is freed once its
    /// lines are read): at most `until - since` entries, seqs strictly increasing within
    /// `since < seq <= until`.
    ///
    /// # Errors
    /// [`SyncError::Incomplete`] when parts are missing (`attempts` 0), otherwise
    /// [`SyncError::Invalid`].
    pub fn finish(mut self) -> Result<Vec<JournalEntry>, SyncError> {
        let h = self.header;
        if !self.is_complete() {
            return Err(SyncError::Incomplete {
                attempts: 0,
                missing: self.missing().len(),
                total: h.total,
            });
        }
        if self.held != h.bytes {
            return Err(invalid(format!("{} bytes, header said {}", self.held, h.bytes)));
        }
        let most = h.until.saturating_sub(h.since);
        let mut entries: Vec<JournalEntry> = Vec::new();
        let mut previous = h.since;
        let mut line: Vec<u8> = Vec::new();
        let mut take = |line: &[u8]| -> Result<(), SyncError> {
            if line.is_empty() {
                return Ok(());
            }
            if entries.len() as u64 >= most {
                return Err(invalid(format!(
                    "more than the {most} entries of {}..={}",
                    h.since, h.until
                )));
            }
            let entry: JournalEntry = serde_json::from_slice(line).map_err(|e| invalid(e.to_string()))?;
            if entry.seq <= previous || entry.seq > h.until {
                return Err(invalid(format!(
                    "entry {} after {previous}, outside {}..={}",
                    entry.seq, h.since, h.until
                )));
            }
            previous = entry.seq;
            entries.push(entry);
            Ok(())
        };
        while let Some((_, part)) = self.parts.pop_first() {
            let mut rest = part.as_slice();
            while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                let (head, tail) = rest.split_at(end);
                if line.is_empty() {
                    take(head)?;
                } else {
                    line.extend_from_slice(head);
                    take(&line)?;
                    line.clear();
                }
                rest = tail.get(1..).unwrap_or_default();
            }
            line.extend_from_slice(rest);
        }
        take(&line)?;
        Ok(entries)
    }
}

#[cfg(test)]
/// Checks and assembles one answer from its header and parts (in any order): the pure core
/// of [`super::pull::pull`], for tests and fuzzing.
///
/// # Errors
/// See [`Assembly::new`], [`Assembly::add`], [`Assembly::finish`].
pub(crate) fn assemble<'a>(
    ask: Ask,
    header: Header,
    parts: impl IntoIterator<Item = (u32, u32, &'a str)>,
) -> Result<Vec<JournalEntry>, SyncError> {
    let mut assembly = Assembly::new(ask, header)?;
    for (index, total, data) in parts {
        assembly.add(index, total, data)?;
    }
    assembly.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_entry(seq: u64, pad: usize) -> JournalEntry {
        JournalEntry {
            origin: "o".into(),
            seq,
            action: crate::contract::Action::Create,
            data_type: "D".into(),
            user: "u".into(),
            resource: serde_json::json!({"id": format!("r{seq}"), "creator_id": "o", "pad": "x".repeat(pad)})
                .into(),
            time_ms: 1,
        }
    }

    fn ask(since: u64) -> Ask {
        Ask {
            since,
            part_bytes: 2048,
            max_entries: 100,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn until_is_capped_whatever_the_request_says() {
        assert_eq!(plan_until(10, Some(u64::MAX), 1_000_000, 4096), 4106);
        assert_eq!(plan_until(10, None, 1_000_000, 4096), 4106);
        assert_eq!(plan_until(10, Some(20), 1_000_000, 4096), 20);
        assert_eq!(plan_until(10, None, 15, 4096), 15, "capped at the head");
        assert_eq!(plan_until(10, Some(3), 15, 4096), 10, "never below since");
        assert_eq!(
            plan_until(u64::MAX - 1, None, u64::MAX, 4096),
            u64::MAX,
            "no overflow"
        );
    }

    #[test]
    fn asked_parts_are_deduplicated_bounded_and_in_range() {
        assert_eq!(wanted_parts(None, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(wanted_parts(Some(vec![2, 0, 2, 9]), 4).unwrap(), vec![0, 2]);
        assert_eq!(wanted_parts(Some(vec![1, 1, 1]), 3).unwrap(), vec![1]);
        assert!(
            wanted_parts(Some(vec![0; 100_000]), 3).is_err(),
            "longer than total"
        );
        assert!(wanted_parts(Some(vec![0]), 0).is_err());
        assert_eq!(wanted_parts(Some(vec![]), 0).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn a_header_must_fit_what_was_asked() {
        let good = Header {
            since: 0,
            until: 3,
            head: 10,
            total: 2,
            bytes: 2000,
        };
        assert!(ask(0).check(&good).is_ok());
        let bad = [
            Header {
                total: u32::MAX,
                bytes: u64::MAX,
                ..good
            },
            Header {
                total: u32::MAX,
                ..good
            },
            Header {
                bytes: (1 << 20) + 1,
                total: 1000,
                ..good
            },
            Header { since: 1, ..good },
            Header {
                until: 101,
                head: 200,
                ..good
            },
            Header { head: 2, ..good },
            Header { total: 0, ..good },
            Header { total: 1, ..good },
            Header {
                total: 1,
                bytes: 0,
                ..good
            },
        ];
        for h in bad {
            assert!(
                matches!(ask(0).check(&h), Err(SyncError::Invalid(_))),
                "{h:?} accepted"
            );
        }
        assert!(
            ask(0)
                .check(&Header {
                    total: 0,
                    bytes: 0,
                    ..good
                })
                .is_ok(),
            "nothing to send"
        );
    }

    #[test]
    fn parts_never_pass_what_the_header_announced() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n]);
        let chunk = chunk_bytes(2048);
        let header = Header {
            since: 0,
            until: 3,
            head: 3,
            total: 2,
            bytes: (chunk + 10) as u64,
        };
        let fresh = || Assembly::new(ask(0), header).unwrap();
        // Larger than a part may be: refused from its base64 length, before decoding.
        assert!(fresh().add(0, 2, &b64(chunk + 1)).is_err());
        assert!(fresh().add(0, 2, &"A".repeat(10_000_000)).is_err());
        // More parts than announced, or another total.
        assert!(fresh().add(2, 2, &b64(10)).is_err());
        assert!(fresh().add(0, 3, &b64(chunk)).is_err());
        // The same part twice.
        let mut a = fresh();
        a.add(0, 2, &b64(chunk)).unwrap();
        assert!(a.add(0, 2, &b64(chunk)).is_err());
        // The last part must be exactly the rest.
        assert!(a.add(1, 2, &b64(11)).is_err());
        a.add(1, 2, &b64(10)).unwrap();
        assert!(a.is_complete());
        // A first part that cannot cut `bytes` into `total` slices.
        assert!(fresh().add(0, 2, &b64(5)).is_err());
        // Not base64.
        assert!(fresh().add(0, 2, "!!!!").is_err());
    }

    #[test]
    fn assembled_entries_stay_in_their_range() {
        let lines = |seqs: &[u64]| {
            let mut blob = Vec::new();
            for s in seqs {
                blob.extend(serde_json::to_vec(&journal_entry(*s, 10)).unwrap());
                blob.push(b'\n');
            }
            base64::engine::general_purpose::STANDARD.encode(blob)
        };
        let run = |seqs: &[u64], until: u64| {
            let data = lines(seqs);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&data)
                .unwrap()
                .len() as u64;
            let mut a = ask(0);
            a.part_bytes = 1 << 20;
            let header = Header {
                since: 0,
                until,
                head: until,
                total: 1,
                bytes,
            };
            assemble(a, header, [(0, 1, data.as_str())])
        };
        assert_eq!(run(&[1, 2, 3], 3).unwrap().len(), 3);
        assert!(run(&[1, 2, 3, 4], 3).is_err(), "more entries than the range");
        assert!(run(&[2, 1], 3).is_err(), "not increasing");
        assert!(run(&[0], 3).is_err(), "at or below since");
        assert!(run(&[1, 1], 3).is_err(), "twice");
    }

    #[test]
    fn assembling_never_panics_on_garbage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for _ in 0..2_000 {
            let header = Header {
                since: rng.gen_range(0..4),
                until: rng.gen_range(0..8),
                head: rng.gen_range(0..10),
                total: rng.gen_range(0..4),
                bytes: rng.gen_range(0..1500),
            };
            let parts: Vec<(u32, u32, String)> = (0..rng.gen_range(0..5))
                .map(|_| {
                    let n = rng.gen_range(0..400);
                    let raw: Vec<u8> = (0..n)
                        .map(|_| *b"{}\n\"a:1,seq".get(rng.gen_range(0..12)).unwrap_or(&b'x'))
                        .collect();
                    let data = if rng.gen_bool(0.9) {
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    } else {
                        String::from_utf8_lossy(&raw).into_owned()
                    };
                    (rng.gen_range(0..4), rng.gen_range(0..4), data)
                })
                .collect();
            let _ = assemble(ask(0), header, parts.iter().map(|(i, t, d)| (*i, *t, d.as_str())));
        }
    }
}
