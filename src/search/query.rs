//! The application's `PB_SEARCH` command, validated (`protocols/nats-search-event.md`): a
//! peer search (data type `PEER`) or a resource search with its scope, limit and timeout.
//! Pure: no I/O, every field checked against its limit before use.

use std::time::Duration;

use serde_json::Value;

use crate::contract::{AppCommand, ErrorCode, Refusal};

/// The data type whose search looks up peer records instead of resources.
pub(crate) const PEER_DATA_TYPE: &str = "PEER";
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(3000);
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_LIMIT: u64 = 1000;
pub(crate) const MAX_LIMIT: u64 = 10_000;
/// Longest search text, in bytes.
pub(crate) const MAX_SEARCH_BYTES: usize = 1024;
/// Longest data type accepted, from the application or a peer.
pub(super) const MAX_DATA_TYPE: usize = 128;

/// Who a resource search goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everyone, over the gossip topic.
    All,
    /// Peers with relation `known` in the peers table (configured partners excluded).
    Known,
    /// Partners: relation `partner` in the peers table and configured partners.
    Partner,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Some(Scope::All),
            "known" => Some(Scope::Known),
            "partner" => Some(Scope::Partner),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::Known => "known",
            Scope::Partner => "partner",
        }
    }
}

/// A validated `PB_SEARCH`.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Peer { search: String, timeout: Duration },
    Resources(Query),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub(super) data_type: String,
    pub(super) search: String,
    pub(super) scope: Scope,
    pub(super) limit: u64,
    pub(super) timeout: Duration,
}

/// Validates a `PB_SEARCH` command.
///
/// # Errors
/// The refusal to report: a field missing, of the wrong type or outside its limits.
pub fn parse(command: &AppCommand) -> Result<Parsed, Refusal> {
    let p = &command.payload;
    let search = match p.get("search") {
        None | Some(Value::Null) => {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "missing string field payload.search",
            ))
        }
        Some(Value::String(s)) if s.len() <= MAX_SEARCH_BYTES => s.clone(),
        Some(Value::String(_)) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.search is longer than {MAX_SEARCH_BYTES} bytes"),
            ))
        }
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.search must be a string",
            ))
        }
    };
    let timeout = match optional_u64(p, "timeout_ms")? {
        None => DEFAULT_TIMEOUT,
        Some(ms) if ms >= 1 && ms <= MAX_TIMEOUT.as_millis() as u64 => Duration::from_millis(ms),
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!(
                    "payload.timeout_ms must be between 1 and {}",
                    MAX_TIMEOUT.as_millis()
                ),
            ))
        }
    };
    if command.data_type.eq_ignore_ascii_case(PEER_DATA_TYPE) {
        let search = search.trim().to_owned();
        if search.is_empty() {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.search must name a peer id or a peer name",
            ));
        }
        return Ok(Parsed::Peer { search, timeout });
    }
    if command.data_type.len() > MAX_DATA_TYPE {
        return Err(Refusal::new(ErrorCode::InvalidField, "data_type is too long"));
    }
    let scope = match p.get("type") {
        None | Some(Value::Null) => {
            return Err(Refusal::new(
                ErrorCode::MissingField,
                "missing string field payload.type (all, known or partner)",
            ))
        }
        Some(Value::String(s)) => Scope::parse(s).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.type {s:?} is not all, known or partner"),
            )
        })?,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "payload.type must be a string (all, known or partner)",
            ))
        }
    };
    let limit = match optional_u64(p, "limit")? {
        None => DEFAULT_LIMIT,
        Some(n) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.limit must be between 1 and {MAX_LIMIT}"),
            ))
        }
    };
    Ok(Parsed::Resources(Query {
        data_type: command.data_type.clone(),
        search,
        scope,
        limit,
        timeout,
    }))
}

fn optional_u64(p: &Value, name: &str) -> Result<Option<u64>, Refusal> {
    match p.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidField,
                format!("payload.{name} must be a positive integer"),
            )
        }),
    }
}

/// 16 random hex digits.
pub(crate) fn new_query_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::CommandAction;
    use serde_json::json;

    fn command(data_type: &str, payload: Value) -> AppCommand {
        AppCommand {
            action: CommandAction::Search,
            data_type: data_type.into(),
            user: "u".into(),
            payload,
        }
    }

    fn code(data_type: &str, payload: Value) -> ErrorCode {
        parse(&command(data_type, payload)).unwrap_err().code
    }

    #[test]
    fn payloads_are_validated() {
        assert_eq!(code("PEER", json!({})), ErrorCode::MissingField);
        assert_eq!(code("PEER", json!({"search": " "})), ErrorCode::InvalidField);
        assert_eq!(code("PEER", json!({"search": 3})), ErrorCode::InvalidField);
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x"})),
            ErrorCode::MissingField
        );
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x", "type": "friends"})),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code("DATA_RESOURCE", json!({"search": "x", "type": "all", "limit": 0})),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(
                "DATA_RESOURCE",
                json!({"search": "x", "type": "all", "timeout_ms": -5})
            ),
            ErrorCode::InvalidField
        );
        assert_eq!(
            parse(&command("peer", json!({"search": "site-a"}))).unwrap(),
            Parsed::Peer {
                search: "site-a".into(),
                timeout: DEFAULT_TIMEOUT
            }
        );
        let Parsed::Resources(q) = parse(&command(
            "DATA_RESOURCE",
            json!({"search": "gpu", "type": "Known", "limit": 5, "timeout_ms": 700}),
        ))
        .unwrap() else {
            panic!("not a resource search")
        };
        assert_eq!(
            (q.scope, q.limit, q.timeout),
            (Scope::Known, 5, Duration::from_millis(700))
        );
    }
}
