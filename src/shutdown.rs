//! The one shutdown signal: a `watch` flag turned true once, observed by every task.

use tokio::sync::watch;

/// Completes when shutdown is signalled (or the signal's sender is gone).
pub(crate) async fn signalled(rx: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = rx.wait_for(|stop| *stop).await;
}
