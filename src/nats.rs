//! The site's NATS: connecting, and publishing what the node owes applications with a
//! confirmation (a flush round trip) before anything that depends on it moves on.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, HeaderMap};

use crate::store::OutboxRow;

/// Header JetStream uses to drop duplicate publishes.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Messages buffered per subscription before the server marks us a slow consumer.
const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;
/// Commands buffered in the client while the connection catches up.
const CLIENT_CAPACITY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("NATS did not confirm within {0:?}")]
    Timeout(Duration),
}

/// Connects to NATS. Returns at once: the connection is made (and remade) in the
/// background, so the node starts even when NATS is not up yet.
///
/// # Errors
/// The URL is malformed.
pub async fn connect(url: &str, timeout: Duration) -> Result<Client, async_nats::ConnectError> {
    ConnectOptions::new()
        .name("oc-discovery")
        .retry_on_initial_connect()
        .connection_timeout(timeout)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .client_capacity(CLIENT_CAPACITY)
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        })
        .connect(url)
        .await
}

pub fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Publishes what the node owes applications, confirmed before anyone moves on.
///
/// A subject captured by a JetStream stream is published through JetStream and confirmed
/// by its PubAck (persisted, deduplicated on `Nats-Msg-Id`); a subject no stream captures
/// gets a core publish confirmed by a flush round trip. Which is which is asked of the
/// server and remembered for `CAPTURE_RECHECK`.
pub struct Publisher {
    client: Client,
    js: async_nats::jetstream::Context,
    /// Subject → (captured by a stream, when that was learned).
    captured: std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>,
}

/// How long what was learned about a subject's stream is trusted.
const CAPTURE_RECHECK: Duration = Duration::from_secs(30);

impl Publisher {
    pub fn new(client: Client) -> Self {
        let js = async_nats::jetstream::new(client.clone());
        Publisher {
            client,
            js,
            captured: Default::default(),
        }
    }

    async fn is_captured(&self, subject: &str, timeout: Duration) -> bool {
        let known = self.captured.lock().ok().and_then(|m| m.get(subject).copied());
        if let Some((captured, at)) = known {
            if at.elapsed() < CAPTURE_RECHECK {
                return captured;
            }
        }
        // A server without JetStream, or no stream on the subject: core publish.
        let captured = matches!(
            tokio::time::timeout(timeout, self.js.stream_by_subject(subject)).await,
            Ok(Ok(_))
        );
        if let Ok(mut m) = self.captured.lock() {
            m.insert(subject.to_owned(), (captured, std::time::Instant::now()));
        }
        captured
    }

    /// Publishes outbox rows with their `Nats-Msg-Id` and waits until the server has them.
    ///
    /// # Errors
    /// A publish was refused or not confirmed in time; the caller keeps the rows.
    pub async fn publish_rows(&self, rows: &[OutboxRow], timeout: Duration) -> Result<(), PublishError> {
        let failed = |e: &dyn std::fmt::Display| PublishError::Publish(e.to_string());
        let work = async {
            let mut acks = Vec::new();
            let mut core = false;
            for row in rows {
                if self.is_captured(&row.subject, timeout).await {
                    let ack = self
                        .js
                        .publish_with_headers(row.subject.clone(), headers(row), row.payload.clone().into())
                        .await
                        .map_err(|e| failed(&e))?;
                    acks.push(ack);
                } else {
                    self.client
                        .publish_with_headers(row.subject.clone(), headers(row), row.payload.clone().into())
                        .await
                        .map_err(|e| failed(&e))?;
                    core = true;
                }
            }
            // Pipelined: every publish is out before the first confirmation is awaited.
            for ack in acks {
                ack.await.map_err(|e| failed(&e))?;
            }
            if core {
                self.client.flush().await.map_err(|e| failed(&e))?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
    }
}

fn headers(row: &OutboxRow) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, row.msg_id.as_str());
    headers
}
