//! Commands: the application requests that are not journaled, sent to chosen peers.
//!
//! - `PB_CONSIDERS` `{"peer_ids": [...], ...}`: the event goes to each listed peer on
//!   `/opencloud/resource/considers/1.0`; each answers with an `ack` once it republished the
//!   event on its NATS. Unreachable peers are named in the reply and in an error event.
//! - `PB_PLANNER` `{"peer_id": ..., ...}`: sent on a long-lived
//!   `/opencloud/resource/planner/1.0` stream to that peer, opened on first use.
//! - `PB_CLOSE_PLANNER` `{"peer_id": ...}`: closes and forgets that stream.
//! - `PB_SEARCH`: handed to the search service.
//!
//! Receivers republish what arrives on these protocols as `PROPALGATION_EVENT` with
//! `from_app: "oc-discovery"`, the protocol's action and the sending connection's peer id
//! as `from_peer`, within a per-peer rate.
//!
//! - [`router`]: the NATS side, the `CommandRouter` actor (`PB_CONSIDERS` fan-out, planner
//!   queues, `PB_SEARCH` hand-off, answers and refusals).
//! - [`planner`]: one long-lived planner stream per peer, its queue bounded in messages and
//!   bytes.
//! - [`forwarder`]: the receiving side (republishing, per-peer rate, bounded streams).
//! - This file: the two protocols, the frame they carry, and [`Delivery`], how a stream to
//!   a chosen peer is opened (through the directory's one `reach`) and failures reported.

pub mod forwarder;
pub mod planner;
pub mod router;

use std::sync::Arc;

use libp2p::{PeerId, Stream, StreamProtocol};

use crate::answers::Answers;
use crate::config::Tuning;
use crate::contract::{AppCommand, CommandAction};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ForwardFrame};
use crate::p2p::{self};
use crate::peers::directory::Directory;

pub const PROTOCOL_CONSIDERS: StreamProtocol = StreamProtocol::new("/opencloud/resource/considers/1.0");
pub const PROTOCOL_PLANNER: StreamProtocol = StreamProtocol::new("/opencloud/resource/planner/1.0");

/// A frame encoded once (length prefix included), shared by every peer it goes to.
type Encoded = Arc<[u8]>;

fn encode(frame: &ForwardFrame) -> Encoded {
    let mut buf = Vec::new();
    wire::encode_frame(frame, &mut buf);
    buf.into()
}

/// The frame an application command travels in.
fn forward_frame(command: &AppCommand) -> ForwardFrame {
    ForwardFrame::Forward {
        action: command.action.as_str().to_owned(),
        data_type: command.data_type.clone(),
        user: command.user.clone(),
        payload: command.payload.clone(),
    }
}

/// What sending commands to chosen peers needs: reaching them, opening streams, and
/// reporting on NATS what could not be delivered (`place="commands"`).
pub(crate) struct Delivery {
    pub net: p2p::Client,
    pub directory: Arc<Directory>,
    pub answers: Answers,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
}

impl Delivery {
    /// Connects to `peer` if needed (the directory's `reach`) and opens a stream.
    ///
    /// # Errors
    /// The peer cannot be reached, or refuses the stream, within the I/O timeout.
    async fn open(&self, peer: PeerId, protocol: StreamProtocol) -> Result<Stream, String> {
        let t = self.tuning.io_timeout;
        self.directory.reach(peer, t).await?;
        self.net
            .open_stream(peer, protocol, t)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Which forwarding protocol a stream speaks: it, not the frame, decides the action
/// republished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForwardKind {
    Considers,
    Planner,
}

impl ForwardKind {
    pub(crate) fn of(protocol: &StreamProtocol) -> Option<ForwardKind> {
        if *protocol == PROTOCOL_CONSIDERS {
            Some(ForwardKind::Considers)
        } else if *protocol == PROTOCOL_PLANNER {
            Some(ForwardKind::Planner)
        } else {
            None
        }
    }

    /// The only action a stream of this kind republishes.
    pub(crate) fn action(self) -> CommandAction {
        match self {
            ForwardKind::Considers => CommandAction::Considers,
            ForwardKind::Planner => CommandAction::Planner,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_decides_the_action() {
        assert_eq!(
            ForwardKind::of(&PROTOCOL_CONSIDERS).map(ForwardKind::action),
            Some(CommandAction::Considers)
        );
        assert_eq!(
            ForwardKind::of(&PROTOCOL_PLANNER).map(ForwardKind::action),
            Some(CommandAction::Planner)
        );
        assert_eq!(ForwardKind::of(&StreamProtocol::new("/other/1.0")), None);
    }
}
