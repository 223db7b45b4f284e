//! Transactions: each starts durable (majority, journaled, bounded in time), commits again
//! while MongoDB cannot tell whether a commit happened, and runs again on a transient error.

use std::time::Duration;

use mongodb::error::{Error as MongoError, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{Acknowledgment, ReadConcern, WriteConcern};
use mongodb::ClientSession;

use super::error::Failure;
use super::{MongoSettings, MongoStore};
use crate::backoff::Backoff;

/// First wait before committing again when a commit's outcome is unknown; it doubles up to
/// [`COMMIT_RETRY_MAX`], within [`MongoSettings::commit_attempts`].
const COMMIT_RETRY_MIN: Duration = Duration::from_millis(100);
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Write concern of every commit: acknowledged by a majority and in their on-disk
/// journals, bounded in time.
pub(super) fn durable(settings: &MongoSettings) -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .w_timeout(settings.write_timeout)
        .build()
}

impl MongoStore {
    /// Starts a session with a transaction that commits durably.
    pub(super) async fn begin(&self) -> Result<ClientSession, MongoError> {
        let mut session = self.client.start_session().await?;
        session
            .start_transaction()
            .read_concern(ReadConcern::local())
            .write_concern(durable(&self.settings))
            .await?;
        Ok(session)
    }

    /// Commits, retrying while MongoDB cannot tell whether the commit happened (the
    /// driver's documented procedure: a retried commit of a committed transaction is
    /// a success).
    pub(super) async fn commit(&self, session: &mut ClientSession) -> Result<(), MongoError> {
        let mut backoff = Backoff::new(COMMIT_RETRY_MIN, COMMIT_RETRY_MAX);
        let mut attempt = 1;
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT)
                        && attempt < self.settings.commit_attempts =>
                {
                    let delay = backoff.next_delay();
                    tracing::warn!(attempt, cause = %e, retry_in = ?delay, "mongodb: commit outcome unknown, committing again");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// What to do after a transaction body ran: commit it, or tell the caller to run
    /// the whole transaction again (a transient error), or give up.
    pub(super) async fn finish<T>(
        &self,
        mut session: ClientSession,
        body: Result<T, Failure>,
        attempt: u32,
    ) -> Result<Option<T>, Failure> {
        let result = match body {
            Ok(v) => self.commit(&mut session).await.map(|()| v).map_err(Failure::from),
            // Dropping the session aborts the transaction.
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_transient() && attempt < self.settings.transaction_attempts => {
                tracing::debug!(attempt, cause = %e, "mongodb: transient transaction error, running it again");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
