//! The application contract: what applications and the node say to each other on the
//! site's NATS. Every other part of the node builds on it; it depends on nothing of the node.
//!
//! - `subjects`: the subject names and the `from_app` mark of the node's own publishes.
//! - `action`: the actions an event can ask for.
//! - `errors`: the stable error codes and [`Refusal`].
//! - `decode`: decoding and validating a `PROPALGATION_EVENT` body.
//! - `resource`: a resource as the JSON text that came, with its `id` and `creator_id`.
//! - `journal`: a journal entry, the unit the node stores and propagates.
//! - `notice`: the `CREATE_RESOURCE` / `REMOVE_RESOURCE` bodies.
//! - `error_event`: the `PROPALGATION_ERROR` body for a refused message.
//!
//! The whole contract is used through this module (`crate::contract::Refusal`, ...): each
//! item has that one path, the files only keep its concerns apart. Its reference for
//! application authors: protocols/nats-subjects.md.

mod action;
mod decode;
mod error_event;
mod errors;
mod journal;
mod notice;
mod resource;
mod subjects;

pub use action::{Action, CommandAction};
pub use decode::{decode_intake, AppCommand, Decoded, NewEvent, MAX_COMMAND_PEERS};
pub use error_event::{error_event, ERROR_ECHO_BYTES};
pub use errors::{ErrorCode, Refusal};
pub use journal::{now_ms, JournalEntry};
pub use notice::ResourceNotice;
pub use resource::Resource;
pub use subjects::{OWN_APP, SUBJECT_CREATE, SUBJECT_ERROR, SUBJECT_PROPAGATION, SUBJECT_REMOVE};
