//! Naming: the node's bookkeeping collections, the collection of a data type, and the
//! database names MongoDB accepts.

use super::error::OpenError;

pub const DEFAULT_DB: &str = "opencloud";

/// Bookkeeping collections; every name starts with [`RESERVED_PREFIX`].
pub(super) const JOURNAL: &str = "oc_journal";
pub(super) const CURSORS: &str = "oc_cursors";
pub(super) const APPLIED: &str = "oc_applied";
pub(super) const VERSIONS: &str = "oc_versions";
pub(super) const OUTBOX: &str = "oc_outbox";
/// The applied log, keyed by the outbox id of each apply (a counter never reused).
pub(super) const APPLIED_LOG: &str = "oc_applied_log";
pub(super) const COUNTERS: &str = "oc_counters";
pub(super) const PEERS: &str = "oc_peers";
pub(super) const INTAKE: &str = "oc_intake";
pub(super) const OWN: &str = "oc_own";
/// This node's deleted own resources: key → seq of the delete entry (compaction keeps it).
pub(super) const GONE: &str = "oc_gone";
/// Small bookkeeping values: snapshot jobs, the compaction floor.
pub(super) const META: &str = "oc_meta";
/// No data type may map to a collection with this prefix.
pub(super) const RESERVED_PREFIX: &str = "oc_";
/// `oc_counters` document holding the last outbox id handed out.
pub(super) const OUTBOX_COUNTER: &str = "outbox";
/// MongoDB's limit on `<database>.<collection>`.
pub(super) const MAX_NAMESPACE_BYTES: usize = 255;

/// The collection a data type's resources live in: its name in lower case.
///
/// # Errors
/// A sentence saying why MongoDB (or the `oc_` reservation) does not allow that name.
pub fn collection_for(db: &str, data_type: &str) -> Result<String, String> {
    let name = data_type.to_lowercase();
    if name.is_empty() {
        return Err("empty data type".to_owned());
    }
    if name.contains('$') || name.contains('\0') {
        return Err(format!(
            "data type {data_type:?} is not a valid collection name ('$' or NUL)"
        ));
    }
    if name.starts_with("system.") || name.starts_with('.') || name.ends_with('.') {
        return Err(format!("data type {data_type:?} is not a valid collection name"));
    }
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "data type {data_type:?} maps to {name}, reserved for the node's bookkeeping"
        ));
    }
    if db.len() + 1 + name.len() > MAX_NAMESPACE_BYTES {
        return Err(format!(
            "data type {data_type:?} is too long for a MongoDB namespace"
        ));
    }
    Ok(name)
}

pub(super) fn check_database_name(name: &str) -> Result<(), OpenError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() >= 64 {
        Some("64 bytes or more")
    } else if name
        .chars()
        .any(|c| matches!(c, '/' | '\\' | '.' | ' ' | '"' | '$' | '\0'))
    {
        Some("contains one of / \\ . space \" $ NUL")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(OpenError::Database {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names() {
        assert_eq!(
            collection_for("opencloud", "COMPUTE_RESOURCE").unwrap(),
            "compute_resource"
        );
        assert!(collection_for("opencloud", "").is_err());
        assert!(collection_for("opencloud", "OC_JOURNAL").is_err());
        assert!(collection_for("opencloud", "a$b").is_err());
        assert!(collection_for("opencloud", "system.users").is_err());
        assert!(collection_for("opencloud", &"X".repeat(300)).is_err());
    }

    #[test]
    fn database_names() {
        assert!(check_database_name("opencloud").is_ok());
        assert!(check_database_name("").is_err());
        assert!(check_database_name("a.b").is_err());
    }
}
