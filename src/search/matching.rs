//! Which of this node's own resources a searcher gets: read from the store page by page
//! (bounded in count and bytes), each parsed alone and kept when the searcher may see it
//! (`access`) and one of its values contains the search text. A query holds one page and one
//! parsed resource at a time, whatever the number of own resources.

use std::collections::VecDeque;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;

use super::query::MAX_LIMIT;
use crate::store::{PageBounds, Store};

/// A responder's store page: at most this many own resources...
pub(crate) const PAGE_COUNT: usize = 256;
/// ... and no more added once this many bytes of JSON text are held.
pub(crate) const PAGE_BYTES: usize = 1024 * 1024;

/// This node's own resources matching one query, read from the store in pages of at
/// most [`PAGE_COUNT`] resources and [`PAGE_BYTES`] bytes of JSON text, each parsed alone
/// to be matched: a query holds one page and one parsed resource at a time.
pub(super) struct OwnMatches {
    store: Arc<dyn Store>,
    origin: String,
    data_type: String,
    needle: String,
    partner: bool,
    /// Matches still to give (the limit).
    left: u64,
    /// Where the next page starts.
    after: Option<String>,
    /// Matches of the last page read, not given yet.
    matched: VecDeque<Box<RawValue>>,
    last_page: bool,
}

impl OwnMatches {
    /// The own resources of `data_type` of node `origin` that a searcher (a partner or not)
    /// may see and that contain `search`, at most `limit`.
    pub(super) fn new(
        store: Arc<dyn Store>,
        origin: &str,
        data_type: &str,
        search: &str,
        partner: bool,
        limit: u64,
    ) -> OwnMatches {
        OwnMatches {
            store,
            origin: origin.to_owned(),
            data_type: data_type.to_owned(),
            needle: search.to_lowercase(),
            partner,
            left: limit.min(MAX_LIMIT),
            after: None,
            matched: VecDeque::new(),
            last_page: false,
        }
    }

    /// The next match, as its JSON text; `None` at the limit or the end.
    ///
    /// # Errors
    /// The store could not be read (its message).
    pub(super) async fn next(&mut self) -> Result<Option<Box<RawValue>>, String> {
        while self.left > 0 {
            if let Some(raw) = self.matched.pop_front() {
                self.left -= 1;
                return Ok(Some(raw));
            }
            if self.last_page {
                return Ok(None);
            }
            let bounds = PageBounds {
                max_count: PAGE_COUNT,
                max_bytes: PAGE_BYTES,
            };
            let page = self
                .store
                .own_resources_page(&self.origin, &self.data_type, self.after.take(), bounds)
                .await
                .map_err(|e| e.to_string())?;
            self.last_page = page.next.is_none();
            self.after = page.next;
            // Parsing and matching a page is CPU work: off the runtime's worker threads, so
            // that searches cannot stall the network loop and the partner sessions.
            let (needle, partner, left) = (self.needle.clone(), self.partner, self.left);
            let data_type = self.data_type.clone();
            let items = page.items;
            self.matched =
                tokio::task::spawn_blocking(move || match_page(items, &needle, partner, left, &data_type))
                    .await
                    .map_err(|e| format!("matching failed: {e}"))?;
        }
        Ok(None)
    }
}

/// The resources of a page that the searcher may see and that contain `needle`, at most
/// `left`, as JSON text; each parsed alone.
fn match_page(
    items: Vec<(String, String)>,
    needle: &str,
    partner: bool,
    left: u64,
    data_type: &str,
) -> VecDeque<Box<RawValue>> {
    let mut out = VecDeque::new();
    for (id, json) in items {
        if out.len() as u64 >= left {
            break;
        }
        let Ok(value) = serde_json::from_str::<Value>(&json) else {
            tracing::warn!(
                id,
                data_type,
                "own resource is not JSON; left out of search answers"
            );
            continue;
        };
        if !(visible(&value, partner) && contains(&value, needle)) {
            continue;
        }
        drop(value);
        if let Ok(raw) = RawValue::from_string(json) {
            out.push_back(raw);
        }
    }
    out
}

/// `private` never, `partners` to partners only, anything else to everyone.
fn visible(resource: &Value, searcher_is_partner: bool) -> bool {
    match resource.get("access").and_then(Value::as_str) {
        Some(a) if a.eq_ignore_ascii_case("private") => false,
        Some(a) if a.eq_ignore_ascii_case("partners") => searcher_is_partner,
        _ => true,
    }
}

/// Whether any value in `v` (strings, numbers, booleans, at any depth; keys excluded)
/// contains `needle`, already lower-cased. The empty text matches everything.
fn contains(v: &Value, needle: &str) -> bool {
    if needle.is_empty() {
        return true;
    }
    match v {
        Value::String(s) => contains_text(s, needle),
        Value::Number(n) => n.to_string().contains(needle),
        Value::Bool(b) => b.to_string().contains(needle),
        Value::Array(a) => a.iter().any(|x| contains(x, needle)),
        Value::Object(o) => o.values().any(|x| contains(x, needle)),
        Value::Null => false,
    }
}

/// Whether `s`, lower-cased, contains `needle` (lower-cased already); without allocating
/// when both are ASCII.
fn contains_text(s: &str, needle: &str) -> bool {
    if s.is_ascii() && needle.is_ascii() {
        let (s, n) = (s.as_bytes(), needle.as_bytes());
        return n.len() <= s.len() && s.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n));
    }
    s.to_lowercase().contains(needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn access_and_text_matching() {
        let public = json!({"id": "a", "name": "Big GPU box", "specs": {"cores": 64}});
        let partners = json!({"id": "b", "name": "gpu", "access": "partners"});
        let private = json!({"id": "c", "name": "gpu", "access": "PRIVATE"});
        assert!(visible(&public, false) && visible(&partners, true) && !visible(&partners, false));
        assert!(!visible(&private, true));
        assert!(contains(&public, "gpu"));
        assert!(contains(&public, "64"));
        assert!(!contains(&public, "specs"), "keys do not match");
        assert!(contains(&public, ""));
        assert!(contains(&json!({"n": "Big GPU Box"}), "gpu box"));
        assert!(
            contains(&json!({"n": "ÉCRAN géant"}), "écran"),
            "non-ASCII lower-cased too"
        );
        assert!(!contains(&json!({"n": "gp"}), "gpu"));
    }

    #[test]
    fn a_page_stops_at_its_count_or_bytes_and_always_moves_on() {
        use crate::store::OwnPage;
        let items = |n: usize| (0..n).map(|i| Ok::<_, ()>((format!("id{i:03}"), "x".repeat(100))));
        let b = |max_count, max_bytes| PageBounds { max_count, max_bytes };
        let p = OwnPage::fill(items(10), b(4, 1 << 20)).unwrap();
        assert_eq!((p.items.len(), p.next.as_deref()), (4, Some("id003")));
        let p = OwnPage::fill(items(10), b(100, 250)).unwrap();
        assert_eq!(p.items.len(), 3, "stops once 250 bytes are held");
        let p = OwnPage::fill(items(1), b(100, 1)).unwrap();
        assert_eq!(p.items.len(), 1, "one resource at least");
        let p = OwnPage::fill(items(3), b(100, 1 << 20)).unwrap();
        assert_eq!((p.items.len(), p.next), (3, None));
    }
}
