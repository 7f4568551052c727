//! Writes of several keys that a crash leaves whole or absent, without sled's `apply_batch`.
//!
//! sled 0.34 makes a batch atomic at a price: `apply_batch` takes sled's global lock
//! exclusively, so it waits for any `flush` under way (a flush holds that lock shared while it
//! waits for the device), and it writes out the log buffer before and after the batch's own
//! start marker, two log writes where one would do. Measured with the webhook benchmark, that
//! was a fifth of the throughput at 64 connections and 60 µs of every single write (see
//! architecture.md, "Where a write's time goes").
//!
//! [`Applier::apply`] does without it. It first inserts the *intent*, a value listing how to undo
//! the set (each key it writes, with the value the key has before it or none), in parts of at
//! most 6 KiB (so that a page of them stays under sled's blob threshold), into a sled tree of
//! its own (`intent`, keyed by the part's number), away from the store's busiest keys; then it applies the writes one by one; then it removes the parts, the
//! last first. Most of a set's bytes are new keys (chunks, feed rows, inbox records), so the
//! intent is small: it names them and keeps the few earlier values a set overwrites (an entity
//! record, a shadow). One lock serializes applications, so their writes never interleave in
//! sled's log (which all of its trees share), and after a crash sled recovers a prefix of its log
//! (a write it keeps was preceded by every write made before it). So after a crash there is no
//! intent, or the parts of the one application that was under way:
//! - all of them: the crash came after the last part was written and before the removals began,
//!   with some prefix of the writes on disk. [`Applier::open`] puts every key back as the intent
//!   says it was and removes the parts: the set is undone. Nothing after the set was kept, so
//!   nothing later is undone with it. The set was never acknowledged: a write is acknowledged
//!   only after a flush that covers the removal of its intent.
//! - a proper prefix of them (the intent cut short): the crash came while the parts were
//!   written, before any write, or while they were removed, after every write. Either way the
//!   application is whole or absent, and the parts are removed.
//!
//! An application that fails part-way (a sled error, a panic) leaves its intent, and the
//! applier refuses every later one, so that no later intent replaces it: the next start undoes
//! it, so a write that reported an error never shows up later. (The store also refuses every
//! later write then, as after a failed flush; the applier keeps its own flag because it must
//! refuse under its lock, before a caller that checked the store earlier gets in.) Within a set,
//! only the last write of each key is applied, as sled's batch did.
//!
//! Readers of one key see each write as it lands, so a reader of several keys can see an
//! application half done: the store's readers of an entity's several keys hold its stripe lock,
//! which its writer holds until the application is over, as do the other crates' readers of
//! their own records (under their own locks).

use std::collections::HashSet;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The name of the sled tree that holds the intent, keyed by the part's number (u32, big endian).
const INTENT_TREE: &[u8] = b"intent";

/// The most bytes of the intent one part holds: a leaf page of parts (up to 17, sled splits
/// leaves by count) stays under sled's blob threshold, about 128 KiB, which a page of 32 KiB
/// parts passed (see `pieces` for what such a page costs). An intent is large only when a set
/// overwrites or removes large values (a compaction: the pieces of the snapshot and chunks it
/// replaces); a part is removed as soon as its set is applied, so unlike a piece it is never
/// read back, and a few larger parts cost fewer writes than many small ones.
const PART_BYTES: usize = 6 * 1024;

/// The intent's format version, the first byte of what it encodes.
const FORMAT: u8 = 1;

/// One write: a key and its new value, or `None` to remove it.
pub(crate) type Write = (Vec<u8>, Option<Vec<u8>>);

/// One step of an application: a part of the intent written or removed, or one of the writes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    /// Part number `.0` of the intent, written (`Some`) or removed (`None`).
    Part(u32, Option<Vec<u8>>),
    /// One of the set's writes.
    Write(Write),
}

/// Applies sets of writes to a sled tree, one set at a time, each whole or not at all.
pub(crate) struct Applier {
    db: sled::Db,
    intent: sled::Tree,
    /// Held while a set is applied; `true` once one failed part-way.
    failed: Mutex<bool>,
}

impl Applier {
    /// The applier of `db`, once it has undone the application a crash interrupted, if any
    /// (see the module's comment). Also returns how many keys it put back. Runs before anything
    /// else reads the store.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the intent cannot be read (then it is left as it is); storage
    /// errors.
    pub(crate) fn open(db: &sled::Db) -> Result<(Self, usize)> {
        let intent = db.open_tree(INTENT_TREE)?;
        let recovered = recover(db, &intent)?;
        let applier = Self {
            db: db.clone(),
            intent,
            failed: Mutex::new(false),
        };
        Ok((applier, recovered))
    }

    /// Applies `writes` in order, so that a crash at any point leaves all of them or none once
    /// the store is opened again. Returns once they are applied, not flushed.
    ///
    /// # Errors
    /// Storage errors. Then the writes may be partly applied in memory, and the intent is still
    /// there: should it reach the disk, the next start undoes the application. The applier
    /// then refuses every later set with [`Error::Failed`], and so must the caller (the store
    /// treats it as a failed flush).
    pub(crate) fn apply(&self, writes: Vec<Write>) -> Result<()> {
        // A poisoned lock means an application panicked part-way: as a failed one.
        let mut failed = self.failed.lock().unwrap_or_else(|poisoned| {
            let mut failed = poisoned.into_inner();
            *failed = true;
            failed
        });
        if *failed {
            return Err(Error::Failed);
        }
        let earlier = |key: &[u8]| -> Result<Option<Vec<u8>>> {
            Ok(self.db.get(key)?.map(|value| value.to_vec()))
        };
        // A read that fails has written nothing yet.
        for step in steps(writes, earlier)? {
            if let Err(error) = run(&self.db, &self.intent, step) {
                *failed = true;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Makes the applier refuse every later set, as a set that failed part-way does.
    #[cfg(test)]
    pub(crate) fn fail(&self) {
        *self
            .failed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
    }
}

/// What applying `writes` does to sled, in order: the intent's parts, the writes, the parts
/// removed last first. The intent lists how to undo the writes: each key with the value
/// `earlier` reads for it now, or `None` where there is none. Of several writes of one key only
/// the last is kept. One write alone needs no intent: sled applies each write whole.
///
/// # Errors
/// Whatever `earlier` returns.
pub(crate) fn steps(
    writes: Vec<Write>,
    earlier: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<Vec<Step>> {
    let mut seen = HashSet::new();
    let mut writes: Vec<Write> = writes
        .into_iter()
        .rev()
        .filter(|(key, _)| seen.insert(key.clone()))
        .collect();
    writes.reverse();
    if writes.len() < 2 {
        return Ok(writes.into_iter().map(Step::Write).collect());
    }
    let undo = writes
        .iter()
        .map(|(key, _)| Ok((key.clone(), earlier(key)?)))
        .collect::<Result<Vec<Write>>>()?;
    let stored = encode(&undo);
    let mut steps: Vec<Step> = stored
        .chunks(PART_BYTES)
        .enumerate()
        .map(|(number, part)| Step::Part(part_number(number), Some(part.to_vec())))
        .collect();
    let count = part_number(steps.len());
    steps.extend(writes.into_iter().map(Step::Write));
    steps.extend((0..count).rev().map(|number| Step::Part(number, None)));
    Ok(steps)
}

fn part_number(number: usize) -> u32 {
    u32::try_from(number).expect("an intent has far fewer than 4 billion parts")
}

/// Carries out one step on `db` and its intent tree.
pub(crate) fn run(db: &sled::Db, intent: &sled::Tree, step: Step) -> Result<()> {
    match step {
        Step::Part(number, Some(part)) => {
            intent.insert(number.to_be_bytes(), part)?;
        }
        Step::Part(number, None) => {
            intent.remove(number.to_be_bytes())?;
        }
        Step::Write((key, Some(value))) => {
            db.insert(key, value)?;
        }
        Step::Write((key, None)) => {
            db.remove(key)?;
        }
    }
    Ok(())
}

/// Undoes the application a crash interrupted, if any: applies the undoing writes of a whole
/// intent, removes its parts, and flushes. Returns how many keys it put back.
fn recover(db: &sled::Db, intent: &sled::Tree) -> Result<usize> {
    let corrupt = |detail: String| Error::Corrupt {
        what: "the intent of an interrupted write".into(),
        detail,
    };
    let mut count = 0u32;
    let mut stored = Vec::new();
    for entry in intent.iter() {
        let (key, value) = entry?;
        if key.as_ref() != count.to_be_bytes() {
            return Err(corrupt(format!(
                "part {count} is missing (found key {:?})",
                key.as_ref()
            )));
        }
        count += 1;
        stored.extend_from_slice(&value);
    }
    if count == 0 {
        return Ok(0);
    }
    let undone = match whole(&stored).map_err(corrupt)? {
        Some(undo) => {
            let undone = undo.len();
            for write in undo {
                run(db, intent, Step::Write(write))?;
            }
            undone
        }
        None => {
            tracing::warn!(
                "dropped the intent of a write a crash cut short (none or all of its writes had landed)"
            );
            0
        }
    };
    for number in (0..count).rev() {
        run(db, intent, Step::Part(number, None))?;
    }
    db.flush()?;
    Ok(undone)
}

/// The writes of the intent stored in `stored` (its parts, joined), or `None` when it is cut
/// short; what is wrong with it otherwise.
fn whole(stored: &[u8]) -> std::result::Result<Option<Vec<Write>>, String> {
    let Some((length, intent)) = stored.split_first_chunk::<8>() else {
        return Err(format!("its first part has {} bytes", stored.len()));
    };
    let length = u64::from_le_bytes(*length);
    match (intent.len() as u64).cmp(&length) {
        std::cmp::Ordering::Less => Ok(None),
        std::cmp::Ordering::Equal => decode(intent).map(Some),
        std::cmp::Ordering::Greater => Err(format!(
            "its parts hold {} bytes, more than the {length} it says",
            intent.len()
        )),
    }
}

/// The intent as stored, before it is cut into parts: the length of the rest (u64), then the
/// format byte, the number of writes, and each write as its key's length, the key, and either `0`
/// (remove) or `1`, the value's length and the value. Numbers are little endian, u32 but the
/// first. The length tells an intent cut short by a crash from a whole one ([`whole`]); the
/// count makes any other cut an error, not fewer writes ([`decode`]).
fn encode(writes: &[Write]) -> Vec<u8> {
    let size: usize = writes
        .iter()
        .map(|(key, value)| 9 + key.len() + value.as_ref().map_or(0, Vec::len))
        .sum();
    let mut bytes = Vec::with_capacity(13 + size);
    bytes.extend_from_slice(&[0; 8]);
    bytes.push(FORMAT);
    bytes.extend_from_slice(&length(writes).to_le_bytes());
    for (key, value) in writes {
        bytes.extend_from_slice(&length(key).to_le_bytes());
        bytes.extend_from_slice(key);
        match value {
            Some(value) => {
                bytes.push(1);
                bytes.extend_from_slice(&length(value).to_le_bytes());
                bytes.extend_from_slice(value);
            }
            None => bytes.push(0),
        }
    }
    let length = (bytes.len() - 8) as u64;
    bytes[..8].copy_from_slice(&length.to_le_bytes());
    bytes
}

fn length<T>(items: &[T]) -> u32 {
    // sled keeps keys and values far below 4 GiB (its segments are megabytes), and a set of
    // writes is far shorter than 4 billion.
    u32::try_from(items.len()).expect("a sled key or value, or a set of writes, is that short")
}

/// The writes of an intent [`encode`] made, after its length; what is wrong with it otherwise.
fn decode(bytes: &[u8]) -> std::result::Result<Vec<Write>, String> {
    let Some((&format, mut rest)) = bytes.split_first() else {
        return Err("it is empty".into());
    };
    if format != FORMAT {
        return Err(format!("unknown format {format}"));
    }
    let count = take_u32(&mut rest)?;
    let mut writes = Vec::new();
    while writes.len() < count as usize {
        let key = take_sized(&mut rest)?;
        let value = match take(&mut rest, 1)? {
            [0] => None,
            [1] => Some(take_sized(&mut rest)?),
            [other] => return Err(format!("write {} has marker {other}", writes.len())),
            _ => unreachable!("take(1) returns one byte"),
        };
        writes.push((key, value));
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes follow its {count} writes", rest.len()));
    }
    Ok(writes)
}

fn take<'a>(rest: &mut &'a [u8], count: usize) -> std::result::Result<&'a [u8], String> {
    if rest.len() < count {
        return Err(format!(
            "it ends {} bytes short",
            count.saturating_sub(rest.len())
        ));
    }
    let (taken, left) = rest.split_at(count);
    *rest = left;
    Ok(taken)
}

fn take_u32(rest: &mut &[u8]) -> std::result::Result<u32, String> {
    let bytes = take(rest, 4)?;
    Ok(u32::from_le_bytes(
        bytes.try_into().expect("take(4) returns four bytes"),
    ))
}

fn take_sized(rest: &mut &[u8]) -> std::result::Result<Vec<u8>, String> {
    let size = take_u32(rest)?;
    Ok(take(rest, size as usize)?.to_vec())
}

#[cfg(test)]
mod tests;
