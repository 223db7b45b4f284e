//! The NATS subjects of the application contract and the mark of the node's own publishes
//! (protocols/nats-subjects.md lists each subject with its body, replies and error codes).

/// NATS subject applications publish resource changes on (typo kept: it is the wire name).
pub const SUBJECT_PROPAGATION: &str = "PROPALGATION_EVENT";
/// NATS subject every refused event is reported on.
pub const SUBJECT_ERROR: &str = "PROPALGATION_ERROR";
/// NATS subject the node publishes partners' creations and updates on.
pub const SUBJECT_CREATE: &str = "CREATE_RESOURCE";
/// NATS subject the node publishes partners' deletions on.
pub const SUBJECT_REMOVE: &str = "REMOVE_RESOURCE";
/// `from_app` value marking the node's own publishes; such events are never re-ingested.
pub const OWN_APP: &str = "oc-discovery";
