//! The applied log (one entry per apply a receiver makes, keyed by a number that grows by one
//! per entry), packed: the entries one apply commit writes go into groups of the journal's
//! layout ([`groups::Group`], up to [`groups::GROUP_BYTES`]) keyed by their first key, instead
//! of a B-tree row of ≈ 1.3 KiB each (docs/PERFORMANCE.md, "The applied log in groups").
//!
//! Stores of earlier versions hold their entries as rows (`applied_log`); those stay rows until
//! the trim removes them. Invariant: every key in a group is above every key in a row (new
//! keys follow the last of both), so reads in key order read the rows, then the groups, and
//! the trim, which removes from the front, takes the rows first.

use redb::{ReadableTable, TableDefinition};

use super::groups::{self, Group};
use super::unavailable;
use crate::store::StoreResult;

/// key → one applied-log entry, as stores of earlier versions wrote them.
pub(super) const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("applied_log");
/// first key → a group of entries of consecutive keys.
pub(super) const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("applied_groups");

/// Both tables of the applied log, opened in one transaction.
pub(super) struct Log<T> {
    pub(super) rows: T,
    pub(super) groups: T,
}

pub(super) fn open_read(
    txn: &redb::ReadTransaction,
) -> StoreResult<Log<redb::ReadOnlyTable<u64, &'static [u8]>>> {
    Ok(Log {
        rows: txn.open_table(ROWS).map_err(unavailable)?,
        groups: txn.open_table(GROUPS).map_err(unavailable)?,
    })
}

pub(super) fn open_write(
    txn: &redb::WriteTransaction,
) -> StoreResult<Log<redb::Table<'_, u64, &'static [u8]>>> {
    Ok(Log {
        rows: txn.open_table(ROWS).map_err(unavailable)?,
        groups: txn.open_table(GROUPS).map_err(unavailable)?,
    })
}

impl<T: ReadableTable<u64, &'static [u8]>> Log<T> {
    /// `read(value)` of the entry `key`, if the log holds it.
    pub(super) fn get<R>(
        &self,
        key: u64,
        read: impl FnOnce(&[u8]) -> StoreResult<R>,
    ) -> StoreResult<Option<R>> {
        if let Some(item) = self.groups.range(..=key).map_err(unavailable)?.next_back() {
            let (k, v) = item.map_err(unavailable)?;
            let group = Group::parse(k.value(), v.value())?;
            return match group.get(key) {
                Some(value) => read(value?).map(Some),
                None => Ok(None),
            };
        }
        match self.rows.get(key).map_err(unavailable)? {
            Some(v) => read(v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// The last key the log holds.
    pub(super) fn last(&self) -> StoreResult<Option<u64>> {
        if let Some((k, v)) = self.groups.last().map_err(unavailable)? {
            return Ok(Some(Group::parse(k.value(), v.value())?.last()));
        }
        Ok(self.rows.last().map_err(unavailable)?.map(|(k, _)| k.value()))
    }

    /// Calls `each(key, value)` for the entries below `before`, newest first, as long as it
    /// answers `true`.
    pub(super) fn newest_before(
        &self,
        before: u64,
        mut each: impl FnMut(u64, &[u8]) -> StoreResult<bool>,
    ) -> StoreResult<()> {
        for item in self.groups.range(..before).map_err(unavailable)?.rev() {
            let (k, v) = item.map_err(unavailable)?;
            let group = Group::parse(k.value(), v.value())?;
            for i in (0..group.len()).rev() {
                // No overflow: `parse` checked the group's last key.
                let key = group.first().saturating_add(i as u64);
                if key < before && !each(key, group.entry(i)?)? {
                    return Ok(());
                }
            }
        }
        for item in self.rows.range(..before).map_err(unavailable)?.rev() {
            let (k, v) = item.map_err(unavailable)?;
            if !each(k.value(), v.value())? {
                return Ok(());
            }
        }
        Ok(())
    }
}

impl Log<redb::Table<'_, u64, &'static [u8]>> {
    /// Removes entries from the front, oldest first, at most `max` of them, as long as
    /// `trims(key, last, value)` answers `true` (`last`: the log's last key); a group it
    /// stops in is written again holding the entries that stay. Returns how many went.
    pub(super) fn trim_front(
        &mut self,
        max: u64,
        mut trims: impl FnMut(u64, u64, &[u8]) -> StoreResult<bool>,
    ) -> StoreResult<u64> {
        let Some(last) = self.last()? else {
            return Ok(0);
        };
        let mut removed = 0u64;
        while removed < max {
            let Some((key, row)) = first_owned(&self.rows)? else {
                break;
            };
            if !trims(key, last, &row)? {
                return Ok(removed);
            }
            self.rows.remove(key).map_err(unavailable)?;
            removed += 1;
        }
        while removed < max {
            let Some((first, value)) = first_owned(&self.groups)? else {
                break;
            };
            let group = Group::parse(first, &value)?;
            let mut kept = group.len();
            for i in 0..group.len() {
                let key = first.saturating_add(i as u64);
                if removed >= max || !trims(key, last, group.entry(i)?)? {
                    kept = i;
                    break;
                }
                removed += 1;
            }
            if kept == group.len() {
                self.groups.remove(first).map_err(unavailable)?;
                continue;
            }
            if kept > 0 {
                self.groups.remove(first).map_err(unavailable)?;
                let mut packer = groups::Packer::new();
                let mut put = insert(&mut self.groups);
                for i in kept..group.len() {
                    let entry = group.entry(i)?;
                    packer.push_into(
                        first.saturating_add(i as u64),
                        |out| {
                            out.extend_from_slice(entry);
                            Ok(())
                        },
                        &mut put,
                    )?;
                }
                packer.finish_into(&mut put)?;
            }
            break;
        }
        Ok(removed)
    }
}

/// Packs the entries an apply commit writes into groups of [`GROUPS`].
pub(super) struct Appender {
    packer: groups::Packer,
    /// The key the next entry takes.
    next: u64,
}

impl Appender {
    pub(super) fn new(log: &Log<redb::Table<'_, u64, &'static [u8]>>) -> StoreResult<Self> {
        Ok(Appender {
            packer: groups::Packer::new(),
            next: log.last()?.map_or(1, |k| k.saturating_add(1)),
        })
    }

    /// Appends an entry, whose value `write` appends to the buffer it is given; returns its key.
    pub(super) fn push(
        &mut self,
        table: &mut redb::Table<'_, u64, &'static [u8]>,
        write: impl FnOnce(&mut Vec<u8>) -> StoreResult<()>,
    ) -> StoreResult<u64> {
        let key = self.next;
        self.packer.push_into(key, write, &mut insert(table))?;
        self.next = key.saturating_add(1);
        Ok(key)
    }

    pub(super) fn finish(mut self, table: &mut redb::Table<'_, u64, &'static [u8]>) -> StoreResult<()> {
        self.packer.finish_into(&mut insert(table))
    }
}

/// The first key of `table` and a copy of its value (the table is written next).
fn first_owned(table: &redb::Table<'_, u64, &'static [u8]>) -> StoreResult<Option<(u64, Vec<u8>)>> {
    Ok(table
        .first()
        .map_err(unavailable)?
        .map(|(k, v)| (k.value(), v.value().to_vec())))
}

/// Inserts a group of the applied log.
fn insert<'t, 'txn>(
    table: &'t mut redb::Table<'txn, u64, &'static [u8]>,
) -> impl FnMut(u64, &[u8]) -> StoreResult<()> + use<'t, 'txn> {
    move |first, value| table.insert(first, value).map(drop).map_err(unavailable)
}
