//! Side records: small keyed values that other crates keep next to the entities, such as a
//! connector's shadow of what an external system has, its delivery outbox, inbound idempotency
//! records and cursors.
//!
//! They live in the same sled tree as the entities, so a record can be written in the same
//! atomic set of writes as the change it belongs to (see `Store::submit_with`): a webhook's
//! change, its idempotency record and the connector's shadow land together or not at all.
//! What a record means is its owner's business; this module only stores bytes under a key.

use std::fmt;

/// The key of a side record: a space (e.g. `connector.shadow`) and parts (e.g. a connector name,
/// a kind and an id). Parts must not contain `\0`; entity kinds and ids, names and hex never do.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordKey(Vec<u8>);

impl RecordKey {
    /// A key in `space` made of `parts`; with fewer parts it is a prefix for [`crate::Store::scan_records`].
    ///
    /// # Panics
    /// When the space or a part contains `\0` (a caller bug: such a key could overlap another).
    pub fn new(space: &str, parts: &[&str]) -> Self {
        let mut bytes = vec![crate::layout::RECORD];
        for (index, part) in std::iter::once(space)
            .chain(parts.iter().copied())
            .enumerate()
        {
            assert!(!part.contains('\0'), "record key parts never contain NUL");
            if index > 0 {
                bytes.push(0);
            }
            bytes.extend_from_slice(part.as_bytes());
        }
        Self(bytes)
    }

    /// Whether the key is in `space`.
    ///
    /// ```
    /// use store::RecordKey;
    /// let key = RecordKey::new("connector.inbox", &["scheduler", "00ff"]);
    /// assert!(key.in_space("connector.inbox"));
    /// assert!(!key.in_space("connector.in"));
    /// assert!(!key.in_space("connector.inbox.old"));
    /// ```
    pub fn in_space(&self, space: &str) -> bool {
        self.0[1..]
            .strip_prefix(space.as_bytes())
            .is_some_and(|rest| rest.first().is_none_or(|byte| *byte == 0))
    }

    /// The parts after the space.
    pub fn parts(&self) -> Vec<String> {
        self.0[1..]
            .split(|byte| *byte == 0)
            .skip(1)
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect()
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// The prefix that matches this key's children (this key followed by a separator).
    pub(crate) fn child_prefix(&self) -> Vec<u8> {
        let mut prefix = self.0.clone();
        prefix.push(0);
        prefix
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RecordKey({})",
            String::from_utf8_lossy(&self.0[1..]).replace('\0', "/")
        )
    }
}

/// One record to put or delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordWrite {
    /// Which record.
    pub key: RecordKey,
    /// Its new value, or `None` to delete it.
    pub value: Option<Vec<u8>>,
}

impl RecordWrite {
    /// Sets `key` to `value`.
    pub fn put(key: RecordKey, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key,
            value: Some(value.into()),
        }
    }

    /// Deletes `key`.
    pub fn delete(key: RecordKey) -> Self {
        Self { key, value: None }
    }

    pub(crate) fn to_write(&self) -> crate::atomic::Write {
        (self.key.as_bytes().to_vec(), self.value.clone())
    }
}

/// What a write is about to commit, for callers that derive side records from it.
#[derive(Clone, Debug, PartialEq)]
pub struct CommitView<'a> {
    /// The entity version after the write.
    pub version: &'a str,
    /// The entity's fields after the write (empty when it reads as absent).
    pub data: &'a serde_json::Map<String, serde_json::Value>,
    /// Whether the write changes the document (false for a no-op).
    pub changed: bool,
}
