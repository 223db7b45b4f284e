//! Signed peer records: what each node says about itself in the DHT
//! (`protocols/dht-peer-records.md`).
//!
//! A record is JSON `{peer_id, name, addrs, public_key, issued_at, expires_at, signature}`.
//! The signature is made by the node's libp2p key over [`signing_bytes`], a canonical,
//! length-prefixed encoding of every other field, so a record can be checked by anyone
//! holding it, whoever relayed it: the public key must hash to `peer_id`, the signature must
//! verify, `expires_at` must lie ahead (but not too far ahead) and `issued_at` must not lie
//! ahead. `issued_at` orders the records of one key ([`PeerRecord::version`]): a stored
//! record is replaced only by a newer one, so a replayed old record is refused. Records of
//! earlier versions have no `issued_at` (their signature covers the older layout); they
//! still verify and rank below every record that has one.
//!
//! Records are stored under two DHT keys, `/oc/peer/<peer id>` and `/oc/name/<name>`. Names
//! are not unique and not authenticated beyond "this key signed this name": a lookup by
//! name can return several records.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use libp2p::identity::{Keypair, PublicKey};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

/// DHT key prefix of the record stored by peer id.
pub(crate) const PEER_KEY_PREFIX: &str = "/oc/peer/";
/// DHT key prefix of the record stored by name.
pub(crate) const NAME_KEY_PREFIX: &str = "/oc/name/";
/// First bytes of every signed byte string: a record signature can never be replayed as
/// the signature of something else the key signs (search queries use their own domain).
pub(crate) const SIGNING_DOMAIN: &[u8] = b"/opencloud/peer-record/1";
/// Domain of records carrying `issued_at` (a record of one layout cannot pass for the other).
pub(crate) const SIGNING_DOMAIN_V2: &[u8] = b"/opencloud/peer-record/2";
/// Largest encoded record accepted (the Kademlia packet cap is 16 KiB).
pub(crate) const MAX_RECORD_BYTES: usize = 4096;
/// Most addresses in one record.
pub const MAX_ADDRS: usize = 16;
/// Longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// A record may not claim to stay valid longer than this from now: a leaked old record
/// stops being served after at most this long.
pub(crate) const MAX_AHEAD: Duration = Duration::from_secs(24 * 3600);
/// Clock difference tolerated on `issued_at`: a record issued further ahead is refused, so
/// nobody can sign a record that stays "newest" long after it was made.
pub(crate) const MAX_ISSUE_SKEW: Duration = Duration::from_secs(60);

/// One node's signed description of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub peer_id: String,
    pub name: String,
    /// Multiaddrs to dial, without the `/p2p/<peer id>` suffix.
    pub addrs: Vec<String>,
    /// Base64 (standard, padded) of the libp2p protobuf encoding of the public key.
    pub public_key: String,
    /// Milliseconds since the Unix epoch when the record was signed: a newer record of the
    /// same key replaces an older one, never the reverse. Absent in records of earlier
    /// versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    /// Milliseconds since the Unix epoch after which the record is void.
    pub expires_at: u64,
    /// Base64 (standard, padded) of the signature over [`signing_bytes`].
    pub signature: String,
}

/// Why a record was not accepted. Each has a short `reason` used as a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("not a peer record: {0}")]
    Undecodable(String),
    #[error("record of {0} bytes exceeds {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    #[error("record outside limits: {0}")]
    Limits(String),
    #[error("public key does not decode: {0}")]
    BadPublicKey(String),
    #[error("peer_id {claimed} is not the id of the record's public key ({actual})")]
    PeerIdMismatch { claimed: String, actual: String },
    #[error("signature does not verify")]
    BadSignature,
    #[error("record expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("record expires at {expires_at}, more than {MAX_AHEAD:?} ahead of {now}")]
    TooFarAhead { expires_at: u64, now: u64 },
    #[error("record issued at {issued_at}, after it expires ({expires_at}) or ahead of {now}")]
    IssuedAhead {
        issued_at: u64,
        expires_at: u64,
        now: u64,
    },
    #[error("record is not newer than the one stored (issued {incoming:?}, stored {stored:?})")]
    Stale { incoming: u64, stored: u64 },
    #[error("record stored under {key:?}, which does not name it")]
    KeyMismatch { key: String },
    #[error("cannot sign: {0}")]
    Signing(String),
}

impl RecordError {
    /// Stable label for logs and metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            RecordError::Undecodable(_) => "undecodable",
            RecordError::TooLarge(_) => "too_large",
            RecordError::Limits(_) => "limits",
            RecordError::BadPublicKey(_) => "bad_public_key",
            RecordError::PeerIdMismatch { .. } => "peer_id_mismatch",
            RecordError::BadSignature => "bad_signature",
            RecordError::Expired { .. } => "expired",
            RecordError::TooFarAhead { .. } => "too_far_ahead",
            RecordError::IssuedAhead { .. } => "issued_ahead",
            RecordError::Stale { .. } => "stale",
            RecordError::KeyMismatch { .. } => "key_mismatch",
            RecordError::Signing(_) => "signing",
        }
    }
}

/// A record whose signature, identity and expiry were checked.
#[derive(Debug, Clone)]
pub struct Verified {
    pub peer: PeerId,
    pub public_key: PublicKey,
    pub addrs: Vec<Multiaddr>,
    pub record: PeerRecord,
}

/// DHT key of a peer's record by id: `/oc/peer/<peer id>`.
pub fn peer_key(peer: &PeerId) -> Vec<u8> {
    format!("{PEER_KEY_PREFIX}{peer}").into_bytes()
}

/// DHT key of a peer's record by name: `/oc/name/<name>`.
pub fn name_key(name: &str) -> Vec<u8> {
    format!("{NAME_KEY_PREFIX}{name}").into_bytes()
}

fn push_field(out: &mut Vec<u8>, field: &str) {
    // Fields are bounded by MAX_RECORD_BYTES long before u32::MAX.
    out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(field.as_bytes());
}

/// The bytes a record's signature covers:
///
/// ```text
/// "/opencloud/peer-record/2"                      ("/opencloud/peer-record/1" without issued_at)
/// field(peer_id) field(name) field(public_key)
/// u64-be(issued_at)                               (absent without issued_at)
/// u64-be(expires_at)
/// u32-be(number of addrs) field(addr) ...
/// ```
/// where `field(s)` is the 4-byte big-endian length of the UTF-8 bytes of `s` followed by
/// them. Every string is taken exactly as it appears in the JSON.
pub(crate) fn signing_bytes(
    peer_id: &str,
    name: &str,
    addrs: &[String],
    public_key: &str,
    issued_at: Option<u64>,
    expires_at: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(if issued_at.is_some() {
        SIGNING_DOMAIN_V2
    } else {
        SIGNING_DOMAIN
    });
    push_field(&mut out, peer_id);
    push_field(&mut out, name);
    push_field(&mut out, public_key);
    if let Some(issued_at) = issued_at {
        out.extend_from_slice(&issued_at.to_be_bytes());
    }
    out.extend_from_slice(&expires_at.to_be_bytes());
    // At most MAX_ADDRS (checked before anything is signed or verified).
    out.extend_from_slice(&u32::try_from(addrs.len()).unwrap_or(u32::MAX).to_be_bytes());
    for a in addrs {
        push_field(&mut out, a);
    }
    out
}

/// `addr` without a trailing `/p2p/<peer id>`.
pub(crate) fn strip_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        a.pop();
    }
    a
}

impl PeerRecord {
    /// Signs a record for `key`'s peer, issued now.
    ///
    /// # Errors
    /// The name or address list is outside the limits, or the key cannot sign.
    pub fn sign(
        key: &Keypair,
        name: &str,
        addrs: &[Multiaddr],
        expires_at: u64,
    ) -> Result<Self, RecordError> {
        Self::sign_at(key, name, addrs, Some(crate::contract::now_ms()), expires_at)
    }

    /// [`PeerRecord::sign`] issued at `issued_at` (ms since the epoch; it orders this
    /// peer's records), or with the layout of earlier versions when `None` (tests of the
    /// compatibility with them).
    ///
    /// # Errors
    /// See [`PeerRecord::sign`].
    pub fn sign_at(
        key: &Keypair,
        name: &str,
        addrs: &[Multiaddr],
        issued_at: Option<u64>,
        expires_at: u64,
    ) -> Result<Self, RecordError> {
        let peer_id = key.public().to_peer_id().to_string();
        let public_key = B64.encode(key.public().encode_protobuf());
        let mut addrs: Vec<String> = addrs.iter().map(|a| strip_peer_id(a).to_string()).collect();
        addrs.dedup();
        addrs.truncate(MAX_ADDRS);
        let bytes = signing_bytes(&peer_id, name, &addrs, &public_key, issued_at, expires_at);
        let signature = key
            .sign(&bytes)
            .map_err(|e| RecordError::Signing(e.to_string()))?;
        let record = PeerRecord {
            peer_id,
            name: name.to_owned(),
            addrs,
            public_key,
            issued_at,
            expires_at,
            signature: B64.encode(signature),
        };
        record.check_limits()?;
        Ok(record)
    }

    fn check_limits(&self) -> Result<(), RecordError> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(RecordError::Limits(format!(
                "name must be 1 to {MAX_NAME_BYTES} bytes"
            )));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(RecordError::Limits(format!("more than {MAX_ADDRS} addresses")));
        }
        Ok(())
    }

    /// What orders the records of one DHT key: the issue time (0 for records of earlier
    /// versions, which have none), then the expiry.
    pub(crate) fn version(&self) -> (u64, u64) {
        (self.issued_at.unwrap_or(0), self.expires_at)
    }

    /// Decodes a record from its JSON bytes (no verification).
    ///
    /// # Errors
    /// Too large or not a record.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| RecordError::Undecodable(e.to_string()))
    }

    /// Decodes a record from a JSON value (as kept in the store).
    ///
    /// # Errors
    /// Not a record.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, RecordError> {
        serde_json::from_value(value.clone()).map_err(|e| RecordError::Undecodable(e.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Checks limits, identity, signature and expiry at `now_ms`.
    ///
    /// # Errors
    /// The first check that fails.
    pub fn verify(&self, now_ms: u64) -> Result<Verified, RecordError> {
        self.check_limits()?;
        let key_bytes = B64
            .decode(&self.public_key)
            .map_err(|e| RecordError::BadPublicKey(e.to_string()))?;
        let public_key = PublicKey::try_decode_protobuf(&key_bytes)
            .map_err(|e| RecordError::BadPublicKey(e.to_string()))?;
        let actual = public_key.to_peer_id();
        if actual.to_string() != self.peer_id {
            return Err(RecordError::PeerIdMismatch {
                claimed: self.peer_id.clone(),
                actual: actual.to_string(),
            });
        }
        let signature = B64
            .decode(&self.signature)
            .map_err(|_| RecordError::BadSignature)?;
        let bytes = signing_bytes(
            &self.peer_id,
            &self.name,
            &self.addrs,
            &self.public_key,
            self.issued_at,
            self.expires_at,
        );
        if !public_key.verify(&bytes, &signature) {
            return Err(RecordError::BadSignature);
        }
        if self.expires_at <= now_ms {
            return Err(RecordError::Expired {
                expires_at: self.expires_at,
                now: now_ms,
            });
        }
        let ahead = u64::try_from(MAX_AHEAD.as_millis()).unwrap_or(u64::MAX);
        if self.expires_at > now_ms.saturating_add(ahead) {
            return Err(RecordError::TooFarAhead {
                expires_at: self.expires_at,
                now: now_ms,
            });
        }
        if let Some(issued_at) = self.issued_at {
            let skew = u64::try_from(MAX_ISSUE_SKEW.as_millis()).unwrap_or(u64::MAX);
            if issued_at > self.expires_at || issued_at > now_ms.saturating_add(skew) {
                return Err(RecordError::IssuedAhead {
                    issued_at,
                    expires_at: self.expires_at,
                    now: now_ms,
                });
            }
        }
        let addrs = self
            .addrs
            .iter()
            .map(|a| a.parse::<Multiaddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RecordError::Limits(format!("address does not parse: {e}")))?;
        Ok(Verified {
            peer: actual,
            public_key,
            addrs,
            record: self.clone(),
        })
    }

    /// [`PeerRecord::verify`], plus: the DHT key it was stored under names this record.
    ///
    /// # Errors
    /// See [`PeerRecord::verify`]; [`RecordError::KeyMismatch`].
    pub(crate) fn verify_for_key(&self, key: &[u8], now_ms: u64) -> Result<Verified, RecordError> {
        let verified = self.verify(now_ms)?;
        let key_text = String::from_utf8_lossy(key);
        let names_it = match (
            key_text.strip_prefix(PEER_KEY_PREFIX),
            key_text.strip_prefix(NAME_KEY_PREFIX),
        ) {
            (Some(id), _) => id == self.peer_id,
            (_, Some(name)) => name == self.name,
            _ => false,
        };
        if !names_it {
            return Err(RecordError::KeyMismatch {
                key: key_text.into_owned(),
            });
        }
        Ok(verified)
    }
}

/// Decodes and verifies a record fetched from or put into the DHT under `key`.
///
/// # Errors
/// See [`PeerRecord::verify_for_key`].
pub fn check(key: &[u8], value: &[u8], now_ms: u64) -> Result<Verified, RecordError> {
    PeerRecord::decode(value)?.verify_for_key(key, now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn addr() -> Multiaddr {
        "/ip4/127.0.0.1/tcp/4001".parse().unwrap()
    }

    #[test]
    fn a_signed_record_verifies_under_both_keys() {
        let key = Keypair::generate_ed25519();
        let r = PeerRecord::sign_at(&key, "site-a", &[addr()], Some(NOW), NOW + 120_000).unwrap();
        let v = check(&peer_key(&key.public().to_peer_id()), &r.encode(), NOW).unwrap();
        assert_eq!(v.peer, key.public().to_peer_id());
        assert_eq!(v.addrs, vec![addr()]);
        check(&name_key("site-a"), &r.encode(), NOW).unwrap();
        assert_eq!(
            check(&name_key("site-b"), &r.encode(), NOW).unwrap_err().reason(),
            "key_mismatch"
        );
    }

    #[test]
    fn tampering_expiry_and_foreign_keys_are_refused() {
        let key = Keypair::generate_ed25519();
        let other = Keypair::generate_ed25519();
        let r = PeerRecord::sign_at(&key, "site-a", &[addr()], Some(NOW), NOW + 120_000).unwrap();

        let mut moved = r.clone();
        moved.addrs = vec!["/ip4/10.0.0.66/tcp/1".into()];
        assert_eq!(moved.verify(NOW).unwrap_err().reason(), "bad_signature");

        let mut renamed = r.clone();
        renamed.name = "site-b".into();
        assert_eq!(renamed.verify(NOW).unwrap_err().reason(), "bad_signature");

        let mut stolen = r.clone();
        stolen.peer_id = other.public().to_peer_id().to_string();
        assert_eq!(stolen.verify(NOW).unwrap_err().reason(), "peer_id_mismatch");

        assert_eq!(r.verify(NOW + 120_000).unwrap_err().reason(), "expired");

        let far = PeerRecord::sign_at(
            &key,
            "site-a",
            &[],
            Some(NOW),
            NOW + MAX_AHEAD.as_millis() as u64 + 1,
        )
        .unwrap();
        assert_eq!(far.verify(NOW).unwrap_err().reason(), "too_far_ahead");

        let mut reissued = r.clone();
        reissued.issued_at = Some(NOW + 1);
        assert_eq!(reissued.verify(NOW).unwrap_err().reason(), "bad_signature");

        let ahead = PeerRecord::sign_at(&key, "site-a", &[], Some(NOW + 61_000), NOW + 120_000).unwrap();
        assert_eq!(ahead.verify(NOW).unwrap_err().reason(), "issued_ahead");
        let after_expiry = PeerRecord::sign_at(&key, "site-a", &[], Some(NOW + 2), NOW + 1).unwrap();
        assert_eq!(after_expiry.verify(NOW).unwrap_err().reason(), "issued_ahead");

        assert_eq!(
            check(b"/oc/peer/x", b"{not json", NOW).unwrap_err().reason(),
            "undecodable"
        );
    }

    #[test]
    fn signing_bytes_are_unambiguous() {
        let a = signing_bytes("p", "ab", &["c".into()], "k", None, 1);
        let b = signing_bytes("p", "a", &["bc".into()], "k", None, 1);
        assert_ne!(a, b);
        assert_ne!(
            signing_bytes("p", "a", &[], "k", Some(1), 2),
            signing_bytes("p", "a", &[], "k", None, 2)
        );
    }

    #[test]
    fn records_of_earlier_versions_still_verify_and_rank_below_new_ones() {
        let key = Keypair::generate_ed25519();
        let old = PeerRecord::sign_at(&key, "site-a", &[addr()], None, NOW + 120_000).unwrap();
        let json = String::from_utf8(old.encode()).unwrap();
        assert!(!json.contains("issued_at"), "{json}");
        check(&peer_key(&key.public().to_peer_id()), json.as_bytes(), NOW).unwrap();
        let new = PeerRecord::sign_at(&key, "site-a", &[addr()], Some(NOW), NOW + 60_000).unwrap();
        assert!(new.version() > old.version());
        let newer = PeerRecord::sign_at(&key, "site-a", &[addr()], Some(NOW + 1), NOW + 60_000).unwrap();
        assert!(newer.version() > new.version());
    }
}
