//! Building the transport and the swarm around a behaviour: TCP (no Nagle), the optional
//! pre-shared-key private network (pnet) wrapping the socket before anything else, Noise,
//! Yamux, DNS resolution of host names in addresses, the handshake timeout and the idle
//! connection timeout; and reading the `swarm.key` file.

use std::time::Duration;

use futures::future::Either;
use libp2p::core::transport::upgrade::Version;
use libp2p::core::Transport;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PnetError, PreSharedKey};
use libp2p::{noise, tcp, yamux, Swarm};

use super::behaviour::Behaviour;
use super::NetError;

/// A handshake that has not finished by then is abandoned (a PSK mismatch hangs, it does
/// not fail, so this is what refuses a peer without the key).
pub(crate) const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections without open streams are closed after this.
pub(crate) const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

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

/// The swarm of identity `key` driving `behaviour` over the node's transport.
///
/// # Errors
/// The transport cannot be built (Noise refuses the key, no DNS configuration).
pub(super) fn swarm(
    key: Keypair,
    psk: Option<PreSharedKey>,
    behaviour: Behaviour,
) -> Result<Swarm<Behaviour>, NetError> {
    let transport_err = |e: &dyn std::fmt::Display| NetError::Transport(e.to_string());
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            // With a PSK, the pnet handshake wraps the socket before anything else.
            let maybe_private = tcp.and_then(move |socket, _| async move {
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
        // Partner addresses may name hosts (/dns4/site-b.example/tcp/4001/p2p/...): resolved
        // at each dial with the system's resolver configuration.
        .with_dns()
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build())
}
