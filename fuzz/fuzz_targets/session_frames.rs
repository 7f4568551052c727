//! Frames from a replication peer, in any order and of any content, through one session.
//!
//! The input is a sequence of records: a control byte, a two-byte little-endian length and that
//! many bytes, which are decoded as a frame (records that do not decode are skipped). Each frame
//! is accepted after a valid hello; when the control byte's low bit is set, the replies it
//! queued are applied at once, otherwise later, as a link does when frames arrive while it is
//! busy. The session may refuse any frame (that ends it), but it never panics, and it never
//! acknowledges a batch beyond what was announced to it.
//!
//! Unlike the other targets, an input here names the entities it touches (its frames carry
//! kinds, ids and documents), so it may change the seeded entities, or leave entities behind,
//! for the inputs after it in the same process. Each input still has a peer, and so a cursor,
//! of its own, which is what the assertion checks. A crash that does not reproduce alone
//! (`cargo fuzz run session_frames <crash file>`, a fresh process and store) needs the inputs
//! that ran before it: rerun with the corpus directory.

#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replication::{stored_cursor, Frame, Session, SessionSettings, PROTOCOL_VERSION};
use serde_json::json;
use store::{Origin, Seq, WriteOptions};

/// The shared store, with a few entities for the session to announce and be asked about.
fn seeded() -> &'static store::Store {
    static SEEDED: OnceLock<()> = OnceLock::new();
    let store = lockstep_fuzz::store();
    SEEDED.get_or_init(|| {
        let options = WriteOptions::new(Origin::local("fuzz").expect("a valid origin"));
        for id in 0..4 {
            let key = store::EntityKey::new("appointment", id.to_string()).expect("a valid key");
            store
                .patch(&key, &json!({"n": id, "site": {"code": "N1"}}), &options)
                .expect("the seed writes");
        }
    });
    store
}

fuzz_target!(|data: &[u8]| {
    let store = seeded();
    // A peer of its own per input, so every input starts from cursor zero.
    static PEERS: AtomicU64 = AtomicU64::new(0);
    let peer = format!("fuzz{}", PEERS.fetch_add(1, Ordering::Relaxed));
    let settings = SessionSettings {
        batch_entities: 4,
        max_rounds: 4,
        // Answers split into a part per entity.
        reply_bytes: 1,
    };
    let mut session = Session::open(store.clone(), &peer, "local", settings).expect("opens");
    let hello = Frame::Hello {
        protocol: PROTOCOL_VERSION,
        site: "remote".into(),
        cursor: Seq::ZERO,
    };
    if session.accept(hello).is_err() {
        return;
    }
    let mut announced_through = Seq::ZERO;
    let mut rest = data;
    while rest.len() >= 3 {
        let control = rest[0];
        let length = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let (bytes, tail) = rest[3..].split_at(length);
        rest = tail;
        let Ok(frame) = Frame::decode(bytes) else {
            continue;
        };
        if let Frame::Rows { through, .. } = &frame {
            announced_through = announced_through.max(*through);
        }
        let mut step = session.accept(frame);
        if control & 1 == 1 {
            while step.is_ok() && session.has_work() {
                step = session.work();
            }
        }
        if step.is_err() {
            return;
        }
        // The cursor only moves to where a batch that was announced ends.
        let cursor = stored_cursor(store, &peer).expect("the cursor reads");
        assert!(
            cursor <= announced_through,
            "{cursor} > {announced_through}"
        );
    }
    while session.has_work() {
        if session.work().is_err() {
            return;
        }
    }
});
