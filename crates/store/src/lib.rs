//! Lockstep's durable entity store: every entity is an Automerge document persisted in sled,
//! every change gets a feed row, and a write returns only once both are on disk.
//!
//! This is the only crate that touches sled. HTTP, connectors and replication call [`Store`];
//! they never see a sled key or an Automerge document.
//!
//! # Layout
//! `key` validates entity identities, `origin` names where a change came from, `version` turns
//! document heads into an opaque string, `document` translates JSON to and from Automerge,
//! `nested` creates nested maps that every replica creates identically, `direct` builds local edits as Automerge changes without Automerge's transaction,
//! `layout` is the sled key scheme, `pieces` stores large Automerge data in pieces that keep sled's pages small, `durability` runs group commit, `cache` bounds loaded
//! documents, `feed` defines feed rows, `records` keeps other crates' side records, `replica` speaks Automerge's sync protocol per entity, and `store` ties them together.
//!
//! # Example
//! ```
//! use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};
//! use serde_json::json;
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(StoreConfig::new(dir.path()))?;
//! let key = EntityKey::new("appointment", "1")?;
//! let options = WriteOptions::new(Origin::local("alice")?);
//! store.patch(&key, &json!({"date": "2026-12-01", "site": {"code": "N1"}}), &options)?;
//! let written = store.patch(&key, &json!({"date": "2026-12-02"}), &options)?;
//! assert_eq!(written.entity.unwrap().data["date"], "2026-12-02");
//! assert_eq!(store.feed(store::Seq::ZERO, None, 10)?.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod atomic;
mod batch;
mod cache;
mod direct;
mod document;
mod durability;
mod error;
mod feed;
mod files;
mod inflation;
mod key;
mod layout;
mod nested;
mod origin;
mod pieces;
mod records;
mod replica;
mod store;
mod version;

pub use batch::{Edit, Records, WriteRequest};
pub use document::{
    ConflictValue, FieldConflict, MAX_DEPTH, MAX_OBJECTS_PER_WRITE, MAX_VALUES_PER_WRITE,
};
pub use durability::SyncMode;
pub use error::{Error, Result};
pub use feed::{FeedRow, Seq};
pub use inflation::MAX_INFLATED_BYTES;
pub use key::{EntityId, EntityKey, Kind};
pub use origin::Origin;
pub use records::{CommitView, RecordKey, RecordWrite};
pub use replica::SyncState;
pub use store::{
    now_ms, Entity, HistoryEntry, Page, Store, StoreConfig, StoreStats, Unflushed, WriteOptions,
    Written,
};
pub use version::{IfMatch, Version};
