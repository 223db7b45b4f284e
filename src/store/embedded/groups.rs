//! The journal above its compaction floor, packed: the entries of consecutive seqs one commit
//! writes go into one redb value (a *group*) of up to [`GROUP_BYTES`], keyed by the origin and
//! the group's first seq, instead of one B-tree row each.
//!
//! Why: a row per entry made redb split a 4 KiB leaf every three entries and write each leaf
//! and branch it touched; a packed group is one insert and one contiguous page run
//! (docs/PERFORMANCE.md, "The journal in groups"). Below the floor, where compaction keeps
//! only the latest entry of each resource and later entries remove older ones one by one, the
//! entries stay one row each in the `journal` table; compaction moves them there.
//!
//! The applied log of a receiver is packed in the same layout ([`super::applied_log`]), with a
//! key of its own: [`Packer::push_into`] takes the insert of its table.
//!
//! Invariant kept by every writer: for an origin, every seq held in a group is above every seq
//! held in a row (the rows hold the compacted range, the groups what follows), and no seq is in
//! both. So a read in seq order reads the rows, then the groups.
//!
//! A group's value: the entries' bytes one after the other (each as a row's value:
//! `write_journal_value`), then the end offset of each entry (u32, little endian), then the
//! number of entries (u32). The trailer lets the entries be written straight into the value.

use redb::{ReadableTable, TableDefinition};

use super::{corrupt, unavailable};
use crate::store::StoreResult;

/// (origin, first seq) → a group of entries of consecutive seqs.
pub(super) const GROUPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("journal_groups");

/// Most bytes of a group's value, its trailer included: an entry that would take it further
/// starts the next group (an entry larger than this is a group of its own). redb gives a value
/// a page run of a power-of-two size: with its key and redb's page header such a group fits
/// 32 KiB. Larger groups write a little less per entry but make a lookup of one entry read the
/// whole run (docs/PERFORMANCE.md, "The journal in groups", measured 16, 32 and 64 KiB).
pub(super) const GROUP_BYTES: usize = 32 * 1024 - 512;

/// Reads a group's value.
pub(super) struct Group<'a> {
    first: u64,
    body: &'a [u8],
    ends: &'a [u8],
}

impl<'a> Group<'a> {
    pub(super) fn parse(first: u64, value: &'a [u8]) -> StoreResult<Self> {
        let bad = || corrupt(format!("group at {first} is malformed"));
        let (rest, count) = value.split_last_chunk::<4>().ok_or_else(bad)?;
        let count = u32::from_le_bytes(*count) as usize;
        let table = count
            .checked_mul(4)
            .filter(|t| *t <= rest.len())
            .ok_or_else(bad)?;
        let (body, ends) = rest.split_at(rest.len() - table);
        if count == 0 || first.checked_add(count as u64 - 1).is_none() {
            return Err(bad());
        }
        Ok(Group { first, body, ends })
    }

    pub(super) fn first(&self) -> u64 {
        self.first
    }

    pub(super) fn len(&self) -> usize {
        self.ends.len() / 4
    }

    /// The last seq it holds (`parse` checked it does not overflow).
    pub(super) fn last(&self) -> u64 {
        self.first.saturating_add(self.len() as u64 - 1)
    }

    fn end(&self, i: usize) -> Option<usize> {
        let at = i.checked_mul(4)?;
        let bytes: [u8; 4] = self.ends.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes) as usize)
    }

    /// The value of its `i`-th entry.
    pub(super) fn entry(&self, i: usize) -> StoreResult<&'a [u8]> {
        let start = if i == 0 { Some(0) } else { self.end(i - 1) };
        start
            .zip(self.end(i))
            .and_then(|(start, end)| self.body.get(start..end))
            .ok_or_else(|| corrupt(format!("group at {} is malformed", self.first)))
    }

    /// The value of the entry `seq`, if it holds it.
    pub(super) fn get(&self, seq: u64) -> Option<StoreResult<&'a [u8]>> {
        let i = seq.checked_sub(self.first)?;
        (i < self.len() as u64).then(|| self.entry(i as usize))
    }
}

/// Packs entries of consecutive seqs into groups, each inserted once it is full and the last
/// one by [`Packer::finish`].
pub(super) struct Packer {
    first: u64,
    next: u64,
    value: Vec<u8>,
    ends: Vec<u8>,
}

impl Packer {
    pub(super) fn new() -> Self {
        Packer {
            first: 0,
            next: 0,
            value: Vec::with_capacity(GROUP_BYTES + 4096),
            ends: Vec::with_capacity(256),
        }
    }

    /// Adds the entry `seq` of `origin`'s journal, whose value `write` appends to the buffer
    /// it is given. A seq that does not follow the previous one, or an entry the group has no
    /// room for, starts a new group.
    pub(super) fn push(
        &mut self,
        table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
        origin: &str,
        seq: u64,
        write: impl FnOnce(&mut Vec<u8>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        self.push_into(seq, write, &mut insert_at(table, origin))
    }

    /// Inserts the group of `origin`'s journal being packed, if any.
    pub(super) fn finish(
        &mut self,
        table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
        origin: &str,
    ) -> StoreResult<()> {
        self.finish_into(&mut insert_at(table, origin))
    }

    /// [`Packer::push`] for a table of any key: `insert(first, value)` stores a full group.
    pub(super) fn push_into(
        &mut self,
        seq: u64,
        write: impl FnOnce(&mut Vec<u8>) -> StoreResult<()>,
        insert: &mut impl FnMut(u64, &[u8]) -> StoreResult<()>,
    ) -> StoreResult<()> {
        if !self.ends.is_empty() && seq != self.next {
            self.finish_into(insert)?;
        }
        if self.ends.is_empty() {
            self.first = seq;
        }
        let start = self.value.len();
        write(&mut self.value)?;
        // With this entry, its end offset and the count.
        let size = self.value.len() + self.ends.len() + 8;
        if size > GROUP_BYTES && !self.ends.is_empty() {
            // Over: the group closes without it, and it opens the next one.
            let entry = self.value.split_off(start);
            self.finish_into(insert)?;
            self.first = seq;
            self.value.extend_from_slice(&entry);
        }
        let end = u32::try_from(self.value.len()).map_err(|_| corrupt("group over 4 GiB"))?;
        self.ends.extend_from_slice(&end.to_le_bytes());
        self.next = seq.saturating_add(1);
        Ok(())
    }

    /// [`Packer::finish`] for a table of any key.
    pub(super) fn finish_into(
        &mut self,
        insert: &mut impl FnMut(u64, &[u8]) -> StoreResult<()>,
    ) -> StoreResult<()> {
        if self.ends.is_empty() {
            return Ok(());
        }
        let count = u32::try_from(self.ends.len() / 4).map_err(|_| corrupt("group too long"))?;
        self.value.extend_from_slice(&self.ends);
        self.value.extend_from_slice(&count.to_le_bytes());
        insert(self.first, &self.value)?;
        self.value.clear();
        self.ends.clear();
        Ok(())
    }
}

/// Inserts a group of `origin`'s journal.
fn insert_at<'t, 'txn>(
    table: &'t mut redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    origin: &'t str,
) -> impl FnMut(u64, &[u8]) -> StoreResult<()> + use<'t, 'txn> {
    move |first, value| {
        table
            .insert((origin, first), value)
            .map(drop)
            .map_err(unavailable)
    }
}

/// The last seq the groups of `origin` hold.
pub(super) fn last(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
) -> StoreResult<Option<u64>> {
    let mut range = table
        .range((origin, 0u64)..=(origin, u64::MAX))
        .map_err(unavailable)?;
    match range.next_back() {
        Some(item) => {
            let (k, v) = item.map_err(unavailable)?;
            Ok(Some(Group::parse(k.value().1, v.value())?.last()))
        }
        None => Ok(None),
    }
}

/// `read(value)` of the entry `seq` of `origin`, if a group holds it.
pub(super) fn with_entry<T>(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
    seq: u64,
    read: impl FnOnce(&[u8]) -> StoreResult<T>,
) -> StoreResult<Option<T>> {
    let mut range = table.range((origin, 0u64)..=(origin, seq)).map_err(unavailable)?;
    let Some(item) = range.next_back() else {
        return Ok(None);
    };
    let (k, v) = item.map_err(unavailable)?;
    let group = Group::parse(k.value().1, v.value())?;
    match group.get(seq) {
        Some(value) => read(value?).map(Some),
        None => Ok(None),
    }
}

/// Calls `each(seq, value)` for the entries of `origin` from seq `from` on, in seq order, as
/// long as it answers `true`.
pub(super) fn scan(
    table: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    origin: &str,
    from: u64,
    mut each: impl FnMut(u64, &[u8]) -> StoreResult<bool>,
) -> StoreResult<()> {
    // The group holding `from` starts at or before it; the others after it.
    let mut visit = |first: u64, value: &[u8]| -> StoreResult<bool> {
        let group = Group::parse(first, value)?;
        let skip = usize::try_from(from.saturating_sub(first)).unwrap_or(usize::MAX);
        for i in skip..group.len() {
            // No overflow: `parse` checked the group's last seq.
            if !each(first.saturating_add(i as u64), group.entry(i)?)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if let Some(item) = table
        .range((origin, 0u64)..=(origin, from))
        .map_err(unavailable)?
        .next_back()
    {
        let (k, v) = item.map_err(unavailable)?;
        if !visit(k.value().1, v.value())? {
            return Ok(());
        }
    }
    let Some(after) = from.checked_add(1) else {
        return Ok(());
    };
    for item in table
        .range((origin, after)..=(origin, u64::MAX))
        .map_err(unavailable)?
    {
        let (k, v) = item.map_err(unavailable)?;
        if !visit(k.value().1, v.value())? {
            return Ok(());
        }
    }
    Ok(())
}

/// Removes the entries of `origin` up to seq `through` from the groups: the groups that end
/// there or before go, the one that straddles it is written again holding what follows.
pub(super) fn drop_through(
    table: &mut redb::Table<(&'static str, u64), &'static [u8]>,
    origin: &str,
    through: u64,
) -> StoreResult<()> {
    let mut gone: Vec<u64> = Vec::new();
    let mut straddling: Option<(u64, Vec<u8>)> = None;
    for item in table
        .range((origin, 0u64)..=(origin, through))
        .map_err(unavailable)?
    {
        let (k, v) = item.map_err(unavailable)?;
        let group = Group::parse(k.value().1, v.value())?;
        gone.push(group.first());
        if group.last() > through {
            straddling = Some((group.first(), v.value().to_vec()));
        }
    }
    for first in gone {
        table.remove((origin, first)).map_err(unavailable)?;
    }
    if let Some((first, value)) = straddling {
        let group = Group::parse(first, &value)?;
        let mut packer = Packer::new();
        for seq in through.saturating_add(1)..=group.last() {
            if let Some(entry) = group.get(seq) {
                let entry = entry?;
                packer.push(table, origin, seq, |out| {
                    out.extend_from_slice(entry);
                    Ok(())
                })?;
            }
        }
        packer.finish(table, origin)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata};

    fn fill(db: &Database, origin: &str, seqs: std::ops::RangeInclusive<u64>, bytes: usize) {
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(GROUPS).unwrap();
            let mut packer = Packer::new();
            for seq in seqs {
                packer
                    .push(&mut table, origin, seq, |out| {
                        out.extend(std::iter::repeat_n((seq % 251) as u8, bytes));
                        Ok(())
                    })
                    .unwrap();
            }
            packer.finish(&mut table, origin).unwrap();
        }
        txn.commit().unwrap();
    }

    fn seqs(db: &Database, origin: &str, from: u64) -> Vec<u64> {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(GROUPS).unwrap();
        let mut out = Vec::new();
        scan(&table, origin, from, |seq, value| {
            assert!(
                value.iter().all(|b| *b == (seq % 251) as u8),
                "entry {seq} holds its own bytes"
            );
            out.push(seq);
            Ok(true)
        })
        .unwrap();
        out
    }

    #[test]
    fn entries_read_back_by_seq_from_any_point_and_groups_close_at_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("g.redb")).unwrap();
        // 1 300-byte entries: 24 to a group; a second commit, and another origin beside.
        fill(&db, "a", 1..=100, 1_300);
        fill(&db, "a", 101..=130, 1_300);
        fill(&db, "b", 1..=3, 10);
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(GROUPS).unwrap();
        assert_eq!(table.len().unwrap(), 8, "a: 4 × 24 + 4, then 24 + 6; b: 3");
        for item in table.iter().unwrap() {
            assert!(item.unwrap().1.value().len() <= GROUP_BYTES);
        }
        drop((table, txn));
        assert_eq!(seqs(&db, "a", 0), (1..=130).collect::<Vec<_>>());
        assert_eq!(seqs(&db, "a", 49), (49..=130).collect::<Vec<_>>());
        assert_eq!(seqs(&db, "a", 130), vec![130]);
        assert!(seqs(&db, "a", 131).is_empty());
        assert_eq!(seqs(&db, "b", 2), vec![2, 3]);
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(GROUPS).unwrap();
        assert_eq!(last(&table, "a").unwrap(), Some(130));
        assert_eq!(last(&table, "c").unwrap(), None);
        let got = with_entry(&table, "a", 97, |v| Ok(v.len())).unwrap();
        assert_eq!(got, Some(1_300));
        assert_eq!(with_entry(&table, "a", 131, |v| Ok(v.len())).unwrap(), None);
        assert_eq!(with_entry(&table, "b", 4, |v| Ok(v.len())).unwrap(), None);
    }

    #[test]
    fn dropping_through_a_seq_keeps_what_follows_it_readable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("g.redb")).unwrap();
        fill(&db, "a", 1..=100, 1_300);
        fill(&db, "b", 1..=10, 10);
        let txn = db.begin_write().unwrap();
        drop_through(&mut txn.open_table(GROUPS).unwrap(), "a", 60).unwrap();
        txn.commit().unwrap();
        assert_eq!(seqs(&db, "a", 0), (61..=100).collect::<Vec<_>>());
        assert_eq!(seqs(&db, "b", 0), (1..=10).collect::<Vec<_>>());
        let txn = db.begin_write().unwrap();
        drop_through(&mut txn.open_table(GROUPS).unwrap(), "a", 100).unwrap();
        txn.commit().unwrap();
        assert!(seqs(&db, "a", 0).is_empty());
    }

    #[test]
    fn a_malformed_group_is_an_error_not_a_panic() {
        for value in [
            &b""[..],
            &[1, 0, 0],
            &[5, 0, 0, 0],
            &[0, 0, 0, 0],
            &[9, 0, 0, 0, 1, 0, 0, 0],
        ] {
            if let Ok(group) = Group::parse(1, value) {
                assert!(group.entry(0).is_err(), "{value:?}");
            }
        }
        assert!(Group::parse(u64::MAX, &[0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]).is_err());
    }
}
