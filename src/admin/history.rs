//! `GET /api/journal` and `GET /api/applied`: the node's own journal and the entries it
//! applied from partners, newest first, a page at a time (the Ppl model: the newest portion,
//! then older pages by cursor until `oldest_reached`).
//!
//! The work per request is bounded: rows are read in windows of [`WINDOW`] below the cursor,
//! at most [`MAX_EXAMINED`] rows are looked at, and a page stops once its entries hold
//! [`MAX_PAGE_BYTES`] of resources (entries are up to `--max-event-bytes` each). A page that
//! stops early has `oldest_reached: false` and a `before` cursor to continue from. At most
//! [`PAGE_READS`] pages are read at once (HTTP routes and the live feed's pages together),
//! so the memory of page reads is bounded whatever the number of clients.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{reply, AdminState};
use crate::contract::{ErrorCode, JournalEntry};
use crate::store::{AppliedRecord, StoreError};

/// Entries per page when the request gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` accepted.
pub const MAX_LIMIT: usize = 1000;
/// Rows read from the store at once (each up to `--max-event-bytes`).
pub const WINDOW: usize = 64;
/// Rows looked at per request at most, whatever the filter.
pub const MAX_EXAMINED: usize = 10_000;
/// Resource bytes in one page at most (a page always holds at least one entry).
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Pages read at once in the whole node; others wait up to [`PAGE_WAIT`].
pub const PAGE_READS: usize = 4;
/// How long a page read waits for its turn before `busy`.
pub const PAGE_WAIT: Duration = Duration::from_secs(10);

static PAGE_PERMITS: Semaphore = Semaphore::const_new(PAGE_READS);

/// Why a page could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// [`PAGE_READS`] pages were being read for [`PAGE_WAIT`].
    #[error("{PAGE_READS} pages are being read; try again")]
    Busy,
}

impl PageError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            PageError::Store(_) => ErrorCode::StoreUnavailable,
            PageError::Busy => ErrorCode::Busy,
        }
    }

    fn reply(&self) -> HttpResponse {
        match self {
            PageError::Store(e) => reply::store(e),
            PageError::Busy => reply::error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy.as_str(), self),
        }
    }
}

/// Waits for one of the [`PAGE_READS`] turns.
async fn page_turn() -> Result<tokio::sync::SemaphorePermit<'static>, PageError> {
    match tokio::time::timeout(PAGE_WAIT, PAGE_PERMITS.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        // Timed out, or closed (never: the semaphore is never closed).
        _ => Err(PageError::Busy),
    }
}

/// The query string of both routes (`origin` only filters `/api/applied`).
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    before: Option<u64>,
    limit: Option<usize>,
    data_type: Option<String>,
    origin: Option<String>,
}

/// A checked [`HistoryQuery`].
#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest {
    /// Only keys strictly below this one; `None`: from the newest.
    pub before: Option<u64>,
    pub limit: usize,
    pub data_type: Option<String>,
    pub origin: Option<String>,
}

impl HistoryQuery {
    /// # Errors
    /// A sentence naming the field out of range.
    pub fn check(self) -> Result<PageRequest, String> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!("limit must be between 1 and {MAX_LIMIT}, not {limit}"));
        }
        if self.before == Some(0) {
            return Err("before must be at least 1".to_owned());
        }
        Ok(PageRequest {
            before: self.before,
            limit,
            data_type: self.data_type.filter(|t| !t.is_empty()),
            origin: self.origin.filter(|o| !o.is_empty()),
        })
    }
}

/// One page, newest first; `before` is the cursor of the next page unless the oldest entry
/// was reached.
#[derive(Debug, Serialize, PartialEq)]
pub struct Page<T> {
    pub entries: Vec<T>,
    pub oldest_reached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
}

/// Fills a page from windows of rows read newest first below a moving cursor: no store and
/// no I/O inside, so the bounds are unit-tested.
#[derive(Debug)]
pub struct Pager<T> {
    limit: usize,
    /// Whether rows may be skipped: windows are then [`WINDOW`] rows, else what is missing.
    filtered: bool,
    cursor: u64,
    examined: usize,
    entries: Vec<T>,
    /// Bytes of the entries kept, as `feed`'s `size` counts them.
    bytes: usize,
    oldest_reached: bool,
}

impl<T> Pager<T> {
    /// A page of at most `limit` entries with keys below `before`.
    pub fn new(before: u64, limit: usize, filtered: bool) -> Self {
        Pager {
            limit,
            filtered,
            cursor: before,
            examined: 0,
            entries: Vec::new(),
            bytes: 0,
            oldest_reached: before <= 1,
        }
    }

    /// The next window to read: (keys below this, at most this many rows); `None` when the
    /// page is full (in entries or [`MAX_PAGE_BYTES`]), the oldest entry was reached or
    /// [`MAX_EXAMINED`] rows were looked at.
    pub fn next_window(&self) -> Option<(u64, usize)> {
        if self.oldest_reached || self.full() || self.examined >= MAX_EXAMINED {
            return None;
        }
        let wanted = if self.filtered {
            WINDOW
        } else {
            self.limit - self.entries.len()
        };
        Some((self.cursor, wanted.min(WINDOW).min(MAX_EXAMINED - self.examined)))
    }

    fn full(&self) -> bool {
        self.entries.len() >= self.limit || self.bytes >= MAX_PAGE_BYTES
    }

    /// Takes a window's rows, newest first, keeping those `keep` accepts; `size` is a kept
    /// row's bytes; `exhausted`: no row is older than this window. An empty window ends the
    /// log too (rows are only ever removed from its old end).
    pub fn feed(
        &mut self,
        rows: Vec<T>,
        exhausted: bool,
        key: impl Fn(&T) -> u64,
        keep: impl Fn(&T) -> bool,
        size: impl Fn(&T) -> usize,
    ) {
        let empty = rows.is_empty();
        for row in rows {
            self.examined += 1;
            self.cursor = key(&row);
            if keep(&row) {
                self.bytes = self.bytes.saturating_add(size(&row));
                self.entries.push(row);
                if self.full() {
                    return;
                }
            }
        }
        self.oldest_reached = exhausted || empty || self.cursor <= 1;
    }

    pub fn finish(self) -> Page<T> {
        Page {
            oldest_reached: self.oldest_reached,
            before: (!self.oldest_reached).then_some(self.cursor),
            entries: self.entries,
        }
    }
}

/// `GET /api/journal?before=SEQ&limit=N&data_type=T`.
pub async fn journal(s: web::Data<AdminState>, q: web::Query<HistoryQuery>) -> HttpResponse {
    let req = match q.into_inner().check() {
        Ok(r) => r,
        Err(e) => return reply::invalid_field(e),
    };
    match journal_page(&s, &req).await {
        Ok(page) => HttpResponse::Ok().json(page),
        Err(e) => e.reply(),
    }
}

pub(crate) async fn journal_page(s: &AdminState, req: &PageRequest) -> Result<Page<JournalEntry>, PageError> {
    let _turn = page_turn().await?;
    let head = s.store.journal_head(&s.own_id).await?;
    let before = req.before.unwrap_or(u64::MAX).min(head.saturating_add(1));
    let mut pager = Pager::new(before, req.limit, req.data_type.is_some());
    while let Some((below, n)) = pager.next_window() {
        // The own journal is gapless from 1: the window is [from, below).
        let from = below.saturating_sub(n as u64).max(1);
        let mut rows = s.store.read_journal(&s.own_id, from, n).await?;
        rows.retain(|e| e.seq < below);
        rows.reverse();
        pager.feed(
            rows,
            from <= 1,
            |e| e.seq,
            |e| matches(&req.data_type, &e.data_type),
            |e| e.resource.json().len(),
        );
    }
    Ok(pager.finish())
}

/// `GET /api/applied?before=K&limit=N&data_type=T&origin=PEER`.
pub async fn applied(s: web::Data<AdminState>, q: web::Query<HistoryQuery>) -> HttpResponse {
    let req = match q.into_inner().check() {
        Ok(r) => r,
        Err(e) => return reply::invalid_field(e),
    };
    match applied_page(&s, &req).await {
        Ok(page) => HttpResponse::Ok().json(page),
        Err(e) => e.reply(),
    }
}

pub(crate) async fn applied_page(
    s: &AdminState,
    req: &PageRequest,
) -> Result<Page<AppliedRecord>, PageError> {
    let _turn = page_turn().await?;
    let filtered = req.data_type.is_some() || req.origin.is_some();
    let mut pager = Pager::new(req.before.unwrap_or(u64::MAX), req.limit, filtered);
    while let Some((below, n)) = pager.next_window() {
        let rows = s.store.applied_log(below, n).await?;
        let exhausted = rows.len() < n;
        pager.feed(
            rows,
            exhausted,
            |r| r.key,
            |r| matches(&req.data_type, &r.entry.data_type) && matches(&req.origin, &r.entry.origin),
            |r| r.entry.resource.json().len(),
        );
    }
    Ok(pager.finish())
}

fn matches(filter: &Option<String>, value: &str) -> bool {
    filter.as_deref().is_none_or(|f| f == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages a log of keys `1..=n` (newest first), keeping those `keep` accepts.
    fn page(n: u64, before: u64, limit: usize, keep: impl Fn(&u64) -> bool + Copy) -> Page<u64> {
        let filtered = !(1..=n).all(|k| keep(&k));
        let mut pager = Pager::new(before.min(n + 1), limit, filtered);
        while let Some((below, w)) = pager.next_window() {
            let rows: Vec<u64> = (1..below).rev().take(w).collect();
            let exhausted = rows.len() < w || rows.last() == Some(&1);
            pager.feed(rows, exhausted, |k| *k, keep, |_| 1);
        }
        pager.finish()
    }

    #[test]
    fn pages_walk_back_to_the_oldest_entry() {
        let first = page(250, u64::MAX, 100, |_| true);
        assert_eq!(first.entries.first(), Some(&250));
        assert_eq!(first.entries.len(), 100);
        assert_eq!((first.oldest_reached, first.before), (false, Some(151)));
        let second = page(250, 151, 100, |_| true);
        assert_eq!(second.entries, (51..=150).rev().collect::<Vec<_>>());
        let last = page(250, 51, 100, |_| true);
        assert_eq!(last.entries, (1..=50).rev().collect::<Vec<_>>());
        assert_eq!((last.oldest_reached, last.before), (true, None));
    }

    #[test]
    fn an_empty_log_is_the_oldest_page() {
        let p = page(0, u64::MAX, 100, |_| true);
        assert!(p.entries.is_empty() && p.oldest_reached);
    }

    #[test]
    fn a_rare_filter_stops_after_the_examined_cap_with_a_cursor() {
        let n = 50_000;
        let p = page(n, u64::MAX, 10, |k| *k == 3);
        assert!(p.entries.is_empty());
        assert!(!p.oldest_reached);
        assert_eq!(p.before, Some(n - MAX_EXAMINED as u64 + 1));
        // Following the cursors reaches the match and the oldest entry.
        let mut before = u64::MAX;
        let mut found = Vec::new();
        loop {
            let p = page(n, before, 10, |k| *k == 3);
            found.extend(p.entries);
            match p.before {
                Some(b) => before = b,
                None => break,
            }
        }
        assert_eq!(found, vec![3]);
    }

    #[test]
    fn a_page_stops_at_its_byte_budget_with_at_least_one_entry() {
        let big = MAX_PAGE_BYTES / 3 + 1;
        let mut pager = Pager::new(11, 100, false);
        let (below, n) = pager.next_window().unwrap();
        pager.feed(
            (1..below).rev().take(n).collect(),
            true,
            |k| *k,
            |_| true,
            |_| big,
        );
        let p = pager.finish();
        assert_eq!(p.entries, vec![10, 9, 8], "the third entry crosses the budget");
        assert_eq!((p.oldest_reached, p.before), (false, Some(8)));
        let mut huge = Pager::new(3, 100, false);
        huge.feed(vec![2u64, 1], true, |k| *k, |_| true, |_| usize::MAX);
        assert_eq!(huge.finish().entries, vec![2], "one entry even above the budget");
    }

    #[test]
    fn limits_out_of_range_are_refused() {
        let q = |limit, before| HistoryQuery {
            before,
            limit,
            data_type: None,
            origin: None,
        };
        assert!(q(Some(0), None).check().is_err());
        assert!(q(Some(MAX_LIMIT + 1), None).check().is_err());
        assert!(q(None, Some(0)).check().is_err());
        assert_eq!(q(None, None).check().map(|r| r.limit), Ok(DEFAULT_LIMIT));
    }
}
