//! A client of a node's live feed (`GET /api/feed`, a WebSocket) for the tests: the node
//! crate's own WebSocket client ([`oc_discovery::cli::AdminClient::websocket`], blocking),
//! each call run on tokio's blocking pool so a test's runtime goes on meanwhile.

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

use crate::NodeProcess;

/// Longest wait for one message.
pub const FEED_READ_TIMEOUT: Duration = Duration::from_secs(30);

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// One feed connection.
pub struct FeedClient {
    ws: Option<Socket>,
}

impl FeedClient {
    /// Connects with the kit's token and CA.
    ///
    /// # Errors
    /// The handshake fails (the error is the node crate's: `AdminError` for 401).
    pub async fn connect(node: &NodeProcess) -> anyhow::Result<FeedClient> {
        let client = node.admin_client()?;
        let ws =
            tokio::task::spawn_blocking(move || client.websocket("/api/feed", FEED_READ_TIMEOUT)).await??;
        Ok(FeedClient { ws: Some(ws) })
    }

    async fn with<T: Send + 'static>(
        &mut self,
        op: impl FnOnce(&mut Socket) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let mut ws = self.ws.take().context("the feed connection is gone")?;
        let (ws, result) = tokio::task::spawn_blocking(move || {
            let r = op(&mut ws);
            (ws, r)
        })
        .await?;
        self.ws = Some(ws);
        result
    }

    /// Sends a JSON message.
    ///
    /// # Errors
    /// The connection is closed.
    pub async fn send(&mut self, msg: &Value) -> anyhow::Result<()> {
        self.send_raw(Message::text(msg.to_string())).await
    }

    /// Sends any frame (a malformed text, a binary frame, an oversized one).
    ///
    /// # Errors
    /// The connection is closed.
    pub async fn send_raw(&mut self, msg: Message) -> anyhow::Result<()> {
        self.with(move |ws| ws.send(msg).context("feed send")).await
    }

    /// The next JSON message (pings and pongs skipped); an error when the node closes the
    /// connection (its close frame in the message) or nothing comes in [`FEED_READ_TIMEOUT`].
    ///
    /// # Errors
    /// See above.
    pub async fn recv(&mut self) -> anyhow::Result<Value> {
        self.with(|ws| loop {
            match ws.read() {
                Ok(Message::Text(t)) => return Ok(serde_json::from_str(&t)?),
                Ok(Message::Close(frame)) => bail!("closed by the node: {frame:?}"),
                Ok(_) => continue,
                Err(e) => bail!("feed read: {e}"),
            }
        })
        .await
    }

    /// The next message, which must be of `kind` (`page`, `live`, `error`, `lagged`).
    ///
    /// # Errors
    /// See [`FeedClient::recv`]; another kind.
    pub async fn expect(&mut self, kind: &str) -> anyhow::Result<Value> {
        let msg = self.recv().await?;
        if msg["type"] != kind {
            bail!("expected a {kind} message, got {msg}");
        }
        Ok(msg)
    }

    /// Subscribes and returns the first page.
    ///
    /// # Errors
    /// See [`FeedClient::expect`].
    pub async fn subscribe(&mut self, msg: Value) -> anyhow::Result<Value> {
        self.send(&msg).await?;
        self.expect("page").await
    }
}
