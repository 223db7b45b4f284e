//! The node's actors and the tasks they own.
//!
//! - [`intake`]: NATS `PROPALGATION_EVENT` → journal → reply.
//! - [`stream_service`]: the partner links; [`partner_link`]: one link's session loop.
//! - [`inbound`]: partners' streams → store + outbox → NATS → ack.
//! - [`peers`]: partnerships and the blacklist at run time (NATS PEER resources, admin API).
//! - [`commands`]: PB_CONSIDERS, PB_PLANNER, PB_CLOSE_PLANNER to chosen peers; PB_SEARCH hand-off.

pub mod commands;
pub mod inbound;
pub mod intake;
pub mod partner_link;
pub mod peers;
pub mod stream_service;
