//! The feed: one row per committed change, in commit order, numbered by `Seq`.
//!
//! `Store` writes a row in the same sled batch as the change it describes, so a crash never
//! leaves a change that subscribers and connectors will not see. Rows become visible to readers
//! only once they are flushed, so a reader never sees a sequence number that a crash could reuse.
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
