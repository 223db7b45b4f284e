//! The puller's side of journal sync: one round of another node's journal ([`pull`]),
//! its header and parts checked and assembled by [`super::plan::Assembly`], missing parts
//! asked again within [`MAX_ATTEMPTS`] requests.

use std::time::Duration;

use libp2p::PeerId;

use crate::config::Tuning;
use crate::contract::{ErrorCode, JournalEntry};
use crate::metrics::Metrics;
use crate::p2p::wire::{self, ErrorFrame, Frame, FrameError, SyncFrame};
use crate::p2p::{self};

use super::plan::{Ask, Assembly, Header, PART_ENVELOPE};
use super::{invalid, SyncError, PROTOCOL_SYNC, REFUSAL_LOG};

/// Requests for one range before the puller gives up until its next attempt.
pub(crate) const MAX_ATTEMPTS: usize = 5;
/// Longest `code` and `message` of an owner's `error` frame kept (they end up in logs).
const MAX_REFUSAL_CODE: usize = 64;
const MAX_REFUSAL_MESSAGE: usize = 512;

/// What a pull brought back.
#[derive(Debug)]
pub(crate) struct Pulled {
    pub entries: Vec<JournalEntry>,
    pub until: u64,
    /// The owner's journal head when it answered.
    pub head: u64,
}

/// Pulls `since < seq` (the owner chooses `until` within the round caps) of `peer`'s
/// journal, re-requesting missing parts, within [`MAX_ATTEMPTS`] requests of
/// `--sync-timeout` each.
///
/// An answer that breaks the rules ([`SyncError::Invalid`]) is counted
/// (`oc_refusals_total{place="sync",code="invalid_field"}`), logged (throttled per peer),
/// and reported only after `Tuning::backoff_max`: the session starts no other sync of that
/// origin meanwhile, so a lying owner is asked at most once per backoff.
///
/// # Errors
/// The peer is unreachable, refuses, answers what was not asked, or the answer stays
/// incomplete.
pub(crate) async fn pull(
    net: &p2p::Client,
    peer: PeerId,
    since: u64,
    tuning: &Tuning,
    metrics: &Metrics,
) -> Result<Pulled, SyncError> {
    let result = pull_range(net, peer, Ask::new(since, tuning), tuning.sync_timeout).await;
    if let Err(SyncError::Invalid(why)) = &result {
        metrics.refused("sync", ErrorCode::InvalidField);
        if let Some(count) = REFUSAL_LOG.hit(peer, "sync_answer_invalid") {
            tracing::warn!(%peer, since, code = "invalid_field", count, reason = %why, backoff = ?tuning.backoff_max, "journal sync answer refused");
        }
        tokio::time::sleep(tuning.backoff_max).await;
    }
    result
}

async fn pull_range(
    net: &p2p::Client,
    peer: PeerId,
    ask: Ask,
    timeout: Duration,
) -> Result<Pulled, SyncError> {
    let mut assembly: Option<Assembly> = None;
    let frame_cap = usize::try_from(ask.part_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(PART_ENVELOPE * 4);
    for attempt in 1..=MAX_ATTEMPTS {
        let request = SyncFrame::SyncRequest {
            origin: peer.to_string(),
            since: ask.since,
            until: assembly.as_ref().map(|a| a.header().until),
            part_bytes: ask.part_bytes,
            max_bytes: Some(ask.max_bytes),
            parts: assembly.as_ref().map(Assembly::missing),
        };
        // Progress is kept whatever happens to this attempt.
        let result = tokio::time::timeout(timeout, async {
            let mut stream = net.open_stream(peer, PROTOCOL_SYNC, timeout).await?;
            wire::write_frame(&mut stream, &request).await?;
            loop {
                let read = match wire::read_frame::<SyncFrame, _>(&mut stream, frame_cap).await {
                    Err(FrameError::Unexpected { kind }) => {
                        return Err(invalid(format!("unexpected {kind} frame")))
                    }
                    read => read?,
                };
                match read {
                    None => return Ok::<(), SyncError>(()),
                    Some(SyncFrame::SyncHeader {
                        since,
                        until,
                        head,
                        total,
                        bytes,
                    }) => {
                        let header = Header {
                            since,
                            until,
                            head,
                            total,
                            bytes,
                        };
                        match &assembly {
                            // `head` may move between requests; the range may not.
                            Some(a)
                                if (
                                    a.header().since,
                                    a.header().until,
                                    a.header().total,
                                    a.header().bytes,
                                ) != (since, until, total, bytes) =>
                            {
                                return Err(invalid("header changed between requests"));
                            }
                            Some(_) => {}
                            None => assembly = Some(Assembly::new(ask, header)?),
                        }
                    }
                    Some(SyncFrame::SyncPart { index, total, data }) => match assembly.as_mut() {
                        Some(a) => a.add(index, total, &data)?,
                        None => return Err(invalid(format!("part {index}/{total} before any header"))),
                    },
                    Some(SyncFrame::Error(ErrorFrame { code, message, .. })) => {
                        return Err(SyncError::Refused {
                            code: clip(code, MAX_REFUSAL_CODE),
                            message: clip(message, MAX_REFUSAL_MESSAGE),
                        })
                    }
                    Some(other) => return Err(invalid(format!("unexpected {} frame", other.kind()))),
                }
            }
        })
        .await;
        match result {
            Ok(Err(e @ (SyncError::Refused { .. } | SyncError::Invalid(_)))) => return Err(e),
            Ok(Err(e)) => tracing::debug!(%peer, attempt, cause = %e, "sync attempt failed"),
            Ok(Ok(())) => {}
            Err(_) => {
                let have = assembly.as_ref().map_or(0, Assembly::held);
                tracing::info!(%peer, attempt, have, "sync request timed out; asking for the rest");
            }
        }
        if assembly.as_ref().is_some_and(Assembly::is_complete) {
            if let Some(a) = assembly.take() {
                let (until, head) = (a.header().until, a.header().head);
                let entries = a.finish()?;
                return Ok(Pulled { entries, until, head });
            }
        }
    }
    let (total, missing) = assembly
        .as_ref()
        .map_or((0, 0), |a| (a.header().total, a.missing().len()));
    Err(SyncError::Incomplete {
        attempts: MAX_ATTEMPTS,
        missing,
        total,
    })
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_texts_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("busy".into(), 64), "busy");
        assert_eq!(clip("ééé".into(), 3), "é…");
        assert!(clip("x".repeat(1 << 20), MAX_REFUSAL_MESSAGE).len() <= MAX_REFUSAL_MESSAGE + 3);
    }
}
