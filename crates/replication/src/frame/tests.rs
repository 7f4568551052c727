//! Frames survive an encode/decode round trip, and no byte string makes decoding panic.

use proptest::prelude::*;
use store::{EntityKey, Seq};

use super::*;

fn key() -> impl Strategy<Value = EntityKey> {
    ("[a-z]{1,8}", "[A-Za-z0-9_-][A-Za-z0-9_.-]{0,11}")
        .prop_map(|(kind, id)| EntityKey::new(kind, id).expect("the pattern is a valid key"))
}

fn message() -> impl Strategy<Value = Option<Vec<u8>>> {
    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64))
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), "[a-z0-9-]{0,16}", any::<u64>()).prop_map(|(protocol, site, cursor)| {
            Frame::Hello {
                protocol,
                site,
                cursor: Seq(cursor),
            }
        }),
        (
            any::<u64>(),
            proptest::collection::vec((key(), "[0-9a-f.]{0,80}", any::<u64>()), 0..8),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(batch, rows, through, head)| Frame::Rows {
                batch,
                rows: rows
                    .into_iter()
                    .map(|(key, version, seq)| Row {
                        key,
                        version,
                        seq: Seq(seq)
                    })
                    .collect(),
                through: Seq(through),
                head: Seq(head),
            }),
        (
            any::<u64>(),
            proptest::collection::vec((key(), 0u8..3, message()), 0..8)
        )
            .prop_map(|(batch, entries)| Frame::Sync {
                batch,
                entries: entries
                    .into_iter()
                    .map(|(key, mode, message)| SyncEntry {
                        key,
                        mode: [Mode::Sync, Mode::Reset, Mode::Whole][mode as usize],
                        message,
                    })
                    .collect(),
            }),
        (
            any::<u64>(),
            proptest::collection::vec((key(), message()), 0..8),
            any::<bool>()
        )
            .prop_map(|(batch, entries, last)| {
                let entries = entries
                    .into_iter()
                    .map(|(key, message)| ReplyEntry { key, message })
                    .collect();
                if last {
                    Frame::Reply { batch, entries }
                } else {
                    Frame::ReplyPart { batch, entries }
                }
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(batch, cursor)| Frame::Done {
            batch,
            cursor: Seq(cursor)
        }),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip(frame in frame()) {
        let bytes = frame.encode();
        prop_assert_eq!(Frame::decode(&bytes).expect("an encoded frame decodes"), frame);
    }

    #[test]
    fn arbitrary_bytes_are_an_error_or_a_frame_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(frame) = Frame::decode(&bytes) {
            // Whatever decodes is a frame that encodes back to the same bytes' meaning.
            prop_assert_eq!(Frame::decode(&frame.encode()).expect("re-encoded"), frame);
        }
    }

    #[test]
    fn a_truncated_or_extended_frame_is_malformed(frame in frame(), cut in any::<prop::sample::Index>()) {
        let bytes = frame.encode();
        let cut = cut.index(bytes.len());
        prop_assert!(matches!(Frame::decode(&bytes[..cut]), Err(Error::Malformed(_))));
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(matches!(Frame::decode(&longer), Err(Error::Malformed(_))));
    }
}

#[test]
fn hostile_lengths_and_keys_are_malformed_not_allocated() {
    // A Rows frame claiming 2^63 rows in a few bytes.
    let mut bytes = vec![2, 0, 0, 0];
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(Frame::decode(&bytes), Err(Error::Malformed(_))));
    // A number longer than 64 bits.
    assert!(matches!(
        Frame::decode(&[5, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0]),
        Err(Error::Malformed(_))
    ));
    // An entity id that is not a valid id.
    let mut sync = vec![3, 0, 1];
    sync.extend_from_slice(&[1, b'a', 3, b'a', b'/', b'b', 0, 0]);
    assert!(matches!(Frame::decode(&sync), Err(Error::Malformed(_))));
    assert!(matches!(Frame::decode(&[]), Err(Error::Malformed(_))));
    assert!(matches!(Frame::decode(&[99]), Err(Error::Malformed(_))));
}

/// A frame of more rows or entries than a batch may hold is malformed before its items are
/// read: minimal rows take about 24 times their size in memory once decoded.
#[test]
fn a_frame_holds_at_most_a_batchs_worth_of_items() {
    let row = |n: usize| Row {
        key: EntityKey::new("a", n.to_string()).expect("a valid key"),
        version: String::new(),
        seq: Seq(0),
    };
    let rows = |count: usize| Frame::Rows {
        batch: 0,
        rows: (0..count).map(row).collect(),
        through: Seq(1),
        head: Seq(1),
    };
    let largest = rows(MAX_BATCH_ENTITIES);
    assert_eq!(Frame::decode(&largest.encode()).expect("decodes"), largest);
    assert!(matches!(
        Frame::decode(&rows(MAX_BATCH_ENTITIES + 1).encode()),
        Err(Error::Malformed(_))
    ));
    let replies = Frame::Reply {
        batch: 0,
        entries: (0..=MAX_BATCH_ENTITIES)
            .map(|n| ReplyEntry {
                key: row(n).key,
                message: None,
            })
            .collect(),
    };
    assert!(matches!(
        Frame::decode(&replies.encode()),
        Err(Error::Malformed(_))
    ));
    let Frame::Reply { batch, entries } = replies else {
        unreachable!()
    };
    let part = Frame::ReplyPart { batch, entries };
    assert!(matches!(
        Frame::decode(&part.encode()),
        Err(Error::Malformed(_))
    ));
}
