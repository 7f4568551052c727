//! The feed: one row per committed change, in commit order, numbered by `Seq`.
//!
//! `Store` writes a row in the same atomic set of writes as the change it describes (see
//! `atomic`), so a crash never leaves a change that subscribers and connectors will not see.
//! Rows become visible to readers only once they are flushed, so a reader never sees a sequence
//! number that a crash could reuse.
//! What a connector or a subscriber does with a row is its own business, not this module's.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::key::{EntityId, Kind};
use crate::origin::Origin;

/// A feed sequence number. The first row is 1; 0 means "before the first row".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number before every row.
    pub const ZERO: Seq = Seq(0);

    /// The next sequence number.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }

    pub(crate) fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Seq {
    type Err = std::num::ParseIntError;
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        value.trim().parse().map(Seq)
    }
}

/// One committed change, as subscribers and connectors see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedRow {
    /// Its position in the feed.
    pub seq: Seq,
    /// The entity's kind.
    pub kind: Kind,
    /// The entity's id.
    pub id: EntityId,
    /// The entity's version after the change.
    pub version: String,
    /// Who made the change.
    pub origin: Origin,
    /// The dotted paths of the fields the change set or removed.
    pub fields: Vec<String>,
    /// Whether the entity exists after the change (false after a delete).
    pub exists: bool,
    /// When the change was committed here, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// The feed rows committed last, in order, so that readers who keep up with the feed (event
/// streams, connectors, replication) get new rows from memory: reading them from sled would
/// cost a range scan each time, and each reader would decode every row again.
///
/// It holds a run of consecutive sequence numbers, the last `capacity` committed; rows are added
/// by the committing thread in sequence order, after their batch is applied and before they are
/// flushed, so every durable row after the first one held is here. A reader further behind than
/// that reads sled.
pub(crate) struct RecentRows {
    rows: std::sync::Mutex<std::collections::VecDeque<FeedRow>>,
    capacity: usize,
}

impl RecentRows {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            rows: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<FeedRow>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds rows just applied, which follow the last one held (by sequence number).
    pub(crate) fn push(&self, rows: impl IntoIterator<Item = FeedRow>) {
        let mut held = self.lock();
        for row in rows {
            debug_assert!(
                held.back().is_none_or(|last| last.seq.next() == row.seq),
                "feed rows are added in sequence"
            );
            if held.len() == self.capacity {
                held.pop_front();
            }
            held.push_back(row);
        }
    }

    /// The rows after `since` up to `through`, only those of `kind` if given, at most `limit`:
    /// `None` when the rows right after `since` are no longer (or not yet) held.
    pub(crate) fn read(
        &self,
        since: Seq,
        through: Seq,
        kind: Option<&Kind>,
        limit: usize,
    ) -> Option<Vec<FeedRow>> {
        let held = self.lock();
        let first = held.front()?.seq;
        if first > since.next() || held.back()?.seq < through {
            return None;
        }
        let skip = usize::try_from(since.0.saturating_sub(first.0 - 1)).ok()?;
        Some(
            held.iter()
                .skip(skip)
                .take_while(|row| row.seq <= through)
                .filter(|row| kind.is_none_or(|kind| *kind == row.kind))
                .take(limit)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, kind: &str) -> FeedRow {
        FeedRow {
            seq: Seq(seq),
            kind: Kind::new(kind).unwrap(),
            id: EntityId::new("1").unwrap(),
            version: String::new(),
            origin: Origin::local("u").unwrap(),
            fields: Vec::new(),
            exists: true,
            at_ms: 0,
        }
    }

    fn seqs(rows: Option<Vec<FeedRow>>) -> Option<Vec<u64>> {
        rows.map(|rows| rows.iter().map(|row| row.seq.0).collect())
    }

    #[test]
    fn recent_rows_hold_the_last_ones_and_say_when_a_reader_is_behind_them() {
        let recent = RecentRows::new(4);
        assert_eq!(seqs(recent.read(Seq(0), Seq(1), None, 10)), None);
        recent.push((1..=6).map(|seq| row(seq, if seq % 2 == 0 { "a" } else { "b" })));
        // 3 to 6 are held.
        assert_eq!(seqs(recent.read(Seq(1), Seq(6), None, 10)), None);
        assert_eq!(
            seqs(recent.read(Seq(2), Seq(6), None, 10)),
            Some(vec![3, 4, 5, 6])
        );
        assert_eq!(
            seqs(recent.read(Seq(3), Seq(5), None, 10)),
            Some(vec![4, 5])
        );
        assert_eq!(seqs(recent.read(Seq(2), Seq(6), None, 2)), Some(vec![3, 4]));
        let a = Kind::new("a").unwrap();
        assert_eq!(
            seqs(recent.read(Seq(2), Seq(6), Some(&a), 10)),
            Some(vec![4, 6])
        );
        assert_eq!(
            seqs(recent.read(Seq(4), Seq(5), Some(&a), 10)),
            Some(vec![])
        );
        // Rows not yet held.
        assert_eq!(seqs(recent.read(Seq(5), Seq(7), None, 10)), None);
    }
}
