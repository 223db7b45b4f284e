//! The searches of the local application in flight, apart from I/O: at most a given number
//! at once, each under a fresh query id, `all` ones with the route of their answers. Owned
//! by the [`super::SearchService`] actor, which changes it one message at a time.

use std::collections::HashMap;

use super::query::new_query_id;
use super::routes::Route;

pub(super) struct InFlight {
    /// Query id → the route of its answers (`all` searches only).
    searches: HashMap<String, Option<Route>>,
    max: usize,
}

impl InFlight {
    pub(super) fn new(max: usize) -> InFlight {
        InFlight {
            searches: HashMap::new(),
            max,
        }
    }

    /// Whether one more search may start.
    pub(super) fn has_room(&self) -> bool {
        self.searches.len() < self.max
    }

    /// Records a search (with its route when its answers come on streams the responders
    /// open) and returns its query id, one no search in flight has.
    pub(super) fn admit(&mut self, route: Option<Route>) -> String {
        loop {
            let id = new_query_id();
            if !self.searches.contains_key(&id) {
                self.searches.insert(id.clone(), route);
                return id;
            }
        }
    }

    /// Where the answers of search `query_id` go, if it is in flight and routed.
    pub(super) fn route(&self, query_id: &str) -> Option<Route> {
        self.searches.get(query_id).cloned().flatten()
    }

    /// The search ended.
    pub(super) fn forget(&mut self, query_id: &str) {
        self.searches.remove(query_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::routes::Inbox;
    use std::time::Duration;

    #[tokio::test]
    async fn at_most_max_searches_and_only_routed_ones_are_found() {
        let mut f = InFlight::new(2);
        let inbox = Inbox::new(Duration::from_secs(1));
        let all = f.admit(Some(inbox.route.clone()));
        let known = f.admit(None);
        assert_ne!(all, known);
        assert!(!f.has_room());
        assert!(f.route(&all).is_some());
        assert!(
            f.route(&known).is_none(),
            "answers of known / partner searches are not routed"
        );
        assert!(f.route("nobody").is_none());
        f.forget(&all);
        assert!(f.has_room());
        assert!(f.route(&all).is_none(), "a search that ended is no longer found");
    }
}
