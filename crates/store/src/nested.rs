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
    let base = if *parent == ROOT {
        Automerge::new()
    } else {
        match doc.hash_for_opid(parent) {
            Some(hash) => doc.fork_at(&[hash])?,
            None => return Ok(None),
        }
    };
    for generation in 0..MAX_GENERATIONS {
        let change = structural_change(&base, parent, key, generation)?;
        if doc.get_change_by_hash(&change.hash()).is_some() {
            // This generation was created here before and has since been deleted or replaced.
            continue;
        }
        doc.apply_changes([change])?;
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

/// The heads to diff a change against so that the maps it needed count as its own fields:
/// its dependencies, with every structural change among them replaced by its own dependencies.
pub(crate) fn edit_base(doc: &Automerge, deps: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut base = Vec::new();
    let mut pending = deps.to_vec();
    while let Some(hash) = pending.pop() {
        match doc.get_change_by_hash(&hash) {
            Some(dep) if is_structural(&dep) => pending.extend(dep.deps()),
            _ => base.push(hash),
        }
    }
    base.sort();
    base.dedup();
    base
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
