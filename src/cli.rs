//! The `id`, `peers` and `partners` commands, the operator commands of [`operator`]
//! (`status`, `journal`, `search`, `publish`, `resources`, `completions`), [`copy`], and the admin API
//! client they and the test kit use ([`AdminClient`]: blocking `ureq` over HTTP or HTTPS,
//! with the admin token; [`AdminClient::websocket`]: the live feed over `tungstenite`, for
//! `journal --follow`).
//!
//! Exit codes (see `main.rs`): a node that cannot be reached, or that refuses the token
//! (401), is an [`AdminError`], exit 3; other failures exit 1.

pub mod copy;
pub mod operator;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{AdminClientArgs, IdArgs, PartnersAction, PartnersArgs, PeersArgs};
use crate::outbound::service::PeerStatus;
use crate::secret_file::Token;

/// Whole-request limit (connect, TLS, request, response).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read (a page of 10 000 stored resources fits).
const MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;
/// Largest `--admin-ca` file read.
const MAX_CA_BYTES: u64 = 1024 * 1024;
/// Largest feed message read (a page is at most 2 MiB plus one entry).
const MAX_FEED_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Exit code of an [`AdminError`].
pub const EXIT_ADMIN_UNAVAILABLE: u8 = 3;

/// `oc-discovery id`: the peer id alone on stdout.
///
/// # Errors
/// The identity cannot be read or created.
pub fn id(args: &IdArgs) -> anyhow::Result<String> {
    let key = crate::identity::load_or_create(&args.data_dir)?;
    Ok(key.public().to_peer_id().to_string())
}

/// `oc-discovery peers`: the partners of a running node, as a table or JSON.
///
/// # Errors
/// The admin API is unreachable or answers something else than the peer list.
pub fn peers(args: &PeersArgs) -> anyhow::Result<String> {
    let client = AdminClient::from_args(&args.client)?;
    let (status, body) = client.call("GET", "/api/peers", None)?;
    if status != 200 {
        bail!("{}/api/peers answered {status}: {body}", args.client.admin);
    }
    let peers: Vec<PeerStatus> = serde_json::from_str(&body).context("decoding /api/peers")?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&peers)?);
    }
    Ok(render_table(&peers))
}

fn render_table(peers: &[PeerStatus]) -> String {
    let mut rows = vec![[
        "PEER ID",
        "STATE",
        "CONNECTED",
        "ACKED SEQ",
        "PENDING",
        "SNAPSHOT",
        "ADDRESS",
    ]
    .map(String::from)];
    for p in peers {
        rows.push([
            p.peer_id.clone(),
            p.state.clone(),
            if p.connected { "yes" } else { "no" }.to_owned(),
            p.acked_seq.to_string(),
            p.pending.to_string(),
            snapshot_cell(&p.snapshot),
            p.addrs.first().cloned().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if peers.is_empty() {
        out.push_str("(no partners configured)\n");
    }
    out
}

/// The snapshot column: `0` when idle, else `state sent/total @P`.
fn snapshot_cell(s: &crate::outbound::service::SnapshotView) -> String {
    if s.state == 0 {
        return "0".to_owned();
    }
    format!("{} {}/{} @{}", s.state, s.sent, s.total, s.position)
}

/// `oc-discovery partners add|remove|list|resync`.
///
/// # Errors
/// The admin API is unreachable or refuses the change (its error is shown).
pub fn partners(args: &PartnersArgs) -> anyhow::Result<String> {
    let client = AdminClient::from_args(&args.client)?;
    let (status, body) = match &args.action {
        PartnersAction::Add { addr, relation } => {
            let body = serde_json::json!({"addr": addr, "relation": relation}).to_string();
            client.call("POST", "/api/partners", Some(&body))?
        }
        PartnersAction::Remove { peer_id } => {
            client.call("DELETE", &format!("/api/partners/{peer_id}"), None)?
        }
        PartnersAction::Resync { peer_id } => {
            let (status, body) =
                client.call("POST", &format!("/api/partners/{peer_id}/resync"), Some("{}"))?;
            if status == 202 {
                return Ok(format!("{body}\n"));
            }
            (status, body)
        }
        PartnersAction::List { json } => {
            let (status, body) = client.call("GET", "/api/partners", None)?;
            if status == 200 && !json {
                let list: Vec<crate::peers::manager::PeerEntry> = serde_json::from_str(&body)?;
                let mut out = format!("{:<54}  {:<9}  {:<7}  ADDRESS\n", "PEER ID", "RELATION", "SOURCE");
                for p in &list {
                    let relation = serde_json::to_value(p.relation)?
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let addr = p.addrs.first().cloned().unwrap_or_default();
                    out.push_str(&format!(
                        "{:<54}  {:<9}  {:<7}  {addr}\n",
                        p.peer_id, relation, p.source
                    ));
                }
                return Ok(out);
            }
            (status, body)
        }
    };
    if status != 200 {
        bail!("the node answered {status}: {body}");
    }
    Ok(format!("{body}\n"))
}

/// Why the admin API could not be used; the process exits with [`EXIT_ADMIN_UNAVAILABLE`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No answer: refused connection, unknown host, timeout, TLS failure.
    #[error("connecting to {base}: {cause}")]
    Unreachable { base: String, cause: String },
    /// 401 with a token.
    #[error("the admin API refused the token (401 unauthorized)")]
    WrongToken,
    /// 401 without a token.
    #[error("the admin API needs a token: give --admin-token-file (401 unauthorized)")]
    NoToken,
}

/// One answer of the admin API.
#[derive(Debug, Clone)]
pub struct AdminResponse {
    pub status: u16,
    pub body: String,
    /// The `WWW-Authenticate` header, if any.
    pub www_authenticate: Option<String>,
}

/// A client of one node's admin API: its base URL (`http://` or `https://`), the token sent
/// as `Authorization: Bearer`, and the CA trusted for HTTPS (default: the public web roots).
/// No proxy (the environment's is ignored: the token goes to the node only) and no
/// redirects.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: Option<Token>,
    agent: ureq::Agent,
    /// `--admin-ca`'s certificates (the feed's WebSocket client trusts them too).
    ca: Option<Arc<Vec<ureq::tls::Certificate<'static>>>>,
}

impl AdminClient {
    /// # Errors
    /// The CA file is unreadable, too large or holds no PEM certificate.
    pub fn new(base: &str, token: Option<Token>, ca: Option<&Path>) -> anyhow::Result<AdminClient> {
        let ca = ca.map(read_ca).transpose()?.map(Arc::new);
        let roots = match &ca {
            Some(certs) => ureq::tls::RootCerts::Specific(certs.clone()),
            None => ureq::tls::RootCerts::WebPki,
        };
        let tls = ureq::tls::TlsConfig::builder().root_certs(roots).build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            // One connection per request, as a CLI makes few: nothing stale after a restart.
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .tls_config(tls)
            .build()
            .into();
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent,
            ca,
        })
    }

    /// The client `--admin`, `--admin-token-file` and `--admin-ca` describe.
    ///
    /// # Errors
    /// The token or CA file cannot be used.
    pub(crate) fn from_args(args: &AdminClientArgs) -> anyhow::Result<AdminClient> {
        let token = args
            .admin_token_file
            .as_deref()
            .map(crate::secret_file::read_token)
            .transpose()?;
        AdminClient::new(&args.admin, token, args.admin_ca.as_deref())
    }

    /// Sends a request (`body`: JSON) and returns the answer, whatever its status.
    ///
    /// # Errors
    /// [`AdminError::Unreachable`] when there is no answer; a malformed URL or method.
    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<AdminResponse> {
        let url = format!("{}{path}", self.base);
        let bearer = self.token.as_ref().map(|t| format!("Bearer {}", t.as_str()));
        let answer = match (method, body) {
            ("GET", None) => with_token(self.agent.get(&url), bearer.as_deref()).call(),
            ("DELETE", None) => with_token(self.agent.delete(&url), bearer.as_deref()).call(),
            ("POST", body) => with_token(self.agent.post(&url), bearer.as_deref())
                .content_type("application/json")
                .send(body.unwrap_or_default()),
            (method, body) => bail!("no {method} request with body {body:?} in the admin API client"),
        };
        let mut response = answer.map_err(|e| self.failure(e))?;
        let status = response.status().as_u16();
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(|e| self.failure(e))?;
        Ok(AdminResponse {
            status,
            body,
            www_authenticate,
        })
    }

    /// [`AdminClient::send`] returning (status, body); a 401 is an [`AdminError`].
    ///
    /// # Errors
    /// See [`AdminClient::send`]; 401.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
        let answer = self.send(method, path, body)?;
        if answer.status == 401 {
            return Err(match self.token {
                Some(_) => AdminError::WrongToken,
                None => AdminError::NoToken,
            }
            .into());
        }
        Ok((answer.status, answer.body))
    }

    /// POSTs `body` (JSON) and hands back the answer's status and body as it arrives (a
    /// stream of JSON lines), within `timeout` for the whole exchange; a 401 is an
    /// [`AdminError`].
    ///
    /// # Errors
    /// See [`AdminClient::call`].
    pub fn stream(
        &self,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u16, std::io::BufReader<ureq::BodyReader<'static>>)> {
        let url = format!("{}{path}", self.base);
        let bearer = self.token.as_ref().map(|t| format!("Bearer {}", t.as_str()));
        let request = with_token(self.agent.post(&url), bearer.as_deref())
            .config()
            .timeout_global(Some(timeout))
            .build()
            .content_type("application/json");
        let response = request.send(body).map_err(|e| self.failure(e))?;
        let status = response.status().as_u16();
        if status == 401 {
            return Err(match self.token {
                Some(_) => AdminError::WrongToken,
                None => AdminError::NoToken,
            }
            .into());
        }
        let reader = response
            .into_body()
            .into_with_config()
            .limit(MAX_RESPONSE_BYTES)
            .reader();
        Ok((status, std::io::BufReader::new(reader)))
    }

    /// Opens the WebSocket at `path` (`GET /api/feed`): `ws://` or `wss://` like the base,
    /// the token as `Authorization: Bearer`, `--admin-ca` trusted for `wss://`. Reads wait
    /// at most `read_timeout` (the node pings its clients more often than that).
    ///
    /// # Errors
    /// [`AdminError`] when there is no answer or the token is refused; a handshake the node
    /// answers with another status.
    pub fn websocket(
        &self,
        path: &str,
        read_timeout: Duration,
    ) -> anyhow::Result<tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>>
    {
        use tungstenite::client::IntoClientRequest;
        let (scheme, rest) = self
            .base
            .split_once("://")
            .with_context(|| format!("the admin URL {} has no scheme", self.base))?;
        let (ws_scheme, default_port) = match scheme {
            "http" => ("ws", 80),
            "https" => ("wss", 443),
            other => bail!("the admin URL {} is not http:// or https:// ({other})", self.base),
        };
        let url = format!("{ws_scheme}://{rest}{path}");
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("the admin URL {} is not usable", self.base))?;
        if let Some(t) = &self.token {
            let value = format!("Bearer {}", t.as_str())
                .parse()
                .context("the admin token is not a valid header value")?;
            request.headers_mut().insert("Authorization", value);
        }
        let unreachable = |cause: String| AdminError::Unreachable {
            base: self.base.clone(),
            cause,
        };
        let host = request
            .uri()
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = request.uri().port_u16().unwrap_or(default_port);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable(format!("{host} has no address")))?;
        let tcp = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
            .map_err(|e| unreachable(e.to_string()))?;
        // The handshake within the HTTP timeout; then reads wait for the feed.
        tcp.set_read_timeout(Some(HTTP_TIMEOUT))?;
        tcp.set_write_timeout(Some(HTTP_TIMEOUT))?;
        // Our own rustls configuration (ring, the CA or the public web roots): tungstenite's
        // default one needs a process-wide crypto provider.
        let connector = match ws_scheme {
            "wss" => tungstenite::Connector::Rustls(Arc::new(rustls_config(
                self.ca.as_deref().map(Vec::as_slice),
            )?)),
            _ => tungstenite::Connector::Plain,
        };
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(MAX_FEED_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_FEED_MESSAGE_BYTES));
        let (ws, _) = match tungstenite::client_tls_with_config(request, tcp, Some(config), Some(connector)) {
            Ok(done) => done,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(answer)))
                if answer.status() == 401 =>
            {
                return Err(match self.token {
                    Some(_) => AdminError::WrongToken,
                    None => AdminError::NoToken,
                }
                .into())
            }
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(answer))) => {
                let body = answer
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                bail!(
                    "the node answered {} to the feed handshake: {body}",
                    answer.status()
                )
            }
            Err(e) => return Err(unreachable(e.to_string()).into()),
        };
        let tcp = match ws.get_ref() {
            tungstenite::stream::MaybeTlsStream::Plain(s) => s,
            tungstenite::stream::MaybeTlsStream::Rustls(s) => s.get_ref(),
            _ => bail!("unexpected WebSocket transport"),
        };
        tcp.set_read_timeout(Some(read_timeout))?;
        Ok(ws)
    }

    fn failure(&self, e: ureq::Error) -> anyhow::Error {
        match e {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
                anyhow::Error::new(e).context(format!("the admin URL {} is not usable", self.base))
            }
            e => AdminError::Unreachable {
                base: self.base.clone(),
                cause: e.to_string(),
            }
            .into(),
        }
    }
}

fn with_token<B>(request: ureq::RequestBuilder<B>, bearer: Option<&str>) -> ureq::RequestBuilder<B> {
    match bearer {
        Some(b) => request.header("Authorization", b),
        None => request,
    }
}

/// A rustls client configuration (ring, as the rest of the node) trusting `certs` only, or
/// the public web roots without them.
fn rustls_config(certs: Option<&[ureq::tls::Certificate<'static>]>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match certs {
        Some(certs) => {
            for c in certs {
                roots
                    .add(rustls::pki_types::CertificateDer::from(c.der().to_vec()))
                    .context("an --admin-ca certificate is not usable")?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The certificates of a PEM file (`--admin-ca`).
fn read_ca(path: &Path) -> anyhow::Result<Vec<ureq::tls::Certificate<'static>>> {
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_BYTES + 1).read_to_end(&mut pem))
        .with_context(|| format!("cannot read --admin-ca {}", path.display()))?;
    if pem.len() as u64 > MAX_CA_BYTES {
        bail!(
            "--admin-ca {} is larger than {MAX_CA_BYTES} bytes",
            path.display()
        );
    }
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        let item = item.with_context(|| format!("--admin-ca {} is not PEM", path.display()))?;
        if let ureq::tls::PemItem::Certificate(c) = item {
            certs.push(c.to_owned());
        }
    }
    if certs.is_empty() {
        bail!("--admin-ca {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// A request without a token over plain HTTP or HTTPS with the public roots: (status, body).
///
/// # Errors
/// No answer.
pub fn http_request(
    method: &str,
    base: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let answer = AdminClient::new(base, None, None)?.send(method, path, body)?;
    Ok((answer.status, answer.body))
}

/// A GET without a token: (status, body).
///
/// # Errors
/// No answer.
pub fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request("GET", base, path, None)
}
