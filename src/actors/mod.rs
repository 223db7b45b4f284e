//! The node's actors and the tasks they own.
//!
//! - [`peers`]: partnerships and the blacklist at run time (NATS PEER resources, admin API).
//! - [`commands`]: PB_CONSIDERS, PB_PLANNER, PB_CLOSE_PLANNER to chosen peers; PB_SEARCH hand-off.
//! - [`search`]: PB_SEARCH (peer records, resource searches) and answers to other nodes' searches.

pub mod commands;
pub mod peers;
pub mod search;
