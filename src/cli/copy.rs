//! `oc-discovery copy <FILE|DIR> <PEER_ID>:<DEST>`: starts a remote copy through the admin
//! API (`POST /api/copies`) and follows it (`GET /api/copies/{id}`) until it is `done` or
//! `failed`: a progress bar on a terminal (indicatif), the final state as JSON with
//! `--json`. A failed copy is an error with its reason (exit 1).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::AdminClient;
use crate::config::CopyArgs;

/// How often the job is asked for its progress.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// Splits `<PEER_ID>:<DEST>`.
fn split_target(target: &str) -> anyhow::Result<(&str, &str)> {
    match target.split_once(':') {
        Some((peer, dest)) if !peer.is_empty() && !dest.is_empty() => Ok((peer, dest)),
        _ => bail!("the target must read <PEER_ID>:<DEST>, not {target:?}"),
    }
}

/// # Errors
/// The node is unreachable or refuses the copy, or the copy fails or does not end within
/// `--timeout`.
pub fn copy(args: &CopyArgs) -> anyhow::Result<String> {
    let (peer, destination) = split_target(&args.target)?;
    let source =
        std::path::absolute(&args.source).with_context(|| format!("the source {:?}", args.source))?;
    let client = AdminClient::from_args(&args.client)?;
    let body =
        json!({"source": source.display().to_string(), "peer": peer, "destination": destination}).to_string();
    let (code, answer) = client.call("POST", "/api/copies", Some(&body))?;
    let value: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
    if code != 202 {
        return Err(super::operator::refused(code, &value, &answer));
    }
    let Some(id) = value["id"].as_str().map(str::to_owned) else {
        bail!("the node answered 202 without a copy id: {answer}");
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(format!("copy {id}"));
        bar
    });
    let deadline = Instant::now() + args.timeout;
    let job = loop {
        let (code, text) = client.call("GET", &format!("/api/copies/{id}"), None)?;
        let job: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if code != 200 {
            return Err(super::operator::refused(code, &job, &text));
        }
        if let Some(bar) = &bar {
            if let Some(total) = job["total"].as_u64() {
                bar.set_length(total);
            }
            bar.set_position(job["bytes_acked"].as_u64().unwrap_or(0));
        }
        match job["state"].as_str() {
            Some("done") | Some("failed") => break job,
            _ => {}
        }
        if Instant::now() >= deadline {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!(
                "copy {id} has not ended within {:?} (it goes on in the node: GET /api/copies/{id})",
                args.timeout
            );
        }
        std::thread::sleep(POLL_EVERY);
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if job["state"] == "failed" {
        bail!(
            "copy {id} failed: {}",
            job["reason"].as_str().unwrap_or("no reason given")
        );
    }
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&job)?));
    }
    Ok(format!(
        "copied {} to {}:{} ({} bytes, sha256 {})\n",
        job["source"].as_str().unwrap_or("-"),
        job["peer"].as_str().unwrap_or("-"),
        job["destination"].as_str().unwrap_or("-"),
        job["total"].as_u64().unwrap_or(0),
        job["sha256"].as_str().unwrap_or("-")
    ))
}

#[cfg(test)]
mod tests {
    use super::split_target;

    #[test]
    fn the_target_is_a_peer_and_a_destination() {
        assert_eq!(split_target("12D3:conf/a:b").unwrap(), ("12D3", "conf/a:b"));
        assert!(split_target("12D3").is_err());
        assert!(split_target(":x").is_err());
        assert!(split_target("p:").is_err());
    }
}
