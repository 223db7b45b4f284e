//! The partner set: the peers this node exchanges journals with, and the address to reach
//! each. Shared by the inbound sessions (who may send), the command router and the search
//! (who counts as a partner), the directory and the peer manager (who changes it); it lives
//! below all of them so that none depends on another for it.

use std::collections::HashMap;
use std::sync::RwLock;

use libp2p::{Multiaddr, PeerId};

/// The peers this node accepts events from, with the address to reach each.
#[derive(Default)]
pub struct Partners(RwLock<HashMap<PeerId, Option<Multiaddr>>>);

impl Partners {
    pub(crate) fn insert(&self, peer: PeerId, addr: Option<Multiaddr>) {
        if let Ok(mut s) = self.0.write() {
            s.insert(peer, addr);
        }
    }

    pub(crate) fn remove(&self, peer: &PeerId) {
        if let Ok(mut s) = self.0.write() {
            s.remove(peer);
        }
    }

    pub(crate) fn contains(&self, peer: &PeerId) -> bool {
        self.0.read().map(|s| s.contains_key(peer)).unwrap_or(false)
    }

    pub(crate) fn addr(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.0.read().ok().and_then(|s| s.get(peer).cloned().flatten())
    }

    pub(crate) fn peers(&self) -> Vec<PeerId> {
        self.0
            .read()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default()
    }
}
