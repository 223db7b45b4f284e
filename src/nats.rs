//! The site's NATS: connecting (a cluster of servers, credentials, TLS), what `/healthz`
//! says about the connection, and publishing what the node owes applications with a
//! confirmation (a JetStream PubAck, or for a subject no stream captures a flush: written
//! to the server's socket) before anything that depends on it moves on.
//!
//! The client reconnects by itself (delays from [`Backoff`]); before each attempt it shows
//! the node the servers' last errors, which become one log line per failed attempt and the
//! reason `/healthz` gives until a connection is made.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::rustls::pki_types::pem::PemObject;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Server, ServerAddr};

use crate::backoff::Backoff;
use crate::store::OutboxRow;

/// Header JetStream uses to drop duplicate publishes.
pub(crate) const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// Messages buffered per subscription before the server marks us a slow consumer.
const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;
/// Commands buffered in the client while the connection catches up.
const CLIENT_CAPACITY: usize = 16 * 1024;
/// Largest credentials, seed, password, token, CA, certificate or key file read (a `.creds`
/// file is about 1 KiB, a CA bundle some 200 KiB).
pub(crate) const MAX_SECRET_FILE_BYTES: u64 = 1024 * 1024;
/// Most bytes of a server's error kept for `/healthz` and the log.
const MAX_REASON_BYTES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("NATS did not confirm within {0:?}")]
    Timeout(Duration),
}

/// How the node proves who it is to NATS: one kind at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    /// `--nats-creds`: a `.creds` file (a user JWT and its nkey seed).
    Creds(PathBuf),
    /// `--nats-nkey`: a file holding an nkey seed (`SU...`).
    Nkey(PathBuf),
    /// `--nats-user` with `--nats-password-file`.
    UserPassword { user: String, password_file: PathBuf },
    /// `--nats-token-file`.
    Token(PathBuf),
}

/// TLS towards NATS. Giving a CA or a client certificate makes TLS required.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// `--nats-tls-ca`: PEM certificates the server's must chain to (instead of the system's).
    pub ca: Option<PathBuf>,
    /// `--nats-tls-cert` and `--nats-tls-key`: the client certificate (PEM) and its key.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    pub(crate) fn required(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }
}

/// Where and how to connect to the site's NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// The servers of the site's NATS (one, or a cluster); `tls://` ones need TLS.
    pub servers: Vec<ServerAddr>,
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

/// A file named by a NATS option that cannot be used; the node does not start.
#[derive(Debug, thiserror::Error)]
#[error("{option} {}: {reason}", path.display())]
pub(crate) struct FileError {
    /// The option naming the file (`--nats-creds`, ...).
    pub option: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("NATS client: {0}")]
    Client(#[from] async_nats::ConnectError),
}

/// Connects to NATS. Returns at once: the connection is made (and remade) in the
/// background, so the node starts even when NATS is not up yet or refuses it; the
/// returned status says why it is not connected.
///
/// # Errors
/// A credentials, CA, certificate or key file is unreadable, too big or malformed.
pub(crate) async fn connect(
    settings: &NatsSettings,
    timeout: Duration,
    retry: Backoff,
) -> Result<(Client, Arc<ConnectionStatus>), ConnectError> {
    connect_with("oc-discovery", ConnectOptions::new(), settings, timeout, retry).await
}

/// [`connect`] for the connection the node publishes its notices on and the peer manager
/// subscribes to `CREATE_RESOURCE` / `REMOVE_RESOURCE` on, opened with `no_echo`: the server
/// does not hand the node's own notices back to that subscription (receiving and reading each
/// of them was about a fifth of a receiving node's CPU, docs/PERFORMANCE.md). Its
/// subscriptions are confirmed by [`subscriptions_confirmed_without_echo`].
///
/// # Errors
/// As [`connect`].
pub(crate) async fn connect_without_echo(
    settings: &NatsSettings,
    timeout: Duration,
    retry: Backoff,
) -> Result<(Client, Arc<ConnectionStatus>), ConnectError> {
    let options = ConnectOptions::new().no_echo();
    connect_with("oc-discovery-notices", options, settings, timeout, retry).await
}

/// Connects with `options` under the client name `name`, which the status's log lines carry.
async fn connect_with(
    name: &'static str,
    options: ConnectOptions,
    settings: &NatsSettings,
    timeout: Duration,
    retry: Backoff,
) -> Result<(Client, Arc<ConnectionStatus>), ConnectError> {
    let status = Arc::new(ConnectionStatus {
        connection: name,
        ..ConnectionStatus::default()
    });
    let options = options
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(timeout)
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .client_capacity(CLIENT_CAPACITY)
        // async-nats counts attempts from 1 (the first try) and resets them once connected.
        .reconnect_delay_callback(move |attempts| retry.after_failures(attempts.saturating_sub(1)));
    let options = with_tls(with_auth(options, &settings.auth)?, &settings.tls)?;
    let on_event = status.clone();
    let before_attempt = status.clone();
    let client = options
        .event_callback(move |event| {
            on_event.event(&event);
            async {}
        })
        .reconnect_to_server_callback(move |servers, _info| {
            before_attempt.attempts_failed(&servers);
            // `None`: the client picks the server as usual.
            async { None }
        })
        .connect(settings.servers.clone())
        .await?;
    Ok((client, status))
}

fn with_auth(options: ConnectOptions, auth: &NatsAuth) -> Result<ConnectOptions, FileError> {
    Ok(match auth {
        NatsAuth::None => options,
        NatsAuth::Creds(path) => {
            // The client's parser wants the line end after each decorated block.
            let text = format!("{}\n", read_secret("--nats-creds", path)?);
            options.credentials(&text).map_err(|e| FileError {
                option: "--nats-creds",
                path: path.clone(),
                reason: e.to_string(),
            })?
        }
        NatsAuth::Nkey(path) => {
            let seed = read_secret("--nats-nkey", path)?;
            if nkeys::KeyPair::from_seed(&seed).is_err() {
                return Err(FileError {
                    option: "--nats-nkey",
                    path: path.clone(),
                    reason: "not an nkey seed (a line starting with S)".into(),
                });
            }
            options.nkey(seed)
        }
        NatsAuth::UserPassword { user, password_file } => {
            let password = read_secret("--nats-password-file", password_file)?;
            options.user_and_password(user.clone(), password)
        }
        NatsAuth::Token(path) => options.token(read_secret("--nats-token-file", path)?),
    })
}

/// The files are checked here so that a bad one stops the start; the client reads them
/// again at each connection attempt.
fn with_tls(options: ConnectOptions, tls: &NatsTls) -> Result<ConnectOptions, FileError> {
    let mut options = options.require_tls(tls.required());
    if let Some(ca) = &tls.ca {
        check_certificates("--nats-tls-ca", ca)?;
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client {
        check_certificates("--nats-tls-cert", cert)?;
        let pem = read_file("--nats-tls-key", key)?;
        warn_if_shared("--nats-tls-key", key);
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| FileError {
            option: "--nats-tls-key",
            path: key.clone(),
            reason: format!("no PEM private key: {e}"),
        })?;
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

fn check_certificates(option: &'static str, path: &Path) -> Result<(), FileError> {
    let pem = read_file(option, path)?;
    let bad = |reason: String| FileError {
        option,
        path: path.to_owned(),
        reason,
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| bad(format!("bad PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(())
}

/// A secret file's text, trimmed: at most [`MAX_SECRET_FILE_BYTES`], UTF-8, not empty.
/// A file group or others may read is used, with a warning.
fn read_secret(option: &'static str, path: &Path) -> Result<String, FileError> {
    let bytes = read_file(option, path)?;
    warn_if_shared(option, path);
    let bad = |reason: &str| FileError {
        option,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(bad("empty"));
    }
    Ok(secret.to_owned())
}

/// Reads a whole file of at most [`MAX_SECRET_FILE_BYTES`].
fn read_file(option: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    let bad = |reason: String| FileError {
        option,
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_SECRET_FILE_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Logs a warning when a secret file is readable by its group or others.
fn warn_if_shared(option: &'static str, path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    option,
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "secret file is readable by group or others; chmod 600 it"
                );
            }
        }
    }
}

/// What `/healthz` says about NATS: why the client is not connected.
#[derive(Debug, Default)]
pub struct ConnectionStatus {
    /// The connection's client name, in its log lines (the node has two, [`connect`] and
    /// [`connect_without_echo`]).
    connection: &'static str,
    /// The last refusal or error of a server, cleared once connected.
    refusal: Mutex<Option<String>>,
    /// Failed attempts per server already reported.
    reported: Mutex<HashMap<String, usize>>,
}

impl ConnectionStatus {
    /// `None` when connected, else the reason (the last server error, if any).
    pub(crate) fn problem(&self, client: &Client) -> Option<String> {
        if is_connected(client) {
            return None;
        }
        let refusal = self.refusal.lock().ok().and_then(|r| r.clone());
        Some(refusal.unwrap_or_else(|| "nats not connected".to_owned()))
    }

    /// The last server refusal or error, kept until a connection succeeds.
    pub fn last_error(&self) -> Option<String> {
        self.refusal.lock().ok().and_then(|r| r.clone())
    }

    /// Before each connection attempt: logs and keeps the failures of the attempts since
    /// the last call (the client keeps each server's failure count and last error).
    fn attempts_failed(&self, servers: &[Server]) {
        let Ok(mut reported) = self.reported.lock() else {
            return;
        };
        let mut now = HashMap::with_capacity(servers.len());
        for server in servers {
            let url = server.addr.as_url_str().to_owned();
            let before = reported.get(&url).copied().unwrap_or(0);
            if let (true, Some(error)) = (server.failed_attempts > before, &server.last_error) {
                let reason = reason(error);
                tracing::warn!(
                    connection = self.connection,
                    server = %url,
                    failed_attempts = server.failed_attempts,
                    reason = %reason,
                    "NATS connection attempt failed; retrying"
                );
                if let Ok(mut refusal) = self.refusal.lock() {
                    *refusal = Some(format!("{reason} ({url})"));
                }
            }
            now.insert(url, server.failed_attempts);
        }
        // Only the current pool is kept: the map never outgrows it.
        *reported = now;
    }

    fn event(&self, event: &Event) {
        match event {
            Event::Connected => {
                if let Ok(mut refusal) = self.refusal.lock() {
                    *refusal = None;
                }
                tracing::info!(connection = self.connection, "connected to NATS");
            }
            Event::Disconnected => {
                tracing::warn!(connection = self.connection, "NATS connection lost; reconnecting")
            }
            // Each failed attempt is logged, with its server and detail, before the next.
            Event::ClientError(e) => {
                tracing::debug!(connection = self.connection, cause = %e, "nats client error")
            }
            other => tracing::info!(connection = self.connection, event = %other, "nats connection event"),
        }
    }
}

/// A server's error as `/healthz` shows it: `nats: authorization violation`,
/// `nats: IO error: invalid peer certificate: UnknownIssuer`, ...
fn reason(error: &str) -> String {
    // An error from the server reads "<kind>: nats: <kind>": once is enough.
    let error = match error.split_once(": nats: ") {
        Some((kind, again)) if kind == again => kind,
        _ => error,
    };
    let mut reason = format!("nats: {error}");
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

pub(crate) fn is_connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Waits until the server has taken every subscription `client` made so far; `false` when
/// that is not confirmed within `timeout`.
///
/// async-nats' `subscribe` returns once the SUB is queued and its `flush` once it is
/// written to the socket, not once the server has it: a message another client publishes
/// meanwhile finds no subscriber and is dropped (core NATS). The server handles one
/// connection's protocol in order, so a message this client publishes to a fresh inbox it
/// subscribed to comes back only after the server took the earlier subscriptions.
pub(crate) async fn subscriptions_confirmed(client: &Client, timeout: Duration) -> bool {
    let round_trip = async {
        let inbox = client.new_inbox();
        let mut echo = client.subscribe(inbox.clone()).await.ok()?;
        client.publish(inbox, "".into()).await.ok()?;
        let back = futures::StreamExt::next(&mut echo).await;
        // Dropping the subscriber unsubscribes too; this only says it at once.
        let _ = echo.unsubscribe().await;
        back
    };
    matches!(tokio::time::timeout(timeout, round_trip).await, Ok(Some(_)))
}

/// [`subscriptions_confirmed`] for a connection without echo ([`connect_without_echo`]), whose
/// own publishes never come back: a request to a subject nobody serves is answered by the
/// server's "no responders" status, once it has taken the earlier subscriptions. Needs a
/// server that sends that status (NATS 2.2 and later); an older one lets the wait run out.
pub(crate) async fn subscriptions_confirmed_without_echo(client: &Client, timeout: Duration) -> bool {
    let nobody = client.new_inbox();
    match tokio::time::timeout(timeout, client.request(nobody, "".into())).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
        Err(_) => false,
    }
}

/// Publishes what the node owes applications, confirmed before anyone moves on.
///
/// A subject captured by a JetStream stream is published through JetStream and confirmed
/// by its PubAck (persisted, deduplicated on `Nats-Msg-Id`); a subject no stream captures
/// gets a core publish followed by a flush (written to the server's socket; core NATS
/// confirms no more than that). Which is which is asked of the
/// server and remembered for `CAPTURE_RECHECK`.
pub(crate) struct Publisher {
    client: Client,
    js: async_nats::jetstream::Context,
    /// Subject → (captured by a stream, when that was learned).
    captured: std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>,
}

/// How long what was learned about a subject's stream is trusted.
const CAPTURE_RECHECK: Duration = Duration::from_secs(30);

impl Publisher {
    pub(crate) fn new(client: Client) -> Self {
        let js = async_nats::jetstream::new(client.clone());
        Publisher {
            client,
            js,
            captured: Default::default(),
        }
    }

    async fn is_captured(&self, subject: &str, timeout: Duration) -> bool {
        let known = self.captured.lock().ok().and_then(|m| m.get(subject).copied());
        if let Some((captured, at)) = known {
            if at.elapsed() < CAPTURE_RECHECK {
                return captured;
            }
        }
        // A server without JetStream, or no stream on the subject: core publish.
        let captured = matches!(
            tokio::time::timeout(timeout, self.js.stream_by_subject(subject)).await,
            Ok(Ok(_))
        );
        if let Ok(mut m) = self.captured.lock() {
            m.insert(subject.to_owned(), (captured, std::time::Instant::now()));
        }
        captured
    }

    /// Publishes outbox rows with their `Nats-Msg-Id` and waits until the server has them.
    ///
    /// # Errors
    /// A publish was refused or not confirmed in time; the caller keeps the rows.
    pub(crate) async fn publish_rows(
        &self,
        rows: &[OutboxRow],
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let failed = |e: &dyn std::fmt::Display| PublishError::Publish(e.to_string());
        let work = async {
            let mut acks = Vec::new();
            let mut core = false;
            // The rows of a batch share one or two subjects: each is looked up (and its
            // `Subject` built) once per call, not once per row.
            let mut subjects: Vec<(&str, async_nats::Subject, bool)> = Vec::new();
            for row in rows {
                let known = subjects.iter().find(|(s, _, _)| *s == row.subject.as_str());
                let (subject, captured) = match known {
                    Some((_, subject, captured)) => (subject.clone(), *captured),
                    None => {
                        let captured = self.is_captured(&row.subject, timeout).await;
                        let subject = async_nats::Subject::from(row.subject.as_str());
                        subjects.push((&row.subject, subject.clone(), captured));
                        (subject, captured)
                    }
                };
                let payload = bytes::Bytes::copy_from_slice(&row.payload);
                if captured {
                    let ack = self
                        .js
                        .publish_with_headers(subject, headers(row), payload)
                        .await
                        .map_err(|e| failed(&e))?;
                    acks.push(ack);
                } else {
                    self.client
                        .publish_with_headers(subject, headers(row), payload)
                        .await
                        .map_err(|e| failed(&e))?;
                    core = true;
                }
            }
            // Pipelined: every publish is out before the first confirmation is awaited.
            for ack in acks {
                ack.await.map_err(|e| failed(&e))?;
            }
            if core {
                self.client.flush().await.map_err(|e| failed(&e))?;
            }
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
    }
}

fn headers(row: &OutboxRow) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, row.msg_id.as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_once_and_are_bounded() {
        assert_eq!(
            reason("authorization violation: nats: authorization violation"),
            "nats: authorization violation"
        );
        assert_eq!(
            reason("IO error: invalid peer certificate: UnknownIssuer"),
            "nats: IO error: invalid peer certificate: UnknownIssuer"
        );
        assert!(reason(&"é".repeat(1000)).len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn secret_files_are_trimmed_bounded_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cr3t\n").unwrap();
        assert_eq!(read_secret("--nats-token-file", &file).unwrap(), "s3cr3t");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_secret("--nats-token-file", &file).is_err());
        std::fs::write(&file, vec![b'a'; MAX_SECRET_FILE_BYTES as usize + 1]).unwrap();
        let e = read_secret("--nats-token-file", &file).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(read_secret("--nats-token-file", &dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_creds_file_and_an_nkey_seed_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let creds = dir.path().join("node.creds");
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        assert!(with_auth(ConnectOptions::new(), &NatsAuth::Creds(creds)).is_ok());
        let nk = dir.path().join("node.nk");
        std::fs::write(&nk, format!("{seed}\n")).unwrap();
        assert!(with_auth(ConnectOptions::new(), &NatsAuth::Nkey(nk)).is_ok());
    }

    #[test]
    fn malformed_tls_files_and_seeds_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let tls = NatsTls {
            ca: Some(junk.clone()),
            client: None,
        };
        let e = with_tls(ConnectOptions::new(), &tls).unwrap_err();
        assert_eq!(e.option, "--nats-tls-ca");
        let e = with_auth(ConnectOptions::new(), &NatsAuth::Nkey(junk.clone())).unwrap_err();
        assert_eq!(e.option, "--nats-nkey");
        let e = with_auth(ConnectOptions::new(), &NatsAuth::Creds(junk)).unwrap_err();
        assert_eq!(e.option, "--nats-creds");
    }
}
