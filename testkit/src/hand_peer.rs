//! A peer that speaks the node's protocols by hand, inside the test process: the node's own
//! network stack ([`oc_discovery::p2p::build`], no node around it), for rogue partners,
//! lying responders, DHT writers and scripted journal owners.

use std::time::{Duration, Instant};

use futures::AsyncReadExt;
use libp2p::identity::Keypair;
use libp2p::{PeerId, Stream, StreamProtocol};
use oc_discovery::p2p::wire::{self, ResourceFrame};
use oc_discovery::p2p::{self, Client, StreamKind};

use crate::{free_port, Site, WAIT};

/// How long a dial or a stream opening may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A hand-driven libp2p peer listening on a known 127.0.0.1 port; its event loop stops
/// when the handle is dropped.
pub struct HandPeer {
    pub net: Client,
    pub key: Keypair,
    /// Its peer id, as text.
    pub id: String,
    pub port: u16,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl HandPeer {
    /// A peer with this key, listening on a free port.
    ///
    /// # Panics
    /// No port is free, or the network stack cannot be built.
    pub fn start(key: Keypair) -> HandPeer {
        let id = key.public().to_peer_id().to_string();
        let port = free_port().expect("a free port");
        let listen = [format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("multiaddr")];
        let (net, event_loop) = p2p::build(key.clone(), None, &listen).expect("p2p stack");
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(event_loop.run(stop_rx));
        HandPeer {
            net,
            key,
            id,
            port,
            _stop: stop,
        }
    }

    /// A peer with a fresh key.
    pub fn fresh() -> HandPeer {
        HandPeer::start(Keypair::generate_ed25519())
    }

    pub fn peer_id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    /// The multiaddr a node dials: `/ip4/127.0.0.1/tcp/<port>/p2p/<peer id>`.
    pub fn addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.port, self.id)
    }

    /// Waits until the event loop listens, so that a node given [`HandPeer::addr`] as a
    /// partner reaches it at its first dial.
    ///
    /// # Panics
    /// Not listening within [`WAIT`].
    pub async fn listening(&self) {
        let deadline = Instant::now() + WAIT;
        while self.net.listen_addrs().await.unwrap_or_default().is_empty() {
            assert!(Instant::now() < deadline, "the hand peer does not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Dials `site`'s node at its libp2p port; returns its peer id.
    ///
    /// # Panics
    /// The dial fails.
    pub async fn dial(&self, site: &Site) -> PeerId {
        let peer: PeerId = site.id().parse().expect("the node's peer id");
        let addr = format!("/ip4/127.0.0.1/tcp/{}", site.node.p2p_port)
            .parse()
            .expect("multiaddr");
        self.net
            .dial(peer, addr, CONNECT_TIMEOUT)
            .await
            .expect("dial the node");
        peer
    }

    /// Dials `site`'s node and opens a stream of `protocol` to it.
    ///
    /// # Panics
    /// The dial or the opening fails.
    pub async fn open(&self, site: &Site, protocol: StreamProtocol) -> Stream {
        let peer = self.dial(site).await;
        self.net
            .open_stream(peer, protocol, CONNECT_TIMEOUT)
            .await
            .expect("open a stream to the node")
    }

    /// Opens the create stream to `site`'s node and says `hello` with `head`; the node's
    /// answer is left to the caller.
    ///
    /// # Panics
    /// The stream cannot be opened or written.
    pub async fn hello(
        &self,
        site: &Site,
        head: u64,
    ) -> (futures::io::ReadHalf<Stream>, futures::io::WriteHalf<Stream>) {
        let stream = self.open(site, StreamKind::Create.protocol()).await;
        let (r, mut w) = stream.split();
        wire::write_frame(
            &mut w,
            &ResourceFrame::Hello {
                origin: self.id.clone(),
                head,
            },
        )
        .await
        .expect("write hello");
        (r, w)
    }
}
