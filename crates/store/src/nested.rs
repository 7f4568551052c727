//! Nested maps that every replica creates identically, so concurrent creation merges field by field.
//!
//! Automerge identifies an object by the operation that created it. When two replicas each create
//! a map at `site` while apart, the two maps are different objects: after a merge one wins the key
//! and the fields written into the other are hidden. To avoid that, the store never creates a
//! nested map with an ordinary operation. It creates it in a change of its own that depends only on
//! where the map goes: the change's actor is derived from the parent object, the key and a
//! generation number; it depends on nothing but the change that created the parent; its time is 0
//! and its message is [`STRUCTURE_MESSAGE`]. Every replica that creates that map builds the
//! byte-identical change, so after a merge both sides wrote into one shared map.
//!
//! A structural change overwrites nothing and its operation has a low counter, so when another
//! replica concurrently wrote something else at the same place (a string where this one made a
//! map), that value wins the merge on every replica; the map stays visible as a conflict.
//!
//! A map that was created and then deleted cannot be brought back by its change, so the next
//! creation at the same place uses the next generation. Replicas that recreate a map concurrently
//! after the same history agree on the generation too. The change bytes are part of the storage
//! format: changing this derivation (or the Automerge encoding) makes old and new replicas build
//! different changes for one actor and sequence number, which Automerge refuses to merge.
//! What goes into the map is `document`'s business; this module only makes the empty map exist.

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ReadDoc, Value, ROOT};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::Result;

/// The message of every structural change, so history can leave them out.
pub(crate) const STRUCTURE_MESSAGE: &str = "lockstep:structure";

/// After this many generations at one place the store falls back to an ordinary map, which may
/// conflict as a whole; it bounds the work for a field that is deleted and recreated very often.
const MAX_GENERATIONS: u32 = 32;

/// Makes `parent[key]` an empty shared map, returning its id, or `None` when that is not possible
/// (the parent's creating change is unknown, or every generation is used up).
///
/// The caller has removed whatever `parent[key]` held: a structural change overwrites nothing,
/// so an older value that is still there would win over the new map.
pub(crate) fn create_shared_map(
    doc: &mut Automerge,
    parent: &ObjId,
    key: &str,
) -> Result<Option<ObjId>> {
    // A document without any change yet (every new entity) that needs a map at its root:
    // a copy of one that got the same map before costs a fifth of applying the change again.
    let empty_root = *parent == ROOT && doc.get_heads().is_empty();
    if empty_root {
        if let Some(template) = template(key, doc.get_actor()) {
            *doc = template;
            return Ok(match doc.get(parent, key)? {
                Some((Value::Object(ObjType::Map), id)) => Some(id),
                _ => None,
            });
        }
    }
    let parent_hash = if *parent == ROOT {
        None
    } else {
        match doc.hash_for_opid(parent) {
            Some(hash) => Some(hash),
            None => return Ok(None),
        }
    };
    // The document the change is built on, made only when a change is not remembered.
    let mut base: Option<Automerge> = None;
    for generation in 0..MAX_GENERATIONS {
        let place = Place {
            parent_hash,
            parent: parent.to_string(),
            key: key.to_owned(),
            generation,
        };
        let change = match built(&place) {
            Some(change) => change,
            None => {
                let base = match &mut base {
                    Some(base) => base,
                    None => base.insert(match parent_hash {
                        None => Automerge::new(),
                        Some(hash) => doc.fork_at(&[hash])?,
                    }),
                };
                let change = structural_change(base, parent, key, generation)?;
                remember(place, &change);
                change
            }
        };
        if crate::document::has_change(doc, &change.hash()) {
            // This generation was created here before and has since been deleted or replaced.
            continue;
        }
        doc.apply_changes([change])?;
        if empty_root {
            remember_template(key, doc);
        }
        return Ok(match doc.get(parent, key)? {
            Some((Value::Object(ObjType::Map), id)) => Some(id),
            _ => None,
        });
    }
    Ok(None)
}

/// Whether a change is one [`create_shared_map`] makes, rather than an edit someone made.
pub(crate) fn is_structural(change: &Change) -> bool {
    change.message() == Some(STRUCTURE_MESSAGE) && change.timestamp() == 0 && change.len() == 1
}

/// Where a structural change puts its map; the change is a function of this alone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Place {
    /// The change that created the parent (none for the root).
    parent_hash: Option<ChangeHash>,
    parent: String,
    key: String,
    generation: u32,
}

/// A process-wide map of things worked out once, bounded: forgotten whole when it is full.
struct Memo<K, V> {
    entries: OnceLock<Mutex<HashMap<K, V>>>,
    max: usize,
}

impl<K: Eq + std::hash::Hash, V: Clone> Memo<K, V> {
    const fn new(max: usize) -> Self {
        Self {
            entries: OnceLock::new(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, V>> {
        self.entries
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, key: &K) -> Option<V> {
        self.lock().get(key).cloned()
    }

    fn insert(&self, key: K, value: V) {
        let mut entries = self.lock();
        if entries.len() >= self.max {
            entries.clear();
        }
        entries.insert(key, value);
    }
}

/// Structural changes already built, at most 4,096. Building one costs a fork, a transaction
/// and a change extraction, as much as the write that needs the map, and the same few places
/// (a record's `site` or `address`) come up in write after write.
static BUILT: Memo<Place, Change> = Memo::new(4096);

fn built(place: &Place) -> Option<Change> {
    BUILT.get(place)
}

fn remember(place: Place, change: &Change) {
    BUILT.insert(place, change.clone());
}

/// Documents that had no change until a shared map was made at `key` in their root, by that key
/// and their actor, at most 256. Such a document is a function of the two (the change is; the
/// actor is the one the document had), so a copy of it, given to another empty document with
/// the same actor, is exactly what applying the change to that document makes.
static TEMPLATES: Memo<(String, ActorId), Automerge> = Memo::new(256);

fn template(key: &str, actor: &ActorId) -> Option<Automerge> {
    TEMPLATES.get(&(key.to_owned(), actor.clone()))
}

fn remember_template(key: &str, doc: &Automerge) {
    TEMPLATES.insert((key.to_owned(), doc.get_actor().clone()), doc.clone());
}

fn structural_change(
    base: &Automerge,
    parent: &ObjId,
    key: &str,
    generation: u32,
) -> Result<Change> {
    let mut fork = base.clone().with_actor(actor_for(parent, key, generation));
    fork.transact_with(
        |_| {
            CommitOptions::default()
                .with_message(STRUCTURE_MESSAGE.to_owned())
                .with_time(0)
        },
        |tx| {
            use automerge::transaction::Transactable;
            tx.put_object(parent, key, ObjType::Map)
        },
    )
    .map_err(|failure| failure.error)?;
    Ok(fork
        .get_last_local_change()
        .expect("the transaction above committed a change with one operation"))
}

fn actor_for(parent: &ObjId, key: &str, generation: u32) -> ActorId {
    let mut hasher = Sha256::new();
    hasher.update(b"lockstep nested map\0");
    hasher.update(parent.to_string().as_bytes());
    hasher.update([0]);
    hasher.update(key.as_bytes());
    hasher.update([0]);
    hasher.update(generation.to_be_bytes());
    ActorId::from(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structural change of every map in `doc`, by the map's key, as bytes.
    fn structural_changes(doc: &Automerge) -> Vec<Vec<u8>> {
        doc.get_changes(&[])
            .into_iter()
            .filter(is_structural)
            .map(|mut change| change.bytes().to_vec())
            .collect()
    }

    #[test]
    fn a_remembered_change_is_the_one_building_it_again_makes() {
        // Two documents that create the same nested places: the second is served from memory,
        // and must get the byte-identical changes, or replicas would stop merging field by field.
        let make = || -> Result<Automerge> {
            let mut doc = Automerge::new();
            let site = create_shared_map(&mut doc, &ROOT, "site-remembered")?.expect("a map");
            create_shared_map(&mut doc, &site, "office")?.expect("a nested map");
            Ok(doc)
        };
        let first = make().expect("first document");
        let second = make().expect("second document");
        let place = Place {
            parent_hash: None,
            parent: ROOT.to_string(),
            key: "site-remembered".to_owned(),
            generation: 0,
        };
        assert!(
            built(&place).is_some(),
            "the root-level change is remembered"
        );
        assert_eq!(structural_changes(&first).len(), 2);
        assert_eq!(structural_changes(&first), structural_changes(&second));
        let fresh =
            structural_change(&Automerge::new(), &ROOT, "site-remembered", 0).expect("built again");
        assert_eq!(
            built(&place).map(|change| change.hash()),
            Some(fresh.hash())
        );
    }

    #[test]
    fn a_full_memo_forgets_everything_and_keeps_the_newest() {
        let memo: Memo<u32, &str> = Memo::new(2);
        memo.insert(1, "one");
        memo.insert(2, "two");
        assert_eq!((memo.get(&1), memo.get(&2)), (Some("one"), Some("two")));
        memo.insert(3, "three");
        assert_eq!((memo.get(&1), memo.get(&2)), (None, None));
        assert_eq!(memo.get(&3), Some("three"));
    }

    #[test]
    fn a_new_document_from_a_template_is_the_one_applying_the_change_makes() {
        use automerge::transaction::Transactable;
        // What a new entity's document is after its first write, made with a template or not:
        // the same bytes, and the same bytes again after an edit into the map.
        let actor = ActorId::from(vec![7; 16]);
        let write = |doc: &mut Automerge| -> Result<Vec<u8>> {
            let site = create_shared_map(doc, &ROOT, "site-template")?.expect("a map");
            doc.transact_with(
                |_| {
                    CommitOptions::default()
                        .with_message("local:test".to_owned())
                        .with_time(1)
                },
                |tx| {
                    tx.put(&site, "code", "N1")?;
                    tx.put(ROOT, "date", "2026-12-03")
                },
            )
            .map_err(|failure| failure.error)?;
            Ok(doc.save())
        };
        let mut applied = Automerge::new().with_actor(actor.clone());
        let applied_bytes = write(&mut applied).expect("the first document");
        assert!(
            template("site-template", &actor).is_some(),
            "the first document left a template"
        );
        let mut copied = Automerge::new().with_actor(actor.clone());
        let copied_bytes = write(&mut copied).expect("the second document");
        assert_eq!(applied_bytes, copied_bytes);
        assert_eq!(applied.get_heads(), copied.get_heads());
        assert_eq!(
            copied.get_actor(),
            &actor,
            "the copy writes as its own actor"
        );
        // Another actor gets its own template, not this one's.
        let other = ActorId::from(vec![8; 16]);
        let mut elsewhere = Automerge::new().with_actor(other.clone());
        write(&mut elsewhere).expect("a document of another actor");
        assert_eq!(elsewhere.get_actor(), &other);
        // A document that already has changes never takes a template.
        let mut edited = Automerge::new().with_actor(actor.clone());
        edited
            .transact_with(
                |_| CommitOptions::default().with_time(1),
                |tx| tx.put(ROOT, "before", 1),
            )
            .map_err(|failure| failure.error)
            .expect("an edit");
        let heads = edited.get_heads();
        create_shared_map(&mut edited, &ROOT, "site-template").expect("a map");
        assert!(
            edited.get_change_by_hash(&heads[0]).is_some(),
            "its own change is kept"
        );
        assert_eq!(
            edited.get_heads().len(),
            2,
            "the map's change sits beside it"
        );
    }
}
