//! The operator commands over the admin API: `status`, `journal`, `search`, `publish`,
//! `resources`, `completions`. Tables by default, `--json` for scripts. A refusal of the node
//! is an error naming its code (exit 1); an unreachable node or a refused token is an
//! [`super::AdminError`] (exit 3).

use std::io::{BufRead, IsTerminal, Read, Write};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::AdminClient;
use crate::config::{
    CompletionsArgs, JournalArgs, PublishArgs, ResourcesAction, ResourcesArgs, SearchArgs, SearchScope,
    StatusArgs,
};

/// Largest `--payload` file read.
const MAX_PAYLOAD_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Time a search stream gets beyond its own timeout (the node's final event, the network).
const SEARCH_MARGIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The node's answer as JSON when 200; else an error naming the node's code.
fn expect_ok(status: u16, body: &str) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if status == 200 && value["ok"] != false {
        return Ok(value);
    }
    Err(refused(status, &value, body))
}

pub(super) fn refused(status: u16, value: &Value, body: &str) -> anyhow::Error {
    match (
        value["error"]["code"].as_str(),
        value["error"]["message"].as_str(),
    ) {
        (Some(code), Some(message)) => anyhow::anyhow!("the node refused ({status} {code}): {message}"),
        _ => anyhow::anyhow!("the node answered {status}: {body}"),
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut all = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    all.extend(rows);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            all.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &all {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `oc-discovery status`.
///
/// # Errors
/// The node is unreachable or refuses.
pub fn status(args: &StatusArgs) -> anyhow::Result<String> {
    let client = AdminClient::from_args(&args.client)?;
    let (code, body) = client.call("GET", "/api/status", None)?;
    let s = expect_ok(code, &body)?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&s)?));
    }
    let mut out = format!(
        "peer id       {}\nversion       {}\nuptime        {} s\nintake        {} (pending {})\nstore         {} ({})\nnats          {}{}\njournal head  {}\n\n",
        text(&s["peer_id"]),
        text(&s["version"]),
        text(&s["uptime_s"]),
        text(&s["intake"]["mode"]),
        text(&s["intake"]["pending"]),
        text(&s["store"]["kind"]),
        if s["store"]["healthy"] == true { "healthy".to_owned() } else { text(&s["store"]["error"]) },
        text(&s["nats"]["state"]),
        s["nats"]["last_error"].as_str().map(|e| format!(" (last error: {e})")).unwrap_or_default(),
        text(&s["journal_head"]),
    );
    let partners = s["partners"].as_array().cloned().unwrap_or_default();
    let rows = partners
        .iter()
        .map(|p| {
            vec![
                text(&p["peer_id"]),
                text(&p["state"]),
                text(&p["acked_seq"]),
                text(&p["pending"]),
                text(&p["lag"]["oldest_unacked_age_ms"]),
                text(&p["rtt_ms"]),
                text(&p["last_error"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "PEER ID",
            "STATE",
            "ACKED SEQ",
            "PENDING",
            "OLDEST UNACKED MS",
            "RTT MS",
            "LAST ERROR",
        ],
        rows,
    ));
    if partners.is_empty() {
        out.push_str("(no partners configured)\n");
    }
    Ok(out)
}

/// The query string of `journal`.
fn journal_path(args: &JournalArgs) -> String {
    let mut path = format!(
        "/api/{}?limit={}",
        if args.applied { "applied" } else { "journal" },
        args.limit
    );
    if let Some(b) = args.before {
        path.push_str(&format!("&before={b}"));
    }
    for (name, value) in [("data_type", &args.data_type), ("origin", &args.origin)] {
        if let Some(v) = value {
            path.push_str(&format!("&{name}={}", encode(v)));
        }
    }
    path
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// `oc-discovery journal [--applied]`.
///
/// # Errors
/// The node is unreachable or refuses.
pub fn journal(args: &JournalArgs) -> anyhow::Result<String> {
    if args.follow {
        follow(args)?;
        return Ok(String::new());
    }
    let client = AdminClient::from_args(&args.client)?;
    let (code, body) = client.call("GET", &journal_path(args), None)?;
    let page = expect_ok(code, &body)?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&page)?));
    }
    let entries = page["entries"].as_array().cloned().unwrap_or_default();
    let rows = entries
        .iter()
        .map(|e| {
            let mut row = Vec::new();
            if args.applied {
                row.push(text(&e["key"]));
            }
            let e = if args.applied { &e["entry"] } else { e };
            row.extend([
                text(&e["origin"]),
                text(&e["seq"]),
                text(&e["action"]),
                text(&e["data_type"]),
                text(&e["resource"]["id"]),
                text(&e["user"]),
            ]);
            row
        })
        .collect();
    let header: &[&str] = if args.applied {
        &["KEY", "ORIGIN", "SEQ", "ACTION", "DATA TYPE", "ID", "USER"]
    } else {
        &["ORIGIN", "SEQ", "ACTION", "DATA TYPE", "ID", "USER"]
    };
    let mut out = table(header, rows);
    match page["before"].as_u64() {
        Some(b) if page["oldest_reached"] != true => out.push_str(&format!("(older: --before {b})\n")),
        _ => out.push_str("(oldest entry reached)\n"),
    }
    Ok(out)
}

/// Longest silence of the feed (the node pings every 20 s) before `--follow` gives up.
const FOLLOW_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(65);

/// One entry of a journal or applied page as a line of `journal --follow`: fixed columns, or
/// the entry's JSON with `--json`.
fn follow_line(args: &JournalArgs, item: &Value) -> String {
    if args.json {
        return format!("{item}\n");
    }
    let e = if args.applied { &item["entry"] } else { item };
    let mut line = String::new();
    if args.applied {
        line.push_str(&format!(
            "{:>8}  {:<52}  ",
            text(&item["key"]),
            text(&e["origin"])
        ));
    }
    line.push_str(&format!(
        "{:>8}  {:<16}  {:<20}  {:<24}  {}",
        text(&e["seq"]),
        text(&e["action"]),
        text(&e["data_type"]),
        text(&e["resource"]["id"]),
        text(&e["user"]),
    ));
    format!("{}\n", line.trim_end())
}

/// `oc-discovery journal --follow [--applied]`: the newest page (oldest first), then each
/// entry as it is committed, until interrupted or the node goes away.
///
/// # Errors
/// The node is unreachable, refuses, or closes the feed.
fn follow(args: &JournalArgs) -> anyhow::Result<()> {
    use tungstenite::Message;
    let client = AdminClient::from_args(&args.client)?;
    let mut ws = client.websocket("/api/feed", FOLLOW_READ_TIMEOUT)?;
    let mut subscribe = json!({
        "type": "subscribe",
        "feed": if args.applied { "applied" } else { "journal" },
        "portion": args.limit,
    });
    if let Some(t) = &args.data_type {
        subscribe["data_type"] = json!(t);
    }
    if let Some(o) = &args.origin {
        subscribe["origin"] = json!(o);
    }
    ws.send(Message::text(subscribe.to_string()))
        .context("sending the subscription")?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        let header = if args.applied {
            format!("{:>8}  {:<52}  ", "KEY", "ORIGIN")
        } else {
            String::new()
        };
        writeln!(
            out,
            "{header}{:>8}  {:<16}  {:<20}  {:<24}  USER",
            "SEQ", "ACTION", "DATA TYPE", "ID"
        )?;
    }
    loop {
        let msg = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(frame)) => {
                let why = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                bail!("the node closed the feed {why}");
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(super::AdminError::Unreachable {
                    base: args.client.admin.clone(),
                    cause: format!("the feed was silent for {} s", FOLLOW_READ_TIMEOUT.as_secs()),
                }
                .into());
            }
            Err(e) => {
                return Err(super::AdminError::Unreachable {
                    base: args.client.admin.clone(),
                    cause: format!("the feed broke: {e}"),
                }
                .into())
            }
        };
        let v: Value = serde_json::from_str(&msg).context("a feed message that is not JSON")?;
        match v["type"].as_str() {
            Some("page") => {
                let entries = v["entries"].as_array().cloned().unwrap_or_default();
                for e in entries.iter().rev() {
                    out.write_all(follow_line(args, e).as_bytes())?;
                }
            }
            Some("live") => out.write_all(follow_line(args, &v["entry"]).as_bytes())?,
            Some("lagged") => eprintln!(
                "({} entries skipped: the node went faster than this terminal read)",
                text(&v["skipped"])
            ),
            Some("error") => bail!("the node refused ({}): {}", text(&v["code"]), text(&v["message"])),
            _ => {}
        }
        out.flush()?;
    }
}

/// `oc-discovery search`: prints each `SEARCH_EVENT` as it arrives.
///
/// # Errors
/// The node is unreachable, refuses the search, or the stream ends in an error line.
pub fn search(args: &SearchArgs) -> anyhow::Result<()> {
    let client = AdminClient::from_args(&args.client)?;
    let scope = match args.scope {
        SearchScope::All => "all",
        SearchScope::Known => "known",
        SearchScope::Partner => "partner",
    };
    let mut payload =
        json!({"search": args.text, "type": scope, "timeout_ms": args.timeout.as_millis() as u64});
    if let Some(limit) = args.limit {
        payload["limit"] = json!(limit);
    }
    let body = json!({"action": "PB_SEARCH", "data_type": args.data_type, "payload": payload}).to_string();
    let (code, lines) = client.stream("/api/search", &body, args.timeout + SEARCH_MARGIN)?;
    if code != 200 {
        let mut text = String::new();
        lines.take(64 * 1024).read_to_string(&mut text)?;
        return Err(refused(
            code,
            &serde_json::from_str(&text).unwrap_or(Value::Null),
            &text,
        ));
    }
    let spinner = std::io::stderr().is_terminal();
    if spinner {
        eprint!("searching…");
    }
    let mut out = std::io::stdout().lock();
    for (n, line) in lines.lines().enumerate() {
        let line = line.context("reading the search stream")?;
        if spinner && n == 0 {
            eprint!("\r          \r");
        }
        let event: Value = serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        if event["ok"] == false {
            return Err(refused(200, &event, &line));
        }
        if args.json {
            writeln!(out, "{line}")?;
        } else {
            for r in event["results"].as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{}  {}  {}",
                    text(&event["from_peer"]),
                    text(&r["id"]),
                    text(&r["name"])
                )?;
            }
            if event["done"] == true {
                writeln!(
                    out,
                    "({} results, {} of {} peers answered)",
                    text(&event["results_total"]),
                    text(&event["peers_answered"]),
                    text(&event["peers_targeted"])
                )?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// `oc-discovery publish`.
///
/// # Errors
/// The payload cannot be read, the node is unreachable or refuses the event.
pub fn publish(args: &PublishArgs) -> anyhow::Result<String> {
    let mut raw = Vec::new();
    let read = if args.payload == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_PAYLOAD_FILE_BYTES + 1)
            .read_to_end(&mut raw)
    } else {
        std::fs::File::open(&args.payload)
            .and_then(|f| f.take(MAX_PAYLOAD_FILE_BYTES + 1).read_to_end(&mut raw))
    };
    read.with_context(|| format!("cannot read --payload {}", args.payload))?;
    if raw.len() as u64 > MAX_PAYLOAD_FILE_BYTES {
        bail!(
            "--payload {} is larger than {MAX_PAYLOAD_FILE_BYTES} bytes",
            args.payload
        );
    }
    let payload: Value =
        serde_json::from_slice(&raw).with_context(|| format!("--payload {} is not JSON", args.payload))?;
    let body = json!({"action": args.action, "data_type": args.data_type, "payload": payload}).to_string();
    let client = AdminClient::from_args(&args.client)?;
    let (code, answer) = client.call("POST", "/api/events", Some(&body))?;
    let value = expect_ok(code, &answer)?;
    if args.json {
        return Ok(format!("{value}\n"));
    }
    Ok(format!(
        "journaled: {} seq {}\n",
        text(&value["origin"]),
        text(&value["seq"])
    ))
}

/// `oc-discovery resources list|get`.
///
/// # Errors
/// The node is unreachable or refuses.
pub fn resources(args: &ResourcesArgs) -> anyhow::Result<String> {
    let client = AdminClient::from_args(&args.client)?;
    let path = match &args.action {
        ResourcesAction::List { data_type } => format!("/api/resources/{}", encode(data_type)),
        ResourcesAction::Get { data_type, id } => {
            format!("/api/resources/{}/{}", encode(data_type), encode(id))
        }
    };
    let (code, body) = client.call("GET", &path, None)?;
    let value = expect_ok(code, &body)?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let list = match value {
        Value::Array(list) => list,
        one => vec![one],
    };
    let rows = list
        .iter()
        .map(|r| {
            vec![
                text(&r["data_type"]),
                text(&r["id"]),
                text(&r["origin"]),
                text(&r["version"]),
                if r["deleted"] == true { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    Ok(table(&["DATA TYPE", "ID", "ORIGIN", "VERSION", "DELETED"], rows))
}

/// `oc-discovery completions bash|zsh|fish`.
pub fn completions(args: &CompletionsArgs) -> String {
    let mut command = <crate::config::Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut command, "oc-discovery", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}
