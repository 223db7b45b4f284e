//! The DHT record store: this node's share of the peer records, bounded in records and in
//! bytes, with expired records purged and the least useful ones evicted first when full
//! (`protocols/dht-peer-records.md`, "What a node keeps").
//!
//! Pure bookkeeping, no I/O: the network loop verifies a record (`records::check`) and
//! offers it here with what it learnt ([`Offer`]); Kademlia reads through the
//! [`RecordStore`] trait. Rules:
//!
//! - **Newer only.** A record replaces the one stored under its key only when its
//!   [`PeerRecord::version`](super::records::PeerRecord::version) (issue time, then expiry)
//!   is higher; the same record again changes nothing; an older one is refused
//!   ([`Refusal::Stale`]), so a replayed record cannot bring back an old address.
//! - **Expired records go.** A purge on every tick of the network loop and before any
//!   eviction removes the records whose expiry passed; `get` never returns one.
//! - **When full** (records or bytes), expired records go first, then the least useful:
//!   records put by a peer that is not their owner (relayed: the owners of this network put
//!   their own records, so only an attacker or an older node relays), then records put by
//!   their owner, oldest put first. This node's own records are never evicted. A fresh
//!   record is refused ([`Refusal::Full`]) only when every stored record is more useful
//!   than it.
//!
//! Provider records are not used by this network; the few Kademlia may keep are delegated
//! to a small `MemoryStore`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

/// Bytes counted per record beyond its key and value (indexes, the entry itself).
const ENTRY_OVERHEAD: usize = 160;
/// Provider records kept (the network does not use them).
const MAX_PROVIDED_KEYS: usize = 64;

/// How much a stored record is worth keeping; lower is evicted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Usefulness {
    /// Put here by a peer that does not own it.
    Relayed = 0,
    /// Put here by its owner.
    Direct = 1,
    /// This node's own record: never evicted.
    Own = 2,
}

/// Limits of the store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_value_bytes: usize,
}

/// A verified record offered for storage, with what the loop knows of it.
#[derive(Debug, Clone)]
pub(crate) struct Offer {
    pub record: Record,
    /// Its [`PeerRecord::version`](super::records::PeerRecord::version).
    pub version: (u64, u64),
    /// When the record stops being valid (from its `expires_at`).
    pub expires: Instant,
    pub usefulness: Usefulness,
}

/// What an accepted offer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Stored {
    /// A record was under that key and this newer one replaced it.
    pub replaced: bool,
    /// Expired records purged to make room.
    pub expired: usize,
    /// Valid records evicted to make room.
    pub evicted: usize,
}

/// Why an offer was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// The stored record under that key is as new or newer (and not the same record).
    #[error("a record as new or newer is stored under this key")]
    Stale { stored: (u64, u64) },
    /// The same record is already stored: nothing to do (not an error for the sender).
    #[error("the same record is already stored")]
    Unchanged,
    /// The store is full of records at least as useful.
    #[error("the record store is full of more useful records")]
    Full,
    #[error("the record is larger than a stored value may be")]
    TooLarge,
}

impl Refusal {
    /// Stable label for logs and metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Refusal::Stale { .. } => "stale",
            Refusal::Unchanged => "unchanged",
            Refusal::Full => "store_full",
            Refusal::TooLarge => "too_large",
        }
    }
}

/// A stored record with its bookkeeping (opaque outside this module).
pub(crate) struct Entry {
    record: Record,
    version: (u64, u64),
    expires: Instant,
    usefulness: Usefulness,
    /// Order of the put that stored it (the eviction order within a usefulness).
    seq: u64,
    bytes: usize,
}

/// Counters since the store was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub records: usize,
    pub bytes: usize,
    pub expired: u64,
    pub evicted: u64,
}

/// The record store (see the module documentation).
pub(crate) struct PeerRecordStore {
    local: PeerId,
    limits: Limits,
    entries: HashMap<RecordKey, Entry>,
    /// (usefulness, seq) → key: the eviction order.
    by_use: BTreeMap<(Usefulness, u64), RecordKey>,
    /// (expiry, seq) → key: the purge order.
    by_expiry: BTreeMap<(Instant, u64), RecordKey>,
    bytes: usize,
    next_seq: u64,
    expired: u64,
    evicted: u64,
    providers: MemoryStore,
}

impl PeerRecordStore {
    pub(crate) fn new(local: PeerId, limits: Limits) -> PeerRecordStore {
        PeerRecordStore {
            local,
            limits,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            by_expiry: BTreeMap::new(),
            bytes: 0,
            next_seq: 0,
            expired: 0,
            evicted: 0,
            providers: MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: 0,
                    max_provided_keys: MAX_PROVIDED_KEYS,
                    ..Default::default()
                },
            ),
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            records: self.entries.len(),
            bytes: self.bytes,
            expired: self.expired,
            evicted: self.evicted,
        }
    }

    #[cfg(test)]
    /// The version of the record stored under `key`, if any.
    pub(crate) fn version_of(&self, key: &RecordKey) -> Option<(u64, u64)> {
        self.entries.get(key).map(|e| e.version)
    }

    fn entry_bytes(record: &Record) -> usize {
        record
            .key
            .as_ref()
            .len()
            .saturating_add(record.value.len())
            .saturating_add(ENTRY_OVERHEAD)
    }

    fn take(&mut self, key: &RecordKey) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.by_use.remove(&(entry.usefulness, entry.seq));
        self.by_expiry.remove(&(entry.expires, entry.seq));
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        Some(entry)
    }

    fn insert(&mut self, offer: Offer) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        let key = offer.record.key.clone();
        let bytes = Self::entry_bytes(&offer.record);
        self.by_use.insert((offer.usefulness, seq), key.clone());
        self.by_expiry.insert((offer.expires, seq), key.clone());
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries.insert(
            key,
            Entry {
                record: offer.record,
                version: offer.version,
                expires: offer.expires,
                usefulness: offer.usefulness,
                seq,
                bytes,
            },
        );
    }

    /// Removes every record whose expiry is at or before `now`; returns how many.
    pub(crate) fn purge_expired(&mut self, now: Instant) -> usize {
        let mut purged = 0;
        while let Some((&(expires, _), key)) = self.by_expiry.first_key_value() {
            if expires > now {
                break;
            }
            let key = key.clone();
            self.take(&key);
            purged += 1;
        }
        self.expired = self.expired.saturating_add(purged as u64);
        purged
    }

    fn is_full_for(&self, bytes: usize) -> bool {
        self.entries.len() >= self.limits.max_records
            || self.bytes.saturating_add(bytes) > self.limits.max_bytes
    }

    /// Stores a verified record under the rules of the module documentation.
    ///
    /// # Errors
    /// [`Refusal`]: stale or the same record, too large, or a full store of more useful
    /// records.
    pub(crate) fn offer(&mut self, offer: Offer, now: Instant) -> Result<Stored, Refusal> {
        if offer.record.value.len() > self.limits.max_value_bytes {
            return Err(Refusal::TooLarge);
        }
        let mut done = Stored::default();
        if offer.expires <= now {
            // Verified records are not expired; a clock jump between the two is stale.
            return Err(Refusal::Stale {
                stored: offer.version,
            });
        }
        if let Some(existing) = self.entries.get(&offer.record.key) {
            if existing.expires > now {
                if existing.version == offer.version && existing.record.value == offer.record.value {
                    return Err(Refusal::Unchanged);
                }
                if existing.version >= offer.version {
                    return Err(Refusal::Stale {
                        stored: existing.version,
                    });
                }
            }
            // A newer record (or one replacing an expired record) takes the old one's room.
            let key = offer.record.key.clone();
            let old = self.take(&key);
            done.replaced = old.is_some();
        }
        let bytes = Self::entry_bytes(&offer.record);
        if bytes > self.limits.max_bytes {
            return Err(Refusal::TooLarge);
        }
        if self.is_full_for(bytes) {
            done.expired = self.purge_expired(now);
        }
        while self.is_full_for(bytes) {
            let Some((&(usefulness, _), key)) = self.by_use.first_key_value() else {
                return Err(Refusal::Full);
            };
            if usefulness == Usefulness::Own || usefulness > offer.usefulness {
                return Err(Refusal::Full);
            }
            let key = key.clone();
            self.take(&key);
            self.evicted = self.evicted.saturating_add(1);
            done.evicted += 1;
        }
        self.insert(offer);
        Ok(done)
    }
}

impl RecordStore for PeerRecordStore {
    type RecordsIter<'a> = std::iter::Map<
        std::collections::hash_map::Values<'a, RecordKey, Entry>,
        fn(&'a Entry) -> Cow<'a, Record>,
    >;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        let entry = self.entries.get(k)?;
        // Kademlia removes an expired record it is handed; the purge tick removes the rest.
        Some(Cow::Borrowed(&entry.record))
    }

    /// Kademlia's own puts: this node's records (`Client::put_record`). Records other peers
    /// put go through [`PeerRecordStore::offer`] in the network loop, after verification.
    fn put(&mut self, r: Record) -> store::Result<()> {
        let now = Instant::now();
        let usefulness = if r.publisher.is_none() || r.publisher == Some(self.local) {
            Usefulness::Own
        } else {
            Usefulness::Direct
        };
        let expires = r.expires.unwrap_or(now + super::records::MAX_AHEAD);
        let offer = Offer {
            // The node's own record is always its latest.
            version: (u64::MAX, u64::MAX),
            expires,
            usefulness,
            record: r,
        };
        let key = offer.record.key.clone();
        // The node's own put replaces whatever is stored under the key.
        self.take(&key);
        match self.offer(offer, now) {
            Ok(_) | Err(Refusal::Unchanged) => Ok(()),
            Err(Refusal::TooLarge) => Err(store::Error::ValueTooLarge),
            Err(_) => Err(store::Error::MaxRecords),
        }
    }

    fn remove(&mut self, k: &RecordKey) {
        self.take(k);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        fn borrow(e: &Entry) -> Cow<'_, Record> {
            Cow::Borrowed(&e.record)
        }
        self.entries.values().map(borrow as fn(&Entry) -> Cow<'_, Record>)
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.providers.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.providers.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.providers.remove_provider(k, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: Limits = Limits {
        max_records: 4,
        max_bytes: 1 << 20,
        max_value_bytes: 4096,
    };

    fn offer(key: &str, version: u64, life: Duration, usefulness: Usefulness, now: Instant) -> Offer {
        Offer {
            record: Record::new(RecordKey::new(&key), format!("{key}@{version}").into_bytes()),
            version: (version, version),
            expires: now + life,
            usefulness,
        }
    }

    fn keys(s: &PeerRecordStore) -> Vec<String> {
        let mut k: Vec<String> = s
            .records()
            .map(|r| String::from_utf8(r.key.to_vec()).unwrap())
            .collect();
        k.sort();
        k
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn only_a_newer_record_replaces_the_stored_one() {
        let now = Instant::now();
        let mut s = PeerRecordStore::new(PeerId::random(), LIMITS);
        s.offer(offer("a", 5, HOUR, Usefulness::Direct, now), now)
            .unwrap();
        assert_eq!(
            s.offer(offer("a", 4, HOUR, Usefulness::Direct, now), now),
            Err(Refusal::Stale { stored: (5, 5) })
        );
        assert_eq!(
            s.offer(offer("a", 5, HOUR, Usefulness::Direct, now), now),
            Err(Refusal::Unchanged)
        );
        let done = s
            .offer(offer("a", 6, HOUR, Usefulness::Direct, now), now)
            .unwrap();
        assert!(done.replaced);
        assert_eq!(s.version_of(&RecordKey::new(&"a")), Some((6, 6)));
        assert_eq!(s.counts().records, 1);
    }

    #[test]
    fn a_full_store_drops_expired_then_relayed_then_oldest_and_keeps_its_own() {
        let now = Instant::now();
        let local = PeerId::random();
        let mut s = PeerRecordStore::new(local, LIMITS);
        let mut own = Record::new(RecordKey::new(&"own"), b"own".to_vec());
        own.publisher = Some(local);
        own.expires = Some(now + HOUR);
        s.put(own).unwrap();
        s.offer(offer("direct-old", 1, HOUR, Usefulness::Direct, now), now)
            .unwrap();
        s.offer(
            offer("short", 1, Duration::from_secs(1), Usefulness::Direct, now),
            now,
        )
        .unwrap();
        s.offer(offer("relayed", 1, HOUR, Usefulness::Relayed, now), now)
            .unwrap();
        let later = now + Duration::from_secs(2);

        // Full: the expired one goes first.
        let done = s
            .offer(offer("d1", 1, HOUR, Usefulness::Direct, later), later)
            .unwrap();
        assert_eq!((done.expired, done.evicted), (1, 0));
        assert_eq!(keys(&s), ["d1", "direct-old", "own", "relayed"]);
        // Then the relayed one.
        let done = s
            .offer(offer("d2", 1, HOUR, Usefulness::Direct, later), later)
            .unwrap();
        assert_eq!((done.expired, done.evicted), (0, 1));
        assert_eq!(keys(&s), ["d1", "d2", "direct-old", "own"]);
        // A relayed record does not push out a direct one.
        assert_eq!(
            s.offer(offer("r2", 1, HOUR, Usefulness::Relayed, later), later),
            Err(Refusal::Full)
        );
        // A direct one pushes out the oldest direct one; the own record stays.
        s.offer(offer("d3", 1, HOUR, Usefulness::Direct, later), later)
            .unwrap();
        assert_eq!(keys(&s), ["d1", "d2", "d3", "own"]);
        let c = s.counts();
        assert_eq!((c.records, c.expired, c.evicted), (4, 1, 2));
    }

    #[test]
    fn a_flood_of_relayed_records_stays_within_the_bounds() {
        let now = Instant::now();
        let limits = Limits {
            max_records: 1000,
            max_bytes: 64 * 1024,
            max_value_bytes: 4096,
        };
        let mut s = PeerRecordStore::new(PeerId::random(), limits);
        s.offer(offer("honest-old", 1, HOUR, Usefulness::Direct, now), now)
            .unwrap();
        for i in 0..20_000 {
            let _ = s.offer(
                offer(&format!("flood-{i}"), 1, HOUR, Usefulness::Relayed, now),
                now,
            );
            assert!(s.counts().bytes <= limits.max_bytes);
            assert!(s.counts().records <= limits.max_records);
        }
        assert!(
            s.get(&RecordKey::new(&"honest-old")).is_some(),
            "direct records outlive a relayed flood"
        );
        s.offer(offer("honest-new", 1, HOUR, Usefulness::Direct, now), now)
            .unwrap();
        assert!(s.get(&RecordKey::new(&"flood-19999")).is_some());
        let later = now + HOUR;
        s.purge_expired(later);
        assert_eq!(s.counts().records, 0);
        assert_eq!(s.counts().bytes, 0);
    }
}
