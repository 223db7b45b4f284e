//! `GET /api/feed`: the live journal and applied log over a WebSocket, in the Ppl model
//! (protocols/admin-http.md, "Live feed").
//!
//! The client subscribes to one feed with a portion and filters and gets the newest
//! portion as a `page`; `older` pages walk back until `oldest_reached`; entries committed
//! since come as `live` messages unless the client paused; `resume` sends the newest portion
//! again and live entries go on. Live entries come from the shared ring of
//! [`crate::feed`]: a client that cannot keep up gets `lagged` with the number of entries it
//! missed, never more memory.
//!
//! Bounds: clients at once (`--feed-max-clients`, then `busy`), bytes of a client message
//! ([`MAX_MESSAGE_BYTES`]), bytes of a page ([`MAX_PAGE_BYTES`], the rest follows with
//! `older`), the client's outgoing queue (actix-ws' 32 frames; messages over [`FRAME_BYTES`]
//! go as continuation frames, so at most 2 MiB wait there; then the client's task waits, at
//! most [`SEND_TIMEOUT`] per frame), silence ([`IDLE_TIMEOUT`], pings every
//! [`PING_INTERVAL`]). A bad message gets `{"type":"error","code","message"}` and the
//! connection stays. Who may connect: the admin token ([`super::auth`], also as the
//! `bearer.` subprotocol), and no page of another origin (`auth::same_origin`).

use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Item, Session};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::auth::{same_origin, FORBIDDEN_ORIGIN};
use super::history::{self, PageRequest, DEFAULT_LIMIT, MAX_LIMIT};
use super::{reply, AdminState};
use crate::contract::ErrorCode;
use crate::feed::{ClientSlot, Live};

/// The subprotocol the node answers with (the page offers it beside its token).
pub const PROTOCOL: &str = "oc-discovery.feed";
/// Largest client message (text frame, continuations together).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Largest `page` message: beyond, the page ends early with a `before` cursor.
pub const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// Messages larger than this go out as continuation frames of this size, so that the
/// client's outgoing queue (32 frames) holds at most 32 of them: 2 MiB.
pub const FRAME_BYTES: usize = 64 * 1024;
/// Longest wait for the client to take one message; then it is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Refusals (`busy`) sent on a WebSocket at once; beyond, one too many gets HTTP 503 `busy`.
pub const MAX_REFUSALS: usize = 16;
/// How long sending a refusal and its close may take.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

static REFUSALS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_REFUSALS);
/// The node pings this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
/// A client heard from (any frame, pongs included) less recently is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Live entries taken from the ring at once, and their bytes (at least one entry): what a
/// client holds of entries the ring may meanwhile drop.
const LIVE_BATCH: usize = 64;
const LIVE_BATCH_BYTES: usize = 256 * 1024;

/// Which log a client follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedName {
    Journal,
    Applied,
}

/// A message from the client.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Subscribe {
        feed: FeedName,
        portion: Option<usize>,
        data_type: Option<String>,
        origin: Option<String>,
    },
    Older {
        before: u64,
    },
    Pause,
    Resume,
}

/// An `error` message: a code of the contract and a sentence.
#[derive(Debug, PartialEq)]
pub struct FeedError {
    pub code: ErrorCode,
    pub message: String,
}

impl FeedError {
    fn new(code: ErrorCode, message: impl Into<String>) -> FeedError {
        FeedError {
            code,
            message: message.into(),
        }
    }

    fn to_text(&self) -> String {
        json!({"type": "error", "code": self.code.as_str(), "message": self.message}).to_string()
    }
}

/// Decodes a client message: `invalid_json` when it is not JSON, `invalid_field` when it is
/// not one of the messages or a field is out of range.
///
/// # Errors
/// See above.
pub fn decode(text: &str) -> Result<ClientMessage, FeedError> {
    let msg: ClientMessage = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => FeedError::new(ErrorCode::InvalidField, e.to_string()),
        _ => FeedError::new(ErrorCode::InvalidJson, e.to_string()),
    })?;
    match &msg {
        ClientMessage::Subscribe { portion: Some(n), .. } if *n == 0 || *n > MAX_LIMIT => {
            Err(FeedError::new(
                ErrorCode::InvalidField,
                format!("portion must be between 1 and {MAX_LIMIT}, not {n}"),
            ))
        }
        ClientMessage::Older { before: 0 } => Err(FeedError::new(
            ErrorCode::InvalidField,
            "before must be at least 1",
        )),
        _ => Ok(msg),
    }
}

/// What a subscribed client follows.
struct Subscription {
    feed: FeedName,
    request: PageRequest,
    paused: bool,
    /// Ring cursor of the next live entry.
    cursor: u64,
    /// Live entries at or below this key were in the last newest page.
    seen_up_to: u64,
    newest: watch::Receiver<u64>,
}

impl Subscription {
    fn keeps(&self, data_type: &str, origin: &str) -> bool {
        self.request.data_type.as_deref().is_none_or(|t| t == data_type)
            && self.request.origin.as_deref().is_none_or(|o| o == origin)
    }
}

/// A page as a `page` message, cut at [`MAX_PAGE_BYTES`]; with the key of its newest entry.
fn page_text<T: Serialize>(
    page: history::Page<T>,
    key: impl Fn(&T) -> u64,
) -> Result<(String, Option<u64>), serde_json::Error> {
    let newest = page.entries.first().map(&key);
    let mut parts = Vec::with_capacity(page.entries.len());
    let mut bytes = 0usize;
    let mut cut = None;
    for e in &page.entries {
        let text = serde_json::to_string(e)?;
        if !parts.is_empty() && bytes.saturating_add(text.len()) > MAX_PAGE_BYTES {
            cut = Some(key(e).saturating_add(1));
            break;
        }
        bytes = bytes.saturating_add(text.len() + 1);
        parts.push(text);
    }
    let (oldest_reached, before) = match cut {
        Some(b) => (false, Some(b)),
        None => (page.oldest_reached, page.before),
    };
    let mut out = String::with_capacity(bytes.saturating_add(96));
    out.push_str("{\"type\":\"page\",\"entries\":[");
    out.push_str(&parts.join(","));
    out.push_str(&format!("],\"oldest_reached\":{oldest_reached}"));
    if let Some(b) = before {
        out.push_str(&format!(",\"before\":{b}"));
    }
    out.push('}');
    Ok((out, newest))
}

/// One client connection.
struct Client {
    state: web::Data<AdminState>,
    session: Session,
    sub: Option<Subscription>,
    peer: String,
}

/// Why a client's task ends.
enum End {
    Gone,
    Slow,
}

impl Client {
    fn live(&self, feed: FeedName) -> &Live {
        match feed {
            FeedName::Journal => &self.state.feed.journal,
            FeedName::Applied => &self.state.feed.applied,
        }
    }

    /// Sends one text message, in frames of [`FRAME_BYTES`] when larger; each frame waits
    /// at most [`SEND_TIMEOUT`] for room in the client's queue.
    async fn send(&mut self, text: String) -> Result<(), End> {
        if text.len() <= FRAME_BYTES {
            return wait_send(self.session.text(text)).await;
        }
        let bytes = bytes::Bytes::from(text);
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + FRAME_BYTES).min(bytes.len());
            let part = bytes.slice(at..end);
            let item = match (at, end == bytes.len()) {
                (0, _) => Item::FirstText(part),
                (_, true) => Item::Last(part),
                _ => Item::Continue(part),
            };
            wait_send(self.session.continuation(item)).await?;
            at = end;
        }
        Ok(())
    }

    async fn error(&mut self, e: &FeedError) -> Result<(), End> {
        self.state.metrics.refused(PLACE, e.code);
        tracing::debug!(peer = %self.peer, code = e.code.as_str(), message = %e.message, "feed message refused");
        self.send(e.to_text()).await
    }

    /// The page of `request` below `before` (`None`: the newest).
    async fn page(&mut self, feed: FeedName, request: &PageRequest) -> Result<Option<u64>, End> {
        let answer = match feed {
            FeedName::Journal => history::journal_page(&self.state, request)
                .await
                .map(|p| page_text(p, |e| e.seq)),
            FeedName::Applied => history::applied_page(&self.state, request)
                .await
                .map(|p| page_text(p, |r| r.key)),
        };
        match answer {
            Ok(Ok((text, newest))) => {
                self.send(text).await?;
                Ok(newest)
            }
            Ok(Err(e)) => {
                let e = FeedError::new(ErrorCode::InvalidDocument, format!("entry not encoded: {e}"));
                self.error(&e).await.map(|()| None)
            }
            Err(e) => {
                let e = FeedError::new(e.code(), e.to_string());
                self.error(&e).await.map(|()| None)
            }
        }
    }

    /// The newest portion, and live entries from then on.
    async fn start(&mut self, feed: FeedName, request: PageRequest) -> Result<(), End> {
        let live = self.live(feed);
        // Watch and cursor before the page: whatever is committed after the read is live.
        let newest = live.watch();
        let cursor = live.cursor();
        let seen_up_to = self.page(feed, &request).await?.unwrap_or(0);
        self.sub = Some(Subscription {
            feed,
            request,
            paused: false,
            cursor,
            seen_up_to,
            newest,
        });
        Ok(())
    }

    async fn handle(&mut self, text: &str) -> Result<(), End> {
        let msg = match decode(text) {
            Ok(m) => m,
            Err(e) => return self.error(&e).await,
        };
        match msg {
            ClientMessage::Subscribe {
                feed,
                portion,
                data_type,
                origin,
            } => {
                let request = PageRequest {
                    before: None,
                    limit: portion.unwrap_or(DEFAULT_LIMIT),
                    data_type: data_type.filter(|t| !t.is_empty()),
                    // The journal holds this node's entries only: its origin is never a filter.
                    origin: origin.filter(|o| !o.is_empty() && feed == FeedName::Applied),
                };
                self.start(feed, request).await
            }
            ClientMessage::Older { before } => {
                let Some(sub) = &self.sub else {
                    return self.error(&not_subscribed("older")).await;
                };
                let (feed, request) = (
                    sub.feed,
                    PageRequest {
                        before: Some(before),
                        ..sub.request.clone()
                    },
                );
                self.page(feed, &request).await.map(|_| ())
            }
            ClientMessage::Pause => match &mut self.sub {
                Some(sub) => {
                    sub.paused = true;
                    Ok(())
                }
                None => self.error(&not_subscribed("pause")).await,
            },
            ClientMessage::Resume => match self.sub.take() {
                Some(sub) => self.start(sub.feed, sub.request).await,
                None => self.error(&not_subscribed("resume")).await,
            },
        }
    }

    /// Sends the live entries the subscription has not seen yet (one batch; more is
    /// signalled again).
    async fn drain(&mut self) -> Result<(), End> {
        let Some(sub) = &self.sub else {
            return Ok(());
        };
        let read = self.live(sub.feed).read(sub.cursor, LIVE_BATCH, LIVE_BATCH_BYTES);
        let Some(sub) = &mut self.sub else {
            return Ok(());
        };
        sub.cursor = read.next;
        if read.more {
            sub.newest.mark_changed();
        }
        let (seen_up_to, items) = (sub.seen_up_to, read.items);
        let wanted: Vec<_> = items
            .into_iter()
            .filter(|i| i.key > seen_up_to && sub.keeps(&i.data_type, &i.origin))
            .collect();
        if read.skipped > 0 {
            self.state.metrics.feed_lagged.inc_by(read.skipped);
            tracing::debug!(peer = %self.peer, skipped = read.skipped, "feed client lagged");
            self.send(json!({"type": "lagged", "skipped": read.skipped}).to_string())
                .await?;
        }
        // One message built at a time: the entries are shared with the ring until sent.
        for item in wanted {
            self.send(format!("{{\"type\":\"live\",\"entry\":{}}}", item.json))
                .await?;
        }
        Ok(())
    }
}

async fn wait_send(send: impl std::future::Future<Output = Result<(), actix_ws::Closed>>) -> Result<(), End> {
    match tokio::time::timeout(SEND_TIMEOUT, send).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_closed)) => Err(End::Gone),
        Err(_) => Err(End::Slow),
    }
}

/// Where feed refusals are counted in `oc_refusals_total`.
pub const PLACE: &str = "admin_feed";

fn not_subscribed(what: &str) -> FeedError {
    FeedError::new(
        ErrorCode::InvalidField,
        format!("{what} before subscribe: send {{\"type\":\"subscribe\",\"feed\":\"journal\"}} first"),
    )
}

/// Waits for new live entries of an active subscription; never returns otherwise.
async fn live_changed(sub: &mut Option<Subscription>) {
    match sub {
        Some(s) if !s.paused => {
            if s.newest.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// `GET /api/feed`: upgrades to a WebSocket and serves one client.
///
/// # Errors
/// Not a WebSocket handshake (400).
pub async fn feed(
    req: HttpRequest,
    body: web::Payload,
    s: web::Data<AdminState>,
) -> Result<HttpResponse, actix_web::Error> {
    if let Err(origin) = same_origin(req.headers()) {
        s.metrics.refused(PLACE, ErrorCode::InvalidField);
        tracing::warn!(origin = %origin.chars().take(128).collect::<String>(), "feed refused: a page of another origin");
        return Ok(super::reply::error(
            actix_web::http::StatusCode::FORBIDDEN,
            FORBIDDEN_ORIGIN,
            "a WebSocket from a page of another origin is refused",
        ));
    }
    let peer = req
        .peer_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    let slot = s.feed.join();
    // One too many is told so on the WebSocket (a browser shows it), by a bounded number of
    // short tasks; beyond those, with a plain HTTP answer.
    let refusal = match slot {
        Some(_) => None,
        None => match REFUSALS.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => {
                s.metrics.refused(PLACE, ErrorCode::Busy);
                return Ok(reply::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::Busy.as_str(),
                    "too many feed clients; try again later",
                ));
            }
        },
    };
    let (response, mut session, stream) = actix_ws::handle_with_protocols(&req, body, &[PROTOCOL])?;
    let stream = stream
        .max_frame_size(MAX_MESSAGE_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_MESSAGE_BYTES);
    match (slot, refusal) {
        (Some(slot), _) => {
            actix_web::rt::spawn(serve(s, session, stream, peer, slot));
        }
        (None, permit) => {
            s.metrics.refused(PLACE, ErrorCode::Busy);
            tracing::warn!(%peer, clients = s.feed.clients(), "feed client refused: too many clients");
            let e = FeedError::new(ErrorCode::Busy, "too many feed clients; try again later");
            actix_web::rt::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(REFUSAL_TIMEOUT, session.text(e.to_text())).await;
                let reason = CloseReason {
                    code: CloseCode::Again,
                    description: Some("too many feed clients".to_owned()),
                };
                let _ = tokio::time::timeout(REFUSAL_TIMEOUT, session.close(Some(reason))).await;
            });
        }
    }
    Ok(response)
}

async fn serve(
    state: web::Data<AdminState>,
    session: Session,
    mut stream: AggregatedMessageStream,
    peer: String,
    _slot: ClientSlot,
) {
    tracing::debug!(%peer, "feed client connected");
    let mut client = Client {
        state,
        session,
        sub: None,
        peer,
    };
    let mut ping = tokio::time::interval(PING_INTERVAL);
    let mut heard = Instant::now();
    let mut close = None;
    let end = loop {
        let step = tokio::select! {
            msg = stream.recv() => {
                match msg {
                    None => break End::Gone,
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        heard = Instant::now();
                        client.handle(&text).await
                    }
                    Some(Ok(AggregatedMessage::Binary(_))) => {
                        heard = Instant::now();
                        client.error(&FeedError::new(ErrorCode::InvalidJson, "send JSON text frames")).await
                    }
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        heard = Instant::now();
                        client.session.pong(&bytes).await.map_err(|_| End::Gone)
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => {
                        heard = Instant::now();
                        Ok(())
                    }
                    Some(Ok(AggregatedMessage::Close(_))) => break End::Gone,
                    Some(Err(e)) => {
                        // A frame over the limit, or a broken one: the stream cannot go on.
                        let e = FeedError::new(
                            ErrorCode::PayloadTooLarge,
                            format!("message refused ({e}); messages are at most {MAX_MESSAGE_BYTES} bytes"),
                        );
                        let _ = client.error(&e).await;
                        close = Some(CloseCode::Size);
                        break End::Gone;
                    }
                }
            }
            () = live_changed(&mut client.sub) => client.drain().await,
            _ = ping.tick() => {
                if heard.elapsed() > IDLE_TIMEOUT {
                    close = Some(CloseCode::Away);
                    break End::Gone;
                }
                client.session.ping(b"").await.map_err(|_| End::Gone)
            }
        };
        if let Err(end) = step {
            break end;
        }
    };
    if let End::Slow = end {
        tracing::warn!(peer = %client.peer, timeout = ?SEND_TIMEOUT, "feed client disconnected: it took no message");
        close = Some(CloseCode::Policy);
    }
    let reason = close.map(|code| CloseReason {
        code,
        description: None,
    });
    let _ = tokio::time::timeout(SEND_TIMEOUT, client.session.close(reason)).await;
    tracing::debug!(peer = %client.peer, "feed client gone");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode_and_bad_ones_get_their_code() {
        assert_eq!(
            decode(r#"{"type":"subscribe","feed":"applied","portion":5,"origin":"p"}"#),
            Ok(ClientMessage::Subscribe {
                feed: FeedName::Applied,
                portion: Some(5),
                data_type: None,
                origin: Some("p".to_owned()),
            })
        );
        assert_eq!(decode(r#"{"type":"pause"}"#), Ok(ClientMessage::Pause));
        assert_eq!(
            decode(r#"{"type":"older","before":3}"#),
            Ok(ClientMessage::Older { before: 3 })
        );
        let code = |t: &str| decode(t).map_err(|e| e.code.as_str()).err();
        assert_eq!(code("{nope"), Some("invalid_json"));
        assert_eq!(code(r#"{"type":"explode"}"#), Some("invalid_field"));
        assert_eq!(
            code(r#"{"type":"subscribe","feed":"other"}"#),
            Some("invalid_field")
        );
        assert_eq!(
            code(r#"{"type":"subscribe","feed":"journal","portion":0}"#),
            Some("invalid_field")
        );
        assert_eq!(
            code(r#"{"type":"subscribe","feed":"journal","portion":1001}"#),
            Some("invalid_field")
        );
        assert_eq!(code(r#"{"type":"older","before":0}"#), Some("invalid_field"));
        assert_eq!(code(r#"{"type":"older","before":-1}"#), Some("invalid_field"));
    }

    #[test]
    fn only_pages_of_the_node_s_own_origin_may_open_the_feed() {
        use actix_web::test::TestRequest;
        let req = |origin: Option<&str>| {
            let r = TestRequest::get().insert_header(("Host", "127.0.0.1:8650"));
            match origin {
                Some(o) => r.insert_header(("Origin", o)),
                None => r,
            }
            .to_http_request()
        };
        assert!(same_origin(req(None).headers()).is_ok(), "not a browser");
        assert!(same_origin(req(Some("http://127.0.0.1:8650")).headers()).is_ok());
        assert!(same_origin(req(Some("https://127.0.0.1:8650")).headers()).is_ok());
        for other in [
            "http://evil.example",
            "http://127.0.0.1:8651",
            "null",
            "http://127.0.0.1:8650.evil",
        ] {
            assert!(same_origin(req(Some(other)).headers()).is_err(), "{other}");
        }
    }

    #[test]
    fn a_page_over_the_byte_cap_ends_early_with_a_cursor() {
        let big = "x".repeat(MAX_PAGE_BYTES / 3);
        let page = history::Page {
            entries: (1..=5u64).rev().map(|k| (k, big.clone())).collect(),
            oldest_reached: true,
            before: None,
        };
        let (text, newest) = page_text(page, |e| e.0).unwrap();
        assert_eq!(newest, Some(5));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "page");
        assert_eq!(v["entries"].as_array().unwrap().len(), 2);
        assert_eq!(
            (v["oldest_reached"].clone(), v["before"].clone()),
            (json!(false), json!(4))
        );
    }
}
