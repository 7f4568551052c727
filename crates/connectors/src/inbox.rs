//! Where a connector remembers the webhook ids it has answered, for `dedupe_retention`.
//!
//! Each answered id leaves an inbox record (the first response, the body's hash, when it came).
//! Records are kept in one of two places:
//!
//! - in **arrival order** (`connector.received`, keyed by an arrival number and the id's
//!   hash), with an in-memory index from the id's hash to its arrival number. A new key at the
//!   end of the range costs sled next to nothing, where a key at a random place (the hash of
//!   the id) cost 10–20 µs of server CPU per webhook (docs/architecture.md, "Where a write's
//!   time goes"). The index is rebuilt from the keys when the server starts.
//! - **by hash** (`connector.inbox`, keyed by the id's hash alone), read with no index: where
//!   every record went before the arrival order existed, and where a record goes when the index
//!   is full (`dedupe_index_ids`) or when another retained id has the same 128-bit hash prefix.
//!
//! A lookup tries the index, then the hashed record, so records of both kinds are honoured
//! whatever the index holds. [`Inbox::place`] enters a new arrival in the index before its
//! record is written, so that no written record is ever missing from it (a write that then
//! fails leaves an entry whose record does not exist, which a lookup reads as no record there).
//! Callers hold the id's lock (see `inbound`) across the lookup, the placing and the write, and
//! the clean-up holds it when it deletes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use store::RecordKey;

use crate::error::Result;
use crate::state::{InboxRecord, Records};

#[cfg(test)]
mod tests;

/// The SHA-256 of a webhook id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdHash([u8; 32]);

impl IdHash {
    pub(crate) fn of(webhook_id: &str) -> Self {
        Self(Sha256::digest(webhook_id.as_bytes()).into())
    }

    pub(crate) fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// What the index keys an id by: the hash's first 16 bytes.
    fn prefix(&self) -> Prefix {
        let half = |range: std::ops::Range<usize>| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&self.0[range]);
            u64::from_be_bytes(bytes)
        };
        Prefix(half(0..8), half(8..16))
    }
}

/// The first 16 bytes of an id's hash, as two words: an index entry with its arrival number
/// is 24 bytes (a `u128` would align it to 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prefix(u64, u64);

impl std::hash::Hash for Prefix {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Part of a SHA-256 already: its first word is as good a hash as any.
        state.write_u64(self.0);
    }
}

/// Passes on the one word [`Prefix`] hashes itself by.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }
}

type Index = HashMap<Prefix, u64, BuildHasherDefault<PrefixHasher>>;

/// What a lookup found.
#[derive(Debug)]
pub(crate) struct Lookup {
    /// The record kept for the id, if any (it may be older than the retention: the caller decides).
    pub found: Option<InboxRecord>,
    /// The arrival number of this id's own record, when the index points at it: a new record
    /// for the id may then replace that entry. An entry that points anywhere else is another
    /// id's (one with the same 128-bit prefix), and a new record for this id goes by hash.
    own: Option<u64>,
}

/// One connector's inbox index; see the module documentation.
pub(crate) struct Inbox {
    index: Mutex<Index>,
    next_arrival: AtomicU64,
    limit: usize,
}

impl Inbox {
    /// Builds the index from the connector's records in arrival order. `limit` bounds how many
    /// ids new webhooks add to it; the ids found here are all indexed, whatever their number
    /// (a lower limit than before takes effect as they expire).
    ///
    /// # Errors
    /// Store errors.
    pub(crate) fn open(records: &Records, limit: usize) -> Result<Self> {
        let mut index = Index::default();
        let mut next_arrival = 0;
        records.visit_received(|arrival, hash| {
            // Later arrivals of one id (reused after it expired) replace earlier ones.
            index.insert(hash.prefix(), arrival);
            next_arrival = next_arrival.max(arrival + 1);
        })?;
        Ok(Self {
            index: Mutex::new(index),
            next_arrival: AtomicU64::new(next_arrival),
            limit,
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many ids the index holds.
    pub(crate) fn indexed(&self) -> usize {
        self.index().len()
    }

    /// The record kept for `hash`: the indexed one, else the one kept by hash. An indexed
    /// record received before `remembered_since` does not hide a later one kept by hash (which
    /// a build from before the arrival order may have written).
    ///
    /// # Errors
    /// Store errors, and a record that cannot be decoded.
    pub(crate) fn lookup(
        &self,
        records: &Records,
        hash: &IdHash,
        remembered_since: u64,
    ) -> Result<Lookup> {
        let indexed = self.index().get(&hash.prefix()).copied();
        // The key holds the whole hash: another id with the same prefix has no record here.
        let own = match indexed {
            Some(arrival) => records.inbox(&records.received_key(arrival, hash))?,
            None => None,
        };
        let own_arrival = own.as_ref().and(indexed);
        let found = match own {
            Some(own) if own.at_ms >= remembered_since => Some(own),
            // Expired or not indexed: a record kept by hash may be the newer one.
            own => {
                let hashed = records.inbox(&records.inbox_key(hash))?;
                match (own, hashed) {
                    (Some(own), Some(hashed)) => Some(if hashed.at_ms > own.at_ms {
                        hashed
                    } else {
                        own
                    }),
                    (own, hashed) => hashed.or(own),
                }
            }
        };
        Ok(Lookup {
            found,
            own: own_arrival,
        })
    }

    /// The key a new record for the id of `lookup` goes under: in arrival order while the
    /// index has room (or holds the id's own earlier record, reused after it expired), else by
    /// hash. An arrival is entered in the index here, before its record is written: a
    /// concurrent webhook whose id has the same prefix then finds the entry taken and goes by
    /// hash.
    pub(crate) fn place(&self, records: &Records, lookup: &Lookup, hash: &IdHash) -> RecordKey {
        let mut index = self.index();
        match index.get(&hash.prefix()) {
            Some(entry) if Some(*entry) != lookup.own => return records.inbox_key(hash),
            Some(_) => {}
            None if index.len() >= self.limit => return records.inbox_key(hash),
            None => {}
        }
        let arrival = self.next_arrival.fetch_add(1, Ordering::Relaxed);
        index.insert(hash.prefix(), arrival);
        records.received_key(arrival, hash)
    }

    /// Forgets the index entry of a record the clean-up deleted, if the entry is still that
    /// record's (an id reused since has a newer one).
    pub(crate) fn forget(&self, key: &RecordKey) {
        if let Some((arrival, hash)) = Records::received_of(key) {
            let mut index = self.index();
            if index.get(&hash.prefix()) == Some(&arrival) {
                index.remove(&hash.prefix());
            }
        }
    }
}
