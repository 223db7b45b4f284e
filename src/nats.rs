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

/// Publishes outbox rows with their `Nats-Msg-Id` and waits until the server has them.
///
/// # Errors
/// The publish was refused or not confirmed in time; the caller keeps the rows.
pub async fn publish_rows(
    client: &Client,
    rows: &[OutboxRow],
    timeout: Duration,
) -> Result<(), PublishError> {
    let work = async {
        for row in rows {
            let mut headers = HeaderMap::new();
            headers.insert(MSG_ID_HEADER, row.msg_id.as_str());
            client
                .publish_with_headers(row.subject.clone(), headers, row.payload.clone().into())
                .await
                .map_err(|e| PublishError::Publish(e.to_string()))?;
        }
        client
            .flush()
            .await
            .map_err(|e| PublishError::Publish(e.to_string()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| PublishError::Timeout(timeout))?
}
