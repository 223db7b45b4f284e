//! The event loop's side of the search gossip topic: publishing, handing each received
//! query to the subscriber for validation (ignored at once when nobody has room for it), and
//! reporting the subscriber's verdict so gossipsub forwards only verified queries.

use libp2p::{gossipsub, PeerId};
use tokio::sync::oneshot;

use super::event_loop::EventLoop;
use super::{NetError, SEARCH_TOPIC};

/// A search query received on the gossip topic, waiting for validation
/// ([`super::Client::report_gossip`]) before gossipsub forwards it further.
#[derive(Debug, Clone)]
pub struct GossipMessage {
    pub message_id: gossipsub::MessageId,
    /// The neighbour that handed it over (not necessarily the author).
    pub propagation_source: PeerId,
    /// The author, from gossipsub's own signature.
    pub author: Option<PeerId>,
    pub data: Vec<u8>,
}

/// Verdict on a gossip message: accepted messages are forwarded, rejected ones count
/// against the neighbour, ignored ones are dropped quietly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipVerdict {
    Accept,
    Reject,
    Ignore,
}

impl EventLoop {
    pub(super) fn publish_gossip(&mut self, data: Vec<u8>, reply: oneshot::Sender<Result<(), NetError>>) {
        let topic = gossipsub::IdentTopic::new(SEARCH_TOPIC);
        let result = self
            .swarm
            .behaviour_mut()
            .gossip
            .publish(topic, data)
            .map(|_| ())
            .map_err(|e| NetError::Gossip(e.to_string()));
        let _ = reply.send(result);
    }

    pub(super) fn report_gossip(
        &mut self,
        message_id: &gossipsub::MessageId,
        source: &PeerId,
        verdict: GossipVerdict,
    ) {
        let acceptance = match verdict {
            GossipVerdict::Accept => gossipsub::MessageAcceptance::Accept,
            GossipVerdict::Reject => gossipsub::MessageAcceptance::Reject,
            GossipVerdict::Ignore => gossipsub::MessageAcceptance::Ignore,
        };
        // False when the message left the cache meanwhile: nothing to forward then.
        let _ = self
            .swarm
            .behaviour_mut()
            .gossip
            .report_message_validation_result(message_id, source, acceptance);
    }

    pub(super) fn on_gossip_event(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let msg = GossipMessage {
                    message_id: message_id.clone(),
                    propagation_source,
                    author: message.source,
                    data: message.data,
                };
                let handed = self
                    .gossip_events
                    .as_ref()
                    .is_some_and(|tx| tx.try_send(msg).is_ok());
                if !handed {
                    tracing::debug!(peer = %propagation_source, "gossip message ignored: no room to handle it");
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .gossip
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Ignore,
                        );
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed to gossip topic");
            }
            other => tracing::trace!(event = ?other, "gossip event"),
        }
    }
}
