//! How MongoDB's errors become the store's: what is retried (an outage), what is a
//! refused document ([`ApplyOutcome::Rejected`](crate::store::ApplyOutcome::Rejected)),
//! what is corrupt, and what stops the set-up ([`OpenError`]).

use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR};

use crate::store::StoreError;

/// Server error codes that mean "this document cannot be stored", not "try again":
/// BadValue, DollarPrefixedFieldName, InvalidDBRef, EmptyFieldName, DottedFieldName,
/// DocumentValidationFailure (a validator the site put on a collection), BSONObjectTooLarge,
/// KeyTooLong, and the update size limit.
pub(super) const REFUSED_DOCUMENT_CODES: [i32; 9] = [2, 52, 55, 56, 57, 121, 10334, 17280, 17419];
/// InvalidNamespace: the collection name is not acceptable to MongoDB.
pub(super) const INVALID_NAMESPACE: i32 = 73;
/// NamespaceExists: `create` on a collection that is already there.
pub(super) const NAMESPACE_EXISTS: i32 = 48;
/// `dropIndexes` of an index that is not there.
pub(super) const INDEX_NOT_FOUND: i32 = 27;

/// Why a MongoDB store cannot even be set up (a configuration error, not an outage).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("invalid MongoDB URI: {0}")]
    Uri(String),
    #[error("invalid MongoDB database name {name:?}: {reason}")]
    Database { name: String, reason: &'static str },
}

/// What a transaction body can fail with, before it becomes a [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    #[error(transparent)]
    Mongo(#[from] MongoError),
    #[error("{0}")]
    Corrupt(String),
    /// The server cannot give the guarantees (a standalone server has no transactions).
    #[error("{0}")]
    Unsupported(String),
}

impl Failure {
    pub(super) fn is_transient(&self) -> bool {
        matches!(self, Failure::Mongo(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR))
    }

    pub(super) fn refused_document(&self) -> Option<String> {
        match self {
            Failure::Mongo(e) => refused_document(e),
            Failure::Corrupt(_) | Failure::Unsupported(_) => None,
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Mongo(e) => classify(e),
            Failure::Corrupt(m) => StoreError::Corrupt(m),
            // Retried like an outage: the operator can convert the server in place.
            Failure::Unsupported(m) => StoreError::Unavailable(m),
        }
    }
}

/// Everything is retryable except documents of ours that do not decode.
pub(super) fn classify(e: MongoError) -> StoreError {
    match *e.kind {
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(format!("mongodb: {e}")),
    }
}

/// The server error code, wherever the driver put it.
pub(super) fn server_code(e: &MongoError) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => Some(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => Some(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => Some(w.code),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| w.code)
            .or_else(|| m.write_concern_error.as_ref().map(|w| w.code)),
        _ => None,
    }
}

/// `Some(reason)` when MongoDB refused a document as such (not an outage).
pub(super) fn refused_document(e: &MongoError) -> Option<String> {
    let code = server_code(e)?;
    if !REFUSED_DOCUMENT_CODES.contains(&code) {
        return None;
    }
    let message = match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.message.clone(),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .map(|w| w.message.clone())
            .unwrap_or_default(),
        ErrorKind::Command(c) => c.message.clone(),
        _ => e.to_string(),
    };
    Some(format!("MongoDB refused the document (code {code}): {message}"))
}
