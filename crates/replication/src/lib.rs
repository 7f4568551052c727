//! Site-to-site replication: several Lockstep sites keep every entity in step with each other,
//! keep working when cut off, and converge when the link returns.
//!
//! Two sites talk over one websocket, dialed by the site that lists the other in `[[peers]]`.
//! Each side announces its feed after the cursor the other asked for, in batches; the other
//! skips entities whose announced version it already has, and brings the rest up to date with
//! Automerge's sync protocol, many entities per round trip, then writes its cursor to disk and
//! acknowledges the batch. Both directions run at once, continuously: a new local change is
//! announced as soon as it is durable. Changes from a peer are recorded with origin
//! `peer:<name>`, so they reach this site's feed, subscribers and connectors. HTTP (the upgrade,
//! authentication status codes, the status endpoints) is `server`'s business; storage is `store`'s.
//!
//! # Layout
//! `config` holds the `[replication]` and `[[peers]]` settings; `frame` is the wire format;
//! `session` is the protocol as a state machine without IO (frames in, frames out), with the
//! puller's half in `session::pull` and the announcer's in `session::serve`; `link` runs a
//! session over one websocket, judging silence by `activity` (when bytes last moved over the
//! connection); `backoff` paces reconnection; `status` is what links report;
//! `registry` holds the peers, dials and accepts.
//!
//! # Example
//! Two sites syncing in-process, moving frames by hand as a websocket would:
//! ```
//! use replication::{Frame, Session, SessionSettings};
//! use serde_json::json;
//! use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};
//!
//! let (north_dir, south_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
//! let north = Store::open(StoreConfig::new(north_dir.path()))?;
//! let south = Store::open(StoreConfig::new(south_dir.path()))?;
//! let key = EntityKey::new("appointment", "1")?;
//! north.patch(&key, &json!({"date": "2026-12-01"}), &WriteOptions::new(Origin::local("alice")?))?;
//!
//! let settings = SessionSettings::default();
//! let mut at_north = Session::open(north.clone(), "south", "north", settings)?;
//! let mut at_south = Session::open(south.clone(), "north", "south", settings)?;
//! let (mut to_south, mut to_north): (Vec<Frame>, Vec<Frame>) =
//!     (vec![at_north.hello()], vec![at_south.hello()]);
//! while !to_south.is_empty() || !to_north.is_empty() {
//!     let mut replies_to_north = Vec::new();
//!     for frame in to_south.drain(..) {
//!         replies_to_north.extend(at_south.receive(frame)?);
//!     }
//!     let mut replies_to_south = Vec::new();
//!     for frame in to_north.drain(..) {
//!         replies_to_south.extend(at_north.receive(frame)?);
//!     }
//!     to_north = replies_to_north;
//!     to_south = replies_to_south;
//! }
//! assert_eq!(south.get(&key)?.unwrap().data["date"], "2026-12-01");
//! assert_eq!(south.feed(store::Seq::ZERO, None, 10)?[0].origin.as_str(), "peer:north");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod activity;
mod backoff;
mod config;
mod error;
mod frame;
mod link;
mod registry;
mod session;
mod status;
pub mod tls;

pub use config::{
    validate, ConfigError, Peer, PeerConfig, PeerToken, ReplicationSettings, Token, ENDPOINT_PATH,
};
pub use error::{Error, Result};
pub use frame::{
    Frame, Mode, ReplyEntry, Row, SyncEntry, BATCHES_IN_FLIGHT, PROTOCOL_VERSION, REPLY_BYTES,
};
pub use link::accept_key;
pub use registry::{LinkSlot, Refusal, Replication, Worker, MAX_LINKS_PER_PEER};
pub use session::{stored_cursor, Progress, Session, SessionSettings};
pub use status::{PeerState, PeerStatus};
