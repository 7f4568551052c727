//! Single sessions driven frame by frame: what is skipped, what is refused, and how an entity
//! that does not converge is reset, fetched whole and finally reported.

use serde_json::json;
use store::{EntityKey, Origin, Seq, Store, StoreConfig, WriteOptions};
use tempfile::TempDir;

use super::*;
use crate::frame::{Mode, ReplyEntry, Row, SyncEntry, PROTOCOL_VERSION, REPLY_BYTES};

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
    session_from(store, settings, 0)
}

/// [`session`] with a peer whose cursor of this site's feed is `cursor`.
fn session_from(store: &Store, settings: SessionSettings, cursor: u64) -> (Session, Vec<Frame>) {
    let mut session =
        Session::open(store.clone(), "remote", "local", settings).expect("a session opens");
    let out = session
        .receive(hello(cursor))
        .expect("the hello is accepted");
    (session, out)
}

/// The acknowledgement of `batch` with the cursor at `cursor`.
fn done(batch: u64, cursor: u64) -> Frame {
    Frame::Done {
        batch,
        cursor: Seq(cursor),
    }
}

/// Rows of one entity, as the peer would announce them.
fn rows_of(batch: u64, id: &str, version: &str, through: u64) -> Frame {
    Frame::Rows {
        batch,
        rows: vec![Row {
            key: key(id),
            version: version.to_string(),
            seq: Seq(through),
        }],
        through: Seq(through),
        head: Seq(through),
    }
}

/// The peer's whole document of `id`, as the answer to a request for it.
fn whole_reply(batch: u64, peer: &Store, id: &str) -> Frame {
    Frame::Reply {
        batch,
        entries: vec![ReplyEntry {
            key: key(id),
            message: peer.stored_document(&key(id)).expect("read"),
        }],
    }
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
    assert_eq!(out, vec![done(0, 9)]);
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
        ..SessionSettings::default()
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
                // The reset and the whole document are counted, for status and metrics.
                assert_eq!(session.progress().sync_fallbacks, 2);
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
        .receive(rows_of(0, "1", &version, 1))
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
    assert_eq!(out, vec![done(0, 1)]);
    assert_eq!(store.version(&key("1")).expect("read"), Some(version));
    // Fetching a new entity whole is the plan from the start, not a fallback.
    assert_eq!(session.progress().sync_fallbacks, 0);
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
    for protocol in [0, 1, 2] {
        let mut wrong_version =
            Session::open(store.clone(), "remote", "local", SessionSettings::default())
                .expect("open");
        assert!(matches!(
            wrong_version.receive(Frame::Hello {
                protocol,
                site: "x".into(),
                cursor: Seq::ZERO
            }),
            Err(Error::Protocol(_))
        ));
    }
}

/// The keys of the rows in the first frame of `out`, and the feed row that frame covers.
fn announced(out: &[Frame]) -> (Vec<String>, Seq) {
    let Some(Frame::Rows { rows, through, .. }) = out.first() else {
        panic!("expected rows: {out:?}");
    };
    let keys = rows.iter().map(|row| row.key.to_string()).collect();
    (keys, *through)
}

/// What a new session at `store` first announces to a peer whose hello says `cursor`.
fn announced_to(store: &Store, cursor: u64) -> (Vec<String>, Seq) {
    let (_session, out) = session_from(store, SessionSettings::default(), cursor);
    announced(&out)
}

/// Changes that came from the peer are not announced back to it, unless it starts from the
/// beginning of the feed, as a peer whose store was replaced does: it has lost them too. Those
/// that arrive from it later it has, so they are not announced back even then.
#[test]
fn changes_from_the_peer_itself_are_announced_back_only_from_the_start() {
    let (_dir, store) = open();
    write(&store, "first", json!({"c": 3}));
    merge_from_peer(&store, "theirs");
    write(&store, "ours", json!({"b": 2}));
    acknowledge(&store, 1);
    let (keys, through) = announced_to(&store, 1);
    assert_eq!(keys, ["appointment/ours"]);
    assert_eq!(through, Seq(3), "the skipped row is covered all the same");

    let (mut session, out) = session(&store, SessionSettings::default());
    let (keys, through) = announced(&out);
    assert_eq!(
        keys,
        [
            "appointment/first",
            "appointment/ours",
            "appointment/theirs"
        ]
    );
    assert_eq!(through, Seq(3));
    merge_from_peer(&store, "later");
    let out = session.poll_feed().expect("announced");
    assert_eq!(announced(&out), (Vec::new(), Seq(4)));
}

/// The acknowledgement of what a peer has is written lazily, so a crash, or a backup taken just
/// after one, can leave none on record. A peer whose cursor is past zero is then announced the
/// whole feed again: this store may have been restored from a backup and have written other rows
/// under the numbers that peer consumed (a site restored that way sent its peer only the rows
/// past the peer's cursor, and the two differed for ever).
#[test]
fn with_no_acknowledgement_on_record_the_feed_is_announced_again_from_the_start() {
    let (_dir, store) = open();
    for id in ["a", "b", "c"] {
        write(&store, id, json!({"n": 1}));
    }
    let (keys, through) = announced_to(&store, 2);
    assert_eq!(keys, ["appointment/a", "appointment/b", "appointment/c"]);
    assert_eq!(through, Seq(3));
    acknowledge(&store, 2);
    assert_eq!(
        announced_to(&store, 2),
        (vec!["appointment/c".into()], Seq(3))
    );
}

/// An acknowledgement record that is not a number (damaged on disk) is taken as no
/// acknowledgement: the whole feed is announced again, and the next acknowledgement replaces
/// it. Before, every hello of that peer failed on it, for ever.
#[test]
fn an_unreadable_acknowledgement_is_announced_past_and_replaced() {
    let (_dir, store) = open();
    for id in ["a", "b", "c"] {
        write(&store, id, json!({"n": 1}));
    }
    let record = RecordKey::new(ACKED_SPACE, &["remote"]);
    store
        .write_records_lazily(vec![RecordWrite::put(record.clone(), "not a number")])
        .expect("the damaged record is written");
    let (mut session, out) = session_from(&store, SessionSettings::default(), 2);
    let (keys, through) = announced(&out);
    assert_eq!(keys, ["appointment/a", "appointment/b", "appointment/c"]);
    assert_eq!(through, Seq(3));
    let Some(Frame::Rows { batch, .. }) = out.first() else {
        panic!("expected rows: {out:?}");
    };
    session.receive(done(*batch, 3)).expect("done");
    let stored = store.read_record(&record).expect("a read");
    assert_eq!(stored.as_deref(), Some(&b"3"[..]));
}

/// Delivers frames between two sessions until neither has anything to send.
fn exchange(a: &mut Session, b: &mut Session, from_a: Vec<Frame>, from_b: Vec<Frame>) {
    let (mut to_b, mut to_a): (
        std::collections::VecDeque<Frame>,
        std::collections::VecDeque<Frame>,
    ) = (from_a.into(), from_b.into());
    for _ in 0..10_000 {
        if let Some(frame) = to_b.pop_front() {
            to_a.extend(b.receive(frame).expect("b accepts a's frame"));
        } else if let Some(frame) = to_a.pop_front() {
            to_b.extend(a.receive(frame).expect("a accepts b's frame"));
        } else {
            return;
        }
    }
    panic!("the sessions did not settle");
}

/// The frames `announcer` answers a request for every entity of `north` with, after it
/// announced them to a puller at `south` whose hello said protocol `protocol`; then the two
/// exchange the rest, and south must end with north's versions.
fn replies_to(
    north: &Store,
    south: &Store,
    ids: &[String],
    protocol: u64,
    reply_bytes: usize,
) -> Vec<Frame> {
    let settings = SessionSettings {
        reply_bytes,
        ..SessionSettings::default()
    };
    let mut announcer = Session::open(north.clone(), "remote", "north", settings).expect("open");
    let rows = announcer
        .receive(Frame::Hello {
            protocol,
            site: "south".into(),
            cursor: Seq::ZERO,
        })
        .expect("the hello is accepted");
    let (mut puller, from_south) = session(south, SessionSettings::default());
    assert!(from_south.is_empty(), "south has nothing to announce");
    let mut requests = Vec::new();
    for frame in rows {
        requests.extend(puller.receive(frame).expect("rows are accepted"));
    }
    let Some(Frame::Sync { entries, .. }) = requests.first() else {
        panic!("no request: {requests:?}");
    };
    assert_eq!(entries.len(), ids.len());
    let replies = announcer
        .receive(requests.remove(0))
        .expect("the request is answered");
    exchange(&mut announcer, &mut puller, replies.clone(), requests);
    for id in ids {
        assert_eq!(
            south.version(&key(id)).expect("read"),
            north.version(&key(id)).expect("read"),
            "{id}"
        );
    }
    assert!(puller.progress().cursor > Seq::ZERO);
    replies
}

/// A request's answer larger than `reply_bytes` comes in several frames, which the puller takes
/// one at a time.
#[test]
fn a_large_answer_comes_in_several_reply_frames() {
    let (_north_dir, north) = open();
    let ids: Vec<String> = (0..5).map(|index| format!("e{index}")).collect();
    for (index, id) in ids.iter().enumerate() {
        write(&north, id, json!({"n": index, "id": id}));
    }
    let parts = |replies: &[Frame]| -> Vec<Vec<usize>> {
        replies
            .iter()
            .map(|frame| match frame {
                Frame::Reply { entries, .. } | Frame::ReplyPart { entries, .. } => {
                    entries.iter().map(ReplyEntry::size).collect()
                }
                other => panic!("not a reply: {other:?}"),
            })
            .collect()
    };
    let (_south_dir, south) = open();
    let whole = parts(&replies_to(
        &north,
        &south,
        &ids,
        PROTOCOL_VERSION,
        REPLY_BYTES,
    ));
    assert_eq!(whole.len(), 1, "{whole:?}");
    // Half of the answer's bytes a frame: each frame as full as the next entry lets it be.
    let total: usize = whole[0].iter().sum();
    let (_south_dir, south) = open();
    let half = parts(&replies_to(
        &north,
        &south,
        &ids,
        PROTOCOL_VERSION,
        total / 2,
    ));
    assert!((2..5).contains(&half.len()), "{half:?}");
    assert_eq!(half.iter().map(Vec::len).sum::<usize>(), 5);
    for (frame, next) in half.iter().zip(half.iter().skip(1)) {
        assert!(frame.iter().sum::<usize>() <= total / 2, "{half:?}");
        assert!(
            frame.iter().sum::<usize>() + next[0] > total / 2,
            "{half:?}"
        );
    }
    let (_south_dir, south) = open();
    let frames = replies_to(&north, &south, &ids, PROTOCOL_VERSION, 1);
    assert!(frames[..4]
        .iter()
        .all(|frame| matches!(frame, Frame::ReplyPart { .. })));
    assert!(matches!(frames[4], Frame::Reply { .. }));
    let each = parts(&frames);
    assert_eq!(each.iter().map(Vec::len).collect::<Vec<_>>(), vec![1; 5]);
}

/// A request's answer comes as parts, each with some of the entities still to answer, then a
/// reply with all the rest, each in request order: anything else ends the link, so an answer
/// that leaves an entity out is an error rather than a batch that never completes.
#[test]
fn an_answer_in_parts_must_bring_every_entity_asked_for_in_order() {
    let (_north_dir, north) = open();
    for id in ["a", "b", "c"] {
        write(&north, id, json!({"id": id}));
    }
    let rows = {
        let (_, rows) = session(&north, SessionSettings::default());
        rows
    };
    let (_south_dir, south) = open();
    let start = || {
        let (mut puller, _) = session(&south, SessionSettings::default());
        let requests = puller.receive(rows[0].clone()).expect("rows are accepted");
        let [Frame::Sync { entries, .. }] = &requests[..] else {
            panic!("one request: {requests:?}");
        };
        let asked: Vec<String> = entries
            .iter()
            .map(|entry| entry.key.id.to_string())
            .collect();
        assert_eq!(asked, ["a", "b", "c"]);
        puller
    };
    let entries = |ids: &[&str]| -> Vec<ReplyEntry> {
        ids.iter()
            .map(|id| ReplyEntry {
                key: key(id),
                message: north.stored_document(&key(id)).expect("read"),
            })
            .collect()
    };
    let reply = |ids: &[&str]| Frame::Reply {
        batch: 0,
        entries: entries(ids),
    };
    let part = |ids: &[&str]| Frame::ReplyPart {
        batch: 0,
        entries: entries(ids),
    };
    for wrong in [
        reply(&[]),
        reply(&["a", "b"]),
        reply(&["a", "c", "b"]),
        reply(&["a", "b", "c", "a"]),
        part(&[]),
        part(&["b"]),
        part(&["a", "b", "c"]),
    ] {
        let refused = start().receive(wrong.clone());
        assert!(
            matches!(refused, Err(Error::Protocol(_))),
            "{wrong:?}: {refused:?}"
        );
    }
    let mut puller = start();
    assert_eq!(puller.receive(part(&["a"])).expect("a part"), vec![]);
    assert!(matches!(
        puller.receive(part(&["b", "c"])),
        Err(Error::Protocol(_))
    ));
    assert_eq!(puller.receive(part(&["b"])).expect("a part"), vec![]);
    let out = puller.receive(reply(&["c"])).expect("the rest");
    assert_eq!(out, vec![done(0, 3)]);
    for id in ["a", "b", "c"] {
        assert_eq!(
            south.version(&key(id)).expect("read"),
            north.version(&key(id)).expect("read")
        );
    }
}

/// Two sites speak the lower of their protocol versions: a hello of a later version than this
/// site's is taken, and answered as this site's version says.
#[test]
fn a_peer_of_a_later_protocol_version_is_spoken_to_in_this_sites() {
    let (_north_dir, north) = open();
    let ids: Vec<String> = (0..3).map(|index| format!("e{index}")).collect();
    for id in &ids {
        write(&north, id, json!({"id": id}));
    }
    let (_south_dir, south) = open();
    let replies = replies_to(&north, &south, &ids, PROTOCOL_VERSION + 1, 1);
    assert_eq!(replies.len(), 3);
    assert!(matches!(replies.last(), Some(Frame::Reply { .. })));
}

/// Each site sizes the batches it announces by its own `batch_entities`; a site set lower takes
/// them all the same (sites need not agree on the setting).
#[test]
fn a_batch_larger_than_the_pullers_own_setting_is_taken() {
    let (_north_dir, north) = open();
    for index in 0..4 {
        write(&north, &format!("e{index}"), json!({"n": index}));
    }
    let (_south_dir, south) = open();
    let settings = |batch_entities| SessionSettings {
        batch_entities,
        max_rounds: 8,
        ..SessionSettings::default()
    };
    let (mut announcer, from_north) = session(&north, settings(4));
    assert_eq!(announced(&from_north).0.len(), 4);
    let (mut puller, from_south) = session(&south, settings(2));
    exchange(&mut announcer, &mut puller, from_north, from_south);
    for index in 0..4 {
        assert_eq!(
            south.version(&key(&format!("e{index}"))).expect("read"),
            north.version(&key(&format!("e{index}"))).expect("read"),
        );
    }
    assert_eq!(puller.progress().cursor, Seq(4));
}

#[test]
fn batches_hold_at_most_batch_entities_and_cover_the_whole_feed() {
    let (_dir, store) = open();
    for index in 0..13 {
        write(&store, &format!("e{index}"), json!({"n": index}));
    }
    // Rewriting an entity adds a row but not an entity to the batch.
    write(&store, "e0", json!({"n": 100}));
    let settings = SessionSettings {
        batch_entities: 3,
        max_rounds: 8,
        ..SessionSettings::default()
    };
    let (mut session, out) = session(&store, settings);
    let mut in_flight: std::collections::VecDeque<Frame> = out.into();
    assert_eq!(in_flight.len(), crate::frame::BATCHES_IN_FLIGHT);
    let mut announced = Vec::new();
    let mut last_through = Seq::ZERO;
    while let Some(Frame::Rows {
        batch,
        rows,
        through,
        ..
    }) = in_flight.pop_front()
    {
        assert!(rows.len() <= 3);
        assert!(through > last_through, "batches follow the feed in order");
        last_through = through;
        announced.extend(rows.iter().map(|row| row.key.to_string()));
        // Each acknowledgement opens room for one more batch, never more than may be in flight.
        let more = session
            .receive(Frame::Done {
                batch,
                cursor: through,
            })
            .expect("done is accepted");
        in_flight.extend(more);
        assert!(in_flight.len() <= crate::frame::BATCHES_IN_FLIGHT);
    }
    assert!(in_flight.is_empty());
    announced.sort();
    announced.dedup();
    assert_eq!(announced.len(), 13);
    assert_eq!(session.progress().their_cursor, Some(Seq(14)));
    assert!(session.is_idle());
}

#[test]
fn batches_are_acknowledged_in_the_order_they_were_announced() {
    let (_dir, store) = open();
    for index in 0..6 {
        write(&store, &format!("e{index}"), json!({"n": index}));
    }
    let settings = SessionSettings {
        batch_entities: 2,
        max_rounds: 8,
        ..SessionSettings::default()
    };
    let (mut session, out) = session(&store, settings);
    let batches: Vec<(u64, Seq)> = out
        .iter()
        .map(|frame| match frame {
            Frame::Rows { batch, through, .. } => (*batch, *through),
            other => panic!("expected rows: {other:?}"),
        })
        .collect();
    assert_eq!(batches.len(), 3);
    // The second batch before the first is out of turn.
    let (second, through) = batches[1];
    assert!(matches!(
        session.receive(Frame::Done {
            batch: second,
            cursor: through
        }),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn a_reply_starts_the_next_batch_before_it_is_applied() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let first = write(&other, "1", json!({"date": "2026-12-01"}));
    let second = write(&other, "2", json!({"date": "2026-12-02"}));
    let (mut session, _) = session(&store, SessionSettings::default());
    let out = session.accept(rows_of(0, "1", &first, 1)).expect("rows");
    assert!(
        matches!(&out[..], [Frame::Sync { batch: 0, .. }]),
        "{out:?}"
    );
    // The second batch waits while the first's request is on the wire.
    let out = session.accept(rows_of(1, "2", &second, 2)).expect("rows");
    assert!(out.is_empty(), "{out:?}");
    // Accepting the first reply asks for the second batch at once, and applies nothing yet.
    let out = session
        .accept(whole_reply(0, &other, "1"))
        .expect("the reply is accepted");
    assert!(
        matches!(&out[..], [Frame::Sync { batch: 1, .. }]),
        "{out:?}"
    );
    assert!(session.has_work());
    assert_eq!(store.version(&key("1")).expect("read"), None);
    assert_eq!(session.work().expect("applied"), vec![done(0, 1)]);
    assert_eq!(store.version(&key("1")).expect("read"), Some(first.clone()));
    assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq(1));
    let out = session
        .receive(whole_reply(1, &other, "2"))
        .expect("the second reply");
    assert_eq!(out, vec![done(1, 2)]);
    assert_eq!(
        store.version(&key("2")).expect("read"),
        Some(second.clone())
    );
    // No more batches than may be in flight (entities not here stay in flight until fetched).
    for batch in 2..2 + crate::frame::BATCHES_IN_FLIGHT as u64 {
        session
            .accept(rows_of(batch, &format!("new{batch}"), &first, batch + 1))
            .expect("room for it");
    }
    assert!(matches!(
        session.accept(rows_of(99, "new99", &second, 99)),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn a_later_batch_that_completes_first_waits_for_the_earlier_one() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let here = write(&store, "here", json!({"n": 1}));
    let new = write(&other, "new", json!({"n": 2}));
    let (mut session, _) = session(&store, SessionSettings::default());
    let out = session.accept(rows_of(0, "new", &new, 1)).expect("rows");
    assert!(
        matches!(&out[..], [Frame::Sync { batch: 0, .. }]),
        "{out:?}"
    );
    assert!(session
        .accept(rows_of(1, "here", &here, 2))
        .expect("rows")
        .is_empty());
    // Accepting the first reply starts the second batch, which has nothing to fetch and is
    // complete at once; it is not acknowledged before the first, whose reply is not applied.
    let out = session
        .accept(whole_reply(0, &other, "new"))
        .expect("reply");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq::ZERO);
    assert_eq!(
        session.work().expect("applied"),
        vec![done(0, 1), done(1, 2)]
    );
    assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq(2));
    assert!(!session.has_work());
}

#[test]
fn one_entity_in_two_batches_in_flight_ends_at_the_later_version() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let first = write(&other, "1", json!({"n": 1}));
    let (mut session, _) = session(&store, SessionSettings::default());
    session.accept(rows_of(0, "1", &first, 1)).expect("rows");
    let first_document = whole_reply(0, &other, "1");
    let second = write(&other, "1", json!({"m": 2}));
    session.accept(rows_of(1, "1", &second, 2)).expect("rows");
    // The second batch starts before the first is applied, so it fetches the entity again.
    let out = session.accept(first_document).expect("reply");
    let Some(Frame::Sync { batch: 1, entries }) = out.first() else {
        panic!("expected the second batch's request: {out:?}");
    };
    assert_eq!(entries[0].mode, Mode::Whole);
    let mut out = session.work().expect("applied");
    out.extend(session.receive(whole_reply(1, &other, "1")).expect("reply"));
    assert_eq!(out, vec![done(0, 1), done(1, 2)]);
    assert_eq!(store.version(&key("1")).expect("read"), Some(second));
    assert_eq!(
        store.get(&key("1")).expect("read"),
        other.get(&key("1")).expect("read")
    );
}

#[test]
fn bad_rows_and_replies_end_the_session_on_the_frame_that_is_wrong() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    let version = write(&other, "1", json!({"n": 1}));
    let cases: Vec<(&str, Vec<Frame>)> = vec![
        (
            "a version that is not one",
            vec![
                rows_of(0, "1", &version, 1),
                rows_of(1, "2", "not a version", 2),
            ],
        ),
        (
            "a batch id twice",
            vec![rows_of(0, "1", &version, 1), rows_of(0, "2", &version, 2)],
        ),
        (
            "a batch that does not follow the one before",
            vec![rows_of(0, "1", &version, 5), rows_of(1, "2", &version, 5)],
        ),
        (
            "a reply for a batch not started",
            vec![
                rows_of(0, "1", &version, 1),
                rows_of(1, "2", &version, 2),
                whole_reply(1, &other, "1"),
            ],
        ),
    ];
    for (case, frames) in cases {
        let (mut session, _) = session(&store, SessionSettings::default());
        let (last, before) = frames.split_last().expect("frames");
        for frame in before {
            session.accept(frame.clone()).expect(case);
        }
        assert!(
            matches!(session.accept(last.clone()), Err(Error::Protocol(_))),
            "{case}"
        );
    }
    assert_eq!(store.last_seq(), Seq::ZERO, "nothing was written");
}

#[test]
fn a_peer_whose_store_was_replaced_moves_the_cursor_back() {
    let (_dir, store) = open();
    let (_other_dir, other) = open();
    store
        .write_records(vec![RecordWrite::put(
            RecordKey::new(CURSOR_SPACE, &["remote"]),
            "100",
        )])
        .expect("an old cursor");
    let version = write(&other, "1", json!({"n": 1}));
    let (mut session, _) = session(&store, SessionSettings::default());
    assert_eq!(session.progress().cursor, Seq(100));
    session.receive(rows_of(0, "1", &version, 1)).expect("rows");
    let out = session.receive(whole_reply(0, &other, "1")).expect("reply");
    assert_eq!(out, vec![done(0, 1)]);
    assert_eq!(stored_cursor(&store, "remote").expect("read"), Seq(1));
}

/// Writes entity `id` as a change from the peer `remote` (`peer:remote`) into `store`.
fn merge_from_peer(store: &Store, id: &str) {
    let (_dir, other) = open();
    other
        .patch(
            &key(id),
            &json!({"a": 1}),
            &WriteOptions::new(Origin::local("bob").expect("valid")),
        )
        .expect("write");
    let bytes = other.save(&key(id)).expect("save").expect("it exists");
    store
        .merge(
            &key(id),
            &bytes,
            &Origin::parse("peer:remote").expect("valid"),
        )
        .expect("merge");
}

/// A session whose peer acknowledges this site's feed up to `acked`, then goes away.
fn acknowledge(store: &Store, acked: u64) {
    let (mut session, out) = session(store, SessionSettings::default());
    let Some(Frame::Rows { batch, .. }) = out.first() else {
        panic!("expected rows: {out:?}");
    };
    session.receive(done(*batch, acked)).expect("done");
}

/// A peer whose hello is behind what it acknowledged here may have lost its store (restored
/// from a backup, say): its own changes are announced back to it from its cursor on, which
/// it would otherwise never get again.
#[test]
fn a_peer_behind_what_it_acknowledged_gets_its_own_changes_back() {
    let (_dir, store) = open();
    write(&store, "first", json!({"c": 3}));
    merge_from_peer(&store, "theirs");
    write(&store, "ours", json!({"b": 2}));
    acknowledge(&store, 3);
    let (keys, through) = announced_to(&store, 1);
    assert_eq!(keys, ["appointment/ours", "appointment/theirs"]);
    assert_eq!(through, Seq(3));
    // At what it acknowledged, its own changes are left out as usual.
    acknowledge(&store, 1);
    assert_eq!(
        announced_to(&store, 1),
        (vec!["appointment/ours".into()], Seq(3))
    );
}

/// A peer whose hello is past what it acknowledged here has consumed rows this store may no
/// longer have (restored from a backup, it wrote other rows under the same numbers): the
/// feed is announced again from what it acknowledged.
#[test]
fn a_peer_past_what_it_acknowledged_is_announced_again_from_there() {
    let (_dir, store) = open();
    for index in 0..5 {
        write(&store, &format!("e{index}"), json!({"n": index}));
    }
    acknowledge(&store, 2);
    let (keys, through) = announced_to(&store, 4);
    assert_eq!(keys, ["appointment/e2", "appointment/e3", "appointment/e4"]);
    assert_eq!(through, Seq(5));
    // At what it acknowledged, the feed goes on from its cursor.
    acknowledge(&store, 4);
    assert_eq!(
        announced_to(&store, 4),
        (vec!["appointment/e4".into()], Seq(5))
    );
}
