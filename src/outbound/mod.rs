//! Outbound: this node's journal replicated to each partner.
//!
//! - [`service`]: the `StreamService` actor, owning one link per partner and the journal head.
//! - [`link`]: one link's I/O loop (dial, streams, handshake, push, heartbeat, reconnect).

pub mod link;
pub mod service;
