//! The signed query of an `all` search on the gossip topic (`protocols/search.md`): its
//! fields, the bytes its signature covers, signing and verifying, and the decoding of what
//! the topic delivers, within limits whatever the bytes. Pure: the searcher's key comes from
//! its peer record, which the responder looks up ([`super::gossip`]).

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::query::{MAX_DATA_TYPE, MAX_SEARCH_BYTES};

/// Longest query id accepted from a peer.
pub(super) const MAX_QUERY_ID: usize = 64;
/// Largest gossip query decoded (gossipsub's own `max_transmit_size` is the same).
pub(crate) const MAX_GOSSIP_QUERY_BYTES: usize = 64 * 1024;
/// First bytes of the byte string a gossip query's signature covers.
pub(crate) const QUERY_SIGNING_DOMAIN: &[u8] = b"/opencloud/search-query/1";

/// The message of an `all` search on the gossip topic, signed by the searcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipQuery {
    pub query_id: String,
    /// The searcher's peer id: responders open the search stream back to it.
    pub searcher: String,
    pub data_type: String,
    pub search: String,
    pub limit: u64,
    pub max_frame_bytes: u64,
    /// Milliseconds since the Unix epoch: the searcher's deadline; later, nobody answers.
    pub expires_at: u64,
    /// Base64 of the searcher's signature over [`GossipQuery::signing_bytes`].
    pub signature: String,
}

impl GossipQuery {
    /// `"/opencloud/search-query/1"`, then `query_id`, `searcher`, `data_type`, `search` each
    /// as a 4-byte big-endian length and the UTF-8 bytes, then `limit`, `max_frame_bytes`,
    /// `expires_at` as 8-byte big-endian integers.
    pub(crate) fn signing_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.search.len());
        out.extend_from_slice(QUERY_SIGNING_DOMAIN);
        for f in [&self.query_id, &self.searcher, &self.data_type, &self.search] {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        for n in [self.limit, self.max_frame_bytes, self.expires_at] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out
    }

    /// Fills `signature` with `key`'s.
    ///
    /// # Errors
    /// The key cannot sign.
    pub fn sign(mut self, key: &Keypair) -> Result<Self, libp2p::identity::SigningError> {
        use base64::Engine;
        let sig = key.sign(&self.signing_bytes())?;
        self.signature = base64::engine::general_purpose::STANDARD.encode(sig);
        Ok(self)
    }

    pub fn verify(&self, key: &PublicKey) -> bool {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .is_ok_and(|sig| key.verify(&self.signing_bytes(), &sig))
    }
}

/// Decodes a gossip query and checks its fields' limits (no signature check: that needs
/// the searcher's record). Never panics, whatever the bytes.
///
/// # Errors
/// The reason, as counted in `oc_search_queries_rejected_total`: `undecodable` (not the
/// JSON of a query, or over [`MAX_GOSSIP_QUERY_BYTES`]), `bad_searcher`, `limits`.
pub(crate) fn decode_gossip_query(data: &[u8]) -> Result<(GossipQuery, PeerId), &'static str> {
    if data.len() > MAX_GOSSIP_QUERY_BYTES {
        return Err("undecodable");
    }
    let q: GossipQuery = serde_json::from_slice(data).map_err(|_| "undecodable")?;
    let searcher: PeerId = q.searcher.parse().map_err(|_| "bad_searcher")?;
    if q.query_id.is_empty()
        || q.query_id.len() > MAX_QUERY_ID
        || q.search.len() > MAX_SEARCH_BYTES
        || q.data_type.len() > MAX_DATA_TYPE
    {
        return Err("limits");
    }
    Ok((q, searcher))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::query::new_query_id;

    #[test]
    fn gossip_queries_verify_against_the_signer() {
        let key = Keypair::generate_ed25519();
        let q = GossipQuery {
            query_id: new_query_id(),
            searcher: key.public().to_peer_id().to_string(),
            data_type: "DATA_RESOURCE".into(),
            search: "gpu".into(),
            limit: 10,
            max_frame_bytes: 4096,
            expires_at: 1,
            signature: String::new(),
        }
        .sign(&key)
        .unwrap();
        assert_eq!(q.query_id.len(), 16);
        assert!(q.verify(&key.public()));
        assert!(!q.verify(&Keypair::generate_ed25519().public()));
        let mut widened = q.clone();
        widened.limit = 10_000;
        assert!(!widened.verify(&key.public()));
    }

    #[test]
    fn gossip_queries_decode_within_limits_whatever_the_bytes() {
        let key = Keypair::generate_ed25519();
        let q = GossipQuery {
            query_id: "q".into(),
            searcher: key.public().to_peer_id().to_string(),
            data_type: "DT".into(),
            search: "x".into(),
            limit: u64::MAX,
            max_frame_bytes: u64::MAX,
            expires_at: u64::MAX,
            signature: String::new(),
        };
        let ok = serde_json::to_vec(&q).unwrap();
        assert!(decode_gossip_query(&ok).is_ok());
        assert_eq!(decode_gossip_query(b"\xff{").err(), Some("undecodable"));
        assert_eq!(
            decode_gossip_query(&vec![b' '; MAX_GOSSIP_QUERY_BYTES + 1]).err(),
            Some("undecodable")
        );
        let mut bad = q.clone();
        bad.searcher = "nobody".into();
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&bad).unwrap()).err(),
            Some("bad_searcher")
        );
        let mut long = q.clone();
        long.search = "s".repeat(MAX_SEARCH_BYTES + 1);
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&long).unwrap()).err(),
            Some("limits")
        );
        let mut empty = q;
        empty.query_id.clear();
        assert_eq!(
            decode_gossip_query(&serde_json::to_vec(&empty).unwrap()).err(),
            Some("limits")
        );
    }
}
