//! The peers domain: who this node deals with and how to reach them.
//!
//! - [`partners`]: the one partner registry (peer id → address), read by the inbound
//!   sessions, the commands, the search and the directory.
//! - [`manager`]: the `PeerManager` actor, the only writer of partnerships and the
//!   blacklist (PEER resources on NATS, admin API), one change at a time.
//! - [`directory`]: this node's signed record in the DHT, the peers met, finding a peer
//!   and the one `reach` every part uses to connect to a peer.

pub mod directory;
pub mod manager;
pub mod partners;
