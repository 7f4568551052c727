//! Local edits built as Automerge changes directly, without Automerge's transaction.
//!
//! Automerge 0.12 splices every operation of a transaction into its columnar op set at once: a
//! put costs about 10 µs, and an update of six fields about 58 µs, most of a write's CPU. Yet
//! all a local edit of a settled entity needs to build its change is, for each field it writes,
//! the id of the operation that set the field's current value (the operation the new one
//! supersedes), plus the document's heads, largest operation counter and this replica's last
//! sequence number. [`WriteIndex`] keeps exactly that, [`WriteIndex::merge_patch`] builds the
//! change from it (Automerge's own encoder, through `ExpandedChange`: about 3 µs), and the
//! document takes such changes later, many at once (`apply_changes_batch`: about 6 µs a change
//! in batches of 40), when something needs the document itself: a snapshot, a read of history,
//! a merge (see `cache::LoadedDoc`).
//!
//! The change is the one the transaction would have made, byte for byte
//! (`direct::tests::the_change_is_the_one_the_transaction_makes`), so nothing downstream
//! (hashes, versions, chunks, replication) can tell the two apart. Anything the index does not
//! cover takes the transaction: a document with concurrent values, a patch that makes a map in
//! an existing entity or writes a list, a write that changes nothing. A new entity's maps are
//! made first as shared maps ([`prepare_new`]), and an entity whose document the cache evicted
//! keeps its index, so its next write is built without loading the document (see
//! `cache::LoadedDoc::hollow`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::num::NonZeroU64;

use automerge::{
    legacy, ActorId, Automerge, Change, ChangeHash, ExpandedChange, ObjId, ObjType, ReadDoc, Value,
    ValueRef, ROOT,
};
use serde_json::{Map, Value as Json};

use crate::document::{self, Stamp, Touched, MAX_DEPTH};

/// The fields of one map: each key's current operation, and for a map value its own fields.
type Fields = HashMap<String, Slot>;

#[derive(Clone, Debug)]
struct Slot {
    /// The operation that set the current value; for a map, the map's object id.
    id: legacy::OpId,
    /// The map's fields, when the value is a map.
    map: Option<Fields>,
}

/// What building a local change needs of a settled document, kept up to date by the changes
/// built from it (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct WriteIndex {
    actor: ActorId,
    /// This replica's last sequence number in the document (0 before its first change).
    seq: u64,
    /// This replica's last change, which a new change depends on even when it is not a head.
    last_local: Option<ChangeHash>,
    /// The largest operation counter in the document.
    max_op: u64,
    /// The document's heads, counting changes not applied to it yet.
    heads: Vec<ChangeHash>,
    root: Fields,
}

impl WriteIndex {
    /// The index of `doc`, or `None` when the document holds concurrent values (a write then
    /// settles them, which only the transaction knows how to do), queued changes, or objects
    /// nested deeper than local writes make.
    pub(crate) fn of(doc: &Automerge) -> Option<Self> {
        Self::read(doc, None)
    }

    /// [`WriteIndex::of`], and the document's fields as JSON (as `document::fields` reads them),
    /// from the same walk over the document.
    pub(crate) fn with_fields(doc: &Automerge) -> Option<(Self, Map<String, Json>)> {
        let mut fields = Map::new();
        let index = Self::read(doc, Some(&mut fields))?;
        Some((index, fields))
    }

    /// The index; the fields as JSON into `json` when given.
    fn read(doc: &Automerge, json: Option<&mut Map<String, Json>>) -> Option<Self> {
        if !doc.get_missing_deps(&[]).is_empty() {
            return None;
        }
        let root = fields_of(doc, &ROOT, 0, json)?;
        // From every change's metadata, not `get_last_local_change`: a document knows the
        // changes of its actor as its own only once it made one itself, not when it loaded or
        // applied them, and the transaction counts them all the same.
        let actor = doc.get_actor().clone();
        let changes = doc.get_changes_meta(&[]);
        let max_op = changes.iter().map(|meta| meta.max_op).max().unwrap_or(0);
        let last = changes
            .iter()
            .filter(|meta| *meta.actor == actor)
            .max_by_key(|meta| meta.seq);
        Some(Self {
            seq: last.map_or(0, |meta| meta.seq),
            last_local: last.map(|meta| meta.hash),
            actor,
            max_op,
            heads: doc.get_heads(),
            root,
        })
    }

    /// The document's heads, counting the changes built from the index.
    pub(crate) fn heads(&self) -> &[ChangeHash] {
        &self.heads
    }

    /// About what the index holds in memory: its own bytes, its heads, and for each map of
    /// fields its hash table (every slot it has room for) and each field's key and nested map.
    pub(crate) fn weight(&self) -> u64 {
        fn fields_weight(fields: &Fields) -> u64 {
            let table = (fields.capacity() * (std::mem::size_of::<(String, Slot)>() + 1)) as u64;
            table
                + fields
                    .iter()
                    .map(|(key, slot)| {
                        key.len() as u64 + slot.map.as_ref().map_or(0, fields_weight)
                    })
                    .sum::<u64>()
        }
        (std::mem::size_of::<Self>() + self.heads.len() * std::mem::size_of::<ChangeHash>()) as u64
            + fields_weight(&self.root)
    }

    /// Builds the change that applying `patch` (RFC 7386) to the document's fields `current`
    /// would make, stamped with `stamp`, and records it in the index; `None` when the patch
    /// needs the transaction (see the module docs), and the index must then be dropped, as it
    /// may hold part of the patch.
    pub(crate) fn merge_patch(
        &mut self,
        patch: &Map<String, Json>,
        current: &Map<String, Json>,
        stamp: &Stamp,
    ) -> Option<(Change, Touched)> {
        let start = self.max_op + 1;
        let mut ops = Vec::new();
        let mut touched = Touched::default();
        let root = legacy::ObjectId::Root;
        let mut builder = Builder {
            actor: &self.actor,
            start,
            ops: &mut ops,
            touched: &mut touched,
        };
        builder.merge(&mut self.root, &root, patch, current, "", 0)?;
        if ops.is_empty() {
            return None;
        }
        let count = ops.len() as u64;
        let mut deps = self.heads.clone();
        if let Some(last) = self.last_local {
            if !deps.contains(&last) {
                deps.push(last);
            }
        }
        deps.sort_unstable();
        let change = Change::from(ExpandedChange {
            operations: ops,
            actor_id: self.actor.clone(),
            hash: None,
            seq: self.seq + 1,
            start_op: NonZeroU64::new(start)?,
            time: stamp.time,
            message: Some(stamp.message.clone()),
            deps,
            extra_bytes: Vec::new(),
            author: None,
        });
        self.seq += 1;
        self.max_op += count;
        self.last_local = Some(change.hash());
        self.heads = vec![change.hash()];
        Some((change, touched))
    }
}

/// A new entity readied for its first write by [`prepare_new`].
pub(crate) struct Prepared<'p> {
    /// The fields its document reads as.
    pub(crate) current: Map<String, Json>,
    /// The patch, in the order the transaction writes it.
    pub(crate) patch: Cow<'p, Map<String, Json>>,
}

/// Readies a new entity's empty document for its first write, a merge patch, as the
/// transaction's path does: the maps the patch writes into are made first, as shared maps (see
/// `nested`), in changes of their own. Returns the fields the document then reads as (those maps,
/// empty) and the patch in the order the transaction writes it: a patch without maps is written
/// in one batch, its fields in key order. `None` when making the maps fails; the document must
/// then be dropped.
pub(crate) fn prepare_new<'p>(
    doc: &mut Automerge,
    patch: &'p Map<String, Json>,
    stamp: &Stamp,
) -> Option<Prepared<'p>> {
    if patch.values().any(Json::is_object) {
        let mut made = Touched::default();
        document::create_maps(doc, &ROOT, patch, stamp, "", &mut made).ok()?;
        return Some(Prepared {
            current: document::fields(doc, None),
            patch: Cow::Borrowed(patch),
        });
    }
    let mut sorted: Vec<_> = patch.iter().collect();
    sorted.sort_by(|left, right| left.0.cmp(right.0));
    let ordered = sorted
        .into_iter()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    Some(Prepared {
        current: Map::new(),
        patch: Cow::Owned(ordered),
    })
}

/// Reads the fields of the map `obj` (at most [`MAX_DEPTH`] levels down), and, into `json`
/// when given, the map as JSON, keys sorted as `document::object_to_json` sorts them; `None`
/// when a field holds concurrent values or nests deeper.
fn fields_of(
    doc: &Automerge,
    obj: &ObjId,
    depth: usize,
    mut json: Option<&mut Map<String, Json>>,
) -> Option<Fields> {
    if depth > MAX_DEPTH {
        return None;
    }
    let mut fields = Fields::new();
    for item in doc.map_range(obj, ..) {
        if item.conflict {
            return None;
        }
        let id = item.id();
        let wanted = json.is_some();
        let (map, value) = match item.value {
            ValueRef::Object(ObjType::Map | ObjType::Table) => {
                let mut child = wanted.then(Map::new);
                let map = fields_of(doc, &id, depth + 1, child.as_mut())?;
                (Some(map), child.map(Json::Object))
            }
            ValueRef::Object(_) => (
                None,
                wanted.then(|| document::object_to_json(doc, &id, None)),
            ),
            scalar => (
                None,
                wanted.then(|| match scalar.into_value() {
                    Value::Scalar(scalar) => document::scalar_to_json(&scalar),
                    Value::Object(_) => Json::Null,
                }),
            ),
        };
        let key = item.key.into_owned();
        if let (Some(json), Some(value)) = (json.as_deref_mut(), value) {
            json.insert(key.clone(), value);
        }
        let ObjId::Id(counter, actor, _) = id else {
            return None;
        };
        fields.insert(
            key,
            Slot {
                id: legacy::OpId(counter, actor),
                map,
            },
        );
    }
    if let Some(json) = json {
        json.sort_keys();
    }
    Some(fields)
}

/// The operations of one change as they are built.
struct Builder<'a> {
    actor: &'a ActorId,
    start: u64,
    ops: &'a mut Vec<legacy::Op>,
    touched: &'a mut Touched,
}

impl Builder<'_> {
    fn next_id(&self) -> legacy::OpId {
        legacy::OpId(self.start + self.ops.len() as u64, self.actor.clone())
    }

    /// The operations `document::apply_merge_patch` makes for `patch` on the map `obj`, whose
    /// fields are `fields` and read as `current`, in the same order.
    fn merge(
        &mut self,
        fields: &mut Fields,
        obj: &legacy::ObjectId,
        patch: &Map<String, Json>,
        current: &Map<String, Json>,
        prefix: &str,
        depth: usize,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        for (key, value) in patch {
            let known = current.get(key.as_str());
            match value {
                Json::Null => {
                    if known.is_some() != fields.contains_key(key.as_str()) {
                        return None;
                    }
                    if known.is_some() {
                        let slot = fields.remove(key.as_str())?;
                        self.push(obj, key, legacy::OpType::Delete, Some(slot.id));
                        self.touched.add(prefix, key);
                    }
                }
                Json::Object(child_patch) => {
                    // Only into a map that exists: making one takes a shared map (`nested`).
                    let child_current = known?.as_object()?;
                    let slot = fields.get_mut(key.as_str())?;
                    let child_fields = slot.map.as_mut()?;
                    let child = legacy::ObjectId::Id(slot.id.clone());
                    let path = document::join(prefix, key);
                    self.merge(
                        child_fields,
                        &child,
                        child_patch,
                        child_current,
                        &path,
                        depth + 1,
                    )?;
                }
                Json::Array(_) => return None,
                scalar => {
                    let pred = fields.get(key.as_str()).map(|slot| slot.id.clone());
                    if known.is_some() != pred.is_some() {
                        return None;
                    }
                    if known == Some(scalar) {
                        continue;
                    }
                    let id = self.next_id();
                    self.push(
                        obj,
                        key,
                        legacy::OpType::Put(document::json_to_scalar(scalar)),
                        pred,
                    );
                    fields.insert(key.clone(), Slot { id, map: None });
                    self.touched.add_value(prefix, key, scalar);
                }
            }
        }
        Some(())
    }

    fn push(
        &mut self,
        obj: &legacy::ObjectId,
        key: &str,
        action: legacy::OpType,
        pred: Option<legacy::OpId>,
    ) {
        self.ops.push(legacy::Op {
            action,
            obj: obj.clone(),
            key: legacy::Key::Map(key.into()),
            pred: pred.into_iter().collect(),
            insert: false,
        });
    }
}

#[cfg(test)]
mod tests;
