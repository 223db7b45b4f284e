//! Planner streams: one long-lived `/opencloud/resource/planner/1.0` stream per peer, fed
//! by a queue bounded in messages per peer, in peers ([`MAX_PLANNERS`]) and in bytes across
//! all peers ([`PLANNER_QUEUE_BYTES`]). The [`Planners`] bookkeeping is owned by the command
//! router; each stream is written by its own task, which ends when its queue is dropped
//! (`PB_CLOSE_PLANNER`) or stays idle, and then says so ([`PlannerEnded`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use async_nats::Subject;
use futures::AsyncWriteExt;
use libp2p::{PeerId, Stream};
use serde_json::json;
use tokio::sync::mpsc;

use super::{encode, Delivery, Encoded, PROTOCOL_PLANNER};
use crate::contract::{self, ErrorCode, Refusal};
use crate::p2p::wire::{self, ErrorFrame, ForwardFrame};

/// Planner messages queued per peer while its stream is being (re)opened.
const PLANNER_QUEUE: usize = 256;
/// Peers with a planner stream at once; beyond, `PB_PLANNER` to a new peer is `busy`.
pub(crate) const MAX_PLANNERS: usize = 256;
/// Bytes of planner messages queued across all peers; beyond, `PB_PLANNER` is `busy`.
pub(crate) const PLANNER_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// A planner task ended: its entry goes, unless a newer task replaced it.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PlannerEnded {
    pub peer: PeerId,
    pub generation: u64,
}

/// Each peer's planner queue and the task writing it.
pub(crate) struct Planners {
    delivery: Arc<Delivery>,
    /// Each peer's queue and the generation of the task writing it: a task that ends
    /// (idle, closed, failed) removes its own entry, never a newer one.
    queues: HashMap<PeerId, (u64, mpsc::Sender<Queued>)>,
    generation: u64,
    /// Bytes of planner messages queued, all peers together.
    queued_bytes: Arc<AtomicUsize>,
}

impl Planners {
    pub(crate) fn new(delivery: Arc<Delivery>) -> Self {
        Planners {
            delivery,
            queues: HashMap::new(),
            generation: 0,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Queues `frame` on `peer`'s planner stream, starting its task when it has none;
    /// `ended` hears when that task ends.
    ///
    /// # Errors
    /// `busy` when the bytes, the peers or this peer's queue are at their bound.
    pub(crate) fn queue(
        &mut self,
        peer: PeerId,
        frame: &ForwardFrame,
        ended: Recipient<PlannerEnded>,
    ) -> Result<(), Refusal> {
        let bytes = encode(frame);
        let Some(reserved) = Reserved::take(&self.queued_bytes, bytes.len(), PLANNER_QUEUE_BYTES) else {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("{PLANNER_QUEUE_BYTES} bytes of planner messages are queued; retry"),
            ));
        };
        let mut frame = Queued {
            bytes,
            _reserved: reserved,
        };
        // Twice: a task may end (idle) between the lookup and the send.
        for _ in 0..2 {
            let queue = match self.queues.get(&peer).filter(|(_, q)| !q.is_closed()) {
                Some((_, q)) => q.clone(),
                None => self.start(peer, ended.clone())?,
            };
            match queue.try_send(frame) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(Refusal::new(
                        ErrorCode::Busy,
                        format!("planner stream to {peer} is saturated"),
                    ))
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.queues.remove(&peer);
                    frame = back;
                }
            }
        }
        Err(Refusal::new(
            ErrorCode::Busy,
            format!("planner stream to {peer} is restarting; retry"),
        ))
    }

    /// Starts the task writing `peer`'s planner stream and returns its queue.
    fn start(
        &mut self,
        peer: PeerId,
        ended: Recipient<PlannerEnded>,
    ) -> Result<mpsc::Sender<Queued>, Refusal> {
        if !self.queues.contains_key(&peer) && self.queues.len() >= MAX_PLANNERS {
            self.queues.retain(|_, (_, q)| !q.is_closed());
        }
        if !self.queues.contains_key(&peer) && self.queues.len() >= MAX_PLANNERS {
            return Err(Refusal::new(
                ErrorCode::Busy,
                format!("{MAX_PLANNERS} planner streams are open; close one first"),
            ));
        }
        let (tx, rx) = mpsc::channel(PLANNER_QUEUE);
        self.generation = self.generation.wrapping_add(1);
        tokio::spawn(planner_stream(
            self.delivery.clone(),
            peer,
            rx,
            ended,
            self.generation,
        ));
        self.queues.insert(peer, (self.generation, tx.clone()));
        Ok(tx)
    }

    /// Forgets the queue of a task that ended, unless a newer task replaced it.
    pub(crate) fn ended(&mut self, msg: &PlannerEnded) {
        if self
            .queues
            .get(&msg.peer)
            .is_some_and(|(g, _)| *g == msg.generation)
        {
            self.queues.remove(&msg.peer);
        }
    }

    /// Drops `peer`'s queue, which ends its task and closes the stream; whether one was open.
    pub(crate) fn close(&mut self, peer: &PeerId) -> bool {
        self.queues.remove(peer).is_some_and(|(_, q)| !q.is_closed())
    }
}

/// A planner message waiting in a queue, with its share of [`PLANNER_QUEUE_BYTES`], given
/// back when it is dropped (sent, refused, or its queue gone).
struct Queued {
    bytes: Encoded,
    _reserved: Reserved,
}

struct Reserved {
    total: Arc<AtomicUsize>,
    n: usize,
}

impl Reserved {
    fn take(total: &Arc<AtomicUsize>, n: usize, max: usize) -> Option<Reserved> {
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|sum| *sum <= max)
            })
            .ok()
            .map(|_| Reserved {
                total: total.clone(),
                n,
            })
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.total.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Writes a peer's planner messages on one long-lived stream, each confirmed by the peer's
/// `ack`; a failed stream is reopened once per message. Ends when the queue is dropped
/// (`PB_CLOSE_PLANNER`) or after `planner_idle` without a message, and then tells the
/// router, which forgets the queue.
async fn planner_stream(
    env: Arc<Delivery>,
    peer: PeerId,
    mut queue: mpsc::Receiver<Queued>,
    ended: Recipient<PlannerEnded>,
    generation: u64,
) {
    let t = env.tuning.io_timeout;
    let mut stream: Option<Stream> = None;
    let mut idle = false;
    loop {
        let frame = if idle {
            // Closed for new messages: what was queued before still goes out.
            match queue.try_recv() {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            match tokio::time::timeout(env.tuning.planner_idle, queue.recv()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(%peer, idle = ?env.tuning.planner_idle, "idle planner stream closed");
                    queue.close();
                    idle = true;
                    continue;
                }
            }
        };
        let mut outcome = Err(Refusal::new(ErrorCode::Unreachable, "not sent"));
        for attempt in 0..2 {
            if stream.is_none() {
                match env.open(peer, PROTOCOL_PLANNER).await {
                    Ok(s) => stream = Some(s),
                    Err(e) => {
                        tracing::warn!(%peer, attempt, cause = %e, "cannot open planner stream");
                        outcome = Err(Refusal::new(ErrorCode::Unreachable, e));
                        continue;
                    }
                }
            }
            let Some(s) = stream.as_mut() else { continue };
            match tokio::time::timeout(t, exchange(s, &frame.bytes, env.tuning.max_frame_bytes)).await {
                Ok(Ok(answer)) => {
                    // The peer answered: its refusal stands, it is not resent.
                    outcome = answer;
                    break;
                }
                Ok(Err(e)) => {
                    outcome = Err(Refusal::new(ErrorCode::Unreachable, e));
                    stream = None;
                }
                Err(_) => {
                    outcome = Err(Refusal::new(
                        ErrorCode::Unreachable,
                        format!("no answer within {t:?}"),
                    ));
                    stream = None;
                }
            }
        }
        if let Err(refusal) = outcome {
            tracing::warn!(%peer, code = refusal.code.as_str(), reason = %refusal.message, "planner message not delivered");
            env.metrics.refused("commands", refusal.code);
            let error = Refusal::new(
                refusal.code,
                format!("planner message not delivered to {peer}: {}", refusal.message),
            );
            let body = json!({"error": error.to_json(), "subject": contract::SUBJECT_PROPAGATION, "action": "PB_PLANNER", "unreachable": [peer.to_string()]});
            env.answers
                .publish(Subject::from_static(contract::SUBJECT_ERROR), &body)
                .await;
        }
    }
    if let Some(mut s) = stream {
        let _ = tokio::time::timeout(t, s.close()).await;
    }
    ended.do_send(PlannerEnded { peer, generation });
}

/// Writes one frame and reads the peer's answer: `Ok(Ok)` acked, `Ok(Err)` refused by the
/// peer (its code), `Err` the stream failed.
async fn exchange(stream: &mut Stream, frame: &[u8], max: usize) -> Result<Result<(), Refusal>, String> {
    wire::write_encoded(stream, frame)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match wire::read_frame::<ForwardFrame, _>(stream, max).await {
            Ok(Some(ForwardFrame::Ack { .. })) => return Ok(Ok(())),
            Ok(Some(ForwardFrame::Error(ErrorFrame { code, message, .. }))) => {
                let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::Unreachable);
                return Ok(Err(Refusal::new(code, message)));
            }
            Ok(Some(_)) => continue,
            Ok(None) => return Err("stream closed by the peer".to_owned()),
            Err(e) if e.is_recoverable() => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_planner_bytes_are_bounded_and_given_back() {
        let total = Arc::new(AtomicUsize::new(0));
        let a = Reserved::take(&total, 60, 100).unwrap();
        assert!(Reserved::take(&total, 41, 100).is_none(), "over the budget");
        let b = Reserved::take(&total, 40, 100).unwrap();
        assert!(Reserved::take(&total, usize::MAX, 100).is_none(), "no overflow");
        drop(a);
        assert_eq!(total.load(Ordering::Acquire), 40);
        drop(b);
        assert_eq!(total.load(Ordering::Acquire), 0);
    }
}
