//! # oc-discovery
//!
//! A peer-to-peer resource propagation node for the OpenCloud network.
//!
//! # Layout
//! In the order an event flows through the node:
//! - [`config`]: command line, environment and config file.
//! - [`identity`]: the node's Ed25519 key and peer id.
//! - [`event`]: wire types of the NATS subjects, decoding and error codes.
//! - [`actors::intake`]: NATS intake actor: decodes `PROPALGATION_EVENT`, journals, replies.
//! - [`store`]: journal, resources, cursors and outbox behind the [`store::Store`] trait:
//!   [`store::embedded`] (a redb file, default) or [`store::mongo`] (the site's MongoDB).
//! - [`actors::stream_service`]: one partner link per partner, feeding it the journal.
//! - [`p2p`]: the network layer: transport, behaviour, the event loop that alone owns the
//!   Swarm, the [`p2p::Client`] handle, the DHT and search gossip handlers, stream framing;
//!   [`p2p::records`]: signed peer records.
//! - [`directory`]: this node's peer record in the DHT, the peers met, finding a peer.
//! - [`search`]: `PB_SEARCH`: peer records, resource searches and their answers.
//! - [`actors::inbound`]: applies partners' events, publishes them, acknowledges.
//! - [`sync`]: journal sync, pulling a partner's journal in parts to fill gaps.
//! - [`partners`]: the partner set, shared by the sessions, commands, search and directory.
//! - [`answers`]: replies to applications and the one refusal report (log, metric, error event, reply).
//! - [`backoff`]: the one retry delay rule every retry loop uses.
//! - [`guard`]: per-peer shares of helper pools, token buckets, throttled refusal logs.
//! - [`nats`]: NATS connection and the confirmed publisher.
//! - [`admin`]: admin HTTP API; [`metrics`]: counters it serves.
//! - [`node`]: wires everything together and runs until shutdown.
//! - [`cli`]: the `id` and `peers` commands.
//! - [`fuzzing`]: entry points of the fuzz targets, shared with the corpus replay test.
//! - [`testkit`]: spawns real nats-servers, mongods and nodes for tests, demo and benchmarks.

pub mod actors;
pub mod admin;
pub mod answers;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod directory;
pub mod event;
pub mod fuzzing;
pub mod guard;
pub mod identity;
pub mod metrics;
pub mod nats;
pub mod node;
pub mod p2p;
pub mod partners;
pub mod search;
pub mod shutdown;
pub mod store;
pub mod sync;
pub mod testkit;
