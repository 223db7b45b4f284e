//! Building the transport and the swarm around a behaviour: TCP (no Nagle) and WebSocket
//! (`/ws`, and `/wss` with TLS) over TCP, both with DNS resolution of host names in
//! addresses; the optional pre-shared-key private network (pnet) wrapping either socket
//! before anything else; Noise, Yamux, the handshake timeout; the circuit relay v2 client
//! transport (`/p2p/<relay>/p2p-circuit/p2p/<peer>`, whose circuits travel inside
//! connections to the relay, themselves inside the PSK); the idle connection timeout; and
//! reading the `swarm.key` file.
//!
//! QUIC is left out: it brings its own TLS 1.3 handshake and cannot be wrapped in the pnet
//! handshake, so it would be a way around the private network (`protocols/transports.md`).

use std::time::Duration;

use futures::future::Either;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::Transport;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetError, PreSharedKey};
use libp2p::{dns, noise, relay, tcp, websocket, yamux, Swarm};

use super::behaviour::Behaviour;
use super::NetError;

/// A handshake that has not finished by then is abandoned (a PSK mismatch hangs, it does
/// not fail, so this is what refuses a peer without the key). It covers the WebSocket and
/// TLS handshakes too.
pub(crate) const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections without open streams are closed after this.
pub(crate) const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest WebSocket frame accepted (libp2p's default is 256 MiB, buffered whole): the
/// frames carry pnet/Noise records of at most 64 KiB, so this bounds a hostile peer's
/// memory per connection without refusing anything valid.
pub(crate) const WS_MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Reads a `swarm.key` file (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
///
/// # Errors
/// The file is unreadable or not in that format.
pub fn read_psk(path: &std::path::Path) -> Result<PreSharedKey, NetError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| NetError::Transport(format!("cannot read PSK file {}: {e}", path.display())))?;
    text.trim()
        .parse::<PreSharedKey>()
        .map_err(|e| NetError::Transport(format!("PSK file {} is not a swarm.key: {e}", path.display())))
}

/// The swarm of identity `key` driving the behaviour `make` builds around the relay
/// client, over the node's transports; `tls` configures `/wss`.
///
/// # Errors
/// The transport cannot be built (Noise refuses the key, no DNS configuration).
pub(super) fn swarm(
    key: Keypair,
    psk: Option<PreSharedKey>,
    tls: websocket::tls::Config,
    make: impl FnOnce(relay::client::Behaviour) -> Result<Behaviour, NetError>,
) -> Result<Swarm<Behaviour>, NetError> {
    let transport_err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tcp = || tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // Partner addresses may name hosts (/dns4/site-b.example/tcp/443/wss/p2p/...):
            // resolved at each dial with the system's resolver configuration, below the
            // WebSocket layer so that TLS sees the host name.
            let mut ws = websocket::Config::new(dns::tokio::Transport::system(tcp())?);
            ws.set_tls_config(tls).set_max_data_size(WS_MAX_FRAME_BYTES);
            let sockets = ws.or_transport(dns::tokio::Transport::system(tcp())?);
            // With a PSK, the pnet handshake wraps the socket before anything else, on
            // every transport.
            let maybe_private = sockets.and_then(move |socket, _| async move {
                match psk {
                    Some(psk) => PnetConfig::new(psk).handshake(socket).await.map(Either::Left),
                    None => Ok::<_, PnetError>(Either::Right(socket)),
                }
            });
            Ok(maybe_private
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .timeout(TRANSPORT_TIMEOUT))
        })
        .map_err(|e| transport_err(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|_, relay_client| {
            make(relay_client).map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}
