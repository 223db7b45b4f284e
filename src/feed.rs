//! The live feed: entries of the node's journal and of its applied log as they are
//! committed, for the clients of `GET /api/feed` ([`crate::admin::feed`]).
//!
//! The commit points only say that something was committed ([`Live::advanced`]: a
//! `Notify`, nothing allocated, never waits). One follower task per log
//! ([`follow_journal`], [`follow_applied`]) reads the new rows back from the store,
//! encodes each once as JSON (the shape of `GET /api/journal` and `GET /api/applied`
//! entries) and pushes it into a [`Ring`] bounded in entries and in bytes. Every client reads
//! the same ring at its own pace through its own cursor: a slow client never slows the node
//! nor grows memory; one that falls behind the ring's oldest entry learns how many it
//! missed ([`Read::skipped`]) and goes on from the oldest kept. While no client is connected
//! the followers only move their position to the newest key: nothing is read or encoded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::backoff::Backoff;
use crate::store::{AppliedRecord, Store};

/// Entries a ring keeps at most.
pub const DEFAULT_RING_ENTRIES: usize = 4096;
/// Bytes of JSON a ring keeps at most (its oldest entries go first).
pub const DEFAULT_RING_BYTES: usize = 16 * 1024 * 1024;
/// Feed clients connected at once at most, all feeds together.
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// Rows a follower reads from the store at once.
const FOLLOW_WINDOW: usize = 256;
/// Bytes a ring item costs beyond its JSON and labels (ids, `Arc`, queue slot).
const ITEM_OVERHEAD: usize = 96;
/// Retry delays of a follower whose store read failed.
const FOLLOW_RETRY_MIN: Duration = Duration::from_millis(200);
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(10);
/// A follower looks at the store this often even without a commit notice (a notice is
/// never lost, this only bounds the wait).
const FOLLOW_POLL: Duration = Duration::from_secs(5);

/// One committed entry as the feed sends it.
#[derive(Debug)]
pub struct LiveItem {
    /// Position in the ring's sequence: 1, 2, 3 ... with no gap.
    pub id: u64,
    /// The entry's own key: its `seq` in the journal, its apply `key` in the applied log.
    pub key: u64,
    pub data_type: String,
    pub origin: String,
    /// The entry as JSON.
    pub json: Arc<str>,
}

impl LiveItem {
    fn cost(&self) -> usize {
        self.json
            .len()
            .saturating_add(self.data_type.len())
            .saturating_add(self.origin.len())
            .saturating_add(ITEM_OVERHEAD)
    }
}

/// What a client gets from [`Ring::read`].
#[derive(Debug, Default)]
pub struct Read {
    /// Entries that left the ring before this client read them.
    pub skipped: u64,
    pub items: Vec<Arc<LiveItem>>,
    /// The cursor to read from next time.
    pub next: u64,
    /// Whether entries were left for the next read (a bound was reached).
    pub more: bool,
}

/// The newest committed entries, bounded in count and bytes; no I/O inside.
#[derive(Debug)]
pub struct Ring {
    items: VecDeque<Arc<LiveItem>>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Id of the next entry pushed.
    next_id: u64,
}

impl Ring {
    pub fn new(max_entries: usize, max_bytes: usize) -> Ring {
        Ring {
            items: VecDeque::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            next_id: 1,
        }
    }

    /// Adds an entry, dropping the oldest ones beyond the bounds (an entry larger than the
    /// byte bound alone is still kept, alone, so that every commit is seen or counted).
    pub fn push(&mut self, key: u64, data_type: &str, origin: &str, json: Arc<str>) {
        let item = Arc::new(LiveItem {
            id: self.next_id,
            key,
            data_type: data_type.to_owned(),
            origin: origin.to_owned(),
            json,
        });
        self.next_id = self.next_id.saturating_add(1);
        self.bytes = self.bytes.saturating_add(item.cost());
        self.items.push_back(item);
        while self.items.len() > self.max_entries || (self.bytes > self.max_bytes && self.items.len() > 1) {
            if let Some(old) = self.items.pop_front() {
                self.bytes = self.bytes.saturating_sub(old.cost());
            }
        }
    }

    /// The cursor of a client that wants only what is pushed from now on.
    pub fn cursor(&self) -> u64 {
        self.next_id
    }

    /// Counts `n` entries that were committed but never pushed (more than a ring's worth
    /// arrived at once): they take ids, and what the ring held goes (the entries pushed
    /// next fill it anyway), so a client behind is told it skipped them too.
    pub fn skip(&mut self, n: u64) {
        if n > 0 {
            self.items.clear();
            self.bytes = 0;
            self.next_id = self.next_id.saturating_add(n);
        }
    }

    /// Up to `max` entries and about `max_bytes` (at least one entry) from cursor `from` on,
    /// and how many were skipped because they already left the ring.
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> Read {
        let oldest = self.items.front().map_or(self.next_id, |i| i.id);
        let start = from.max(oldest).min(self.next_id);
        let skipped = start.saturating_sub(from);
        let offset = usize::try_from(start - oldest).unwrap_or(usize::MAX);
        let mut items: Vec<Arc<LiveItem>> = Vec::new();
        let mut bytes = 0usize;
        for item in self.items.iter().skip(offset) {
            if items.len() >= max || (!items.is_empty() && bytes.saturating_add(item.cost()) > max_bytes) {
                break;
            }
            bytes = bytes.saturating_add(item.cost());
            items.push(item.clone());
        }
        let next = items.last().map_or(start, |i| i.id.saturating_add(1));
        Read {
            skipped,
            items,
            next,
            more: next < self.next_id,
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// One log's live side: the commit notice, the ring, and the id of its newest entry for
/// the clients to wait on.
pub struct Live {
    advanced: Notify,
    ring: Mutex<Ring>,
    newest: watch::Sender<u64>,
}

impl Live {
    fn new(max_entries: usize, max_bytes: usize) -> Live {
        Live {
            advanced: Notify::new(),
            ring: Mutex::new(Ring::new(max_entries, max_bytes)),
            newest: watch::Sender::new(0),
        }
    }

    /// The commit point's hook: something new was committed (wakes the follower).
    pub fn advanced(&self) {
        self.advanced.notify_one();
    }

    /// Changes each time entries are pushed.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// See [`Ring::cursor`].
    pub fn cursor(&self) -> u64 {
        self.lock().cursor()
    }

    /// See [`Ring::read`].
    pub fn read(&self, from: u64, max: usize, max_bytes: usize) -> Read {
        self.lock().read(from, max, max_bytes)
    }

    /// Pushes `items` after counting `skipped` entries that were never read ([`Ring::skip`]).
    fn push_all(&self, skipped: u64, items: impl IntoIterator<Item = (u64, String, String, Arc<str>)>) {
        let newest = {
            let mut ring = self.lock();
            ring.skip(skipped);
            for (key, data_type, origin, json) in items {
                ring.push(key, &data_type, &origin, json);
            }
            ring.cursor().saturating_sub(1)
        };
        self.newest.send_replace(newest);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The ring holds no invariant a panicking holder could break half-way.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Both logs' live sides and the count of connected clients.
pub struct Feed {
    pub journal: Live,
    pub applied: Live,
    clients: AtomicUsize,
    max_clients: usize,
}

/// A connected client's place; dropping it frees the place.
pub struct ClientSlot(Arc<Feed>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Feed {
    pub fn new(ring_entries: usize, ring_bytes: usize, max_clients: usize) -> Arc<Feed> {
        Arc::new(Feed {
            journal: Live::new(ring_entries, ring_bytes),
            applied: Live::new(ring_entries, ring_bytes),
            clients: AtomicUsize::new(0),
            max_clients,
        })
    }

    /// A place for one more client, unless `max_clients` are connected.
    pub fn join(self: &Arc<Feed>) -> Option<ClientSlot> {
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_clients).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(self.clone()))
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }
}

impl Default for Feed {
    fn default() -> Feed {
        Feed {
            journal: Live::new(DEFAULT_RING_ENTRIES, DEFAULT_RING_BYTES),
            applied: Live::new(DEFAULT_RING_ENTRIES, DEFAULT_RING_BYTES),
            clients: AtomicUsize::new(0),
            max_clients: DEFAULT_MAX_CLIENTS,
        }
    }
}

/// Waits for a commit notice, the poll interval or shutdown; false on shutdown.
async fn next_round(live: &Live, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = live.advanced.notified() => true,
        () = tokio::time::sleep(FOLLOW_POLL) => true,
        () = crate::shutdown::signalled(stop) => false,
    }
}

/// Feeds the journal ring from the store: every own entry above the head at start.
pub async fn follow_journal(
    feed: Arc<Feed>,
    store: Arc<dyn Store>,
    own_id: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(FOLLOW_RETRY_MIN, FOLLOW_RETRY_MAX);
    let mut last = loop {
        match store.journal_head(&own_id).await {
            Ok(head) => break head,
            Err(e) => tracing::warn!(cause = %e, "live feed: cannot read the journal head"),
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut stop)).await {
            return;
        }
    };
    while next_round(&feed.journal, &mut stop).await {
        // Nobody watching: move past what is committed without reading or encoding it. The
        // head is read before the client count: a client counted after it reads its page
        // after this head, so nothing it should get live is skipped.
        if let Ok(head) = store.journal_head(&own_id).await {
            if feed.clients() == 0 {
                last = last.max(head);
                continue;
            }
        }
        loop {
            let rows = match store
                .read_journal(&own_id, last.saturating_add(1), FOLLOW_WINDOW)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(cause = %e, after = last, "live feed: cannot read the journal");
                    break;
                }
            };
            let full = rows.len() >= FOLLOW_WINDOW;
            let mut items = Vec::with_capacity(rows.len());
            for e in rows {
                last = last.max(e.seq);
                match serde_json::to_string(&e) {
                    Ok(json) => items.push((e.seq, e.data_type, e.origin, Arc::from(json))),
                    Err(err) => tracing::warn!(cause = %err, seq = e.seq, "live feed: entry not encoded"),
                }
            }
            feed.journal.push_all(0, items);
            if !full {
                break;
            }
        }
    }
}

/// Feeds the applied ring from the store: every applied record above the newest at start.
pub async fn follow_applied(feed: Arc<Feed>, store: Arc<dyn Store>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(FOLLOW_RETRY_MIN, FOLLOW_RETRY_MAX);
    let mut last = loop {
        match store.applied_log(u64::MAX, 1).await {
            Ok(rows) => break rows.first().map_or(0, |r| r.key),
            Err(e) => tracing::warn!(cause = %e, "live feed: cannot read the applied log"),
        }
        if !backoff.wait_or(crate::shutdown::signalled(&mut stop)).await {
            return;
        }
    };
    let cap = feed.applied.lock().max_entries;
    while next_round(&feed.applied, &mut stop).await {
        // Nobody watching: see `follow_journal`.
        if let Ok(rows) = store.applied_log(u64::MAX, 1).await {
            if feed.clients() == 0 {
                last = last.max(rows.first().map_or(0, |r| r.key));
                continue;
            }
        }
        // Newest first, walking back to `last`; at most a ring's worth (older ones would
        // leave the ring at once: they are counted as skipped, keys being contiguous).
        let mut newer: Vec<AppliedRecord> = Vec::new();
        let mut before = u64::MAX;
        let mut reached_last = false;
        let complete = loop {
            let rows = match store.applied_log(before, FOLLOW_WINDOW).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(cause = %e, after = last, "live feed: cannot read the applied log");
                    break false;
                }
            };
            let full = rows.len() >= FOLLOW_WINDOW;
            let mut reached = !full;
            for r in rows {
                if r.key <= last {
                    reached = true;
                    break;
                }
                before = r.key;
                newer.push(r);
            }
            if reached || newer.len() >= cap {
                reached_last = reached;
                break true;
            }
        };
        if !complete {
            // Read again at the next round: pushing the newer part alone would leave a hole.
            continue;
        }
        // Keys between `last` and the oldest read were applied but not read.
        let skipped = match newer.last() {
            Some(oldest) if !reached_last => oldest.key.saturating_sub(last).saturating_sub(1),
            _ => 0,
        };
        if let Some(newest) = newer.first() {
            last = newest.key;
        }
        let items = newer
            .into_iter()
            .rev()
            .filter_map(|r| match serde_json::to_string(&r) {
                Ok(json) => Some((r.key, r.entry.data_type, r.entry.origin, Arc::from(json))),
                Err(err) => {
                    tracing::warn!(cause = %err, key = r.key, "live feed: applied record not encoded");
                    None
                }
            });
        feed.applied.push_all(skipped, items.collect::<Vec<_>>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(n: u64, max_entries: usize, max_bytes: usize) -> Ring {
        let mut r = Ring::new(max_entries, max_bytes);
        for k in 1..=n {
            r.push(k, "T", "o", Arc::from(format!("{{\"seq\":{k}}}")));
        }
        r
    }

    #[test]
    fn entries_never_pushed_count_as_skipped_for_a_reader_behind() {
        let mut r = ring_of(3, 10, 1 << 20);
        let cursor = r.cursor();
        r.skip(5);
        r.push(9, "T", "o", Arc::from("x"));
        let read = r.read(cursor, 10, 1 << 20);
        assert_eq!(read.skipped, 5);
        assert_eq!(read.items.iter().map(|i| i.key).collect::<Vec<_>>(), vec![9]);
        let from_start = r.read(1, 10, 1 << 20);
        assert_eq!(
            from_start.skipped, 8,
            "the three held before and the five never pushed"
        );
    }

    #[test]
    fn a_reader_gets_what_came_after_its_cursor_in_order() {
        let mut r = Ring::new(10, 1 << 20);
        let cursor = r.cursor();
        r.push(7, "T", "o", Arc::from("a"));
        r.push(8, "T", "o", Arc::from("b"));
        let read = r.read(cursor, 100, usize::MAX);
        assert_eq!(read.skipped, 0);
        assert_eq!(read.items.iter().map(|i| i.key).collect::<Vec<_>>(), vec![7, 8]);
        let again = r.read(read.next, 100, usize::MAX);
        assert!(again.items.is_empty() && again.skipped == 0);
        assert_eq!(again.next, read.next);
    }

    #[test]
    fn a_reader_behind_the_ring_learns_how_many_it_missed() {
        let r = ring_of(100, 10, 1 << 20);
        let read = r.read(1, 4, usize::MAX);
        assert_eq!(read.skipped, 90);
        assert_eq!(
            read.items.iter().map(|i| i.key).collect::<Vec<_>>(),
            vec![91, 92, 93, 94]
        );
        let rest = r.read(read.next, 100, usize::MAX);
        assert_eq!(rest.skipped, 0);
        assert_eq!(rest.items.len(), 6);
        assert!(read.more && !rest.more);
        // A byte bound: at least one entry, then what fits.
        let one = r.read(read.next, 100, 1);
        assert_eq!(one.items.len(), 1);
        assert!(one.more);
    }

    #[test]
    fn the_ring_is_bounded_in_bytes() {
        let r = ring_of(1000, usize::MAX, 10 * (ITEM_OVERHEAD + 20));
        assert!(r.bytes() <= 10 * (ITEM_OVERHEAD + 20));
        assert!(r.items.len() <= 10 && !r.items.is_empty());
        // One entry larger than the bound is kept alone.
        let mut big = Ring::new(10, 10);
        big.push(1, "T", "o", Arc::from("x".repeat(100)));
        assert_eq!(big.items.len(), 1);
    }

    #[test]
    fn clients_are_counted_and_bounded() {
        let feed = Feed::new(10, 1000, 2);
        let a = feed.join().expect("first");
        let _b = feed.join().expect("second");
        assert!(feed.join().is_none());
        drop(a);
        assert!(feed.join().is_some());
    }
}
