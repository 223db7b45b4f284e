//! The searcher's rules for the answers of one search, apart from I/O ([`Screen`]): which
//! results are kept, which are dropped and why. Unit-tested on their own.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use serde_json::Value;

#[cfg(doc)]
use super::query::MAX_LIMIT;

/// A result's identity for duplicate detection: its `id`, else its whole JSON.
pub fn dedupe_key(r: &Value) -> String {
    match r.get("id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => r.to_string(),
    }
}

/// Results of one batch that the searcher dropped, by why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dropped {
    /// `creator_id` absent or not the peer that answered.
    not_creator: u64,
    /// The batch did not say the data type asked, or the result says another one.
    wrong_data_type: u64,
    /// Beyond the peer's share of the search, in count or in bytes.
    result_cap: u64,
    /// Seen already from this peer (not a refusal: not counted in the metric).
    duplicate: u64,
}

impl Dropped {
    /// The refusals, with their metric label and log code.
    pub(super) fn by_reason(&self) -> [(&'static str, u64); 3] {
        [
            ("not_creator", self.not_creator),
            ("wrong_data_type", self.wrong_data_type),
            ("result_cap", self.result_cap),
        ]
    }
}

/// What a peer contributed to one search so far.
#[derive(Debug, Default, Clone, Copy)]
struct Share {
    results: u64,
    bytes: u64,
}

/// The searcher's rules for one search's answers, apart from I/O: a result is kept when
/// its `creator_id` is the peer that answered, its batch is of the data type asked (and the
/// result names no other), it is not a duplicate from that peer, and the peer's share
/// (`max_results` results, `max_bytes` bytes of JSON) is not used up.
///
/// Memory: `seen` and `shares` hold kept results only, so they are bounded by the search's
/// limit (at most [`MAX_LIMIT`] results) whatever peers send.
pub(super) struct Screen {
    data_type: String,
    max_results: u64,
    max_bytes: u64,
    seen: HashSet<(PeerId, String)>,
    shares: HashMap<PeerId, Share>,
}

impl Screen {
    pub(super) fn new(data_type: &str, max_results: u64, max_bytes: u64) -> Screen {
        Screen {
            data_type: data_type.to_owned(),
            max_results,
            max_bytes,
            seen: HashSet::new(),
            shares: HashMap::new(),
        }
    }

    /// The results of `peer`'s batch to forward (at most `room`), and what was dropped.
    /// Results beyond `room` (the search's limit) are neither kept nor counted.
    pub(super) fn batch(
        &mut self,
        peer: PeerId,
        data_type: Option<&str>,
        results: Vec<Value>,
        room: u64,
    ) -> (Vec<Value>, Dropped) {
        let mut dropped = Dropped::default();
        let mut kept = Vec::new();
        if data_type != Some(self.data_type.as_str()) {
            dropped.wrong_data_type = results.len() as u64;
            return (kept, dropped);
        }
        let peer_id = peer.to_string();
        for r in results {
            if kept.len() as u64 >= room {
                break;
            }
            if r.get("creator_id").and_then(Value::as_str) != Some(peer_id.as_str()) {
                dropped.not_creator += 1;
                continue;
            }
            if r.get("data_type")
                .and_then(Value::as_str)
                .is_some_and(|dt| dt != self.data_type)
            {
                dropped.wrong_data_type += 1;
                continue;
            }
            let key = (peer, dedupe_key(&r));
            if self.seen.contains(&key) {
                dropped.duplicate += 1;
                continue;
            }
            let share = self.shares.get(&peer).copied().unwrap_or_default();
            let len = serde_json::to_vec(&r).map_or(u64::MAX, |b| b.len() as u64);
            if share.results >= self.max_results || share.bytes.saturating_add(len) > self.max_bytes {
                dropped.result_cap += 1;
                continue;
            }
            self.shares.insert(
                peer,
                Share {
                    results: share.results.saturating_add(1),
                    bytes: share.bytes.saturating_add(len),
                },
            );
            self.seen.insert(key);
            kept.push(r);
        }
        (kept, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_searcher_keeps_only_its_responders_own_results_of_the_type_asked_within_its_share() {
        let (peer, other) = (PeerId::random(), PeerId::random());
        let r = |id: &str, creator: &PeerId| json!({"id": id, "creator_id": creator.to_string(), "pad": "p"});
        let mut screen = Screen::new("DT", 3, 1 << 20);
        let batch = vec![
            r("a", &peer),
            r("foreign", &other),
            json!({"id": "nobody"}),
            json!({"id": "typed", "creator_id": peer.to_string(), "data_type": "OTHER"}),
            r("a", &peer),
            r("b", &peer),
        ];
        let (kept, dropped) = screen.batch(peer, Some("DT"), batch, 100);
        assert_eq!(kept.len(), 2);
        assert_eq!(
            dropped,
            Dropped {
                not_creator: 2,
                wrong_data_type: 1,
                result_cap: 0,
                duplicate: 1
            }
        );
        let (kept, dropped) = screen.batch(peer, Some("OTHER"), vec![r("c", &peer)], 100);
        assert!(kept.is_empty());
        assert_eq!(dropped.wrong_data_type, 1);
        let (kept, _) = screen.batch(peer, None, vec![r("c", &peer)], 100);
        assert!(kept.is_empty(), "a batch must say its data type");
        let (kept, dropped) = screen.batch(
            peer,
            Some("DT"),
            vec![r("c", &peer), r("d", &peer), r("e", &peer)],
            100,
        );
        assert_eq!((kept.len(), dropped.result_cap), (1, 2), "three results per peer");
        let (kept, _) = screen.batch(other, Some("DT"), vec![r("a", &other), r("b", &other)], 1);
        assert_eq!(kept.len(), 1, "the room left by the limit");

        let mut bytes = Screen::new("DT", 100, 120);
        let (kept, dropped) = bytes.batch(
            peer,
            Some("DT"),
            (0..5).map(|i| r(&format!("x{i}"), &peer)).collect(),
            100,
        );
        assert!(kept.len() < 5 && !kept.is_empty(), "{kept:?}");
        assert_eq!(dropped.result_cap as usize, 5 - kept.len());
    }
}
