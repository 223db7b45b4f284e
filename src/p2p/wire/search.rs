//! Frames of search streams `/opencloud/resource/search/1.0` (`protocols/search.md`): `search_query`
//! from the searcher, `search_results`, `search_done` and `error` from the responder.

use serde::{Deserialize, Serialize};

use super::framing::{ErrorFrame, Frame};

/// One message on a search stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SearchFrame {
    /// Searcher → responder, first frame of a `known` / `partner` search stream: the
    /// responder's own resources of `data_type` whose values contain `search`, at most
    /// `limit`, in frames of at most `max_frame_bytes`.
    SearchQuery {
        query_id: String,
        data_type: String,
        search: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_frame_bytes: Option<u64>,
    },
    /// Responder → searcher: one batch of results (for an `all` search it is the first
    /// frame of the stream the responder opens), all of `data_type` (the one asked; a
    /// searcher drops batches without it or of another data type).
    SearchResults {
        query_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data_type: Option<String>,
        results: Vec<serde_json::Value>,
    },
    /// Responder → searcher: the last frame. `count` results were sent; `skipped` matches
    /// were left out because one alone exceeds a frame.
    SearchDone {
        query_id: String,
        #[serde(default)]
        count: u64,
        #[serde(default)]
        skipped: u64,
    },
    /// Responder → searcher: the query is refused.
    Error(ErrorFrame),
}

impl Frame for SearchFrame {
    fn kind(&self) -> &'static str {
        match self {
            SearchFrame::SearchQuery { .. } => "search_query",
            SearchFrame::SearchResults { .. } => "search_results",
            SearchFrame::SearchDone { .. } => "search_done",
            SearchFrame::Error(_) => "error",
        }
    }

    fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}
