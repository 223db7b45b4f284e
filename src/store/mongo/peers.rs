//! The peers table's one transaction: a peer met is read and written together, so a
//! relation set meanwhile is kept.

use mongodb::bson::doc;
use mongodb::ClientSession;

use super::bson::PeerDoc;
use super::error::Failure;
use super::names::PEERS;
use super::MongoStore;
use crate::store::{keep_relation, PeerRow, Relation};

impl MongoStore {
    pub(super) async fn meet_txn(
        &self,
        s: &mut ClientSession,
        mut row: PeerRow,
    ) -> Result<Relation, Failure> {
        let peers = self.coll::<PeerDoc>(PEERS);
        if let Some(existing) = peers
            .find_one(doc! {"_id": &row.peer_id})
            .session(&mut *s)
            .await?
        {
            keep_relation(&mut row, existing.into_row()?);
        }
        let relation = row.relation;
        let doc = PeerDoc::from_row(row)?;
        peers
            .replace_one(doc! {"_id": &doc.peer_id}, &doc)
            .upsert(true)
            .session(&mut *s)
            .await?;
        Ok(relation)
    }
}
