//! # oc-discovery
//!
//! A peer-to-peer resource propagation node for the OpenCloud network.
//!
//! # Layout
//! In the order an event flows through the node:
//! - [`config`]: command line, environment and config file.
//! - [`identity`]: the node's Ed25519 key and peer id.
//! - [`contract`]: the application contract: NATS subjects, event decoding, error codes.
//! - [`intake`]: NATS intake actor: decodes `PROPALGATION_EVENT`, journals, replies.
//! - [`store`]: journal, resources, cursors and outbox behind the [`store::Store`] trait:
//!   [`store::embedded`] (a redb file, default) or [`store::mongo`] (the site's MongoDB);
//!   [`store::retention`]: journal compaction (what a run may remove, the periodic task).
//! - [`outbound`]: one partner link per partner, feeding it the journal: [`outbound::service`]
//!   (the actor owning the links), [`outbound::link`] (one link's I/O loop),
//!   [`outbound::window`] (its send window, ack and resume rules, pure), [`outbound::status`],
//!   [`outbound::snapshot`] (a snapshot job towards a partner behind the compacted journal).
//! - [`p2p`]: the network layer: transports (TCP, WebSocket and `/wss` with [`p2p::tls`],
//!   relay circuits), behaviour ([`p2p::relay`]: relay server limits, DCUtR, AutoNAT), the
//!   event loop that alone owns the Swarm, the [`p2p::Client`] handle, the DHT and search gossip handlers; [`p2p::wire`]: one
//!   frame enum per stream protocol over one shared framing;
//!   [`p2p::records`]: signed peer records.
//! - [`search`]: `PB_SEARCH`: peer records, resource searches and their answers.
//! - [`inbound`]: applies partners' events, publishes them, acknowledges:
//!   [`inbound::reorder`] (the pure reorder, gap and sync decisions), a session per partner,
//!   the apply of a run, the snapshot frames an origin sends.
//! - [`sync`]: journal sync, pulling a partner's journal in parts to fill gaps:
//!   [`sync::plan`] (the pure round rules), [`sync::serve`] (owner), [`sync::pull`] (puller);
//!   [`sync::snapshot`] (the pure rules of snapshot jobs).
//! - [`peers`]: [`peers::partners`] (the one partner registry), [`peers::manager`] (the
//!   `PeerManager` actor: partnerships and the blacklist), [`peers::directory`] (this node's
//!   peer record in the DHT, the peers met, finding and reaching a peer).
//! - [`commands`]: `PB_CONSIDERS`, `PB_PLANNER`, `PB_CLOSE_PLANNER` to chosen peers, and
//!   the receiving side that republishes them.
//! - [`answers`]: replies to applications and the one refusal report (log, metric, error event, reply).
//! - [`backoff`]: the one retry delay rule every retry loop uses.
//! - [`guard`]: per-peer shares of helper pools, token buckets, throttled refusal logs.
//! - [`nats`]: NATS connection and the confirmed publisher.
//! - [`copy`]: remote copy of files and directories to partners (`/opencloud/copy/1.0`):
//!   [`copy::job`] (the sender's jobs, resumed after a restart), [`copy::receive`] (writes
//!   below `--copy-root` only), [`copy::archive`] (tar of a directory), [`copy::ledger`]
//!   (offsets and acks, pure), [`copy::remotecopy`] (the `REMOTECOPY` subject).
//! - [`feed`]: the live feed: journal and applied entries as they are committed, in a
//!   bounded ring every feed client reads at its own pace.
//! - [`admin`]: admin HTTP API (bearer token, HTTPS; status, journal and applied pages,
//!   the live feed WebSocket and the web page, events and searches without NATS);
//!   [`metrics`]: the Prometheus registry it serves.
//! - [`secret_file`]: the admin token file, and warnings for secret files others can read.
//! - [`node`]: wires everything together and runs until shutdown.
//! - [`cli`]: the `id`, `peers`, `partners` and operator commands (`status`, `journal`,
//!   `search`, `publish`, `resources`, `copy`, `completions`) and their admin API client.

pub mod admin;
pub mod answers;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod config;
pub mod contract;
pub mod copy;
pub mod feed;
pub mod guard;
pub mod identity;
pub mod inbound;
pub mod intake;
pub mod metrics;
pub mod nats;
pub mod node;
pub mod outbound;
pub mod p2p;
pub mod peers;
pub mod search;
pub mod secret_file;
pub mod shutdown;
pub mod store;
pub mod sync;
