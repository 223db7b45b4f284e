//! The body of `CREATE_RESOURCE` / `REMOVE_RESOURCE`, the notices the node publishes for
//! what partners sent.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{Action, JournalEntry, OWN_APP, SUBJECT_CREATE, SUBJECT_REMOVE};

/// Body of `CREATE_RESOURCE` / `REMOVE_RESOURCE` as the node publishes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceNotice {
    pub data_type: String,
    pub user: String,
    pub resource: Value,
    pub from_peer: String,
    pub origin_seq: u64,
    /// Always `oc-discovery`: marks the node's own publishes for every reader.
    #[serde(default)]
    pub from_app: String,
}

/// [`ResourceNotice`] borrowing from its entry: the same JSON, without copying the resource.
#[derive(Serialize)]
struct NoticeRef<'a> {
    data_type: &'a str,
    user: &'a str,
    resource: &'a RawValue,
    from_peer: &'a str,
    origin_seq: u64,
    from_app: &'a str,
}

impl ResourceNotice {
    /// The JSON body of the notice for `e`: a [`ResourceNotice`] written from the entry
    /// without copying it.
    pub fn body_of(e: &JournalEntry) -> Vec<u8> {
        ResourceNotice::body(&e.data_type, &e.user, e.resource.raw(), &e.origin, e.seq)
    }

    /// The JSON body of a notice from its parts; the same bytes as [`Self::body_of`] for
    /// the entry they come from.
    pub(crate) fn body(
        data_type: &str,
        user: &str,
        resource: &RawValue,
        from_peer: &str,
        origin_seq: u64,
    ) -> Vec<u8> {
        let notice = NoticeRef {
            data_type,
            user,
            resource,
            from_peer,
            origin_seq,
            from_app: OWN_APP,
        };
        // Sized once for the whole body (field names and numbers take < 128 bytes beyond
        // the texts): growing from serde_json's default 128 bytes copied it four times.
        let texts = resource.get().len() + data_type.len() + user.len() + from_peer.len();
        let mut out = Vec::with_capacity(texts.saturating_add(128));
        // Serializing strings and a JSON text into a Vec cannot fail.
        match serde_json::to_writer(&mut out, &notice) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn subject(action: Action) -> &'static str {
        match action {
            Action::Create | Action::Update => SUBJECT_CREATE,
            Action::Delete => SUBJECT_REMOVE,
        }
    }
}
