//! Command line, environment and config file.
//!
//! Every `run` option can be given three ways; the first found wins:
//! a flag (`--nats-url`), an environment variable (`OC_DISCOVERY_NATS_URL`), a key in the
//! TOML file named by `--config` (`nats_url = "..."` or `nats-url = "..."`). Repeatable
//! options take a comma-separated list in the environment and an array in the file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;

pub(crate) const DEFAULT_DATA_DIR: &str = "./data";
pub(crate) const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub(crate) const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/tcp/4001";
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8650";
pub(crate) const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Default of `--applied-log-max-rows`: about 1 GiB of applied log at 1 KiB per entry.
pub(crate) const DEFAULT_APPLIED_LOG_MAX_ROWS: u64 = 1_000_000;
pub(crate) const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Default of `--max-partner-buffer-bytes`: 64 MiB per partner.
pub(crate) const DEFAULT_MAX_PARTNER_BUFFER_BYTES: usize = 64 * 1024 * 1024;
pub(crate) const DEFAULT_INTAKE_STREAM: &str = "OC_PROPAGATION";
/// Bytes the JetStream intake stream holds at most (`discard: new` beyond).
pub(crate) const DEFAULT_INTAKE_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Age after which the JetStream intake stream drops a message nobody consumed.
pub(crate) const DEFAULT_INTAKE_MAX_AGE: &str = "7d";
/// Smallest `--intake-max-bytes` accepted.
pub(crate) const MIN_INTAKE_MAX_BYTES: u64 = 1024;
/// Forwarded commands (considers / planner) one peer may make this node republish, per second.
pub(crate) const DEFAULT_FORWARD_RATE: f64 = 50.0;
/// Forwarded commands one peer may send at once above its rate.
pub(crate) const DEFAULT_FORWARD_BURST: u32 = 100;
/// A planner stream that carried nothing for this long is closed (both sides).
pub(crate) const DEFAULT_PLANNER_IDLE: &str = "10m";
/// Bytes of one journal sync round (`--sync-max-bytes`).
pub(crate) const DEFAULT_SYNC_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Room for an entry's fields around its resource: `--sync-max-bytes` must exceed
/// `--max-event-bytes` by this much, so that one entry always fits in a round.
const SYNC_ENTRY_ROOM: u64 = 64 * 1024;
/// Shortest period accepted for intervals and timeouts (zero would spin).
const MIN_PERIOD: Duration = Duration::from_millis(10);
/// Life of this node's signed peer record in the DHT; it is re-signed every half of it.
pub(crate) const DEFAULT_RECORD_TTL: &str = "2m";
/// Bounds of `--record-ttl` (the upper one is what other nodes accept).
pub(crate) const MIN_RECORD_TTL: Duration = Duration::from_secs(2);
pub(crate) const MAX_RECORD_TTL: Duration = crate::p2p::records::MAX_AHEAD;
pub(crate) const DEFAULT_MONGO_DB: &str = crate::store::mongo::DEFAULT_DB;
/// Per peer and search: results kept, and bytes of their JSON.
pub(crate) const DEFAULT_SEARCH_PEER_MAX_RESULTS: u64 = 1000;
pub(crate) const DEFAULT_SEARCH_PEER_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Gossip queries per second from searchers without a known record, all together.
pub(crate) const DEFAULT_SEARCH_UNKNOWN_QUERIES_PER_SECOND: f64 = 2.0;
/// Rows of relation `known` kept in the peers table (least recently seen dropped first).
pub(crate) const DEFAULT_MAX_KNOWN_PEERS: usize = 10_000;

/// Which [`crate::store::Store`] backend holds the node's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One redb file in the data directory.
    #[default]
    Embedded,
    /// The site's MongoDB (`--mongo-uri`, `--mongo-db`).
    Mongodb,
}

#[derive(Debug, Parser)]
#[command(
    name = "oc-discovery",
    version,
    about = "OpenCloud peer-to-peer resource propagation node",
    long_about = "Propagates the resource changes applications publish on the site's NATS \
                  (PROPALGATION_EVENT) to partner sites over libp2p, through a durable journal \
                  with acknowledged, resumable partner streams."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this node's peer id (creating the identity if missing) and exit.
    Id(IdArgs),
    /// Run the node.
    Run(Box<RunArgs>),
    /// Show the partners of a running node and their state.
    Peers(PeersArgs),
    /// Make, end and list partnerships (and the blacklist) of a running node.
    Partners(PartnersArgs),
    /// A running node at a glance: intake, store, NATS, journal head, partner links.
    Status(StatusArgs),
    /// The node's own journal (or, with --applied, what it applied from partners), newest
    /// first.
    Journal(JournalArgs),
    /// Search the network (PB_SEARCH) through a running node; results as they arrive.
    Search(SearchArgs),
    /// Publish a PROPALGATION_EVENT through a running node's admin API.
    Publish(PublishArgs),
    /// The resources a running node received from partners.
    Resources(ResourcesArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Copy a file or directory on the node's disk to a partner (`<PEER_ID>:<DEST>`, DEST
    /// below the partner's --copy-root); waits until it is done or failed.
    Copy(CopyArgs),
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// File or directory to copy, on the node's disk, below its --copy-source-root (a
    /// relative path is made absolute from the current directory).
    pub source: String,
    /// `<PEER_ID>:<DEST>`: the partner, and the path below its --copy-root.
    pub target: String,
    /// Longest wait for the copy to end; the node goes on with it past this.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the final state of the copy as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JournalArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// Entries applied from partners (by local apply order) instead of the node's own.
    #[arg(long)]
    pub applied: bool,
    /// Only entries older than this seq (with --applied: this apply key).
    #[arg(long, conflicts_with = "follow")]
    pub before: Option<u64>,
    /// After the newest --limit entries (oldest first), print entries as they are committed,
    /// until interrupted (over the WebSocket GET /api/feed).
    #[arg(long)]
    pub follow: bool,
    /// Entries per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Only entries of this data type.
    #[arg(long)]
    pub data_type: Option<String>,
    /// Only entries from this origin peer (with --applied).
    #[arg(long, requires = "applied")]
    pub origin: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Who a resource search goes to.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SearchScope {
    All,
    Known,
    Partner,
}

#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// Data type searched (PEER: a peer record).
    pub data_type: String,
    /// Text searched.
    pub text: String,
    #[arg(long, value_enum, default_value = "all")]
    pub scope: SearchScope,
    /// Most results wanted.
    #[arg(long)]
    pub limit: Option<u64>,
    /// How long the peers have to answer.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the SEARCH_EVENT bodies as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// PB_CREATE, PB_UPDATE or PB_DELETE.
    pub action: String,
    pub data_type: String,
    /// File holding the payload (JSON), or - for standard input.
    #[arg(long)]
    pub payload: String,
    /// Print the node's JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ResourcesArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    #[command(subcommand)]
    pub action: ResourcesAction,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ResourcesAction {
    /// The stored resources of a data type (tombstones included).
    List { data_type: String },
    /// One stored resource.
    Get { data_type: String, id: String },
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

/// How the commands using the admin API reach it.
#[derive(Debug, Clone, Args)]
pub struct AdminClientArgs {
    /// Base URL of the node's admin API (`http://` or `https://`).
    #[arg(
        long,
        env = "OC_DISCOVERY_ADMIN",
        default_value = "http://127.0.0.1:8650",
        global = true
    )]
    pub admin: String,
    /// File holding the node's admin token (sent as `Authorization: Bearer`).
    #[arg(long, env = "OC_DISCOVERY_ADMIN_TOKEN_FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// PEM file of the CA (or certificate) to trust for an `https://` admin URL, instead of
    /// the public web roots.
    #[arg(long, env = "OC_DISCOVERY_ADMIN_CA", global = true)]
    pub admin_ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PartnersArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    #[command(subcommand)]
    pub action: PartnersAction,
}

#[derive(Debug, Subcommand)]
pub enum PartnersAction {
    /// Make a peer a partner (or blacklist it with --relation blacklist).
    Add {
        /// Multiaddr ending in /p2p/<peer id>.
        addr: String,
        /// partner, known or blacklist.
        #[arg(long, default_value = "partner")]
        relation: String,
    },
    /// End any relation with a peer.
    Remove {
        /// The peer id.
        peer_id: String,
    },
    /// List partners and blacklisted peers.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a snapshot job towards a partner: its current state of this node's resources,
    /// then the journal (refused with `busy` while one runs).
    Resync {
        /// The partner's peer id.
        peer_id: String,
    },
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Directory holding identity.key and the store.
    #[arg(long, env = "OC_DISCOVERY_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub client: AdminClientArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML file with any of the options below (keys as the flag names, `-` or `_`).
    #[arg(long, env = "OC_DISCOVERY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding identity.key and the embedded store (created if missing).
    #[arg(long, env = "OC_DISCOVERY_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The site's NATS servers, comma-separated (a cluster); `tls://` URLs need TLS.
    #[arg(long, env = "OC_DISCOVERY_NATS_URL", value_delimiter = ',', default_value = DEFAULT_NATS_URL)]
    pub nats_url: Vec<String>,
    /// NATS credentials file (`.creds`: a user JWT and its nkey seed).
    #[arg(long, env = "OC_DISCOVERY_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// File holding the nkey seed (`SU...`) of this node's NATS user.
    #[arg(long, env = "OC_DISCOVERY_NATS_NKEY", value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// NATS user name; the password is read from --nats-password-file.
    #[arg(long, env = "OC_DISCOVERY_NATS_USER")]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user.
    #[arg(long, env = "OC_DISCOVERY_NATS_PASSWORD_FILE", value_name = "FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// File holding a NATS authentication token.
    #[arg(long, env = "OC_DISCOVERY_NATS_TOKEN_FILE", value_name = "FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// PEM certificates NATS servers' certificates must chain to (instead of the system's);
    /// makes TLS required.
    #[arg(long, env = "OC_DISCOVERY_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to NATS, with --nats-tls-key; makes TLS required.
    #[arg(long, env = "OC_DISCOVERY_NATS_TLS_CERT", value_name = "FILE")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long, env = "OC_DISCOVERY_NATS_TLS_KEY", value_name = "FILE")]
    pub nats_tls_key: Option<PathBuf>,
    /// libp2p listen address: TCP (`/ip4/0.0.0.0/tcp/4001`), WebSocket (`.../tcp/443/ws`)
    /// or WebSocket over TLS (`.../tcp/443/wss`, needs --tls-cert and --tls-key); repeat
    /// for several. An empty value (`--listen ''`) listens nowhere: the node only dials out.
    #[arg(long = "listen", env = "OC_DISCOVERY_LISTEN", value_delimiter = ',', default_value = DEFAULT_LISTEN)]
    pub listen: Vec<Multiaddr>,
    /// Admin HTTP API address (health, peers, metrics, resources).
    #[arg(long, env = "OC_DISCOVERY_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: String,
    /// File holding the admin API token: every route but `GET /healthz` and `GET /metrics`
    /// then needs `Authorization: Bearer <token>`. Required when --admin-listen is not a
    /// loopback address.
    #[arg(long, env = "OC_DISCOVERY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain of the admin API: it then serves HTTPS only (with --admin-tls-key).
    #[arg(long, env = "OC_DISCOVERY_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, env = "OC_DISCOVERY_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// A partner site, as a multiaddr ending in /p2p/<peer id>; repeat for several.
    #[arg(long = "partner", env = "OC_DISCOVERY_PARTNER", value_delimiter = ',')]
    pub partner: Vec<Multiaddr>,
    /// Pre-shared key file (swarm.key format) making a private network.
    #[arg(long, env = "OC_DISCOVERY_PSK_FILE")]
    pub psk_file: Option<PathBuf>,
    /// PEM certificate chain presented by the `/wss` listeners (with --tls-key).
    #[arg(long, env = "OC_DISCOVERY_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "OC_DISCOVERY_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificates trusted for `/wss` partners besides the web's root authorities
    /// (a private CA, or a partner's self-signed certificate).
    #[arg(long, env = "OC_DISCOVERY_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Offer circuit relay v2: partners (and --relay-allow peers) behind NAT may reserve a
    /// slot here and be reached through this node.
    #[arg(long, env = "OC_DISCOVERY_RELAY_SERVER")]
    pub relay_server: bool,
    /// A peer id allowed to reserve a slot on this node's relay besides its partners;
    /// repeat for several.
    #[arg(
        long = "relay-allow",
        env = "OC_DISCOVERY_RELAY_ALLOW",
        value_delimiter = ',',
        value_name = "PEER_ID"
    )]
    pub relay_allow: Vec<PeerId>,
    /// A relay (multiaddr ending in /p2p/<relay id>) this node reserves a slot on and
    /// listens through, reachable as <relay>/p2p-circuit/p2p/<own id>; repeat for several.
    #[arg(
        long = "relay",
        env = "OC_DISCOVERY_RELAY",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub relay: Vec<Multiaddr>,
    /// Let AutoNAT probe and confirm private and loopback addresses too (sites reaching
    /// each other over a private network or a VPN); by default only global ones.
    #[arg(long, env = "OC_DISCOVERY_AUTONAT_PRIVATE_IPS")]
    pub autonat_private_ips: bool,
    /// Largest PROPALGATION_EVENT accepted, in bytes; larger ones get payload_too_large.
    #[arg(long, env = "OC_DISCOVERY_MAX_EVENT_BYTES", default_value_t = DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
    /// Largest frame on partner streams and journal sync parts; bigger entries are split.
    #[arg(long, env = "OC_DISCOVERY_MAX_FRAME_BYTES", default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Most bytes of one partner's entries held between its streams and the store (session
    /// inbox and reorder buffer); beyond, reading stops or entries are dropped and pulled later.
    #[arg(long, env = "OC_DISCOVERY_MAX_PARTNER_BUFFER_BYTES", default_value_t = DEFAULT_MAX_PARTNER_BUFFER_BYTES)]
    pub max_partner_buffer_bytes: usize,
    /// JetStream stream capturing PROPALGATION_EVENT (when the NATS server has JetStream).
    #[arg(long, env = "OC_DISCOVERY_INTAKE_STREAM", default_value = DEFAULT_INTAKE_STREAM)]
    pub intake_stream: String,
    /// Bytes the JetStream intake stream holds at most; when full, the server refuses new
    /// publishes (discard new) until the node drained it.
    #[arg(long, env = "OC_DISCOVERY_INTAKE_MAX_BYTES", default_value_t = DEFAULT_INTAKE_MAX_BYTES)]
    pub intake_max_bytes: u64,
    /// Age after which the JetStream intake stream drops a message the node never consumed.
    #[arg(long, env = "OC_DISCOVERY_INTAKE_MAX_AGE", default_value = DEFAULT_INTAKE_MAX_AGE, value_parser = parse_duration)]
    pub intake_max_age: Duration,
    /// Considers / planner messages one peer may make this node republish per second.
    #[arg(long, env = "OC_DISCOVERY_FORWARD_RATE", default_value_t = DEFAULT_FORWARD_RATE)]
    pub forward_rate: f64,
    /// Considers / planner messages one peer may send at once above --forward-rate.
    #[arg(long, env = "OC_DISCOVERY_FORWARD_BURST", default_value_t = DEFAULT_FORWARD_BURST)]
    pub forward_burst: u32,
    /// A planner stream idle for this long is closed (reopened on the next message).
    #[arg(long, env = "OC_DISCOVERY_PLANNER_IDLE", default_value = DEFAULT_PLANNER_IDLE, value_parser = parse_duration)]
    pub planner_idle: Duration,
    /// Heartbeat period towards each partner (e.g. 10s, 500ms).
    #[arg(long, env = "OC_DISCOVERY_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A partner that has not answered for this long is offline.
    #[arg(long, env = "OC_DISCOVERY_PONG_DISCARD_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub pong_discard_timeout: Duration,
    /// A journal sync request not completed within this keeps its progress and re-requests the rest.
    #[arg(long, env = "OC_DISCOVERY_SYNC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub sync_timeout: Duration,
    /// Period of the safety-net journal sync with each partner.
    #[arg(long, env = "OC_DISCOVERY_SYNC_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub sync_interval: Duration,
    /// Journal entries older than this (and acknowledged by every partner still waited
    /// for) are compacted: per resource only its latest entry or tombstone is kept.
    #[arg(long, env = "OC_DISCOVERY_JOURNAL_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub journal_retention: Duration,
    /// When the journal holds more bytes than this, it is compacted up to what every
    /// partner acknowledged, whatever the entries' age (0: no byte limit).
    #[arg(long, env = "OC_DISCOVERY_JOURNAL_MAX_BYTES", default_value_t = 0)]
    pub journal_max_bytes: u64,
    /// Tombstones (latest entries of deleted resources) in the compacted journal are
    /// dropped after this.
    #[arg(long, env = "OC_DISCOVERY_TOMBSTONE_RETENTION", default_value = "90d", value_parser = parse_duration)]
    pub tombstone_retention: Duration,
    /// A partner that has acknowledged nothing for this long is no longer waited for by
    /// compaction; once the journal is compacted past its cursor it gets a snapshot.
    #[arg(long, env = "OC_DISCOVERY_PARTNER_MAX_LAG", default_value = "30d", value_parser = parse_duration)]
    pub partner_max_lag: Duration,
    /// Period of the journal compaction (also the first run after start-up).
    #[arg(long, env = "OC_DISCOVERY_COMPACT_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub compact_interval: Duration,
    /// Rows of the applied log (`/api/applied`, the applied feed) applied longer ago than
    /// this are removed at each compaction run.
    #[arg(long, env = "OC_DISCOVERY_APPLIED_LOG_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub applied_log_retention: Duration,
    /// The applied log keeps at most this many rows (the newest), whatever their age (at
    /// least 1).
    #[arg(long, env = "OC_DISCOVERY_APPLIED_LOG_MAX_ROWS", default_value_t = DEFAULT_APPLIED_LOG_MAX_ROWS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub applied_log_max_rows: u64,
    /// Most bytes of one journal sync round (entries as JSON lines), on both sides: the
    /// owner cuts a round there, the puller refuses an answer announcing more. At least
    /// --max-event-bytes + 64 KiB, so one entry always fits.
    #[arg(long, env = "OC_DISCOVERY_SYNC_MAX_BYTES", default_value_t = DEFAULT_SYNC_MAX_BYTES)]
    pub sync_max_bytes: u64,
    /// First wait before a partner link retries after a failed session; it doubles with
    /// each failure in a row, up to --backoff-max.
    #[arg(long, env = "OC_DISCOVERY_BACKOFF_MIN", default_value = "200ms", value_parser = parse_duration)]
    pub backoff_min: Duration,
    /// Longest wait between a partner link's attempts. A partner that connects (as it does
    /// when it starts) ends the wait at once.
    #[arg(long, env = "OC_DISCOVERY_BACKOFF_MAX", default_value = "10s", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// This node's name in its peer record (searchable); default: the host name.
    #[arg(long, env = "OC_DISCOVERY_NAME")]
    pub name: Option<String>,
    /// Validity of this node's signed peer record; it is re-signed and republished every half of it.
    #[arg(long, env = "OC_DISCOVERY_RECORD_TTL", default_value = DEFAULT_RECORD_TTL, value_parser = parse_duration)]
    pub record_ttl: Duration,
    /// A DHT bootstrap node (multiaddr, ideally ending in /p2p/<peer id>); repeat for several.
    /// Partners are bootstrap nodes too.
    #[arg(long = "bootstrap", env = "OC_DISCOVERY_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// Where the journal, cursors and received resources live.
    #[arg(long, env = "OC_DISCOVERY_STORE", value_enum, default_value_t = StoreKind::Embedded)]
    pub store: StoreKind,
    /// MongoDB connection string (with `--store mongodb`), e.g. mongodb://host:27017/?replicaSet=rs0.
    #[arg(long, env = "OC_DISCOVERY_MONGO_URI")]
    pub mongo_uri: Option<String>,
    /// MongoDB database holding the resource collections and the node's `oc_*` bookkeeping.
    #[arg(long, env = "OC_DISCOVERY_MONGO_DB", default_value = DEFAULT_MONGO_DB)]
    pub mongo_db: String,
    /// Most results one peer may contribute to one search of this node; beyond, dropped.
    #[arg(long, env = "OC_DISCOVERY_SEARCH_PEER_MAX_RESULTS", default_value_t = DEFAULT_SEARCH_PEER_MAX_RESULTS)]
    pub search_peer_max_results: u64,
    /// Most bytes of results (JSON) one peer may contribute to one search; beyond, dropped.
    #[arg(long, env = "OC_DISCOVERY_SEARCH_PEER_MAX_BYTES", default_value_t = DEFAULT_SEARCH_PEER_MAX_BYTES)]
    pub search_peer_max_bytes: u64,
    /// Gossip search queries per second, all together, from searchers whose peer record this
    /// node does not hold (each also limited to 1 per second, burst 2); beyond, ignored.
    #[arg(long, env = "OC_DISCOVERY_SEARCH_UNKNOWN_QUERIES_PER_SECOND", default_value_t = DEFAULT_SEARCH_UNKNOWN_QUERIES_PER_SECOND)]
    pub search_unknown_queries_per_second: f64,
    /// Live feed (`GET /api/feed`, the web page) clients connected at once; beyond, refused
    /// with `busy`.
    #[arg(long, env = "OC_DISCOVERY_FEED_MAX_CLIENTS", default_value_t = crate::feed::DEFAULT_MAX_CLIENTS as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub feed_max_clients: u32,
    /// Bytes of recent entries each live feed (journal, applied) keeps for its clients; a
    /// client further behind gets `lagged`.
    #[arg(long, env = "OC_DISCOVERY_FEED_RING_BYTES", default_value_t = crate::feed::DEFAULT_RING_BYTES as u64, value_parser = clap::value_parser!(u64).range(4096..=1 << 32))]
    pub feed_ring_bytes: u64,
    /// Most rows of relation `known` in the peers table; beyond, the least recently seen
    /// are dropped (partners and blacklisted peers never are).
    #[arg(long, env = "OC_DISCOVERY_MAX_KNOWN_PEERS", default_value_t = DEFAULT_MAX_KNOWN_PEERS)]
    pub max_known_peers: usize,
    /// Most established connections with one peer (partners are exempt).
    #[arg(long, env = "OC_DISCOVERY_MAX_CONNECTIONS_PER_PEER", default_value_t = crate::p2p::DEFAULT_MAX_CONNECTIONS_PER_PEER)]
    pub max_connections_per_peer: u32,
    /// Most inbound connections still in their handshake (TCP accepted, not yet authenticated).
    #[arg(long, env = "OC_DISCOVERY_MAX_PENDING_INCOMING", default_value_t = crate::p2p::DEFAULT_MAX_PENDING_INCOMING)]
    pub max_pending_incoming: u32,
    /// Most established connections in total, both directions (partners are exempt).
    #[arg(long, env = "OC_DISCOVERY_MAX_CONNECTIONS", default_value_t = crate::p2p::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: u32,
    /// The only directory partners' copies are written below (`/opencloud/copy/1.0`);
    /// without it, copies to this node are refused.
    #[arg(long, env = "OC_DISCOVERY_COPY_ROOT", value_name = "DIR")]
    pub copy_root: Option<PathBuf>,
    /// The only directory copies to partners are read from (`POST /api/copies`,
    /// `REMOTECOPY`); without it, this node sends no copies.
    #[arg(long, env = "OC_DISCOVERY_COPY_SOURCE_ROOT", value_name = "DIR")]
    pub copy_source_root: Option<PathBuf>,
    /// Largest copy sent or received, in bytes (a directory: its tar).
    #[arg(long, env = "OC_DISCOVERY_COPY_MAX_BYTES", default_value_t = DEFAULT_COPY_MAX_BYTES)]
    pub copy_max_bytes: u64,
    /// Copies one partner may send to this node at once; beyond, `busy`.
    #[arg(long, env = "OC_DISCOVERY_COPY_MAX_PER_PEER", default_value_t = DEFAULT_COPY_MAX_PER_PEER)]
    pub copy_max_per_peer: usize,
}

/// Parses `250ms`, `10s`, `2m`, `1h`, `7d`, or a bare number of seconds.
///
/// # Errors
/// Anything else.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m, h or d)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The host name, or `oc-discovery` when it cannot be read.
fn default_name() -> String {
    hostname::get()
        .ok()
        .map(|h| h.to_string_lossy().into_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "oc-discovery".to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("partner address {0} must end in /p2p/<peer id>")]
    PartnerWithoutPeerId(Multiaddr),
    #[error("--max-event-bytes must be at least 64")]
    MaxEventBytes,
    #[error("--max-frame-bytes must be at least 4096")]
    MaxFrameBytes,
    #[error("--sync-max-bytes must be at least --max-event-bytes + 65536")]
    SyncMaxBytes,
    #[error("--max-partner-buffer-bytes must be at least --max-frame-bytes")]
    MaxPartnerBufferBytes,
    #[error("--ping-interval must be shorter than --pong-discard-timeout")]
    Heartbeat,
    #[error("--backoff-min must not be longer than --backoff-max")]
    Backoff,
    #[error("--search-peer-max-results and --search-peer-max-bytes must be at least 1")]
    SearchPeerCap,
    #[error("--search-unknown-queries-per-second must be a number, 0 or more")]
    SearchUnknownRate,
    #[error("{0} must be at least 10ms")]
    TooShort(&'static str),
    #[error("--name must be 1 to {} bytes", crate::p2p::records::MAX_NAME_BYTES)]
    Name,
    #[error("--record-ttl must be between {MIN_RECORD_TTL:?} and {MAX_RECORD_TTL:?}")]
    RecordTtl,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--store mongodb needs --mongo-uri (or OC_DISCOVERY_MONGO_URI)")]
    MongoUriMissing,
    #[error("--intake-max-bytes must be at least {MIN_INTAKE_MAX_BYTES}")]
    IntakeMaxBytes,
    #[error("--intake-max-age must be at least 1s")]
    IntakeMaxAge,
    #[error("--forward-rate must be a number above 0 and --forward-burst at least 1")]
    ForwardRate,
    #[error("--nats-url {url}: {reason}")]
    NatsUrl { url: String, reason: String },
    #[error("--nats-url names no server")]
    NatsUrlEmpty,
    #[error("give one kind of NATS credentials at most (--nats-creds, --nats-nkey, --nats-user with --nats-password-file, or --nats-token-file); got {}", .0.join(" and "))]
    NatsAuthKinds(Vec<&'static str>),
    #[error("--nats-user needs --nats-password-file (secrets are read from files)")]
    NatsUserWithoutPassword,
    #[error("--nats-password-file needs --nats-user")]
    NatsPasswordWithoutUser,
    #[error("--nats-tls-cert and --nats-tls-key go together")]
    NatsClientCert,
    #[error("--admin-tls-cert and --admin-tls-key go together: give both or neither")]
    AdminTlsPair,
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    TlsPair,
    #[error("--listen {0} is a /wss address: it needs --tls-cert and --tls-key (PEM files)")]
    WssWithoutTls(Multiaddr),
    #[error("--relay {0} must end in /p2p/<relay peer id>")]
    RelayWithoutPeerId(Multiaddr),
    #[error("--listen {0}: QUIC is not supported (it cannot carry the PSK private network); use /tcp, /ws or /wss")]
    Quic(Multiaddr),
}

/// Parses the process arguments; `run` options given neither as a flag nor in the
/// environment are taken from the `--config` file.
///
/// # Errors
/// An unreadable or invalid config file.
pub fn parse() -> Result<Cli, ConfigError> {
    parse_from(std::env::args_os())
}

/// [`parse`] over given arguments (tests).
///
/// # Errors
/// See [`parse`].
pub(crate) fn parse_from<I, T>(args: I) -> Result<Cli, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let first = Cli::command().get_matches_from(args.clone());
    let file = match Cli::from_arg_matches(&first) {
        Ok(Cli {
            command: Command::Run(run),
        }) => run.config,
        Ok(_) => None,
        Err(e) => e.exit(),
    };
    let Some(path) = file else {
        return Cli::from_arg_matches(&first).or_else(|e| e.exit());
    };
    // The one file layer: each key of the file becomes the default of the `run` option of
    // the same name, so flags and the environment beat it and clap parses and checks its
    // value exactly as it would a flag's.
    let command = with_file_defaults(Cli::command(), &path)?;
    let matches = command
        .try_get_matches_from(args)
        .map_err(|e| ConfigError::Parse {
            path: path.clone(),
            reason: clap_reason(&e),
        })?;
    Cli::from_arg_matches(&matches).map_err(|e| ConfigError::Parse {
        path,
        reason: e.to_string(),
    })
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// `command` with the `--config` file's values as the defaults of the `run` options.
/// Keys are the options' names (`nats_url` or `nats-url`); a repeatable option takes an
/// array or a comma-separated string. An unknown key is an error, so a typo is never
/// silently ignored.
fn with_file_defaults(command: clap::Command, path: &PathBuf) -> Result<clap::Command, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| ConfigError::Parse {
        path: path.clone(),
        reason,
    };
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let run = command
        .find_subcommand("run")
        .cloned()
        .ok_or_else(|| bad("no run command".to_owned()))?;
    let mut defaults = Vec::new();
    for (key, value) in table {
        let id = key.replace('-', "_");
        let Some(arg) = run
            .get_arguments()
            .find(|a| a.get_id() == id.as_str() && id != "config")
        else {
            return Err(bad(format!("unknown key {key:?}")));
        };
        let repeatable = arg.get_value_delimiter().is_some();
        let values = file_values(&value, repeatable).ok_or_else(|| {
            bad(format!(
                "{key}: expected {}",
                if repeatable {
                    "a string, a number or an array of them"
                } else {
                    "a string, a number or a boolean"
                }
            ))
        })?;
        defaults.push((id, values));
    }
    Ok(command.mut_subcommand("run", |mut run| {
        for (id, values) in defaults {
            run = run.mut_arg(id, |arg| arg.default_values(values));
        }
        run
    }))
}

/// A file value as the strings clap parses; `None` when its type fits no option.
fn file_values(value: &toml::Value, repeatable: bool) -> Option<Vec<String>> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        toml::Value::Array(items) if repeatable => items.iter().map(scalar).collect(),
        toml::Value::String(s) if repeatable => Some(
            s.split(',')
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect(),
        ),
        v => scalar(v).map(|s| vec![s]),
    }
}

/// Run options after validation, as the node uses them.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    /// The site's NATS: servers, credentials, TLS.
    pub nats: crate::nats::NatsSettings,
    pub listen: Vec<Multiaddr>,
    pub admin_listen: String,
    /// `--admin-token-file` (read at start, see [`crate::secret_file::read_token`]).
    pub admin_token_file: Option<PathBuf>,
    /// `--admin-tls-cert` and `--admin-tls-key`, both or neither.
    pub admin_tls: Option<AdminTlsFiles>,
    pub partners: Vec<(PeerId, Multiaddr)>,
    pub psk_file: Option<PathBuf>,
    /// `/wss` certificates, the relay offered, the relays listened through.
    pub transport: crate::p2p::TransportOptions,
    pub max_event_bytes: usize,
    pub intake_stream: String,
    /// Limits of the JetStream intake stream (`discard: new`).
    pub intake_max_bytes: u64,
    pub intake_max_age: Duration,
    /// Name in this node's peer record.
    pub name: String,
    pub record_ttl: Duration,
    /// DHT bootstrap nodes (partners are added to them at start).
    pub bootstrap: Vec<Multiaddr>,
    pub store: StoreConfig,
    /// Most `known` rows in the peers table (`--max-known-peers`).
    pub max_known_peers: usize,
    /// Connection limits (`--max-connections-per-peer`, `--max-pending-incoming`,
    /// `--max-connections`).
    pub net_limits: crate::p2p::NetLimits,
    /// Remote copy: `--copy-root`, `--copy-source-root`, `--copy-max-bytes`,
    /// `--copy-max-per-peer`.
    pub copy: CopySettings,
    pub tuning: Tuning,
}

pub use crate::admin::tls::AdminTlsFiles;

/// Default of `--copy-max-bytes`: the largest file or directory tar sent or received.
pub const DEFAULT_COPY_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Default of `--copy-max-per-peer`: copies one partner may send to this node at once.
pub const DEFAULT_COPY_MAX_PER_PEER: usize = 2;

/// The copy options of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySettings {
    /// `--copy-root`: the only directory copies from partners are written below; none, and
    /// copies are refused.
    pub root: Option<PathBuf>,
    /// `--copy-source-root`: the only directory copies are read from; none, and this node
    /// sends no copies.
    pub source_root: Option<PathBuf>,
    /// `--copy-max-bytes`: the largest copy sent or received (a directory: its tar).
    pub max_bytes: u64,
    /// `--copy-max-per-peer`: copies one partner may send to this node at once.
    pub max_per_peer: usize,
}

impl Default for CopySettings {
    fn default() -> Self {
        CopySettings {
            root: None,
            source_root: None,
            max_bytes: DEFAULT_COPY_MAX_BYTES,
            max_per_peer: DEFAULT_COPY_MAX_PER_PEER,
        }
    }
}

/// The store backend with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `<data-dir>/store.redb`.
    Embedded,
    Mongodb {
        uri: String,
        db: String,
    },
}

/// Limits and intervals with defaults sized for the performance targets.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Most events journaled in one commit.
    pub intake_batch: usize,
    /// Most unacknowledged events in flight to one partner.
    pub send_window: u64,
    /// Most journal entries read per disk read when feeding a partner.
    pub read_chunk: usize,
    /// Most inbound events applied in one commit.
    pub apply_batch: usize,
    /// Largest frame on partner streams and sync parts; larger journal entries travel split.
    pub max_frame_bytes: usize,
    /// Most bytes of one partner's entries in its session inbox and reorder buffer.
    pub max_partner_buffer_bytes: usize,
    /// Most JetStream intake messages delivered and not yet acknowledged.
    pub max_ack_pending: i64,
    pub ping_interval: Duration,
    pub pong_discard_timeout: Duration,
    pub sync_timeout: Duration,
    pub sync_interval: Duration,
    /// Most journal entries one sync request covers.
    pub sync_max_entries: usize,
    /// Most bytes (JSON lines) one sync round holds, on the owner and the puller.
    pub sync_max_bytes: u64,
    /// Wait for a peer's answer (stream open, hello ack, NATS flush).
    pub io_timeout: Duration,
    /// Reconnect backoff bounds.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often a partner's cursor is persisted while acks arrive.
    pub cursor_persist_every: Duration,
    /// Per-peer token bucket of forwarded commands (considers / planner) republished.
    pub forward_rate: f64,
    pub forward_burst: u32,
    /// A planner stream idle this long is closed by either side.
    pub planner_idle: Duration,
    /// Most results, and bytes of results, one peer contributes to one search.
    pub search_peer_max_results: u64,
    pub search_peer_max_bytes: u64,
    /// Gossip queries per second from searchers without a known peer record, all together.
    pub search_unknown_queries_per_second: f64,
    /// Live feed clients at once (`GET /api/feed`), and bytes each feed's ring keeps.
    pub feed_max_clients: usize,
    pub feed_ring_bytes: usize,
    /// Retention: see [`crate::store::retention`].
    pub journal_retention: Duration,
    pub journal_max_bytes: u64,
    pub tombstone_retention: Duration,
    pub partner_max_lag: Duration,
    pub compact_interval: Duration,
    /// Applied log retention: see [`crate::store::retention::trim_applied_log`].
    pub applied_log_retention: Duration,
    pub applied_log_max_rows: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            intake_batch: 2048,
            send_window: 8192,
            read_chunk: 1024,
            apply_batch: 2048,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_partner_buffer_bytes: DEFAULT_MAX_PARTNER_BUFFER_BYTES,
            max_ack_pending: 65_536,
            ping_interval: Duration::from_secs(10),
            pong_discard_timeout: Duration::from_secs(30),
            sync_timeout: Duration::from_secs(30),
            sync_interval: Duration::from_secs(60),
            sync_max_entries: 4096,
            sync_max_bytes: DEFAULT_SYNC_MAX_BYTES,
            io_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            cursor_persist_every: Duration::from_millis(200),
            forward_rate: DEFAULT_FORWARD_RATE,
            forward_burst: DEFAULT_FORWARD_BURST,
            planner_idle: Duration::from_secs(600),
            search_peer_max_results: DEFAULT_SEARCH_PEER_MAX_RESULTS,
            search_peer_max_bytes: DEFAULT_SEARCH_PEER_MAX_BYTES,
            search_unknown_queries_per_second: DEFAULT_SEARCH_UNKNOWN_QUERIES_PER_SECOND,
            feed_max_clients: crate::feed::DEFAULT_MAX_CLIENTS,
            feed_ring_bytes: crate::feed::DEFAULT_RING_BYTES,
            journal_retention: Duration::from_secs(30 * 86_400),
            journal_max_bytes: 0,
            tombstone_retention: Duration::from_secs(90 * 86_400),
            partner_max_lag: Duration::from_secs(30 * 86_400),
            compact_interval: Duration::from_secs(600),
            applied_log_retention: Duration::from_secs(30 * 86_400),
            applied_log_max_rows: DEFAULT_APPLIED_LOG_MAX_ROWS,
        }
    }
}

impl TryFrom<RunArgs> for NodeConfig {
    type Error = ConfigError;

    fn try_from(run: RunArgs) -> Result<Self, ConfigError> {
        if run.max_event_bytes < 64 {
            return Err(ConfigError::MaxEventBytes);
        }
        let nats = nats_settings(&run)?;
        let transport = transport_options(&run)?;
        let partners = run
            .partner
            .into_iter()
            .map(|addr| match addr.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(peer)) => Ok((peer, addr)),
                _ => Err(ConfigError::PartnerWithoutPeerId(addr)),
            })
            .collect::<Result<_, _>>()?;
        if run.max_frame_bytes < 4096 {
            return Err(ConfigError::MaxFrameBytes);
        }
        if run.sync_max_bytes < (run.max_event_bytes as u64).saturating_add(SYNC_ENTRY_ROOM) {
            return Err(ConfigError::SyncMaxBytes);
        }
        if run.max_partner_buffer_bytes < run.max_frame_bytes {
            return Err(ConfigError::MaxPartnerBufferBytes);
        }
        if run.ping_interval >= run.pong_discard_timeout {
            return Err(ConfigError::Heartbeat);
        }
        for (flag, d) in [
            ("--ping-interval", run.ping_interval),
            ("--sync-timeout", run.sync_timeout),
            ("--sync-interval", run.sync_interval),
            ("--backoff-min", run.backoff_min),
            ("--planner-idle", run.planner_idle),
            ("--journal-retention", run.journal_retention),
            ("--tombstone-retention", run.tombstone_retention),
            ("--partner-max-lag", run.partner_max_lag),
            ("--compact-interval", run.compact_interval),
            ("--applied-log-retention", run.applied_log_retention),
        ] {
            if d < MIN_PERIOD {
                return Err(ConfigError::TooShort(flag));
            }
        }
        if run.search_peer_max_results == 0 || run.search_peer_max_bytes == 0 {
            return Err(ConfigError::SearchPeerCap);
        }
        if !(run.search_unknown_queries_per_second.is_finite()
            && run.search_unknown_queries_per_second >= 0.0)
        {
            return Err(ConfigError::SearchUnknownRate);
        }
        if run.backoff_min > run.backoff_max {
            return Err(ConfigError::Backoff);
        }
        let name = run.name.unwrap_or_else(default_name);
        if name.is_empty() || name.len() > crate::p2p::records::MAX_NAME_BYTES {
            return Err(ConfigError::Name);
        }
        if run.record_ttl < MIN_RECORD_TTL || run.record_ttl > MAX_RECORD_TTL {
            return Err(ConfigError::RecordTtl);
        }
        if run.intake_max_bytes < MIN_INTAKE_MAX_BYTES || run.intake_max_bytes > i64::MAX as u64 {
            return Err(ConfigError::IntakeMaxBytes);
        }
        if run.intake_max_age < Duration::from_secs(1) {
            return Err(ConfigError::IntakeMaxAge);
        }
        if !(run.forward_rate.is_finite() && run.forward_rate > 0.0) || run.forward_burst == 0 {
            return Err(ConfigError::ForwardRate);
        }
        for (flag, n) in [
            ("--max-known-peers", run.max_known_peers),
            (
                "--max-connections-per-peer",
                run.max_connections_per_peer as usize,
            ),
            ("--max-pending-incoming", run.max_pending_incoming as usize),
            ("--max-connections", run.max_connections as usize),
            ("--copy-max-per-peer", run.copy_max_per_peer),
        ] {
            if n == 0 {
                return Err(ConfigError::Zero(flag));
            }
        }
        if run.copy_max_bytes == 0 {
            return Err(ConfigError::Zero("--copy-max-bytes"));
        }
        let tuning = Tuning {
            max_frame_bytes: run.max_frame_bytes,
            forward_rate: run.forward_rate,
            forward_burst: run.forward_burst,
            planner_idle: run.planner_idle,
            max_partner_buffer_bytes: run.max_partner_buffer_bytes,
            ping_interval: run.ping_interval,
            pong_discard_timeout: run.pong_discard_timeout,
            sync_timeout: run.sync_timeout,
            sync_interval: run.sync_interval,
            sync_max_bytes: run.sync_max_bytes,
            backoff_min: run.backoff_min,
            backoff_max: run.backoff_max,
            search_peer_max_results: run.search_peer_max_results,
            search_peer_max_bytes: run.search_peer_max_bytes,
            search_unknown_queries_per_second: run.search_unknown_queries_per_second,
            feed_max_clients: usize::try_from(run.feed_max_clients).unwrap_or(usize::MAX),
            feed_ring_bytes: usize::try_from(run.feed_ring_bytes).unwrap_or(usize::MAX),
            journal_retention: run.journal_retention,
            journal_max_bytes: run.journal_max_bytes,
            tombstone_retention: run.tombstone_retention,
            partner_max_lag: run.partner_max_lag,
            compact_interval: run.compact_interval,
            applied_log_retention: run.applied_log_retention,
            applied_log_max_rows: run.applied_log_max_rows,
            ..Tuning::default()
        };
        let admin_tls = match (run.admin_tls_cert, run.admin_tls_key) {
            (Some(cert), Some(key)) => Some(AdminTlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(ConfigError::AdminTlsPair),
        };
        let listen: Vec<Multiaddr> = run.listen.into_iter().filter(|a| !a.is_empty()).collect();
        let store = match run.store {
            StoreKind::Embedded => StoreConfig::Embedded,
            StoreKind::Mongodb => StoreConfig::Mongodb {
                uri: run.mongo_uri.ok_or(ConfigError::MongoUriMissing)?,
                db: run.mongo_db,
            },
        };
        Ok(NodeConfig {
            data_dir: run.data_dir,
            nats,
            listen,
            admin_listen: run.admin_listen,
            admin_token_file: run.admin_token_file,
            admin_tls,
            partners,
            psk_file: run.psk_file,
            transport,
            max_event_bytes: run.max_event_bytes,
            store,
            intake_stream: run.intake_stream,
            intake_max_bytes: run.intake_max_bytes,
            intake_max_age: run.intake_max_age,
            name,
            record_ttl: run.record_ttl,
            bootstrap: run.bootstrap,
            max_known_peers: run.max_known_peers,
            net_limits: crate::p2p::NetLimits {
                max_connections_per_peer: run.max_connections_per_peer,
                max_pending_incoming: run.max_pending_incoming,
                max_connections: run.max_connections,
            },
            copy: CopySettings {
                root: run.copy_root,
                source_root: run.copy_source_root,
                max_bytes: run.copy_max_bytes,
                max_per_peer: run.copy_max_per_peer,
            },
            tuning,
        })
    }
}

/// The transport options of `run`, checked: a `/wss` listener has its certificate, a
/// relay names its peer id, no QUIC (see `protocols/transports.md`).
///
/// # Errors
/// Half a TLS pair, `/wss` without one, a relay without `/p2p/<id>`, a QUIC address.
fn transport_options(run: &RunArgs) -> Result<crate::p2p::TransportOptions, ConfigError> {
    use libp2p::multiaddr::Protocol;
    let wss_tls = match (&run.tls_cert, &run.tls_key) {
        (Some(cert), Some(key)) => Some(crate::p2p::WssTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None) => None,
        _ => return Err(ConfigError::TlsPair),
    };
    for addr in run.listen.iter().chain(&run.partner).chain(&run.relay) {
        if addr
            .iter()
            .any(|p| matches!(p, Protocol::Quic | Protocol::QuicV1))
        {
            return Err(ConfigError::Quic(addr.clone()));
        }
    }
    if wss_tls.is_none() {
        if let Some(addr) = run
            .listen
            .iter()
            .find(|a| a.iter().any(|p| matches!(p, Protocol::Wss(_) | Protocol::Tls)))
        {
            return Err(ConfigError::WssWithoutTls(addr.clone()));
        }
    }
    for relay in &run.relay {
        if !matches!(relay.iter().last(), Some(Protocol::P2p(_))) {
            return Err(ConfigError::RelayWithoutPeerId(relay.clone()));
        }
    }
    Ok(crate::p2p::TransportOptions {
        wss_tls,
        tls_ca: run.tls_ca.clone(),
        relay_server: run.relay_server,
        relay_allow: run.relay_allow.clone(),
        relays: run.relay.clone(),
        autonat_private_ips: run.autonat_private_ips,
    })
}

/// The NATS servers, credentials and TLS of `run`, checked.
///
/// # Errors
/// A malformed URL or one carrying a user or password, more than one kind of credentials,
/// a user without password file (or the reverse), half a client certificate.
fn nats_settings(run: &RunArgs) -> Result<crate::nats::NatsSettings, ConfigError> {
    use crate::nats::{NatsAuth, NatsSettings, NatsTls};
    let servers = run
        .nats_url
        .iter()
        .map(|url| url.trim())
        .filter(|url| !url.is_empty())
        .map(|url| {
            let bad = |reason: String| ConfigError::NatsUrl {
                url: url.to_owned(),
                reason,
            };
            let addr: async_nats::ServerAddr = url.parse().map_err(|e| bad(format!("{e}")))?;
            if addr.has_user_pass() {
                return Err(bad(
                    "no user or password in the URL: use --nats-user and --nats-password-file".into(),
                ));
            }
            Ok(addr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(ConfigError::NatsUrlEmpty);
    }
    let given: Vec<&'static str> = [
        ("--nats-creds", run.nats_creds.is_some()),
        ("--nats-nkey", run.nats_nkey.is_some()),
        (
            "--nats-user",
            run.nats_user.is_some() || run.nats_password_file.is_some(),
        ),
        ("--nats-token-file", run.nats_token_file.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    if given.len() > 1 {
        return Err(ConfigError::NatsAuthKinds(given));
    }
    let auth = match (&run.nats_user, &run.nats_password_file) {
        (Some(user), Some(file)) => NatsAuth::UserPassword {
            user: user.clone(),
            password_file: file.clone(),
        },
        (Some(_), None) => return Err(ConfigError::NatsUserWithoutPassword),
        (None, Some(_)) => return Err(ConfigError::NatsPasswordWithoutUser),
        (None, None) => match (&run.nats_creds, &run.nats_nkey, &run.nats_token_file) {
            (Some(f), _, _) => NatsAuth::Creds(f.clone()),
            (_, Some(f), _) => NatsAuth::Nkey(f.clone()),
            (_, _, Some(f)) => NatsAuth::Token(f.clone()),
            _ => NatsAuth::None,
        },
    };
    let client = match (&run.nats_tls_cert, &run.nats_tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        (None, None) => None,
        _ => return Err(ConfigError::NatsClientCert),
    };
    Ok(NatsSettings {
        servers,
        auth,
        tls: NatsTls {
            ca: run.nats_tls_ca.clone(),
            client,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut all = vec!["oc-discovery", "run"];
        all.extend_from_slice(args);
        match parse_from(all).unwrap().command {
            Command::Run(r) => *r,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn file_fills_defaults_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "nats-url = \"nats://file:1\"\nmax_event_bytes = 2048\nlisten = [\"/ip4/127.0.0.1/tcp/9\"]\n",
        )
        .unwrap();
        let cfg = file.to_str().unwrap();
        let r = run_args(&["--config", cfg, "--max-event-bytes", "4096"]);
        assert_eq!(r.nats_url, ["nats://file:1"]);
        assert_eq!(r.max_event_bytes, 4096);
        assert_eq!(
            r.listen,
            vec!["/ip4/127.0.0.1/tcp/9".parse::<Multiaddr>().unwrap()]
        );
        assert_eq!(r.admin_listen, DEFAULT_ADMIN_LISTEN);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn discovery_options_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "name = \"site-file\"\nrecord-ttl = \"30s\"\nbootstrap = [\"/ip4/127.0.0.1/tcp/7\"]\n",
        )
        .unwrap();
        let r = run_args(&["--config", file.to_str().unwrap(), "--record-ttl", "10s"]);
        let cfg = NodeConfig::try_from(r).unwrap();
        assert_eq!(cfg.name, "site-file");
        assert_eq!(cfg.record_ttl, Duration::from_secs(10));
        assert_eq!(cfg.bootstrap.len(), 1);
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert!(!cfg.name.is_empty(), "defaults to the host name");
        assert_eq!(cfg.record_ttl, Duration::from_secs(120));
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--record-ttl", "1s"])),
            Err(ConfigError::RecordTtl)
        ));
    }

    #[test]
    fn copy_options_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "copy-root = \"/srv/in\"\ncopy_max_bytes = 4096\n").unwrap();
        let path = file.to_str().unwrap();
        let cfg =
            NodeConfig::try_from(run_args(&["--config", path, "--copy-source-root", "/srv/out"])).unwrap();
        assert_eq!(cfg.copy.root.as_deref(), Some(std::path::Path::new("/srv/in")));
        assert_eq!(
            cfg.copy.source_root.as_deref(),
            Some(std::path::Path::new("/srv/out"))
        );
        assert_eq!(cfg.copy.max_bytes, 4096);
        assert_eq!(cfg.copy.max_per_peer, DEFAULT_COPY_MAX_PER_PEER);
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(cfg.copy, CopySettings::default(), "copies off by default");
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--copy-max-per-peer", "0"])),
            Err(ConfigError::Zero("--copy-max-per-peer"))
        ));
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--copy-max-bytes", "0"])),
            Err(ConfigError::Zero("--copy-max-bytes"))
        ));
    }

    #[test]
    fn store_from_file_env_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "store = \"mongodb\"\nmongo-uri = \"mongodb://file:27017\"\nmongo_db = \"site\"\n",
        )
        .unwrap();
        let cfg = file.to_str().unwrap();
        let r = run_args(&["--config", cfg, "--mongo-db", "flagged"]);
        assert_eq!(r.store, StoreKind::Mongodb);
        assert_eq!(
            NodeConfig::try_from(r).unwrap().store,
            StoreConfig::Mongodb {
                uri: "mongodb://file:27017".into(),
                db: "flagged".into()
            }
        );
        let r = run_args(&[]);
        assert_eq!(r.store, StoreKind::Embedded);
        assert_eq!(r.mongo_db, "opencloud");
        assert_eq!(NodeConfig::try_from(r).unwrap().store, StoreConfig::Embedded);
        let r = run_args(&["--store", "mongodb"]);
        assert!(matches!(
            NodeConfig::try_from(r),
            Err(ConfigError::MongoUriMissing)
        ));
    }

    #[test]
    fn partner_buffer_bytes_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "max_partner_buffer_bytes = 2097152\n").unwrap();
        let cfg = NodeConfig::try_from(run_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(cfg.tuning.max_partner_buffer_bytes, 2 << 20);
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(cfg.tuning.max_partner_buffer_bytes, 64 << 20);
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--max-partner-buffer-bytes", "4096"])),
            Err(ConfigError::MaxPartnerBufferBytes)
        ));
    }

    #[test]
    fn search_limits_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "search-peer-max-results = 50\nsearch_peer_max_bytes = 4096\nsearch-unknown-queries-per-second = 0.5\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let cfg =
            NodeConfig::try_from(run_args(&["--config", path, "--search-peer-max-results", "7"])).unwrap();
        let t = &cfg.tuning;
        assert_eq!(
            (
                t.search_peer_max_results,
                t.search_peer_max_bytes,
                t.search_unknown_queries_per_second
            ),
            (7, 4096, 0.5)
        );
        let d = NodeConfig::try_from(run_args(&[])).unwrap().tuning;
        assert_eq!(
            (
                d.search_peer_max_results,
                d.search_peer_max_bytes,
                d.search_unknown_queries_per_second
            ),
            (1000, 16 * 1024 * 1024, 2.0)
        );
        let bad: [&[&str]; 3] = [
            &["--search-peer-max-results", "0"],
            &["--search-peer-max-bytes", "0"],
            &["--search-unknown-queries-per-second=-1"],
        ];
        for bad in bad {
            assert!(NodeConfig::try_from(run_args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backoff_bounds_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "backoff-min = \"1s\"\nbackoff_max = \"1m\"\n").unwrap();
        let cfg = NodeConfig::try_from(run_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(
            (cfg.tuning.backoff_min, cfg.tuning.backoff_max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(
            (cfg.tuning.backoff_min, cfg.tuning.backoff_max),
            (Duration::from_millis(200), Duration::from_secs(10))
        );
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--backoff-min", "20s"])),
            Err(ConfigError::Backoff)
        ));
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--backoff-min", "1ms"])),
            Err(ConfigError::TooShort("--backoff-min"))
        ));
    }

    #[test]
    fn intake_and_forward_limits_from_flags_and_file() {
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(cfg.intake_max_bytes, DEFAULT_INTAKE_MAX_BYTES);
        assert_eq!(cfg.intake_max_age, Duration::from_secs(7 * 86_400));
        assert_eq!(cfg.tuning.forward_rate, DEFAULT_FORWARD_RATE);
        assert_eq!(cfg.tuning.forward_burst, DEFAULT_FORWARD_BURST);
        assert_eq!(cfg.tuning.planner_idle, Duration::from_secs(600));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "intake-max-bytes = 4096\nintake_max_age = \"1h\"\nforward-rate = 2.5\nforward_burst = 3\nplanner-idle = \"30s\"\n",
        )
        .unwrap();
        let r = run_args(&["--config", file.to_str().unwrap(), "--forward-burst", "7"]);
        let cfg = NodeConfig::try_from(r).unwrap();
        assert_eq!(cfg.intake_max_bytes, 4096);
        assert_eq!(cfg.intake_max_age, Duration::from_secs(3600));
        assert_eq!(cfg.tuning.forward_rate, 2.5);
        assert_eq!(cfg.tuning.forward_burst, 7);
        assert_eq!(cfg.tuning.planner_idle, Duration::from_secs(30));
        for bad in [
            &["--intake-max-bytes", "10"][..],
            &["--intake-max-age", "10ms"],
            &["--forward-rate", "0"],
            &["--forward-burst", "0"],
        ] {
            assert!(NodeConfig::try_from(run_args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admin_token_and_tls_files_from_flags_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "admin_token_file = \"/etc/oc/admin.token\"\nadmin-tls-cert = \"/etc/oc/cert.pem\"\nadmin_tls_key = \"/etc/oc/key.pem\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let cfg = NodeConfig::try_from(run_args(&["--config", path])).unwrap();
        assert_eq!(cfg.admin_token_file, Some(PathBuf::from("/etc/oc/admin.token")));
        assert_eq!(
            cfg.admin_tls,
            Some(AdminTlsFiles {
                cert: "/etc/oc/cert.pem".into(),
                key: "/etc/oc/key.pem".into()
            })
        );
        let r = run_args(&["--config", path, "--admin-token-file", "flag.token"]);
        assert_eq!(
            r.admin_token_file,
            Some(PathBuf::from("flag.token")),
            "the flag wins"
        );
        let file2 = dir.path().join("alias.toml");
        std::fs::write(&file2, "admin-token-file = \"alias.token\"\n").unwrap();
        let r = run_args(&["--config", file2.to_str().unwrap()]);
        assert_eq!(r.admin_token_file, Some(PathBuf::from("alias.token")));
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!((cfg.admin_token_file, cfg.admin_tls), (None, None));
        for half in [&["--admin-tls-cert", "c.pem"][..], &["--admin-tls-key", "k.pem"]] {
            assert!(matches!(
                NodeConfig::try_from(run_args(half)),
                Err(ConfigError::AdminTlsPair)
            ));
        }
    }

    #[test]
    fn the_cli_commands_take_the_token_and_ca_before_or_after_their_action() {
        let cli = parse_from([
            "oc-discovery",
            "partners",
            "list",
            "--admin",
            "https://node:8650",
            "--admin-token-file",
            "t",
            "--admin-ca",
            "ca.pem",
        ])
        .unwrap();
        let Command::Partners(p) = cli.command else {
            panic!("not partners")
        };
        assert_eq!(p.client.admin, "https://node:8650");
        assert_eq!(p.client.admin_token_file, Some(PathBuf::from("t")));
        assert_eq!(p.client.admin_ca, Some(PathBuf::from("ca.pem")));
        let cli = parse_from(["oc-discovery", "peers", "--admin-token-file", "t"]).unwrap();
        let Command::Peers(p) = cli.command else {
            panic!("not peers")
        };
        assert_eq!(p.client.admin_token_file, Some(PathBuf::from("t")));
        assert_eq!(p.client.admin, "http://127.0.0.1:8650");
    }

    #[test]
    fn partners_need_a_peer_id() {
        let r = run_args(&["--partner", "/ip4/127.0.0.1/tcp/4001"]);
        assert!(matches!(
            NodeConfig::try_from(r),
            Err(ConfigError::PartnerWithoutPeerId(_))
        ));
    }

    #[test]
    fn the_sync_round_byte_cap_comes_from_flag_or_file_and_fits_an_entry() {
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(cfg.tuning.sync_max_bytes, DEFAULT_SYNC_MAX_BYTES);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "sync-max-bytes = 2097152\n").unwrap();
        let cfg = NodeConfig::try_from(run_args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(cfg.tuning.sync_max_bytes, 2 << 20);
        let small = run_args(&["--sync-max-bytes", "65536", "--max-event-bytes", "1024"]);
        assert!(matches!(
            NodeConfig::try_from(small),
            Err(ConfigError::SyncMaxBytes)
        ));
        let fits = run_args(&["--sync-max-bytes", "66560", "--max-event-bytes", "1024"]);
        assert_eq!(NodeConfig::try_from(fits).unwrap().tuning.sync_max_bytes, 66560);
    }

    #[test]
    fn peer_and_connection_limits_have_defaults_flags_and_file_keys() {
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(cfg.max_known_peers, DEFAULT_MAX_KNOWN_PEERS);
        assert_eq!(cfg.net_limits, crate::p2p::NetLimits::default());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "max_known_peers = 50\nmax-connections = 100\nmax_pending_incoming = 8\n",
        )
        .unwrap();
        let r = run_args(&[
            "--config",
            file.to_str().unwrap(),
            "--max-connections-per-peer",
            "2",
        ]);
        let cfg = NodeConfig::try_from(r).unwrap();
        assert_eq!(cfg.max_known_peers, 50);
        assert_eq!(
            cfg.net_limits,
            crate::p2p::NetLimits {
                max_connections_per_peer: 2,
                max_pending_incoming: 8,
                max_connections: 100,
            }
        );
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--max-known-peers", "0"])),
            Err(ConfigError::Zero("--max-known-peers"))
        ));
    }

    #[test]
    fn nats_servers_are_a_list_from_flag_env_or_file() {
        let urls = |cfg: NodeConfig| -> Vec<String> {
            cfg.nats
                .servers
                .iter()
                .map(|s| s.as_url_str().to_owned())
                .collect()
        };
        let cfg = NodeConfig::try_from(run_args(&["--nats-url", "nats://a:1, tls://b:2"])).unwrap();
        assert_eq!(urls(cfg), ["nats://a:1", "tls://b:2"]);
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "nats_url = \"nats://a:1,nats://b:2\"\n",
            "nats-url = [\"nats://a:1\", \"nats://b:2\"]\n",
        ] {
            let file = dir.path().join("node.toml");
            std::fs::write(&file, text).unwrap();
            let cfg = NodeConfig::try_from(run_args(&["--config", file.to_str().unwrap()])).unwrap();
            assert_eq!(urls(cfg), ["nats://a:1", "nats://b:2"], "{text}");
        }
        let cfg = NodeConfig::try_from(run_args(&[])).unwrap();
        assert_eq!(urls(cfg), [DEFAULT_NATS_URL]);
        assert_eq!(cfg_auth(&[]), crate::nats::NatsAuth::None);
        for bad in [
            &["--nats-url", ","][..],
            &["--nats-url", "http://a:1"],
            &["--nats-url", "nats://me:secret@a:1"],
        ] {
            assert!(NodeConfig::try_from(run_args(bad)).is_err(), "{bad:?}");
        }
    }

    fn cfg_auth(args: &[&str]) -> crate::nats::NatsAuth {
        NodeConfig::try_from(run_args(args)).unwrap().nats.auth
    }

    #[test]
    fn nats_credentials_are_one_kind_and_secrets_come_from_files() {
        use crate::nats::NatsAuth;
        assert_eq!(
            cfg_auth(&["--nats-user", "u", "--nats-password-file", "/p"]),
            NatsAuth::UserPassword {
                user: "u".into(),
                password_file: "/p".into()
            }
        );
        assert_eq!(cfg_auth(&["--nats-creds", "/c"]), NatsAuth::Creds("/c".into()));
        assert_eq!(cfg_auth(&["--nats-nkey", "/n"]), NatsAuth::Nkey("/n".into()));
        assert_eq!(
            cfg_auth(&["--nats-token-file", "/t"]),
            NatsAuth::Token("/t".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "nats-user = \"u\"\nnats_password_file = \"/p\"\n").unwrap();
        assert!(matches!(
            cfg_auth(&["--config", file.to_str().unwrap()]),
            NatsAuth::UserPassword { .. }
        ));
        let err = |args: &[&str]| NodeConfig::try_from(run_args(args)).unwrap_err();
        assert!(matches!(
            err(&["--nats-creds", "/c", "--nats-token-file", "/t"]),
            ConfigError::NatsAuthKinds(k) if k == ["--nats-creds", "--nats-token-file"]
        ));
        assert!(matches!(
            err(&["--nats-user", "u"]),
            ConfigError::NatsUserWithoutPassword
        ));
        assert!(matches!(
            err(&["--nats-password-file", "/p"]),
            ConfigError::NatsPasswordWithoutUser
        ));
    }

    #[test]
    fn nats_tls_options_imply_tls_and_a_client_certificate_needs_its_key() {
        let tls = |args: &[&str]| NodeConfig::try_from(run_args(args)).map(|c| c.nats.tls);
        assert!(!tls(&[]).unwrap().required());
        assert!(tls(&["--nats-tls-ca", "/ca.pem"]).unwrap().required());
        let client = tls(&["--nats-tls-cert", "/c.pem", "--nats-tls-key", "/k.pem"]).unwrap();
        assert!(client.required());
        assert_eq!(client.client, Some(("/c.pem".into(), "/k.pem".into())));
        assert!(matches!(
            tls(&["--nats-tls-cert", "/c.pem"]),
            Err(ConfigError::NatsClientCert)
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "nats-tls-ca = \"/ca.pem\"\nnats_tls_cert = \"/c\"\nnats-tls-key = \"/k\"\n",
        )
        .unwrap();
        let from_file = tls(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(from_file.ca, Some("/ca.pem".into()));
        assert!(from_file.client.is_some());
    }

    #[test]
    fn run_help_shows_every_nats_flag() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        for flag in [
            "--nats-url",
            "--nats-creds",
            "--nats-nkey",
            "--nats-user",
            "--nats-password-file",
            "--nats-token-file",
            "--nats-tls-ca",
            "--nats-tls-cert",
            "--nats-tls-key",
            "OC_DISCOVERY_NATS_PASSWORD_FILE",
        ] {
            assert!(help.contains(flag), "{flag} missing from run --help");
        }
    }
    #[test]
    fn transport_options_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        let relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
        std::fs::write(
            &file,
            format!("relay-server = true\nrelay = [\"{relay}\"]\ntls-ca = \"/etc/ca.pem\"\n"),
        )
        .unwrap();
        let cfg =
            NodeConfig::try_from(run_args(&["--config", file.to_str().unwrap(), "--listen", ""])).unwrap();
        assert!(cfg.listen.is_empty(), "an empty --listen listens nowhere");
        assert!(cfg.transport.relay_server);
        assert_eq!(cfg.transport.relays, vec![relay.parse::<Multiaddr>().unwrap()]);
        assert_eq!(cfg.transport.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        let plain = NodeConfig::try_from(run_args(&[])).unwrap();
        assert!(!plain.transport.relay_server);
        assert_eq!(plain.listen.len(), 1);
    }

    #[test]
    fn wss_needs_its_certificate_and_quic_is_refused() {
        let wss = ["--listen", "/ip4/0.0.0.0/tcp/443/wss"];
        assert!(matches!(
            NodeConfig::try_from(run_args(&wss)),
            Err(ConfigError::WssWithoutTls(_))
        ));
        let half = [&wss[..], &["--tls-cert", "c.pem"]].concat();
        assert!(matches!(
            NodeConfig::try_from(run_args(&half)),
            Err(ConfigError::TlsPair)
        ));
        let both = [&wss[..], &["--tls-cert", "c.pem", "--tls-key", "k.pem"]].concat();
        let cfg = NodeConfig::try_from(run_args(&both)).unwrap();
        assert!(cfg.transport.wss_tls.is_some());
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--listen", "/ip4/0.0.0.0/udp/4001/quic-v1"])),
            Err(ConfigError::Quic(_))
        ));
        assert!(matches!(
            NodeConfig::try_from(run_args(&["--relay", "/ip4/198.51.100.1/tcp/4001"])),
            Err(ConfigError::RelayWithoutPeerId(_))
        ));
    }
}
