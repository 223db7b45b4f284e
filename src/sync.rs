//! Journal sync (`/opencloud/journal/sync/1.0`): a node pulls a range of another node's
//! journal, in parts that each fit in a frame.
//!
//! The cursor is the puller's integer "applied up to" mark for that origin, never a time.
//! The owner answers `since < seq <= until` as the JSON lines of the entries, cut into
//! `total` numbered parts of at most `part_bytes` each, so an entry larger than a frame is
//! split across parts, never dropped. The answer is a pure function of the immutable
//! journal and `(since, until, part_bytes, max_bytes)`, so the owner keeps no state: a
//! puller that misses parts, or whose `--sync-timeout` expires, keeps the parts it has and
//! asks again for the others only.
//!
//! Both sides trust nothing the other sends. A round is capped in entries
//! (`Tuning::sync_max_entries`) and bytes (`--sync-max-bytes`) by the owner whatever `until`
//! says, and its `parts` list is deduplicated and bounded by `total`. The puller checks the
//! header against what it asked for ([`Ask::check`]) before it keeps anything, and every
//! part's size before it stores it ([`Assembly::add`]): what it holds never passes the
//! header's `bytes`, which never passes its own cap. The rules are plain functions of
//! their inputs ([`plan_until`], [`wanted_parts`], [`assemble`]), tested (and fuzzed) apart
//! from the streams.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream, StreamProtocol};

use crate::config::Tuning;
use crate::contract::{ErrorCode, JournalEntry};
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::p2p::wire::{self, Frame, FrameError};
use crate::p2p::{self};
use crate::store::Store;

pub const PROTOCOL_SYNC: StreamProtocol = StreamProtocol::new("/opencloud/journal/sync/1.0");

/// Room left in each part for the frame's JSON envelope.
pub const PART_ENVELOPE: usize = 256;
/// Smallest part accepted from a puller (smaller would mean absurdly many parts).
pub const MIN_PART_BYTES: u64 = 1024;
/// Requests for one range before the puller gives up until its next attempt.
pub const MAX_ATTEMPTS: usize = 5;
/// First journal read of an answer, in entries; later reads are sized from the largest
/// entry seen so far and the bytes left under the round's cap.
const FIRST_READ: u64 = 16;
/// Most entries one journal read of an answer asks for: with entries of at most the owner's
/// `--max-event-bytes` (1 MiB), one read holds at most 64 MiB, whatever came before it.
const MAX_READ: u64 = 64;
/// Longest `code` and `message` of an owner's `error` frame kept (they end up in logs).
const MAX_REFUSAL_CODE: usize = 64;
const MAX_REFUSAL_MESSAGE: usize = 512;
/// Bytes of answer written to the stream at once.
const WRITE_BATCH: usize = 256 * 1024;
/// A repeated refusal is logged once per this interval per peer and code.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Refusals logged by this module (both sides), throttled per peer and code.
static REFUSAL_LOG: LazyLock<LogThrottle> = LazyLock::new(|| LogThrottle::new(LOG_EVERY));

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Boxed: the network error is large, and every rule of this module returns this type.
    #[error(transparent)]
    Net(Box<p2p::NetError>),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("refused by the owner: {code}: {message}")]
    Refused { code: String, message: String },
    /// The answer (or request) breaks the protocol's rules or the limits; nothing of it is
    /// kept. Not retried within the pull.
    #[error("answer does not hold together: {0}")]
    Invalid(String),
    #[error("incomplete after {attempts} requests: {missing} of {total} parts missing")]
    Incomplete {
        attempts: usize,
        missing: usize,
        total: u32,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<p2p::NetError> for SyncError {
    fn from(e: p2p::NetError) -> SyncError {
        SyncError::Net(Box::new(e))
    }
}

fn invalid(why: impl Into<String>) -> SyncError {
    SyncError::Invalid(why.into())
}

/// Bytes of one part's payload before base64, for a part frame of at most `part_bytes`
/// (raised to [`MIN_PART_BYTES`]).
pub fn chunk_bytes(part_bytes: u64) -> usize {
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
    pub fn from_tuning(t: &Tuning) -> RoundCap {
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

/// The answer to a range, ready to be cut in parts.
pub struct Answer {
    pub since: u64,
    pub until: u64,
    pub head: u64,
    blob: Vec<u8>,
    chunk: usize,
}

impl Answer {
    /// Reads the range from the journal: entries `since < seq <= plan_until(..)`, then cut
    /// at the last entry that keeps the answer within `cap.bytes` (at least one entry).
    /// Memory: the answer (at most `cap.bytes`, or one entry) plus one journal read, sized
    /// from the largest entry seen so far to what is left under the cap, at most
    /// [`MAX_READ`] entries.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn build(
        store: &dyn Store,
        origin: &str,
        since: u64,
        until: Option<u64>,
        part_bytes: u64,
        cap: RoundCap,
    ) -> Result<Answer, SyncError> {
        let head = store.journal_head(origin).await?;
        let mut until = plan_until(since, until, head, cap.entries);
        let mut blob = Vec::new();
        let mut next = since.saturating_add(1);
        let mut largest: u64 = 0;
        'read: while next <= until {
            let left_entries = until.saturating_sub(next).saturating_add(1);
            let left_bytes = cap.bytes.saturating_sub(blob.len() as u64);
            let by_bytes = match largest {
                0 => FIRST_READ,
                n => (left_bytes / n).max(1),
            };
            let want = left_entries.min(by_bytes).min(MAX_READ);
            let want = usize::try_from(want).unwrap_or(1);
            let entries = store.read_journal_raw(origin, next, want).await?;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            for e in entries {
                if e.seq > until {
                    break 'read;
                }
                let line = (e.json.len() as u64).saturating_add(1);
                largest = largest.max(line);
                if !blob.is_empty() && (blob.len() as u64).saturating_add(line) > cap.bytes {
                    // Cut here: the answer ends with the entry before this one.
                    until = e.seq.saturating_sub(1);
                    break 'read;
                }
                blob.extend_from_slice(&e.json);
                blob.push(b'\n');
            }
            if last < next || last == u64::MAX {
                break;
            }
            next = last.saturating_add(1);
        }
        Ok(Answer {
            since,
            until,
            head,
            blob,
            chunk: chunk_bytes(part_bytes),
        })
    }

    pub fn total(&self) -> u32 {
        u32::try_from(self.blob.len().div_ceil(self.chunk)).unwrap_or(u32::MAX)
    }

    pub fn bytes(&self) -> u64 {
        self.blob.len() as u64
    }

    pub fn header(&self) -> Frame {
        Frame::SyncHeader {
            since: self.since,
            until: self.until,
            head: self.head,
            total: self.total(),
            bytes: self.bytes(),
        }
    }

    pub fn part(&self, index: u32) -> Option<Frame> {
        let start = (index as usize).checked_mul(self.chunk)?;
        let end = start.saturating_add(self.chunk).min(self.blob.len());
        let slice = self.blob.get(start..end).filter(|s| !s.is_empty())?;
        Some(Frame::SyncPart {
            index,
            total: self.total(),
            data: base64::engine::general_purpose::STANDARD.encode(slice),
        })
    }
}

/// Serves one sync stream from `peer`: reads the request, answers it, closes.
///
/// A request for another origin is answered `error forged_origin`, a `parts` list longer
/// than the answer's `total` `error invalid_field`; both are counted
/// (`oc_refusals_total{place="inbound"}`) and logged (throttled per peer).
///
/// # Errors
/// The stream failed or the request was not a sync request.
pub async fn serve(
    store: &dyn Store,
    own_id: &str,
    peer: PeerId,
    mut stream: Stream,
    tuning: &Tuning,
    metrics: &Metrics,
) -> Result<(), SyncError> {
    let (max_frame, timeout) = (tuning.max_frame_bytes, tuning.sync_timeout);
    let request = tokio::time::timeout(timeout, wire::read_frame(&mut stream, max_frame))
        .await
        .map_err(|_| invalid("no request in time"))??;
    let Some(Frame::SyncRequest {
        origin,
        since,
        until,
        part_bytes,
        max_bytes,
        parts,
    }) = request
    else {
        return Err(invalid("expected a sync_request"));
    };
    if origin != own_id {
        let message = format!("this node serves only its own journal ({own_id})");
        refuse(
            &mut stream,
            peer,
            ErrorCode::ForgedOrigin,
            message,
            metrics,
            timeout,
        )
        .await;
        return Ok(());
    }
    let part_bytes = part_bytes.min(max_frame as u64);
    let mut cap = RoundCap::from_tuning(tuning);
    if let Some(asked) = max_bytes {
        cap.bytes = cap.bytes.min(asked);
    }
    let answer = Answer::build(store, own_id, since, until, part_bytes, cap).await?;
    let indexes = match wanted_parts(parts, answer.total()) {
        Ok(indexes) => indexes,
        Err(message) => {
            refuse(
                &mut stream,
                peer,
                ErrorCode::InvalidField,
                message,
                metrics,
                timeout,
            )
            .await;
            return Ok(());
        }
    };
    let send = async {
        let mut buf = Vec::new();
        wire::encode_frame(&answer.header(), &mut buf);
        for index in indexes {
            if let Some(part) = answer.part(index) {
                wire::encode_frame(&part, &mut buf);
            }
            if buf.len() >= WRITE_BATCH {
                stream.write_all(&buf).await?;
                buf.clear();
            }
        }
        stream.write_all(&buf).await?;
        stream.close().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| invalid("answer not taken in time"))??;
    Ok(())
}

/// Answers a request with an `error` frame (within `timeout`), counts and logs it.
async fn refuse(
    stream: &mut Stream,
    peer: PeerId,
    code: ErrorCode,
    message: String,
    metrics: &Metrics,
    timeout: Duration,
) {
    metrics.refused("inbound", code);
    if let Some(count) = REFUSAL_LOG.hit(peer, code.as_str()) {
        tracing::warn!(%peer, code = code.as_str(), count, reason = %message, "sync request refused");
    }
    let frame = Frame::error(None, code, message);
    let _ = tokio::time::timeout(timeout, async {
        wire::write_frame(&mut *stream, &frame).await?;
        stream.close().await
    })
    .await;
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
    pub fn new(since: u64, tuning: &Tuning) -> Ask {
        Ask {
            since,
            part_bytes: tuning.max_frame_bytes as u64,
            max_entries: tuning.sync_max_entries as u64,
            max_bytes: tuning.sync_max_bytes,
        }
    }

    /// Largest slice the owner may cut: that of our `part_bytes`.
    pub fn max_chunk(&self) -> usize {
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
    pub fn check(&self, h: &Header) -> Result<(), SyncError> {
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

    pub fn is_complete(&self) -> bool {
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

/// Checks and assembles one answer from its header and parts (in any order): the pure core
/// of [`pull`], for tests and fuzzing.
///
/// # Errors
/// See [`Assembly::new`], [`Assembly::add`], [`Assembly::finish`].
pub fn assemble<'a>(
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

/// What a pull brought back.
#[derive(Debug)]
pub struct Pulled {
    pub entries: Vec<JournalEntry>,
    pub until: u64,
    /// The owner's journal head when it answered.
    pub head: u64,
}

/// Pulls `since < seq` (the owner chooses `until` within the round caps) of `peer`'s
/// journal, re-requesting missing parts, within [`MAX_ATTEMPTS`] requests of
/// `--sync-timeout` each.
///
/// An answer that breaks the rules ([`SyncError::Invalid`]) is counted
/// (`oc_refusals_total{place="sync",code="invalid_field"}`), logged (throttled per peer),
/// and reported only after `Tuning::backoff_max`: the session starts no other sync of that
/// origin meanwhile, so a lying owner is asked at most once per backoff.
///
/// # Errors
/// The peer is unreachable, refuses, answers what was not asked, or the answer stays
/// incomplete.
pub async fn pull(
    net: &p2p::Client,
    peer: PeerId,
    since: u64,
    tuning: &Tuning,
    metrics: &Metrics,
) -> Result<Pulled, SyncError> {
    let result = pull_range(net, peer, Ask::new(since, tuning), tuning.sync_timeout).await;
    if let Err(SyncError::Invalid(why)) = &result {
        metrics.refused("sync", ErrorCode::InvalidField);
        if let Some(count) = REFUSAL_LOG.hit(peer, "sync_answer_invalid") {
            tracing::warn!(%peer, since, code = "invalid_field", count, reason = %why, backoff = ?tuning.backoff_max, "journal sync answer refused");
        }
        tokio::time::sleep(tuning.backoff_max).await;
    }
    result
}

async fn pull_range(
    net: &p2p::Client,
    peer: PeerId,
    ask: Ask,
    timeout: Duration,
) -> Result<Pulled, SyncError> {
    let mut assembly: Option<Assembly> = None;
    let frame_cap = usize::try_from(ask.part_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(PART_ENVELOPE * 4);
    for attempt in 1..=MAX_ATTEMPTS {
        let request = Frame::SyncRequest {
            origin: peer.to_string(),
            since: ask.since,
            until: assembly.as_ref().map(|a| a.header().until),
            part_bytes: ask.part_bytes,
            max_bytes: Some(ask.max_bytes),
            parts: assembly.as_ref().map(Assembly::missing),
        };
        // Progress is kept whatever happens to this attempt.
        let result = tokio::time::timeout(timeout, async {
            let mut stream = net.open_stream(peer, PROTOCOL_SYNC, timeout).await?;
            wire::write_frame(&mut stream, &request).await?;
            loop {
                match wire::read_frame(&mut stream, frame_cap).await? {
                    None => return Ok::<(), SyncError>(()),
                    Some(Frame::SyncHeader {
                        since,
                        until,
                        head,
                        total,
                        bytes,
                    }) => {
                        let header = Header {
                            since,
                            until,
                            head,
                            total,
                            bytes,
                        };
                        match &assembly {
                            // `head` may move between requests; the range may not.
                            Some(a)
                                if (
                                    a.header().since,
                                    a.header().until,
                                    a.header().total,
                                    a.header().bytes,
                                ) != (since, until, total, bytes) =>
                            {
                                return Err(invalid("header changed between requests"));
                            }
                            Some(_) => {}
                            None => assembly = Some(Assembly::new(ask, header)?),
                        }
                    }
                    Some(Frame::SyncPart { index, total, data }) => match assembly.as_mut() {
                        Some(a) => a.add(index, total, &data)?,
                        None => return Err(invalid(format!("part {index}/{total} before any header"))),
                    },
                    Some(Frame::Error { code, message, .. }) => {
                        return Err(SyncError::Refused {
                            code: clip(code, MAX_REFUSAL_CODE),
                            message: clip(message, MAX_REFUSAL_MESSAGE),
                        })
                    }
                    Some(other) => return Err(invalid(format!("unexpected {} frame", other.kind()))),
                }
            }
        })
        .await;
        match result {
            Ok(Err(e @ (SyncError::Refused { .. } | SyncError::Invalid(_)))) => return Err(e),
            Ok(Err(e)) => tracing::debug!(%peer, attempt, cause = %e, "sync attempt failed"),
            Ok(Ok(())) => {}
            Err(_) => {
                let have = assembly.as_ref().map_or(0, Assembly::held);
                tracing::info!(%peer, attempt, have, "sync request timed out; asking for the rest");
            }
        }
        if assembly.as_ref().is_some_and(Assembly::is_complete) {
            if let Some(a) = assembly.take() {
                let (until, head) = (a.header().until, a.header().head);
                let entries = a.finish()?;
                return Ok(Pulled { entries, until, head });
            }
        }
    }
    let (total, missing) = assembly
        .as_ref()
        .map_or((0, 0), |a| (a.header().total, a.missing().len()));
    Err(SyncError::Incomplete {
        attempts: MAX_ATTEMPTS,
        missing,
        total,
    })
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_holds_one_line_per_entry_however_its_resource_was_spaced() {
        use crate::contract::{Action, NewEvent, Resource};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("j.redb")).unwrap();
        let pretty = "{\n  \"id\": \"r1\",\r\n  \"creator_id\": \"o\"\n}";
        let event = NewEvent {
            action: Action::Create,
            data_type: "D".into(),
            user: "u".into(),
            from_app: "app".into(),
            resource: Resource::from_json(pretty).unwrap(),
            resource_id: "r1".into(),
        };
        store
            .append_journal("o", vec![event.clone(), event])
            .await
            .unwrap();
        let cap = RoundCap {
            entries: 100,
            bytes: 1 << 20,
        };
        let answer = Answer::build(&store, "o", 0, None, 1 << 20, cap).await.unwrap();
        let entries: Vec<JournalEntry> = answer
            .blob
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).unwrap())
            .collect();
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].seq, entries[1].resource_id()), (2, Some("r1")));
    }

    #[test]
    fn parts_fit_in_frames_and_cover_the_blob() {
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let answer = Answer {
            since: 0,
            until: 3,
            head: 3,
            blob: blob.clone(),
            chunk: chunk_bytes(2048),
        };
        let mut joined = Vec::new();
        for i in 0..answer.total() {
            let Some(part) = answer.part(i) else {
                panic!("part {i} missing")
            };
            let mut framed = Vec::new();
            wire::encode_frame(&part, &mut framed);
            assert!(framed.len() <= 2048, "part {i} is {} bytes", framed.len());
            let Frame::SyncPart { data, .. } = part else {
                unreachable!()
            };
            joined.extend(base64::engine::general_purpose::STANDARD.decode(data).unwrap());
        }
        assert_eq!(joined, blob);
        assert!(answer.part(answer.total()).is_none());
    }
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

    async fn journal(n: u64, pad: usize) -> (tempfile::TempDir, crate::store::embedded::EmbeddedStore) {
        use crate::contract::{Action, NewEvent, Resource};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("j.redb")).unwrap();
        let events = (1..=n)
            .map(|i| NewEvent {
                action: Action::Create,
                data_type: "D".into(),
                user: "u".into(),
                from_app: "app".into(),
                resource: Resource::from_json(&format!(
                    r#"{{"id":"r{i}","creator_id":"o","pad":"{}"}}"#,
                    "x".repeat(pad)
                ))
                .unwrap(),
                resource_id: format!("r{i}"),
            })
            .collect();
        store.append_journal("o", events).await.unwrap();
        (dir, store)
    }

    fn header_of(answer: &Answer) -> Header {
        Header {
            since: answer.since,
            until: answer.until,
            head: answer.head,
            total: answer.total(),
            bytes: answer.bytes(),
        }
    }

    fn parts_of(answer: &Answer) -> Vec<(u32, u32, String)> {
        (0..answer.total())
            .filter_map(|i| match answer.part(i) {
                Some(Frame::SyncPart { index, total, data }) => Some((index, total, data)),
                _ => None,
            })
            .collect()
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
    fn refusal_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("busy".into(), 64), "busy");
        assert_eq!(clip("ééé".into(), 3), "é…");
        assert!(clip("x".repeat(1 << 20), MAX_REFUSAL_MESSAGE).len() <= MAX_REFUSAL_MESSAGE + 3);
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

    #[tokio::test]
    async fn a_round_is_cut_at_an_entry_boundary_by_the_byte_cap_but_holds_one_entry() {
        let (_dir, store) = journal(50, 1000).await;
        let line = store.read_journal_raw("o", 1, 1).await.unwrap()[0].json.len() as u64 + 1;
        let cap = RoundCap {
            entries: 4096,
            bytes: line * 3 + line / 2,
        };
        let answer = Answer::build(&store, "o", 0, Some(u64::MAX), 2048, cap)
            .await
            .unwrap();
        assert_eq!((answer.until, answer.head, answer.bytes()), (3, 50, line * 3));
        let entries = assemble(
            ask(0),
            header_of(&answer),
            parts_of(&answer).iter().map(|(i, t, d)| (*i, *t, d.as_str())),
        )
        .unwrap();
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        // The re-request with the header's until reproduces the same answer.
        let again = Answer::build(&store, "o", 0, Some(3), 2048, cap).await.unwrap();
        assert_eq!(header_of(&again), header_of(&answer));

        let tiny = RoundCap {
            entries: 4096,
            bytes: 10,
        };
        let one = Answer::build(&store, "o", 7, None, 2048, tiny).await.unwrap();
        assert_eq!(
            (one.until, one.bytes()),
            (8, line),
            "one entry larger than the cap still travels"
        );

        let few = RoundCap {
            entries: 5,
            bytes: 1 << 30,
        };
        let capped = Answer::build(&store, "o", 0, Some(u64::MAX), 2048, few)
            .await
            .unwrap();
        assert_eq!(capped.until, 5);
    }

    #[tokio::test]
    async fn an_honest_answer_assembles_in_any_order() {
        let (_dir, store) = journal(30, 300).await;
        let cap = RoundCap {
            entries: 100,
            bytes: 1 << 20,
        };
        let answer = Answer::build(&store, "o", 4, None, 2048, cap).await.unwrap();
        assert!(answer.total() > 3);
        let mut parts = parts_of(&answer);
        parts.reverse();
        let entries = assemble(
            ask(4),
            header_of(&answer),
            parts.iter().map(|(i, t, d)| (*i, *t, d.as_str())),
        )
        .unwrap();
        assert_eq!(entries.len(), 26);
        assert_eq!((entries[0].seq, entries[25].seq), (5, 30));
        // Parts cut smaller by an owner with a smaller frame cap are fine too.
        let small = Answer::build(&store, "o", 4, None, 1024, cap).await.unwrap();
        let parts = parts_of(&small);
        assert_eq!(
            assemble(
                ask(4),
                header_of(&small),
                parts.iter().map(|(i, t, d)| (*i, *t, d.as_str()))
            )
            .unwrap()
            .len(),
            26
        );
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
