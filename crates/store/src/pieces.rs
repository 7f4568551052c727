//! Automerge data over 2 KiB, stored in pieces that keep sled's pages small.
//!
//! sled 0.34 holds in memory, beyond its cache bound (`sled_cache_bytes`), pages it has read
//! but not yet weighed: it weighs them in batches of 64 reads per shard of its cache, and it has
//! 256 shards, so up to about 16,000 pages. Worse, it writes a page whose encoding passes a
//! quarter of its 512 KiB segment to a blob file and weighs it by the size of its pointer, a few
//! bytes, so such pages stay in memory once read. A leaf page holds up to 16 keys (sled splits
//! leaves by count, whatever their size), so the pages of snapshots and chunks of entities with
//! long histories of values that do not compress (scans, signatures, free text) were blobs, and
//! reading 1,000 such entities of 1.3 MB once left 1.26 GB resident with a 1 MiB sled cache.
//!
//! So a snapshot or chunk over [`PIECE_BYTES`] is stored as a *header* under its own key and its
//! bytes in pieces of at most [`PIECE_BYTES`] under `p` keys (see `layout`): a page of pieces is
//! at most about 36 KiB, far under sled's blob threshold, and what sled holds unweighed is at
//! most about 16,000 such pages. The same 1,000 entities then leave 251 MiB resident (pieces of
//! 6 KiB: 539 MiB; of 1 KiB: 178 MiB). Smaller pieces cost more keys: sled's own memory at
//! start grows with the number of pages (37 MiB for this 2.8 GB store with 2 KiB pieces, 70 MiB
//! with 1 KiB, 15 MiB with 6 KiB), and time: in single runs on a shared machine, writing the
//! 20,000 values of 64 KB took 127 s with 2 KiB pieces, 148 s with 1 KiB and 109 s with 6 KiB
//! (112 s whole), and reading the 1,000 entities 14.5, 16.6 and 14.0 s (25.7 s whole, from blob
//! pages). A value of 2 KiB or less, which is what most writes make, is stored whole as before,
//! at no cost.
//!
//! The header starts with [`HEADER_MAGIC`], which no Automerge data starts with (a document or
//! change starts with `85 6f 4a 83`), so values written before pieces existed read as they are.
//! The header and its pieces are written in the same atomic set as the rest of a write
//! (`atomic`), so a crash leaves all of them or none.

use crate::atomic::Write;
use crate::error::{Error, Result};
use crate::layout;

/// The most bytes of one piece: see the module's comment for why 2 KiB.
pub(crate) const PIECE_BYTES: usize = 2 * 1024;

/// The first bytes of a header: not Automerge's magic bytes, which every value stored before
/// pieces existed starts with.
const HEADER_MAGIC: [u8; 4] = *b"LSp1";

/// A header's length: the magic, the number of pieces (u32 BE) and the bytes in all (u64 BE).
const HEADER_BYTES: usize = 16;

/// What a stored value says about its bytes: they are the value itself, or in pieces.
#[derive(Debug, PartialEq)]
enum Stored {
    Whole,
    Pieces { count: u32, total: u64 },
}

fn stored(value: &[u8]) -> Stored {
    if value.len() != HEADER_BYTES || value[..4] != HEADER_MAGIC {
        return Stored::Whole;
    }
    let count = u32::from_be_bytes(value[4..8].try_into().expect("4 bytes"));
    let total = u64::from_be_bytes(value[8..16].try_into().expect("8 bytes"));
    Stored::Pieces { count, total }
}

fn header(count: u32, total: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES);
    bytes.extend_from_slice(&HEADER_MAGIC);
    bytes.extend_from_slice(&count.to_be_bytes());
    bytes.extend_from_slice(&total.to_be_bytes());
    bytes
}

/// The number of pieces a value stored under `key` has now: 0 when it is whole or absent.
fn pieces_of(db: &sled::Db, key: &[u8]) -> Result<u32> {
    Ok(match db.get(key)?.as_deref().map(stored) {
        Some(Stored::Pieces { count, .. }) => count,
        Some(Stored::Whole) | None => 0,
    })
}

/// Adds to `writes` what stores `value` under `key`, whole or in pieces, removing the pieces
/// of the value there now that the new one does not overwrite.
///
/// # Errors
/// Storage errors, reading what is there now.
pub(crate) fn put(
    db: &sled::Db,
    key: &[u8],
    value: Vec<u8>,
    writes: &mut Vec<Write>,
) -> Result<()> {
    let before = pieces_of(db, key)?;
    let count = put_over_whole(key.to_vec(), value, writes);
    for number in count..before {
        writes.push((layout::piece_key(key, number), None));
    }
    Ok(())
}

/// Adds to `writes` what stores `value` under `key`, whole or in pieces, where `key` holds
/// nothing now (a new chunk's) or a value stored whole (a snapshot of at most [`PIECE_BYTES`]);
/// returns the number of pieces, 0 when it is stored whole. Unlike [`put`] it reads nothing,
/// which keeps a small write's cost as it was before pieces.
pub(crate) fn put_over_whole(key: Vec<u8>, value: Vec<u8>, writes: &mut Vec<Write>) -> u32 {
    if value.len() <= PIECE_BYTES {
        writes.push((key, Some(value)));
        return 0;
    }
    let count = u32::try_from(value.len().div_ceil(PIECE_BYTES))
        .expect("a value has far fewer than 4 billion pieces");
    for (number, piece) in (0..count).zip(value.chunks(PIECE_BYTES)) {
        writes.push((layout::piece_key(&key, number), Some(piece.to_vec())));
    }
    writes.push((key, Some(header(count, value.len() as u64))));
    count
}

/// Adds to `writes` what removes `key` and its pieces, given the value stored under it.
pub(crate) fn remove(key: &[u8], value: &[u8], writes: &mut Vec<Write>) {
    if let Stored::Pieces { count, .. } = stored(value) {
        for number in 0..count {
            writes.push((layout::piece_key(key, number), None));
        }
    }
    writes.push((key.to_vec(), None));
}

/// The bytes of the value stored under `key` as `value`: itself, or its pieces joined.
///
/// # Errors
/// [`Error::Corrupt`] when a piece is missing or the pieces do not add up to the header's
/// length; storage errors.
pub(crate) fn read(db: &sled::Db, key: &[u8], value: sled::IVec) -> Result<sled::IVec> {
    let Stored::Pieces { count, total } = stored(&value) else {
        return Ok(value);
    };
    let corrupt = |detail: String| Error::Corrupt {
        what: format!("the pieces of {}", String::from_utf8_lossy(key)),
        detail,
    };
    let capacity = usize::try_from(total).map_err(|_| corrupt(format!("{total} bytes")))?;
    let mut bytes = Vec::with_capacity(capacity.min(count as usize * PIECE_BYTES));
    // The pieces' keys are adjacent: a key between the first and one past the last starts with
    // `p` and the key, and no other key's pieces fall there (see `layout::piece_key`); each is
    // checked all the same, so a gap is reported, never read past.
    let range = db.range(layout::piece_key(key, 0)..layout::piece_key(key, count));
    let mut expected = 0u32;
    for entry in range {
        let (piece_key, piece) = entry?;
        if piece_key.as_ref() != layout::piece_key(key, expected).as_slice() {
            return Err(corrupt(format!("piece {expected} of {count} is missing")));
        }
        bytes.extend_from_slice(&piece);
        expected += 1;
    }
    if expected != count || bytes.len() as u64 != total {
        return Err(corrupt(format!(
            "{expected} of {count} pieces hold {} of {total} bytes",
            bytes.len()
        )));
    }
    Ok(sled::IVec::from(bytes))
}

/// The bytes of the value stored as `value`, for measurements: its header's length in all when
/// it is in pieces.
pub(crate) fn stored_length(value: &[u8]) -> u64 {
    match stored(value) {
        Stored::Whole => value.len() as u64,
        Stored::Pieces { total, .. } => total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(db: &sled::Db, writes: Vec<Write>) {
        for (key, value) in writes {
            match value {
                Some(value) => db.insert(key, value).unwrap(),
                None => db.remove(key).unwrap(),
            };
        }
    }

    fn bytes(length: usize, seed: u8) -> Vec<u8> {
        (0..length)
            .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn piece_keys(db: &sled::Db) -> usize {
        db.scan_prefix([layout::PIECE]).count()
    }

    fn read_back(db: &sled::Db, key: &[u8]) -> Vec<u8> {
        let value = db.get(key).unwrap().unwrap();
        read(db, key, value).unwrap().to_vec()
    }

    #[test]
    fn a_value_over_a_piece_is_stored_in_pieces_and_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let key = b"s\x01kind\0id".to_vec();
        for length in [0, 1, PIECE_BYTES, PIECE_BYTES + 1, 3 * PIECE_BYTES, 100_000] {
            let value = bytes(length, length as u8);
            let mut writes = Vec::new();
            put(&db, &key, value.clone(), &mut writes).unwrap();
            apply(&db, writes);
            assert_eq!(read_back(&db, &key), value, "{length} bytes");
            assert_eq!(
                piece_keys(&db),
                length.div_ceil(PIECE_BYTES) * usize::from(length > PIECE_BYTES)
            );
            let stored = db.get(&key).unwrap().unwrap();
            assert_eq!(stored_length(&stored), length as u64);
        }
    }

    #[test]
    fn a_shorter_value_removes_the_pieces_it_does_not_overwrite_and_remove_takes_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let key = b"s\x01kind\0id".to_vec();
        // Another key that the first is a prefix of keeps its pieces throughout.
        let longer = b"s\x01kind\0id2".to_vec();
        let other = bytes(5 * PIECE_BYTES, 9);
        let mut writes = Vec::new();
        put(&db, &longer, other.clone(), &mut writes).unwrap();
        put(&db, &key, bytes(10 * PIECE_BYTES, 1), &mut writes).unwrap();
        apply(&db, writes);
        assert_eq!(piece_keys(&db), 15);

        let shorter = bytes(2 * PIECE_BYTES + 5, 2);
        let mut writes = Vec::new();
        put(&db, &key, shorter.clone(), &mut writes).unwrap();
        apply(&db, writes);
        assert_eq!(read_back(&db, &key), shorter);
        assert_eq!(piece_keys(&db), 5 + 3);

        let small = bytes(10, 3);
        let mut writes = Vec::new();
        put(&db, &key, small.clone(), &mut writes).unwrap();
        apply(&db, writes);
        assert_eq!(read_back(&db, &key), small);
        assert_eq!(piece_keys(&db), 5);

        let value = db.get(&longer).unwrap().unwrap();
        let mut writes = Vec::new();
        remove(&longer, &value, &mut writes);
        apply(&db, writes);
        assert_eq!(piece_keys(&db), 0);
        assert_eq!(db.get(&longer).unwrap(), None);
        assert_eq!(read_back(&db, &key), small);
    }

    #[test]
    fn automerge_data_stored_whole_is_never_taken_for_a_header() {
        let mut doc = automerge::AutoCommit::new();
        automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "a", 1).unwrap();
        let saved = doc.save();
        assert_eq!(stored(&saved), Stored::Whole);
        let change = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert_eq!(stored(&change), Stored::Whole);
        assert_ne!(saved[..4], HEADER_MAGIC);
    }

    #[test]
    fn a_missing_or_short_piece_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let key = b"c\x01kind\0id\0\0\0\0\x01".to_vec();
        let mut writes = Vec::new();
        put(&db, &key, bytes(4 * PIECE_BYTES, 4), &mut writes).unwrap();
        apply(&db, writes);

        db.remove(layout::piece_key(&key, 1)).unwrap();
        let value = db.get(&key).unwrap().unwrap();
        let error = read(&db, &key, value.clone()).unwrap_err();
        assert!(
            error.to_string().contains("piece 1 of 4 is missing"),
            "{error}"
        );

        db.insert(layout::piece_key(&key, 1), b"short".to_vec())
            .unwrap();
        let error = read(&db, &key, value.clone()).unwrap_err();
        assert!(error.to_string().contains("hold"), "{error}");

        db.remove(layout::piece_key(&key, 3)).unwrap();
        let error = read(&db, &key, value).unwrap_err();
        assert!(error.to_string().contains("3 of 4 pieces"), "{error}");
    }
}
