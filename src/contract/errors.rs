//! The stable error codes applications branch on, and [`Refusal`]: a code with a sentence.

use serde_json::Value;

/// Stable error codes: a public contract (README, protocols/nats-subjects.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    InvalidJson,
    MissingField,
    InvalidField,
    UnsupportedAction,
    NotCreator,
    PayloadTooLarge,
    StoreUnavailable,
    /// Inbound only: the sending peer is not a configured partner.
    NotPartner,
    /// Inbound only: the event's origin is not the peer that sent it.
    ForgedOrigin,
    /// Inbound only: the resource exists with another creator.
    Conflict,
    /// A peer named by a command could not be reached.
    Unreachable,
    /// A bounded queue is full; retry later.
    Busy,
    /// The receiving node could not republish on its NATS.
    NatsUnavailable,
    /// Inbound only: the receiver's store cannot hold the resource as it is (MongoDB: a
    /// field name starting with `$`, a document over 16 MiB, a number beyond 64 bits).
    InvalidDocument,
    /// A peer sent more than its rate allows (forwarded commands); retry later.
    RateLimited,
    /// Remote copy: the bytes received do not hash to the announced SHA-256 (removed).
    HashMismatch,
    /// Remote copy: the receiver's disk is full (the partial data is removed).
    NoSpace,
}

impl ErrorCode {
    pub(crate) const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidJson,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::UnsupportedAction,
        ErrorCode::NotCreator,
        ErrorCode::PayloadTooLarge,
        ErrorCode::StoreUnavailable,
        ErrorCode::NotPartner,
        ErrorCode::ForgedOrigin,
        ErrorCode::Conflict,
        ErrorCode::Unreachable,
        ErrorCode::Busy,
        ErrorCode::NatsUnavailable,
        ErrorCode::InvalidDocument,
        ErrorCode::RateLimited,
        ErrorCode::HashMismatch,
        ErrorCode::NoSpace,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::UnsupportedAction => "unsupported_action",
            ErrorCode::NotCreator => "not_creator",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::NotPartner => "not_partner",
            ErrorCode::ForgedOrigin => "forged_origin",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unreachable => "unreachable",
            ErrorCode::Busy => "busy",
            ErrorCode::NatsUnavailable => "nats_unavailable",
            ErrorCode::InvalidDocument => "invalid_document",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::NoSpace => "no_space",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A refusal: a code plus a sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// `{"code": "...", "message": "..."}` as used in replies and error events.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}
