//! What an application can ask for in `PROPALGATION_EVENT`'s `action`: resource changes
//! (journaled and propagated) and commands (searches, messages to chosen peers).

use serde::{Deserialize, Serialize};

/// What an application asks the node to do with a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum Action {
    #[serde(rename = "PB_CREATE")]
    Create,
    #[serde(rename = "PB_UPDATE")]
    Update,
    #[serde(rename = "PB_DELETE")]
    Delete,
}

impl Action {}

/// Application requests that are not journaled: searches and messages to chosen peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandAction {
    Search,
    Considers,
    Planner,
    ClosePlanner,
}

impl CommandAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CommandAction::Search => "PB_SEARCH",
            CommandAction::Considers => "PB_CONSIDERS",
            CommandAction::Planner => "PB_PLANNER",
            CommandAction::ClosePlanner => "PB_CLOSE_PLANNER",
        }
    }
}
