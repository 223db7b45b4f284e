//! `oc_intake`: which JetStream messages were journaled, as *runs* of consecutive stream
//! sequences, one document per run (`{_id: first, hi: last, seq}`) instead of one per
//! message. A journal commit of a pull batch is usually one run: one document written per
//! commit, and a redelivery check reads the few runs that reach its batch instead of
//! looking up every sequence (docs/PERFORMANCE.md, "MongoDB: fewer documents per event").
//!
//! Forgetting (below the consumer's redelivery floor) deletes the runs wholly below the
//! floor and records the floor in `oc_meta`: a run that straddles it stays, and the
//! sequences of it below the floor are no longer reported.

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::ClientSession;

use super::bson::to_i64;
use super::error::Failure;
use super::names::{INTAKE, META};
use super::MongoStore;

/// `oc_meta` document holding the floor below which sequences are forgotten.
pub(super) const INTAKE_FLOOR: &str = "intake_floor";

/// Sorted, disjoint ranges of stream sequences (inclusive bounds).
#[derive(Debug, Default, PartialEq)]
pub(super) struct Runs(Vec<(u64, u64)>);

impl Runs {
    /// The runs of consecutive sequences among `seqs`, in any order, duplicates allowed.
    pub(super) fn of(seqs: &[u64]) -> Self {
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        Self::merged(sorted.into_iter().map(|s| (s, s)).collect())
    }

    /// Ranges in any order, overlapping or touching, merged.
    pub(super) fn merged(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|(lo, hi)| lo <= hi);
        ranges.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        Runs(out)
    }

    pub(super) fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    pub(super) fn contains(&self, seq: u64) -> bool {
        let after = self.0.partition_point(|(lo, _)| *lo <= seq);
        after > 0 && self.0[after - 1].1 >= seq
    }
}

impl MongoStore {
    /// Records which JetStream messages this journal commit holds, one document per run; a
    /// run already there under the same first sequence (a redelivery journaled anyway) is
    /// replaced.
    pub(super) async fn mark_intake(
        &self,
        s: &mut ClientSession,
        stream_seqs: &[u64],
        seq: u64,
    ) -> Result<(), Failure> {
        let seq = to_i64(seq, "seq")?;
        let runs = Runs::of(stream_seqs);
        let mut firsts = Vec::with_capacity(runs.ranges().len());
        let mut docs = Vec::with_capacity(runs.ranges().len());
        for &(lo, hi) in runs.ranges() {
            let lo = to_i64(lo, "stream seq")?;
            firsts.push(lo);
            docs.push(doc! {"_id": lo, "hi": to_i64(hi, "stream seq")?, "seq": seq});
        }
        if docs.is_empty() {
            return Ok(());
        }
        let intake = self.coll::<Document>(INTAKE);
        intake
            .delete_many(doc! {"_id": {"$in": &firsts}})
            .session(&mut *s)
            .await?;
        intake.insert_many(docs).session(&mut *s).await?;
        Ok(())
    }

    /// Which of `seqs` are recorded: the runs reaching into `min..=max` read (by the `hi`
    /// index), the sequences below the forgotten floor left out.
    pub(super) async fn intake_recorded(&self, seqs: &[u64]) -> Result<Vec<u64>, Failure> {
        let (Some(&min), Some(&max)) = (seqs.iter().min(), seqs.iter().max()) else {
            return Ok(Vec::new());
        };
        let floor = self.intake_floor().await?;
        let mut cursor = self
            .coll::<Document>(INTAKE)
            .find(doc! {"hi": {"$gte": to_i64(min, "stream seq")?}, "_id": {"$lte": to_i64(max, "stream seq")?}})
            .projection(doc! {"_id": 1, "hi": 1})
            .await?;
        let mut ranges = Vec::new();
        while let Some(d) = cursor.try_next().await? {
            let bound = |k: &str| d.get_i64(k).ok().and_then(|n| u64::try_from(n).ok());
            if let (Some(lo), Some(hi)) = (bound("_id"), bound("hi")) {
                ranges.push((lo.max(floor), hi));
            }
        }
        let runs = Runs::merged(ranges);
        Ok(seqs.iter().copied().filter(|&s| runs.contains(s)).collect())
    }

    pub(super) async fn intake_floor(&self) -> Result<u64, Failure> {
        let d = self
            .coll::<Document>(META)
            .find_one(doc! {"_id": INTAKE_FLOOR})
            .await?;
        Ok(d.and_then(|d| d.get_i64("seq").ok())
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0))
    }

    /// Forgets the sequences below `below`: the runs wholly below it deleted, the floor
    /// raised (never lowered) for the run that straddles it.
    pub(super) async fn intake_forget(&self, below: u64) -> Result<(), Failure> {
        let below = i64::try_from(below).unwrap_or(i64::MAX);
        self.relaxed(META)
            .update_one(doc! {"_id": INTAKE_FLOOR}, doc! {"$max": {"seq": below}})
            .upsert(true)
            .await?;
        self.relaxed(INTAKE)
            .delete_many(doc! {"hi": {"$lt": below}})
            .await?;
        Ok(())
    }

    /// The highest sequence recorded (0 when none).
    pub(super) async fn intake_highest(&self) -> Result<u64, Failure> {
        let last = self
            .coll::<Document>(INTAKE)
            .find_one(doc! {})
            .sort(doc! {"hi": -1})
            .projection(doc! {"hi": 1})
            .await?;
        Ok(last
            .and_then(|d| d.get_i64("hi").ok())
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0))
    }

    /// Records written one document per message by versions before the runs
    /// (`{_id: stream seq, seq}`) become runs of one.
    pub(super) async fn intake_runs_from_rows(&self) -> Result<(), Failure> {
        self.coll::<Document>(INTAKE)
            .update_many(
                doc! {"hi": {"$exists": false}},
                vec![doc! {"$set": {"hi": "$_id"}}],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Runs;

    #[test]
    fn runs_are_the_consecutive_sequences_merged() {
        let runs = Runs::of(&[12, 10, 11, 11, 20, 14, 13, 22]);
        assert_eq!(runs.ranges(), &[(10, 14), (20, 20), (22, 22)]);
        for (seq, held) in [
            (9, false),
            (10, true),
            (14, true),
            (15, false),
            (20, true),
            (21, false),
            (22, true),
        ] {
            assert_eq!(runs.contains(seq), held, "{seq}");
        }
        assert_eq!(Runs::of(&[]).ranges(), &[]);
        assert_eq!(Runs::of(&[u64::MAX, 0]).ranges(), &[(0, 0), (u64::MAX, u64::MAX)]);
        // Overlapping and touching ranges (runs of redeliveries), and one emptied by a floor.
        let runs = Runs::merged(vec![(5, 9), (1, 3), (4, 4), (8, 12), (30, 20)]);
        assert_eq!(runs.ranges(), &[(1, 12)]);
        assert!(!runs.contains(0) && runs.contains(12) && !runs.contains(13));
    }
}
