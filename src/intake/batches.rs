//! Group commit: the intake's messages taken in batches of everything already received.

use std::pin::Pin;

use futures::{Future, Stream, StreamExt};

use super::source::{Incoming, Source};

/// Like `ready_chunks`: each item is every message already received, up to `max`, and only
/// waits when there is none. Unlike it, a batch is not cut at tokio's cooperative budget
/// (128 channel reads per poll), which made every journal commit a group of at most 128
/// events however many were waiting: intake topped out near 18 000 events/s while
/// JetStream delivered 95 000/s to a bare consumer (docs/PERFORMANCE.md).
pub(super) struct ReadyBatches {
    source: Source,
    max: usize,
    /// The source ended (after a last partial batch): it is not polled again.
    ended: bool,
}

impl ReadyBatches {
    pub(super) fn new(source: Source, max: usize) -> Self {
        ReadyBatches {
            source,
            max: max.max(1),
            ended: false,
        }
    }
}

impl Stream for ReadyBatches {
    type Item = Vec<Incoming>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Vec<Incoming>>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        let mut batch = Vec::new();
        while batch.len() < self.max {
            let next = tokio::task::coop::unconstrained(self.source.next());
            match std::pin::pin!(next).poll(cx) {
                Poll::Ready(Some(m)) => batch.push(m),
                Poll::Ready(None) => {
                    self.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        match (batch.is_empty(), self.ended) {
            (false, _) => Poll::Ready(Some(batch)),
            (true, true) => Poll::Ready(None),
            (true, false) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::Subject;
    use bytes::Bytes;
    use futures::FutureExt;

    use crate::contract;

    fn incoming(i: usize) -> Incoming {
        Incoming {
            subject: Subject::from_static(contract::SUBJECT_PROPAGATION),
            payload: Bytes::from(i.to_string()),
            reply: None,
            js: None,
        }
    }

    /// A source fed by a tokio channel, whose reads count against the cooperative budget.
    fn channel_source(n: usize) -> Source {
        let (tx, rx) = tokio::sync::mpsc::channel(n.max(1));
        for i in 0..n {
            tx.try_send(incoming(i)).unwrap();
        }
        drop(tx);
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))
    }

    #[tokio::test]
    async fn a_batch_is_everything_waiting_not_cut_at_the_budget() {
        let mut batches = ReadyBatches::new(channel_source(3000), 2048);
        let sizes: Vec<usize> = std::iter::from_fn(|| batches.next().now_or_never().flatten())
            .map(|b| b.len())
            .collect();
        assert_eq!(sizes, vec![2048, 952], "tokio's budget is 128 reads per poll");
        assert!(
            matches!(batches.next().now_or_never(), Some(None)),
            "ended for good"
        );
    }
}
