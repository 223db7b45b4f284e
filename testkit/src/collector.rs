//! What a site's NATS shows on some subjects, in arrival order: the tests' view of what a
//! node published.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use serde_json::Value;

use crate::{wait_until, WAIT};

/// A received NATS message, decoded.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub msg_id: Option<String>,
    pub body: Value,
}

fn distinct(seen: &[Seen]) -> usize {
    seen.iter()
        .filter_map(|s| s.msg_id.as_deref())
        .collect::<HashSet<_>>()
        .len()
}

/// Everything a site's NATS shows on some subjects, in arrival order per subject.
#[derive(Clone, Default)]
pub struct Collector(pub Arc<Mutex<Vec<Seen>>>);

impl Collector {
    pub async fn start(client: &async_nats::Client, subjects: &[&str]) -> Collector {
        let c = Collector::default();
        for s in subjects {
            let mut sub = client.subscribe(s.to_string()).await.expect("subscribe");
            let sink = c.0.clone();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let msg_id = m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.to_string());
                    let body = serde_json::from_slice(&m.payload).unwrap_or(Value::Null);
                    sink.lock().unwrap().push(Seen {
                        subject: m.subject.to_string(),
                        msg_id,
                        body,
                    });
                }
            });
        }
        // Make sure the subscriptions reached the server before anything is published.
        client.flush().await.expect("flush");
        c
    }

    pub fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn distinct_msg_ids(&self) -> usize {
        distinct(&self.all())
    }

    /// Waits until `n` distinct `Nats-Msg-Id`s were seen.
    pub async fn wait_distinct(&self, what: &str, n: usize) {
        self.wait_for(what, |s| distinct(s) >= n).await;
    }

    pub async fn wait_for(&self, what: &str, mut cond: impl FnMut(&[Seen]) -> bool) {
        let inner = self.0.clone();
        wait_until(what, WAIT, || cond(&inner.lock().unwrap()))
            .await
            .unwrap_or_else(|e| panic!("{e}; seen {} messages", self.len()));
    }
}
