//! The node's actors and the tasks they own.
//!
//! - [`intake`]: NATS `PROPALGATION_EVENT` → journal → reply.
//! - [`stream_service`]: the partner links; [`partner_link`]: one link's session loop.
//! - [`inbound`]: partners' streams → store + outbox → NATS → ack.
//! - [`search`]: PB_SEARCH (peer records, resource searches) and answers to other nodes' searches.

pub mod inbound;
pub mod intake;
pub mod partner_link;
pub mod search;
pub mod stream_service;
