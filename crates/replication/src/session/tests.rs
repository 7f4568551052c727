//! Single sessions driven frame by frame: what is skipped, what is refused, and how an entity
//! that does not converge is reset, fetched whole and finally reported.

use serde_json::json;
use store::{EntityKey, Origin, Seq, Store, StoreConfig, WriteOptions};
use tempfile::TempDir;

use super::*;
use crate::frame::{Mode, ReplyEntry, Row, SyncEntry};

fn open() -> (TempDir, Store) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(StoreConfig::new(dir.path())).expect("a fresh store opens");
    (dir, store)
}

fn key(id: &str) -> EntityKey {
    EntityKey::new("appointment", id).expect("a valid key")
}

fn write(store: &Store, id: &str, value: serde_json::Value) -> String {
    store
        .patch(
            &key(id),
            &value,
            &WriteOptions::new(Origin::local("alice").expect("valid")),
        )
        .expect("a write")
        .version
}

fn hello(cursor: u64) -> Frame {
    Frame::Hello {
        protocol: crate::frame::PROTOCOL_VERSION,
        site: "remote".into(),
        cursor: Seq(cursor),
    }
}

/// A session at `store` for peer `remote`, past the hello exchange.
fn session(store: &Store, settings: SessionSettings) -> (Session, Vec<Frame>) {
    let mut session =
        Session::open(store.clone(), "remote", "local", settings).expect("a session opens");
    let out = session.receive(hello(0)).expect("the hello is accepted");
    (session, out)
}

#[test]
fn entities_already_at_the_announced_version_are_skipped() {
    let (_dir, store) = open();
    let version = write(&store, "1", json!({"date": "2026-12-01"}));
    let (mut session, _) = session(&store, SessionSettings::default());
    let out = session
        .receive(Frame::Rows {
            batch: 0,
            rows: vec![Row {
                key: key("1"),
                version,
                seq: Seq(7),
            }],
            through: Seq(9),
            head: Seq(12),
        })
        .expect("rows are accepted");
    assert_eq!(
        out,
        vec![Frame::Done {
            batch: 0,
            cursor: Seq(9)
        }]
    );
    assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq(9));
    let progress = session.progress();
    assert_eq!(progress.cursor, Seq(9));
    assert_eq!(progress.their_head, Some(Seq(12)));
    assert_eq!(progress.entities_synced, 0);
}

#[test]
fn an_entity_that_never_converges_is_reset_then_fetched_whole_then_reported() {
    let (_dir, store) = open();
    // The entity exists here, so it is synced rather than fetched whole.
    write(&store, "1", json!({"room": "4"}));
    let (other_dir, other) = open();
    let version = write(&other, "1", json!({"date": "2026-12-01"}));
    drop(other_dir);
    let settings = SessionSettings {
        batch_entities: 8,
        max_rounds: 3,
    };
    let (mut session, _) = session(&store, settings);
    let mut out = session
        .receive(Frame::Rows {
            batch: 4,
            rows: vec![Row {
                key: key("1"),
                version,
                seq: Seq(1),
            }],
            through: Seq(1),
            head: Seq(1),
        })
        .expect("rows are accepted");
    let mut modes = Vec::new();
    for _ in 0..20 {
        let Some(Frame::Sync { batch, entries }) = out.pop() else {
            panic!("expected a sync request");
        };
        assert_eq!(batch, 4);
        modes.push(entries[0].mode);
        // A peer that never has anything to say.
        match session.receive(Frame::Reply {
            batch,
            entries: vec![ReplyEntry {
                key: key("1"),
                message: None,
            }],
        }) {
            Ok(next) => out = next,
            Err(Error::Stuck { key: stuck, rounds }) => {
                assert_eq!(stuck, key("1"));
                assert_eq!(rounds, 3);
                assert_eq!(modes.first(), Some(&Mode::Sync));
                assert!(modes.contains(&Mode::Reset), "{modes:?}");
                assert_eq!(modes.last(), Some(&Mode::Whole), "{modes:?}");
                assert!(modes.len() <= 2 * 3 + 1, "{modes:?}");
                assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq::ZERO);
                return;
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    panic!("the session did not give up: {modes:?}");
}

#[test]
fn an_entity_never_seen_here_is_fetched_whole_in_one_round_trip() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let version = write(&other, "1", json!({"date": "2026-12-01"}));
    let (mut session, _) = session(&store, SessionSettings::default());
    let out = session
        .receive(Frame::Rows {
            batch: 0,
            rows: vec![Row {
                key: key("1"),
                version: version.clone(),
                seq: Seq(1),
            }],
            through: Seq(1),
            head: Seq(1),
        })
        .expect("rows are accepted");
    let Some(Frame::Sync { entries, .. }) = out.first() else {
        panic!("expected a request: {out:?}");
    };
    assert_eq!(entries[0].mode, Mode::Whole);
    let out = session
        .receive(Frame::Reply {
            batch: 0,
            entries: vec![ReplyEntry {
                key: key("1"),
                message: other.save(&key("1")).expect("save"),
            }],
        })
        .expect("the document is applied");
    assert_eq!(
        out,
        vec![Frame::Done {
            batch: 0,
            cursor: Seq(1)
        }]
    );
    assert_eq!(store.version(&key("1")).expect("read"), Some(version));
    assert_eq!(
        store.feed(Seq::ZERO, None, 1).expect("feed")[0]
            .origin
            .as_str(),
        "peer:remote"
    );
}

#[test]
fn hostile_sync_bytes_are_rejected_and_change_nothing() {
    let (_dir, store) = open();
    write(&store, "1", json!({"date": "2026-12-01"}));
    let (mut session, out) = session(&store, SessionSettings::default());
    let Some(Frame::Rows { batch, .. }) = out.first().cloned() else {
        panic!("the hello starts an announcement: {out:?}");
    };
    let before = store.last_seq();
    for garbage in [
        vec![0x42, 0xff, 0x00, 0x13],
        vec![0u8; 64],
        b"\x42\x01\x01".to_vec(),
    ] {
        let outcome = session.receive(Frame::Sync {
            batch,
            entries: vec![SyncEntry {
                key: key("1"),
                mode: Mode::Sync,
                message: Some(garbage),
            }],
        });
        assert!(
            matches!(outcome, Err(Error::Rejected { .. })),
            "{outcome:?}"
        );
    }
    assert_eq!(store.last_seq(), before);
}

#[test]
fn frames_out_of_turn_are_protocol_errors() {
    let (_dir, store) = open();
    write(&store, "1", json!({"date": "2026-12-01"}));
    let mut fresh =
        Session::open(store.clone(), "remote", "local", SessionSettings::default()).expect("open");
    assert!(matches!(
        fresh.receive(Frame::Done {
            batch: 0,
            cursor: Seq(1)
        }),
        Err(Error::Protocol(_))
    ));
    let out_of_turn = [
        hello(0),
        Frame::Reply {
            batch: 0,
            entries: vec![],
        },
        Frame::Done {
            batch: 99,
            cursor: Seq(1),
        },
        Frame::Done {
            batch: 0,
            cursor: Seq(1000),
        },
        Frame::Sync {
            batch: 0,
            entries: vec![SyncEntry {
                key: key("not-announced"),
                mode: Mode::Sync,
                message: None,
            }],
        },
        Frame::Sync {
            batch: 7,
            entries: vec![],
        },
    ];
    for frame in out_of_turn {
        let (mut session, _) = session(&store, SessionSettings::default());
        let name = frame.name();
        assert!(
            matches!(session.receive(frame), Err(Error::Protocol(_))),
            "{name}"
        );
    }
    let mut wrong_version =
        Session::open(store.clone(), "remote", "local", SessionSettings::default()).expect("open");
    assert!(matches!(
        wrong_version.receive(Frame::Hello {
            protocol: 99,
            site: "x".into(),
            cursor: Seq::ZERO
        }),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn changes_from_the_peer_itself_are_not_announced_back() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let from_peer = other
        .patch(
            &key("theirs"),
            &json!({"a": 1}),
            &WriteOptions::new(Origin::local("bob").expect("valid")),
        )
        .expect("write");
    let bytes = other
        .save(&key("theirs"))
        .expect("save")
        .expect("it exists");
    store
        .merge(
            &key("theirs"),
            &bytes,
            &Origin::parse("peer:remote").expect("valid"),
        )
        .expect("merge");
    assert_eq!(
        store.version(&key("theirs")).expect("read").as_deref(),
        Some(from_peer.version.as_str())
    );
    write(&store, "ours", json!({"b": 2}));
    let (_session, out) = session(&store, SessionSettings::default());
    let Some(Frame::Rows { rows, through, .. }) = out.first() else {
        panic!("expected rows: {out:?}");
    };
    let keys: Vec<String> = rows.iter().map(|row| row.key.to_string()).collect();
    assert_eq!(keys, ["appointment/ours"]);
    assert_eq!(*through, Seq(2), "the skipped row is covered all the same");
}

#[test]
fn batches_hold_at_most_batch_entities_and_cover_the_whole_feed() {
    let (_dir, store) = open();
    for index in 0..7 {
        write(&store, &format!("e{index}"), json!({"n": index}));
    }
    // Rewriting an entity adds a row but not an entity to the batch.
    write(&store, "e0", json!({"n": 100}));
    let settings = SessionSettings {
        batch_entities: 3,
        max_rounds: 8,
    };
    let (mut session, mut out) = session(&store, settings);
    let mut announced = Vec::new();
    while let Some(Frame::Rows {
        batch,
        rows,
        through,
        ..
    }) = out.pop()
    {
        assert!(rows.len() <= 3);
        announced.extend(rows.iter().map(|row| row.key.to_string()));
        out = session
            .receive(Frame::Done {
                batch,
                cursor: through,
            })
            .expect("done is accepted");
    }
    announced.sort();
    announced.dedup();
    assert_eq!(announced.len(), 7);
    assert_eq!(session.progress().their_cursor, Some(Seq(8)));
    assert!(session.is_idle());
}
