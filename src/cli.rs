//! The `id` and `peers` commands, and the small HTTP client they and the test kit use.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::actors::stream_service::PeerStatus;
use crate::config::{IdArgs, PartnersAction, PartnersArgs, PeersArgs};

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

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
    let (status, body) = http_get(&args.admin, "/api/peers")?;
    if status != 200 {
        bail!("{}/api/peers answered {status}: {body}", args.admin);
    }
    let peers: Vec<PeerStatus> = serde_json::from_str(&body).context("decoding /api/peers")?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&peers)?);
    }
    Ok(render_table(&peers))
}

fn render_table(peers: &[PeerStatus]) -> String {
    let mut rows =
        vec![["PEER ID", "STATE", "CONNECTED", "ACKED SEQ", "PENDING", "ADDRESS"].map(String::from)];
    for p in peers {
        rows.push([
            p.peer_id.clone(),
            p.state.clone(),
            if p.connected { "yes" } else { "no" }.to_owned(),
            p.acked_seq.to_string(),
            p.pending.to_string(),
            p.addrs.first().cloned().unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
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

/// `oc-discovery partners add|remove|list`.
///
/// # Errors
/// The admin API is unreachable or refuses the change (its error is shown).
pub fn partners(args: &PartnersArgs) -> anyhow::Result<String> {
    let (status, body) = match &args.action {
        PartnersAction::Add { addr, relation } => {
            let body = serde_json::json!({"addr": addr, "relation": relation}).to_string();
            http_request("POST", &args.admin, "/api/partners", Some(&body))?
        }
        PartnersAction::Remove { peer_id } => {
            http_request("DELETE", &args.admin, &format!("/api/partners/{peer_id}"), None)?
        }
        PartnersAction::List { json } => {
            let (status, body) = http_get(&args.admin, "/api/partners")?;
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

/// A plain HTTP/1.1 GET with `Connection: close`; returns the status and the body.
///
/// # Errors
/// Connection failure, timeout, or a response that is not HTTP.
pub fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request("GET", base, path, None)
}

/// A plain HTTP/1.1 request with an optional JSON body and `Connection: close`.
///
/// # Errors
/// Connection failure, timeout, or a response that is not HTTP.
pub fn http_request(
    method: &str,
    base: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .with_context(|| format!("resolving {hostport}"))?
        .next()
        .with_context(|| format!("no address for {hostport}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, HTTP_TIMEOUT).with_context(|| format!("connecting to {base}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    match body {
        Some(body) => write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?,
        None => write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
        )?,
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("response without headers")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("response without a status")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
