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
/// falls back to a core publish confirmed by a flush round trip, and is probed again later.
pub struct Publisher {
    client: Client,
    js: async_nats::jetstream::Context,
    /// Subjects without a stream, until when to publish them core-style.
    core_until: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// How long a subject found without a stream is published core-style before probing again.
const CORE_RECHECK: Duration = Duration::from_secs(30);

impl Publisher {
    pub fn new(client: Client) -> Self {
        let js = async_nats::jetstream::new(client.clone());
        Publisher {
            client,
            js,
            core_until: Default::default(),
        }
    }

    fn is_core(&self, subject: &str) -> bool {
        self.core_until
            .lock()
            .map(|m| {
                m.get(subject)
                    .is_some_and(|until| *until > std::time::Instant::now())
            })
            .unwrap_or(false)
    }

    fn mark_core(&self, subject: &str) {
        if let Ok(mut m) = self.core_until.lock() {
            m.insert(subject.to_owned(), std::time::Instant::now() + CORE_RECHECK);
        }
    }

    /// Publishes outbox rows with their `Nats-Msg-Id` and waits until the server has them.
    ///
    /// # Errors
    /// A publish was refused or not confirmed in time; the caller keeps the rows.
    pub async fn publish_rows(&self, rows: &[OutboxRow], timeout: Duration) -> Result<(), PublishError> {
        let failed = |e: &dyn std::fmt::Display| PublishError::Publish(e.to_string());
        let work = async {
            let mut acks = Vec::new();
            let mut core = Vec::new();
            for row in rows {
                if self.is_core(&row.subject) {
                    core.push(row);
                    continue;
                }
                let ack = self
                    .js
                    .publish_with_headers(row.subject.clone(), headers(row), row.payload.clone().into())
                    .await
                    .map_err(|e| failed(&e))?;
                acks.push((row, ack));
            }
            // Pipelined: every publish is out before the first acknowledgement is awaited.
            for (row, ack) in acks {
                match ack.await {
                    Ok(_) => {}
                    Err(e)
                        if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound =>
                    {
                        self.mark_core(&row.subject);
                        core.push(row);
                    }
                    Err(e) => return Err(failed(&e)),
                }
            }
            if !core.is_empty() {
                for row in core {
                    self.client
                        .publish_with_headers(row.subject.clone(), headers(row), row.payload.clone().into())
                        .await
                        .map_err(|e| failed(&e))?;
                }
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
