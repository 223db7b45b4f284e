//! The node's actors and the tasks they own.
//!
//! - [`search`]: PB_SEARCH (peer records, resource searches) and answers to other nodes' searches.

pub mod search;
