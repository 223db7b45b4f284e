//! Who may use the admin API: the bearer-token middleware wrapping every route, and the
//! start-up rule that a node without a token listens on loopback only.
//!
//! With `--admin-token-file`, every request but `GET /healthz` and `GET /metrics` (open to
//! probes and Prometheus) and the web page's static files (`PAGE_ROUTES`) must carry
//! `Authorization: Bearer <token>`; the middleware wraps the whole App, so a route added
//! later is covered by default. `GET /api/feed` (a WebSocket, whose browser API cannot set
//! headers) also takes the token as the subprotocol `bearer.<token in base64url>`, checked
//! by the same constant-time comparison. A refused request gets 401,
//! `WWW-Authenticate: Bearer` and `{"ok":false,"error":{"code":"unauthorized",...}}`, is
//! counted in `oc_admin_unauthorized_total` and logged, once per 10 s per client address
//! and reason ([`LogThrottle`]).
//!
//! Before the token, two rules keep web pages the operator opens away from the API
//! ([`browser_refusal`]): a request that can change state (any method but `GET` and `HEAD`)
//! whose `Origin` is not the node's own host and port is refused (403 `forbidden_origin`),
//! since browsers send some cross-site requests (a `POST` without a body, a form) without
//! asking the server first; and a node without a token answers only requests addressed to a
//! loopback name (`Host` an IP literal of loopback or `localhost`, else 403
//! `forbidden_host`), so that a page whose domain name is rebound to 127.0.0.1 cannot read
//! the API as its own origin. Both are counted in `oc_refusals_total{place="admin"}`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::contract::ErrorCode;
use crate::guard::LogThrottle;
use crate::metrics::Metrics;
use crate::secret_file::Token;

/// Routes answered without a token (`GET` only).
pub(crate) const OPEN_ROUTES: [&str; 2] = ["/healthz", "/metrics"];
/// The web page and its static files, answered without a token (`GET` only): they hold no
/// data; every request the page makes carries the token.
pub(crate) const PAGE_ROUTES: [&str; 3] = ["/", "/ui/feed.js", "/ui/feed.css"];
/// Error code of a refused request.
pub(crate) const UNAUTHORIZED: &str = "unauthorized";
/// A refusal of one kind from one address is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Characters of a refused request's path kept in the log line.
const LOGGED_PATH_CHARS: usize = 128;

/// Error code (403) of a state-changing request from a page of another origin, and of a
/// feed WebSocket opened by one.
pub(crate) const FORBIDDEN_ORIGIN: &str = "forbidden_origin";
/// Error code (403) of a request to a node without a token addressed to a name that is not
/// a loopback one.
pub(crate) const FORBIDDEN_HOST: &str = "forbidden_host";
/// Where the browser refusals are counted in `oc_refusals_total`.
const PLACE: &str = "admin";
/// Characters of a refused `Origin` or `Host` kept in the log line.
const LOGGED_HEADER_CHARS: usize = 128;

/// The `Origin` header, when it names another host and port than `Host`; none is fine
/// (clients that are not browsers send none).
///
/// # Errors
/// The refused `Origin`.
pub(crate) fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    if !host.is_empty() && authority.eq_ignore_ascii_case(host) {
        Ok(())
    } else {
        Err(origin.to_owned())
    }
}

/// Whether `host` (a `Host` header: a name or IP literal and an optional port) names this
/// machine's loopback: `localhost`, `127.0.0.0/8`, `[::1]`.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The 403 a browser's request gets before the token is looked at, if any: code, message
/// and the header that made it.
fn browser_refusal(
    method: &Method,
    headers: &HeaderMap,
    has_token: bool,
) -> Option<(&'static str, &'static str, String)> {
    if !has_token {
        if let Some(host) = headers.get(HOST) {
            let host = host.to_str().unwrap_or_default();
            if !loopback_host(host) {
                return Some((
                    FORBIDDEN_HOST,
                    "a node without an admin token answers requests to a loopback name only \
                     (127.0.0.1, [::1], localhost)",
                    host.to_owned(),
                ));
            }
        }
    }
    if method != Method::GET && method != Method::HEAD {
        if let Err(origin) = same_origin(headers) {
            return Some((
                FORBIDDEN_ORIGIN,
                "a request that changes state from a page of another origin is refused",
                origin,
            ));
        }
    }
    None
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    MissingToken,
    /// An `Authorization` header that is not `Bearer <token>`.
    NotBearer,
    /// A bearer token that is not the node's.
    WrongToken,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::NotBearer => "not_bearer",
            Refusal::WrongToken => "wrong_token",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "this route needs the header Authorization: Bearer <admin token>",
            Refusal::NotBearer => "the Authorization header is not Bearer <admin token>",
            Refusal::WrongToken => "the bearer token is not this node's admin token",
        }
    }
}

/// The node's token (none: every request passes, which only a loopback listener allows),
/// the counter and the log throttle of refusals.
pub(crate) struct Gate {
    token: Option<Token>,
    metrics: Arc<Metrics>,
    log: LogThrottle<IpAddr>,
}

impl Gate {
    pub(crate) fn new(token: Option<Token>, metrics: Arc<Metrics>) -> Gate {
        Gate {
            token,
            metrics,
            log: LogThrottle::new(LOG_EVERY),
        }
    }

    /// Whether a request may go on.
    ///
    /// # Errors
    /// Why it may not.
    pub(crate) fn check(
        &self,
        method: &Method,
        path: &str,
        authorization: Option<&[u8]>,
    ) -> Result<(), Refusal> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        if method == Method::GET && (OPEN_ROUTES.contains(&path) || PAGE_ROUTES.contains(&path)) {
            return Ok(());
        }
        let given = bearer(authorization.ok_or(Refusal::MissingToken)?)?;
        // Constant time over the bytes (a length difference shows, the content does not).
        if bool::from(given.ct_eq(token.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::WrongToken)
        }
    }

    /// Counts and (throttled) logs a browser refusal ([`browser_refusal`]).
    fn report_browser(
        &self,
        code: &'static str,
        header: &str,
        peer: Option<SocketAddr>,
        method: &Method,
        path: &str,
    ) {
        self.metrics.refused(PLACE, ErrorCode::InvalidField);
        let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        if let Some(count) = self.log.hit(ip, code) {
            let path: String = path.chars().take(LOGGED_PATH_CHARS).collect();
            let header: String = header.chars().take(LOGGED_HEADER_CHARS).collect();
            tracing::warn!(
                peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                %method,
                path = %path,
                code,
                header = %header,
                count,
                "admin API request refused: a page of another site"
            );
        }
    }

    /// Counts and (throttled) logs a refusal.
    fn report(&self, refusal: Refusal, peer: Option<SocketAddr>, method: &Method, path: &str) {
        Metrics::add(&self.metrics.admin_unauthorized, 1);
        let ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
        if let Some(count) = self.log.hit(ip, refusal.as_str()) {
            let path: String = path.chars().take(LOGGED_PATH_CHARS).collect();
            tracing::warn!(
                peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                %method,
                path = %path,
                reason = refusal.as_str(),
                count,
                "admin API request refused: unauthorized"
            );
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: &[u8]) -> Result<&[u8], Refusal> {
    let text = value.trim_ascii();
    let (scheme, token) = text
        .iter()
        .position(|b| *b == b' ')
        .map(|i| text.split_at(i))
        .ok_or(Refusal::NotBearer)?;
    let token = token.trim_ascii();
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.is_empty() {
        return Err(Refusal::NotBearer);
    }
    Ok(token)
}

/// The live feed's path, where a browser (which cannot set headers on a WebSocket) may
/// carry the token as a subprotocol instead.
pub(crate) const FEED_PATH: &str = "/api/feed";
/// Prefix of the subprotocol carrying the token: `bearer.<token in base64url, no padding>`.
pub(crate) const TOKEN_PROTOCOL_PREFIX: &str = "bearer.";
/// Longest `Sec-WebSocket-Protocol` entry looked at.
const MAX_PROTOCOL_CHARS: usize = 1024;

/// `Bearer <token>` from a `Sec-WebSocket-Protocol: ..., bearer.<base64url token>` header;
/// `None` when there is no such entry or it does not decode (then the request has no token).
fn protocol_token(headers: &actix_web::http::header::HeaderMap) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let offered = headers
        .get_all(actix_web::http::header::SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.len() <= MAX_PROTOCOL_CHARS && p.starts_with(TOKEN_PROTOCOL_PREFIX))?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&offered[TOKEN_PROTOCOL_PREFIX.len()..])
        .ok()?;
    let mut value = b"Bearer ".to_vec();
    value.extend_from_slice(&token);
    Some(value)
}

/// The 401 answer.
pub(crate) fn unauthorized(refusal: Refusal) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((WWW_AUTHENTICATE, "Bearer"))
        .json(json!({"ok": false, "error": {"code": UNAUTHORIZED, "message": refusal.message()}}))
}

/// The middleware (`middleware::from_fn`): lets a request through or answers 401.
///
/// # Errors
/// Those of the wrapped service.
pub(crate) async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // The gate is installed with the middleware; without it, refuse rather than open.
    let Some(gate) = req.app_data::<web::Data<Gate>>().cloned() else {
        let answer = unauthorized(Refusal::MissingToken);
        return Ok(req.into_response(answer).map_into_right_body());
    };
    if let Some((code, message, header)) = browser_refusal(req.method(), req.headers(), gate.token.is_some())
    {
        gate.report_browser(code, &header, req.peer_addr(), req.method(), req.path());
        let answer = super::reply::error(StatusCode::FORBIDDEN, code, message);
        return Ok(req.into_response(answer).map_into_right_body());
    }
    let from_protocol = match req.headers().get(AUTHORIZATION) {
        None if req.path() == FEED_PATH => protocol_token(req.headers()),
        _ => None,
    };
    let auth = from_protocol
        .as_deref()
        .or_else(|| req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()));
    match gate.check(req.method(), req.path(), auth) {
        Ok(()) => next.call(req).await.map(ServiceResponse::map_into_left_body),
        Err(refusal) => {
            gate.report(refusal, req.peer_addr(), req.method(), req.path());
            Ok(req.into_response(unauthorized(refusal)).map_into_right_body())
        }
    }
}

/// Why the admin API may not start as configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ExposureError {
    #[error("cannot resolve --admin-listen {listen}: {source}")]
    Resolve { listen: String, source: std::io::Error },
    #[error(
        "refusing to serve the admin API on {listen} without a token: whoever reaches it could \
         change partnerships. Set --admin-token-file (env OC_DISCOVERY_ADMIN_TOKEN_FILE), or \
         listen on a loopback address such as 127.0.0.1:8650"
    )]
    NoToken { listen: String },
}

/// A node without a token listens on loopback only: every address `listen` resolves to
/// must be a loopback one (`localhost` is; `0.0.0.0` and `::` are not).
///
/// # Errors
/// `listen` does not resolve, or resolves to a non-loopback address while there is no token.
pub(crate) fn check_exposure(listen: &str, has_token: bool) -> Result<(), ExposureError> {
    if has_token {
        return Ok(());
    }
    let addrs: Vec<SocketAddr> = listen
        .to_socket_addrs()
        .map_err(|source| ExposureError::Resolve {
            listen: listen.to_owned(),
            source,
        })?
        .collect();
    let loopback = !addrs.is_empty() && addrs.iter().all(|a| a.ip().to_canonical().is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(ExposureError::NoToken {
            listen: listen.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(
                actix_web::http::header::HeaderName::from_static(name),
                actix_web::http::header::HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    #[test]
    fn pages_of_other_sites_cannot_change_state_nor_rebind_a_tokenless_node() {
        let code = |method: Method, pairs: &[(&'static str, &str)], token: bool| {
            browser_refusal(&method, &headers(pairs), token).map(|(code, _, _)| code)
        };
        let own = [("host", "127.0.0.1:8650"), ("origin", "http://127.0.0.1:8650")];
        let evil = [("host", "127.0.0.1:8650"), ("origin", "http://evil.example")];
        assert_eq!(code(Method::POST, &own, false), None, "the node's own page");
        assert_eq!(
            code(Method::POST, &[("host", "127.0.0.1:8650")], false),
            None,
            "not a browser"
        );
        assert_eq!(code(Method::POST, &evil, false), Some(FORBIDDEN_ORIGIN));
        assert_eq!(
            code(Method::DELETE, &evil, true),
            Some(FORBIDDEN_ORIGIN),
            "with a token too"
        );
        assert_eq!(
            code(Method::GET, &evil, false),
            None,
            "reads: the browser keeps the answer from the page"
        );
        for host in [
            "localhost:8650",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3:1",
            "[::1]:8650",
            "[::ffff:127.0.0.1]:8650",
        ] {
            assert_eq!(code(Method::GET, &[("host", host)], false), None, "{host}");
        }
        for host in [
            "evil.example:8650",
            "127.0.0.1.evil.example",
            "10.0.0.1:8650",
            "[::2]:8650",
            "",
        ] {
            assert_eq!(
                code(Method::GET, &[("host", host)], false),
                Some(FORBIDDEN_HOST),
                "{host}"
            );
            assert_eq!(
                code(Method::GET, &[("host", host)], true),
                None,
                "a token guards it: {host}"
            );
        }
        assert_eq!(code(Method::GET, &[], false), None, "no Host (HTTP/1.0)");
    }

    fn gate(token: Option<&str>) -> Gate {
        let token = token.map(|t| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("t");
            std::fs::write(&path, t).unwrap();
            crate::secret_file::read_token(&path).unwrap()
        });
        Gate::new(token, Arc::new(Metrics::default()))
    }

    #[test]
    fn only_the_right_bearer_token_passes_except_on_the_open_routes() {
        let g = gate(Some("s3cret"));
        let post = Method::POST;
        assert_eq!(g.check(&post, "/api/partners", Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(g.check(&post, "/api/partners", Some(b"bearer  s3cret ")), Ok(()));
        assert_eq!(g.check(&post, "/api/partners", None), Err(Refusal::MissingToken));
        for bad in [&b"s3cret"[..], b"Basic s3cret", b"Bearer", b"Bearer "] {
            assert_eq!(
                g.check(&post, "/api/partners", Some(bad)),
                Err(Refusal::NotBearer)
            );
        }
        for wrong in [&b"Bearer s3cre"[..], b"Bearer s3cretX", b"Bearer S3CRET"] {
            assert_eq!(
                g.check(&post, "/api/partners", Some(wrong)),
                Err(Refusal::WrongToken)
            );
        }
        assert_eq!(g.check(&Method::GET, "/healthz", None), Ok(()));
        assert_eq!(g.check(&Method::GET, "/metrics", None), Ok(()));
        assert_eq!(
            g.check(&Method::POST, "/healthz", None),
            Err(Refusal::MissingToken)
        );
        assert_eq!(
            g.check(&Method::GET, "/healthz/x", None),
            Err(Refusal::MissingToken)
        );
        assert_eq!(
            g.check(&Method::GET, "/anything", None),
            Err(Refusal::MissingToken)
        );
        assert_eq!(g.check(&Method::GET, "/", None), Ok(()));
        assert_eq!(g.check(&Method::GET, "/ui/feed.js", None), Ok(()));
        assert_eq!(
            g.check(&Method::GET, "/api/feed", None),
            Err(Refusal::MissingToken)
        );
        assert_eq!(gate(None).check(&post, "/api/partners", None), Ok(()));
    }

    #[test]
    fn the_feed_takes_the_token_as_a_subprotocol() {
        use actix_web::http::header::{HeaderMap, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
        let mut h = HeaderMap::new();
        // "s3cret" in base64url without padding.
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("oc-discovery.feed, bearer.czNjcmV0"),
        );
        let value = protocol_token(&h).expect("a token");
        let g = gate(Some("s3cret"));
        assert_eq!(g.check(&Method::GET, FEED_PATH, Some(&value)), Ok(()));
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("bearer.czNjcmV1"),
        );
        let wrong = protocol_token(&h).expect("a token");
        assert_eq!(
            g.check(&Method::GET, FEED_PATH, Some(&wrong)),
            Err(Refusal::WrongToken)
        );
        h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("bearer.!!"));
        assert_eq!(protocol_token(&h), None);
    }

    #[test]
    fn without_a_token_only_loopback_addresses_may_listen() {
        for ok in ["127.0.0.1:8650", "[::1]:8650", "localhost:8650", "127.0.0.2:1"] {
            assert!(check_exposure(ok, false).is_ok(), "{ok}");
        }
        for exposed in ["0.0.0.0:8650", "[::]:8650", "192.0.2.1:8650"] {
            let err = check_exposure(exposed, false).unwrap_err().to_string();
            assert!(err.contains("--admin-token-file"), "{exposed}: {err}");
            assert!(check_exposure(exposed, true).is_ok(), "{exposed} with a token");
        }
        assert!(matches!(
            check_exposure("no port here", false),
            Err(ExposureError::Resolve { .. })
        ));
    }
}
