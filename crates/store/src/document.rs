//! Translation between JSON and an entity's Automerge document.
//!
//! An entity's fields live in the document's root map; nested JSON objects are nested maps and
//! arrays are lists, written whole (as RFC 7386 treats them). Strings are stored as scalar strings,
//! not collaborative text, because a field value is replaced whole, never spliced.
//! The root map is the one object every replica of a document shares from the start, so two
//! replicas that create the same entity concurrently never hide each other's top-level fields.
//! Nested maps are created as shared maps (see `nested`), so a nested object created on both
//! sides at once merges field by field too. Lists are replaced whole: two lists written
//! concurrently at one field conflict, and [`conflicts`] lists them like any other conflict.
//!
//! The JSON rules, which `tests/store/model.rs` checks against plain RFC 7386:
//! - a merge patch is applied as RFC 7386 says: `null` deletes, objects merge, anything else
//!   (arrays included, with every element verbatim, `null` too) replaces the field;
//! - an empty object `{}` is a value like any other and is kept, at any depth except the root:
//!   an entity whose root has no fields reads as absent, and a write that would create an entity
//!   with no fields changes nothing;
//! - a replace is the merge patch of its fields onto an empty object, so `null` fields are dropped;
//! - numbers keep their flavour: integers that fit `i64` read back as `i64`, larger ones as `u64`,
//!   and floats as floats (`1.0` stays `1.0`), except that `-0.0` is stored as `0.0`;
//! - field names are not empty and values nest at most [`MAX_DEPTH`] levels.
//!
//! Which document to edit and how it is persisted is `store`'s business, not this module's.

use std::collections::{BTreeSet, HashMap};

use automerge::legacy;
use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{
    hydrate, ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, Patch, PatchAction, Prop,
    ReadDoc, ScalarValue, Value, ValueRef, ROOT,
};
use serde::Serialize;
use serde_json::{Map, Number, Value as Json};

use crate::error::{Error, Result};
use crate::nested;

/// Deeper JSON than this is refused: it bounds recursion on hostile input.
pub const MAX_DEPTH: usize = 32;

/// Whether `doc` holds the change `hash`. Cheaper than `get_change_by_hash`, which builds the
/// change; the store's documents hold no queued changes (see `Store::vet_incoming`), so a hash
/// that is not missing is applied.
pub(crate) fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    doc.get_missing_deps(&[*hash]).is_empty()
}

/// The most values (fields and list items, `null`s included) one write may hold.
///
/// Automerge 0.12 edits an existing document one operation at a time, each costing time that
/// grows with the document, so a write of tens of thousands of changed or deleted fields takes
/// seconds, on the one writer thread every write waits for. The bound keeps any write's stall
/// to about a tenth of a second on a small machine.
pub const MAX_VALUES_PER_WRITE: usize = 4096;

/// The most nested objects one write may hold. Each new one is made by a change of its own (see
/// `nested`), applied to the whole document, which makes their cost grow with the square of
/// their number: 8,000 took 8 seconds.
pub const MAX_OBJECTS_PER_WRITE: usize = 256;

/// Checks that a value is something the store can hold: objects and arrays nested at most
/// [`MAX_DEPTH`] deep, no key that is empty, and at most [`MAX_VALUES_PER_WRITE`] values and
/// [`MAX_OBJECTS_PER_WRITE`] nested objects.
pub(crate) fn check_writable(value: &Json) -> Result<()> {
    let mut counts = (0, 0);
    check_value(value, 0, &mut counts)
}

/// [`check_writable`] of a value `depth` levels down, adding its values and nested objects to
/// `counts`.
fn check_value(value: &Json, depth: usize, counts: &mut (usize, usize)) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::UnwritableValue(format!(
            "fields are nested more than {MAX_DEPTH} levels deep"
        )));
    }
    match value {
        Json::Object(map) => {
            if depth > 0 {
                counts.1 += 1;
                if counts.1 > MAX_OBJECTS_PER_WRITE {
                    return Err(Error::UnwritableValue(format!(
                        "a write may hold at most {MAX_OBJECTS_PER_WRITE} nested objects; \
                         split it into several writes"
                    )));
                }
            }
            for (key, child) in map {
                if key.is_empty() {
                    return Err(Error::UnwritableValue("a field name is empty".into()));
                }
                if key == WRITE_MARKER {
                    return Err(Error::UnwritableValue(format!(
                        "the field name {WRITE_MARKER:?} is reserved"
                    )));
                }
                check_value(child, depth + 1, counts)?;
            }
        }
        Json::Array(items) => {
            count_value(counts)?;
            for item in items {
                check_value(item, depth + 1, counts)?;
            }
        }
        _ => count_value(counts)?,
    }
    Ok(())
}

fn count_value(counts: &mut (usize, usize)) -> Result<()> {
    counts.0 += 1;
    if counts.0 > MAX_VALUES_PER_WRITE {
        return Err(Error::UnwritableValue(format!(
            "a write may hold at most {MAX_VALUES_PER_WRITE} values (fields and list items, \
             nulls included); split it into several writes"
        )));
    }
    Ok(())
}

/// Who made a write and when: written into every change the write makes.
pub(crate) struct Stamp {
    /// The change message: the write's origin.
    pub(crate) message: String,
    /// Seconds since the Unix epoch.
    pub(crate) time: i64,
}

impl Stamp {
    fn commit_options(&self) -> CommitOptions {
        CommitOptions::default()
            .with_message(self.message.clone())
            .with_time(self.time)
    }
}

/// Applies an RFC 7386 merge patch to the entity's fields.
///
/// `null` deletes a field, an object merges into an existing map (or replaces a non-map), and
/// anything else replaces the field. Fields whose value would not change are not touched, so a
/// patch that changes nothing produces no change. On error the document may hold part of the
/// write and must be dropped.
///
/// `current` is the entity's JSON before the write, when it is known: a field whose patch value
/// differs from it is written without reading the document first, and when it is settled, a
/// field whose patch value equals it is left alone without reading the document either.
fn merge_patch(
    doc: &mut Automerge,
    patch: &Map<String, Json>,
    stamp: &Stamp,
    current: Option<Current<'_>>,
) -> Result<Touched> {
    let mut touched = Touched::default();
    create_maps(doc, &ROOT, patch, stamp, "", &mut touched)?;
    if let Some(root) = new_root(doc, patch) {
        transact(doc, stamp, |tx| Ok(tx.init_root_from_hydrate(&root)?))?;
        return Ok(Touched::unknown());
    }
    let settled = current.is_some_and(|current| current.settled);
    let current = current.map(|current| current.fields);
    transact(doc, stamp, |tx| {
        apply_merge_patch(tx, &ROOT, patch, current, settled, "", &mut touched)?;
        mark_write(tx, &touched)
    })?;
    Ok(touched)
}

/// The fields a local edit wrote, as [`changed_fields`] reports them from a diff of the edit;
/// knowing them saves the diff. Unknown when the edit settled a conflict by writing the winning
/// value again (whether a diff shows that depends on Automerge's internals), or wrote a new
/// document in one batch (whose fields are all of its fields anyway).
#[derive(Debug, Default)]
pub(crate) struct Touched {
    paths: BTreeSet<String>,
    unknown: bool,
    /// The first shared map the write made, if any (see [`mark_write`]).
    made: Option<ObjId>,
}

impl Touched {
    fn unknown() -> Self {
        Self {
            unknown: true,
            ..Self::default()
        }
    }

    pub(crate) fn add(&mut self, prefix: &str, key: &str) -> String {
        let path = join(prefix, key);
        self.paths.insert(path.clone());
        path
    }

    /// Adds `key` and, when `value` is an object written whole, every field in it.
    pub(crate) fn add_value(&mut self, prefix: &str, key: &str, value: &Json) {
        let path = self.add(prefix, key);
        if let Json::Object(fields) = value {
            for (child, child_value) in fields {
                if !child_value.is_null() {
                    self.add_value(&path, child, child_value);
                }
            }
        }
    }

    /// The dotted paths, when known.
    pub(crate) fn fields(self) -> Option<Vec<String>> {
        (!self.unknown).then(|| self.paths.into_iter().collect())
    }
}

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Makes the entity's fields exactly `fields`, nested objects included: a merge patch that also
/// deletes every field it does not name. A `null` field is deleted like a missing one.
/// On error the document may hold part of the write and must be dropped.
fn replace(doc: &mut Automerge, fields: &Map<String, Json>, stamp: &Stamp) -> Result<Touched> {
    let mut touched = Touched::default();
    create_maps(doc, &ROOT, fields, stamp, "", &mut touched)?;
    if let Some(root) = new_root(doc, fields) {
        transact(doc, stamp, |tx| Ok(tx.init_root_from_hydrate(&root)?))?;
        return Ok(Touched::unknown());
    }
    transact(doc, stamp, |tx| {
        replace_fields(tx, &ROOT, fields, "", &mut touched)?;
        mark_write(tx, &touched)
    })?;
    Ok(touched)
}

/// A local edit of an entity's fields: a merge patch or a replace (a delete replaces with no
/// fields). It is applied to the document with [`JsonEdit::apply_to`], and what it makes of the
/// fields as JSON is RFC 7386 applied to them (for a replace, to no fields), which is what the
/// document reads as after the write, because a local write's values win over every value it
/// has seen.
pub(crate) enum JsonEdit<'a> {
    /// A merge patch onto the current fields.
    MergePatch(&'a Map<String, Json>),
    /// Fields replacing all current ones.
    Replace(&'a Map<String, Json>),
}

/// What a local write knows of the entity's fields before it (see [`JsonEdit::apply_to`]).
#[derive(Clone, Copy)]
pub(crate) struct Current<'a> {
    /// The fields as JSON.
    pub(crate) fields: &'a Map<String, Json>,
    /// No field of a map among them holds concurrent values. A local write never makes a
    /// conflict (its values supersede every value the document holds), so this stays true from
    /// a document's creation until a change from elsewhere brings concurrent values; a local
    /// write that settles a conflict does not make it true again (the next read of the whole
    /// document does, see [`fields_settled`]).
    pub(crate) settled: bool,
}

impl JsonEdit<'_> {
    /// Applies the edit to the document (see [`merge_patch`] and [`replace`]); `current` is the
    /// entity's JSON before it, when known.
    pub(crate) fn apply_to(
        &self,
        doc: &mut Automerge,
        stamp: &Stamp,
        current: Option<Current<'_>>,
    ) -> Result<Touched> {
        match self {
            JsonEdit::MergePatch(patch) => merge_patch(doc, patch, stamp, current),
            JsonEdit::Replace(fields) => replace(doc, fields, stamp),
        }
    }

    /// Whether the result depends on the current fields.
    pub(crate) fn needs_current(&self) -> bool {
        matches!(self, JsonEdit::MergePatch(_))
    }

    /// The fields after the edit; `current` is ignored by a replace.
    pub(crate) fn apply(&self, current: Map<String, Json>) -> Map<String, Json> {
        match self {
            JsonEdit::MergePatch(patch) => {
                let mut fields = current;
                merge_json(&mut fields, patch);
                fields
            }
            JsonEdit::Replace(fields) => {
                let mut replaced = Map::new();
                merge_json(&mut replaced, fields);
                replaced
            }
        }
    }
}

/// RFC 7386 on plain JSON: `null` removes, an object merges into an object (or replaces
/// anything else, with its own `null`s dropped), any other value replaces.
///
/// Keys end up sorted at every level, as a document reads them (see [`fields`]).
fn merge_json(target: &mut Map<String, Json>, patch: &Map<String, Json>) {
    for (key, value) in patch {
        match value {
            Json::Null => {
                target.shift_remove(key);
            }
            Json::Object(child_patch) => {
                let child = target
                    .entry(key.clone())
                    .and_modify(|current| {
                        if !current.is_object() {
                            *current = Json::Object(Map::new());
                        }
                    })
                    .or_insert_with(|| Json::Object(Map::new()));
                if let Json::Object(child) = child {
                    merge_json(child, child_patch);
                }
            }
            // A value equal to the current one (as JSON compares them, `-0.0` and `0.0` alike)
            // is not written, so the current one stays.
            value if target.get(key) == Some(value) => {}
            value => {
                let mut value = value.clone();
                canonical(&mut value);
                target.insert(key.clone(), value);
            }
        }
    }
    target.sort_keys();
}

/// A written value as the document reads it back: map keys sorted, and `-0.0` as `0.0`
/// (Automerge compares floats as numbers, so it would not tell a `0.0` written over `-0.0`
/// from no change at all; see [`json_to_scalar`]).
fn canonical(value: &mut Json) {
    match value {
        Json::Object(fields) => {
            fields.sort_keys();
            fields.values_mut().for_each(canonical);
        }
        Json::Array(items) => items.iter_mut().for_each(canonical),
        Json::Number(number) if number.as_f64() == Some(0.0) && number.is_f64() => {
            *number = Number::from_f64(0.0).expect("0.0 is finite");
        }
        _ => {}
    }
}

/// The fields of a write that creates a document from nothing, as one value that Automerge
/// writes in a single batch: a put per field costs a splice of its columnar op set each, which
/// made creating a ten-field entity several times dearer than it needs to be.
///
/// `None` unless the document has no changes at all and no field is an object (objects go
/// into shared maps, which `create_maps` has made by then, so the document would not be empty)
/// and at least one field is not `null`. The result equals what the field-by-field edit writes:
/// `null` fields are left out, and lists hold their items verbatim.
fn new_root(doc: &Automerge, fields: &Map<String, Json>) -> Option<hydrate::Map> {
    if !doc.is_empty() || fields.values().any(Json::is_object) {
        return None;
    }
    let root: HashMap<String, hydrate::Value> = fields
        .iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| (key.clone(), to_hydrate(value)))
        .collect();
    (!root.is_empty()).then(|| root.into())
}

/// A JSON value (with `null` kept, as inside a list) as Automerge's plain value tree.
fn to_hydrate(value: &Json) -> hydrate::Value {
    match value {
        Json::Object(fields) => hydrate::Value::Map(
            fields
                .iter()
                .map(|(key, value)| (key.clone(), to_hydrate(value)))
                .collect::<HashMap<String, hydrate::Value>>()
                .into(),
        ),
        Json::Array(items) => {
            hydrate::Value::List(items.iter().map(to_hydrate).collect::<Vec<_>>().into())
        }
        scalar => hydrate::Value::Scalar(json_to_scalar(scalar)),
    }
}

fn transact(
    doc: &mut Automerge,
    stamp: &Stamp,
    edit: impl FnOnce(&mut Transaction<'_>) -> Result<()>,
) -> Result<()> {
    doc.transact_with(|_| stamp.commit_options(), edit)
        .map(|_| ())
        .map_err(|failure| failure.error)
}

/// The key of [`mark_write`]'s operations; a write of JSON fields may not use it (see
/// `check_writable`), and history leaves it out.
pub(crate) const WRITE_MARKER: &str = "\u{0}lockstep:write";

/// Gives a write an operation of its own when all it did was make empty maps (`{"notes": {}}`):
/// a map is made by a structural change of its own (see `nested`), which history leaves out, so
/// without this the write would have no change stamped with its origin and time, and history
/// would show its fields under the next write. The put and delete of [`WRITE_MARKER`] in the
/// first map it made leave that map empty. (A write that first deleted a value in a map's place
/// has a change of its own for that, but the maps come after it and belong to the edit.)
fn mark_write<T: Transactable>(tx: &mut T, touched: &Touched) -> Result<()> {
    if tx.pending_ops() > 0 {
        return Ok(());
    }
    if let Some(map) = &touched.made {
        tx.put(map, WRITE_MARKER, ScalarValue::Null)?;
        tx.delete(map, WRITE_MARKER)?;
    }
    Ok(())
}

fn is_map(value: &Value<'_>) -> bool {
    matches!(value, Value::Object(ObjType::Map | ObjType::Table))
}

/// Makes sure that every object in `fields` has a map to go into, creating missing ones as
/// shared maps (see `nested`), so that the edit that follows only ever writes into maps.
///
/// Whatever holds the place of a missing map (a scalar, a list) is deleted first, in a change
/// stamped like the write, because a shared map overwrites nothing.
pub(crate) fn create_maps(
    doc: &mut Automerge,
    obj: &ObjId,
    fields: &Map<String, Json>,
    stamp: &Stamp,
    prefix: &str,
    touched: &mut Touched,
) -> Result<()> {
    let mut missing = Vec::new();
    for (key, value) in fields {
        if value.is_object() {
            match doc.get(obj, key.as_str())? {
                Some((current, _)) if is_map(&current) => {}
                current => missing.push((key.as_str(), current.is_some())),
            }
        }
    }
    if missing.iter().any(|(_, occupied)| *occupied) {
        transact(doc, stamp, |tx| {
            for (key, occupied) in &missing {
                if *occupied {
                    tx.delete(obj, *key)?;
                }
            }
            Ok(())
        })?;
    }
    for (key, occupied) in &missing {
        // `None` leaves the place empty; the edit then creates an ordinary map there.
        let made = nested::create_shared_map(doc, obj, key)?;
        if made.is_some() || *occupied {
            touched.add(prefix, key);
        }
        if touched.made.is_none() {
            touched.made = made;
        }
    }
    for (key, value) in fields {
        if let Json::Object(child_fields) = value {
            if let Some((current, child)) = doc.get(obj, key.as_str())? {
                if is_map(&current) {
                    let path = join(prefix, key);
                    create_maps(doc, &child, child_fields, stamp, &path, touched)?;
                }
            }
        }
    }
    Ok(())
}

/// Whether writing `value` at `key` changes anything: the value differs, or the field holds
/// concurrent values, so that writing the current winner again settles the conflict.
fn needs_write<T: Transactable>(
    tx: &T,
    obj: &ObjId,
    key: &str,
    value: &Json,
    touched: &mut Touched,
) -> Result<bool> {
    // One lookup: a single current value is compared, none or several always need the write.
    Ok(match tx.get_all(obj, key)?.as_slice() {
        [(Value::Scalar(scalar), _)] => scalar_to_json(scalar) != *value,
        [(Value::Object(_), id)] => object_to_json(tx, id, None) != *value,
        [] => true,
        _ => {
            touched.unknown = true;
            true
        }
    })
}

/// `current` is `obj` as JSON before the write, when known, and `settled` says whether it is
/// settled (see [`merge_patch`] and [`Current`]).
fn apply_merge_patch<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    patch: &Map<String, Json>,
    current: Option<&Map<String, Json>>,
    settled: bool,
    prefix: &str,
    touched: &mut Touched,
) -> Result<()> {
    for (key, patch_value) in patch {
        // The field's current value: `Some(None)` when it is known to be absent.
        let known = current.map(|current| current.get(key.as_str()));
        match patch_value {
            Json::Null => {
                let absent = settled && known == Some(None);
                if !absent && tx.get(obj, key.as_str())?.is_some() {
                    tx.delete(obj, key.as_str())?;
                    touched.add(prefix, key);
                }
            }
            Json::Object(child_patch) => {
                let child = match tx.get(obj, key.as_str())? {
                    Some((current, child)) if is_map(&current) => child,
                    // Only when no shared map could be made (see `create_maps`).
                    _ => {
                        touched.add(prefix, key);
                        tx.put_object(obj, key.as_str(), ObjType::Map)?
                    }
                };
                let child_current = current
                    .and_then(|current| current.get(key))
                    .and_then(Json::as_object);
                apply_merge_patch(
                    tx,
                    &child,
                    child_patch,
                    child_current,
                    settled,
                    &join(prefix, key),
                    touched,
                )?;
            }
            value => {
                // A value that differs from the one the field reads as is written whatever the
                // document holds, and an equal one of a settled field is not; otherwise the
                // document is asked (a conflict is settled by writing the winner again).
                let write = match known {
                    Some(known) if known != Some(value) => true,
                    Some(_) if settled => false,
                    _ => needs_write(tx, obj, key, value, touched)?,
                };
                if write {
                    put_json(tx, obj, Prop::Map(key.clone()), value, Nulls::Omit)?;
                    touched.add_value(prefix, key, value);
                }
            }
        }
    }
    Ok(())
}

fn replace_fields<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    fields: &Map<String, Json>,
    prefix: &str,
    touched: &mut Touched,
) -> Result<()> {
    // A field that is missing or `null` is removed: `null` never reads back as a value.
    let existing: Vec<String> = tx.keys(obj).collect();
    for key in existing {
        if fields.get(&key).is_none_or(Json::is_null) {
            tx.delete(obj, key.as_str())?;
            touched.add(prefix, &key);
        }
    }
    for (key, value) in fields {
        match value {
            Json::Null => {}
            // Nested objects are replaced field by field, so a concurrent edit of a field this
            // write does not touch survives the merge.
            Json::Object(child_fields) => match tx.get(obj, key.as_str())? {
                Some((current, child)) if is_map(&current) => {
                    replace_fields(tx, &child, child_fields, &join(prefix, key), touched)?;
                }
                _ => {
                    put_json(tx, obj, Prop::Map(key.clone()), value, Nulls::Omit)?;
                    touched.add_value(prefix, key, value);
                }
            },
            value => {
                if needs_write(tx, obj, key, value, touched)? {
                    put_json(tx, obj, Prop::Map(key.clone()), value, Nulls::Omit)?;
                    touched.add_value(prefix, key, value);
                }
            }
        }
    }
    Ok(())
}

/// What `null` inside a written object means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nulls {
    /// "No such field", as in a merge patch or the fields of a replace.
    Omit,
    /// A value, as anywhere inside an array, which RFC 7386 writes verbatim.
    Keep,
}

/// Writes a JSON value (as a fresh object when it is one) at `prop` of `obj`.
fn put_json<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    value: &Json,
    nulls: Nulls,
) -> Result<()> {
    match value {
        Json::Object(fields) => {
            let child = tx.put_object(obj, prop, ObjType::Map)?;
            for (key, child_value) in fields {
                if !(child_value.is_null() && nulls == Nulls::Omit) {
                    put_json(tx, &child, Prop::Map(key.clone()), child_value, nulls)?;
                }
            }
        }
        Json::Array(items) => {
            let child = tx.put_object(obj, prop, ObjType::List)?;
            for (index, item) in items.iter().enumerate() {
                insert_json(tx, &child, index, item)?;
            }
        }
        scalar => {
            tx.put(obj, prop, json_to_scalar(scalar))?;
        }
    }
    Ok(())
}

/// Inserts a JSON value into a list, verbatim.
fn insert_json<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    index: usize,
    value: &Json,
) -> Result<()> {
    match value {
        Json::Object(fields) => {
            let child = tx.insert_object(list, index, ObjType::Map)?;
            for (key, child_value) in fields {
                put_json(tx, &child, Prop::Map(key.clone()), child_value, Nulls::Keep)?;
            }
        }
        Json::Array(items) => {
            let child = tx.insert_object(list, index, ObjType::List)?;
            for (child_index, item) in items.iter().enumerate() {
                insert_json(tx, &child, child_index, item)?;
            }
        }
        scalar => {
            tx.insert(list, index, json_to_scalar(scalar))?;
        }
    }
    Ok(())
}

pub(crate) fn json_to_scalar(value: &Json) -> ScalarValue {
    match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(flag) => ScalarValue::Boolean(*flag),
        Json::Number(number) => {
            if let Some(int) = number.as_i64() {
                ScalarValue::Int(int)
            } else if let Some(uint) = number.as_u64() {
                ScalarValue::Uint(uint)
            } else {
                // serde_json numbers without arbitrary precision are always one of the three.
                // `-0.0` is stored as `0.0` (see `canonical`): `+ 0.0` turns it into `0.0`.
                ScalarValue::F64(number.as_f64().unwrap_or(0.0) + 0.0)
            }
        }
        Json::String(text) => ScalarValue::Str(text.as_str().into()),
        Json::Array(_) | Json::Object(_) => {
            unreachable!("put_json and insert_json handle objects and arrays")
        }
    }
}

/// A scalar as JSON. Types JSON lacks are shown in their nearest JSON form.
pub(crate) fn scalar_to_json(scalar: &ScalarValue) -> Json {
    match scalar {
        ScalarValue::Null => Json::Null,
        ScalarValue::Boolean(flag) => Json::Bool(*flag),
        ScalarValue::Int(int) => Json::from(*int),
        ScalarValue::Uint(uint) => Json::from(*uint),
        ScalarValue::F64(float) => Number::from_f64(*float)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        ScalarValue::Counter(counter) => Json::from(i64::from(counter)),
        ScalarValue::Timestamp(millis) => Json::from(*millis),
        ScalarValue::Str(text) => Json::String(text.to_string()),
        ScalarValue::Bytes(bytes) => Json::String(hex::encode(bytes)),
        ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// Objects deeper than this read as `null`. Local writes stop at [`MAX_DEPTH`] and `Store::merge`
/// refuses documents nested deeper, so only an old version merged from elsewhere can reach it;
/// the bound keeps reading such a document from overflowing the stack.
const READ_DEPTH: usize = 2 * MAX_DEPTH;

/// An object of the document (at `heads`, or now) as JSON. Map keys come out sorted.
pub(crate) fn object_to_json<R: ReadDoc + ?Sized>(
    doc: &R,
    obj: &ObjId,
    heads: Option<&[ChangeHash]>,
) -> Json {
    object_json(doc, obj, heads, 0, &mut false)
}

/// [`object_to_json`] that also sets `conflicted` when a field of a map it reads holds
/// concurrent values.
fn object_json<R: ReadDoc + ?Sized>(
    doc: &R,
    obj: &ObjId,
    heads: Option<&[ChangeHash]>,
    depth: usize,
    conflicted: &mut bool,
) -> Json {
    if depth > READ_DEPTH {
        return Json::Null;
    }
    let mut value_json = |value: Option<(Value<'_>, ObjId)>| match value {
        Some((Value::Scalar(scalar), _)) => scalar_to_json(&scalar),
        Some((Value::Object(_), child)) => object_json(doc, &child, heads, depth + 1, conflicted),
        None => Json::Null,
    };
    match doc.object_type(obj) {
        Ok(ObjType::Map | ObjType::Table) => {
            // One pass over the map's keys and values (a lookup per key cost as much again).
            let items: Vec<_> = match heads {
                Some(heads) => doc.map_range_at(obj, .., heads).collect(),
                None => doc.map_range(obj, ..).collect(),
            };
            let mut fields: Vec<(String, Json)> = items
                .into_iter()
                .map(|item| {
                    *conflicted |= item.conflict;
                    let value = match item.value {
                        ValueRef::Object(_) => {
                            object_json(doc, &item.id(), heads, depth + 1, conflicted)
                        }
                        scalar => match scalar.into_value() {
                            Value::Scalar(scalar) => scalar_to_json(&scalar),
                            Value::Object(_) => Json::Null,
                        },
                    };
                    (item.key.into_owned(), value)
                })
                .collect();
            fields.sort_by(|left, right| left.0.cmp(&right.0));
            Json::Object(fields.into_iter().collect())
        }
        Ok(ObjType::List) => {
            let length = match heads {
                Some(heads) => doc.length_at(obj, heads),
                None => doc.length(obj),
            };
            Json::Array(
                (0..length)
                    .map(|index| {
                        let value = match heads {
                            Some(heads) => doc.get_at(obj, index, heads),
                            None => doc.get(obj, index),
                        };
                        value_json(value.ok().flatten())
                    })
                    .collect(),
            )
        }
        Ok(ObjType::Text) => {
            let text = match heads {
                Some(heads) => doc.text_at(obj, heads),
                None => doc.text(obj),
            };
            text.map(Json::String).unwrap_or(Json::Null)
        }
        Err(_) => Json::Null,
    }
}

/// Whether `doc` may nest objects more than `limit` levels below the root. Each level of
/// nesting is an operation that makes an object, so a document with at most `limit` operations
/// in all cannot; most records are that small, and decoding their changes to look
/// ([`creates_deeper_than`]) costs more than merging them.
pub(crate) fn may_nest_deeper_than(doc: &Automerge, limit: usize) -> bool {
    doc.stats().num_ops > limit as u64
}

/// Whether `changes`, which `doc` gained since some earlier version, create an object nested more
/// than `limit` levels below the root, at the moment they create it.
///
/// Objects never move, so this bounds the depth of every version of the document, not just the
/// current one: a merge's feed row diffs the document before and after it, and `?at=` reads an
/// earlier version, whose cost grows with the square of the depth. The store never writes deeper
/// than [`MAX_DEPTH`], so objects that were already there are trusted to be within the limit.
pub(crate) fn creates_deeper_than(doc: &Automerge, changes: &[Change], limit: usize) -> bool {
    let mut depths: HashMap<legacy::OpId, usize> = HashMap::new();
    for change in changes {
        let expanded = change.decode();
        for (id, op, _) in made_objects(&expanded) {
            let parent_depth = match &op.obj {
                legacy::ObjectId::Root => 0,
                legacy::ObjectId::Id(parent) => *depths
                    .entry(parent.clone())
                    .or_insert_with(|| existing_depth(doc, parent)),
            };
            if parent_depth + 1 > limit {
                return true;
            }
            depths.insert(id, parent_depth + 1);
        }
    }
    false
}

/// The objects a decoded change makes: each make operation with the id the object goes by.
fn made_objects(
    change: &legacy::Change,
) -> impl Iterator<Item = (legacy::OpId, &legacy::Op, ObjType)> + '_ {
    change
        .operations
        .iter()
        .enumerate()
        .filter_map(move |(index, op)| match op.action {
            legacy::OpType::Make(kind) => Some((
                legacy::OpId(
                    change.start_op.get() + index as u64,
                    change.actor_id.clone(),
                ),
                op,
                kind,
            )),
            _ => None,
        })
}

/// How deep an object from an earlier change is: the length of its path when it was created.
/// An object deleted in the change that created it has no path; it counts as a field of the root.
fn existing_depth(doc: &Automerge, object: &legacy::OpId) -> usize {
    // The index is only a hint; Automerge looks the actor up when it does not match.
    let id = ObjId::Id(object.counter(), object.actor().clone(), 0);
    doc.hash_for_opid(&id)
        .and_then(|created| doc.parents_at(&id, &[created]).ok())
        .map(|parents| parents.count())
        .unwrap_or(1)
}

/// Whether the entity has any field now: the cheap form of `!fields(doc, None).is_empty()`,
/// which would turn the whole document into JSON.
pub(crate) fn has_fields(doc: &Automerge) -> bool {
    doc.length(ROOT) > 0
}

/// The entity's fields (at `heads`, or now).
pub(crate) fn fields(doc: &Automerge, heads: Option<&[ChangeHash]>) -> Map<String, Json> {
    fields_settled(doc, heads).0
}

/// The entity's fields (at `heads`, or now), and whether they are settled: no field of a map
/// among them holds concurrent values (see [`Current`]).
pub(crate) fn fields_settled(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
) -> (Map<String, Json>, bool) {
    let mut conflicted = false;
    match object_json(doc, &ROOT, heads, 0, &mut conflicted) {
        Json::Object(fields) => (fields, !conflicted),
        _ => (Map::new(), !conflicted),
    }
}

/// The dotted paths of the fields a set of patches touched, e.g. `date` or `site.code`.
///
/// Paths stop at the first list: an edit inside `tags[2]` is reported as `tags`.
pub(crate) fn changed_fields(patches: &[Patch]) -> Vec<String> {
    let mut fields = BTreeSet::new();
    for patch in patches {
        let mut path = Vec::new();
        let mut in_list = false;
        for (_, prop) in &patch.path {
            match prop {
                Prop::Map(key) if !in_list => path.push(key.clone()),
                _ => in_list = true,
            }
        }
        if !in_list {
            match &patch.action {
                PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => {
                    path.push(key.clone())
                }
                PatchAction::Increment {
                    prop: Prop::Map(key),
                    ..
                } => path.push(key.clone()),
                _ => {}
            }
        }
        if !path.is_empty() {
            fields.insert(path.join("."));
        }
    }
    fields.into_iter().collect()
}

/// The dotted paths each change of a document set or removed, as history shows them: one list
/// per change of `changes`, which must be every change of the document (as `get_changes(&[])`
/// gives them), so the change that made each object is among them.
///
/// Read from the changes' own operations: a value put in or removed from `site`'s map is
/// `site.code`, a map a change makes is its own path, and paths stop at the first list (an edit
/// inside `tags[2]` is `tags`), as [`changed_fields`] reports a diff. Diffing each change against
/// its dependencies instead costs time that grows with the document, for every change: history
/// of an entity with thousands of changes took seconds. A structural change (see `nested`) has
/// no entry of its own; the map it made counts as a field of the edit it was made for: an edit
/// that depends on it, unless the edit has seen another edit that needed the same map, as a diff
/// of the edit against its dependencies (structural ones replaced by theirs) would show.
pub(crate) fn fields_of_changes(changes: &[Change]) -> Vec<Vec<String>> {
    let expanded: Vec<legacy::Change> = changes.iter().map(Change::decode).collect();
    let mut places = Places::default();
    for change in &expanded {
        for (id, op, kind) in made_objects(change) {
            let key = match &op.key {
                legacy::Key::Map(key) => Some(key.to_string()),
                legacy::Key::Seq(_) => None,
            };
            let sequence = matches!(kind, ObjType::List | ObjType::Text);
            places.made.insert(id, (op.obj.clone(), key, sequence));
        }
    }
    let own: Vec<BTreeSet<String>> = expanded
        .iter()
        .map(|change| {
            change
                .operations
                .iter()
                .filter_map(|op| places.op_path(op))
                .collect()
        })
        .collect();
    let graph = ChangeGraph::of(changes);
    let mut fields: Vec<Vec<String>> = vec![Vec::new(); changes.len()];
    // For each structural change, the edits it was made for so far: those that needed it and
    // had not seen another edit that did. Edits are visited after everything they depend on.
    let mut made_for: HashMap<usize, Vec<usize>> = HashMap::new();
    for &edit in &graph.order {
        if graph.structural[edit] {
            continue;
        }
        let mut paths = own[edit].clone();
        // The structural changes the edit needed: reached from its dependencies through
        // structural changes only.
        let mut pending = graph.deps[edit].clone();
        let mut seen = BTreeSet::new();
        while let Some(dep) = pending.pop() {
            if !graph.structural[dep] || !seen.insert(dep) {
                continue;
            }
            pending.extend(graph.deps[dep].iter().copied());
            let earlier = made_for.entry(dep).or_default();
            if !earlier.iter().any(|&other| graph.precedes(other, edit)) {
                paths.extend(own[dep].iter().cloned());
                earlier.push(edit);
            }
        }
        fields[edit] = paths.into_iter().collect();
    }
    fields
}

/// The dependencies between a document's changes, by position in the list, with a causal order
/// of them and, for each change, which edits (non-structural changes) it has seen.
struct ChangeGraph {
    deps: Vec<Vec<usize>>,
    structural: Vec<bool>,
    /// Every change after its dependencies.
    order: Vec<usize>,
    /// Per change, per actor of an edit (by number), the highest sequence number of that
    /// actor's edits it has seen: a vector clock over the edits' actors, which are the sites
    /// that wrote (structural changes each have an actor of their own and are left out).
    clocks: Vec<Vec<(usize, u64)>>,
    /// Per change: its actor's number among the edits' actors (structural changes: none), and
    /// its sequence number.
    ids: Vec<(Option<usize>, u64)>,
}

impl ChangeGraph {
    fn of(changes: &[Change]) -> Self {
        let index_of: HashMap<ChangeHash, usize> = changes
            .iter()
            .enumerate()
            .map(|(index, change)| (change.hash(), index))
            .collect();
        let deps: Vec<Vec<usize>> = changes
            .iter()
            .map(|change| {
                change
                    .deps()
                    .iter()
                    .filter_map(|hash| index_of.get(hash).copied())
                    .collect()
            })
            .collect();
        let structural: Vec<bool> = changes.iter().map(nested::is_structural).collect();
        // Kahn's algorithm; Automerge lists changes in a causal order already, so this is one
        // pass in practice.
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
        let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
        for (index, deps) in deps.iter().enumerate() {
            for &dep in deps {
                dependents[dep].push(index);
            }
        }
        let mut ready: Vec<usize> = (0..changes.len())
            .rev()
            .filter(|&index| waiting[index] == 0)
            .collect();
        let mut order = Vec::with_capacity(changes.len());
        while let Some(index) = ready.pop() {
            order.push(index);
            for &dependent in dependents[index].iter().rev() {
                waiting[dependent] -= 1;
                if waiting[dependent] == 0 {
                    ready.push(dependent);
                }
            }
        }
        let mut actors: HashMap<&ActorId, usize> = HashMap::new();
        let ids: Vec<(Option<usize>, u64)> = changes
            .iter()
            .zip(&structural)
            .map(|(change, structural)| {
                let actor = (!structural).then(|| {
                    let next = actors.len();
                    *actors.entry(change.actor_id()).or_insert(next)
                });
                (actor, change.seq())
            })
            .collect();
        let mut clocks: Vec<Vec<(usize, u64)>> = vec![Vec::new(); changes.len()];
        for &index in &order {
            let mut clock: Vec<(usize, u64)> = Vec::new();
            let own = ids[index].0.map(|actor| (actor, ids[index].1));
            for entry in deps[index]
                .iter()
                .flat_map(|&dep| clocks[dep].iter().copied())
                .chain(own)
            {
                match clock.binary_search_by_key(&entry.0, |&(actor, _)| actor) {
                    Ok(at) => clock[at].1 = clock[at].1.max(entry.1),
                    Err(at) => clock.insert(at, entry),
                }
            }
            clocks[index] = clock;
        }
        Self {
            deps,
            structural,
            order,
            clocks,
            ids,
        }
    }

    /// Whether edit `earlier` is edit `later` or one of its ancestors.
    fn precedes(&self, earlier: usize, later: usize) -> bool {
        let (Some(actor), seq) = self.ids[earlier] else {
            return false;
        };
        let clock = &self.clocks[later];
        clock
            .binary_search_by_key(&actor, |&(known, _)| known)
            .is_ok_and(|at| clock[at].1 >= seq)
    }
}

/// Where each object of a document was made: its parent, its key there (none for a list item)
/// and whether it is a list or text, so an operation's path can be named.
#[derive(Default)]
struct Places {
    made: HashMap<legacy::OpId, (legacy::ObjectId, Option<String>, bool)>,
}

impl Places {
    /// The dotted path an operation writes, or `None` when it has none (an object this
    /// document never made, or a list item of the root, which JSON cannot hold).
    fn op_path(&self, op: &legacy::Op) -> Option<String> {
        if matches!(&op.key, legacy::Key::Map(key) if key == WRITE_MARKER) {
            return None;
        }
        let (mut path, stopped) = self.object_path(&op.obj)?;
        if !stopped {
            match &op.key {
                legacy::Key::Map(key) => path.push(key.to_string()),
                legacy::Key::Seq(_) => {}
            }
        }
        (!path.is_empty()).then(|| path.join("."))
    }

    /// The keys from the root down to `object`, stopping after the first list or text (the
    /// second part is true when it stopped there).
    fn object_path(&self, object: &legacy::ObjectId) -> Option<(Vec<String>, bool)> {
        // From the object up to the root; bounded by the number of objects, so a hostile
        // change that names an object as its own ancestor cannot loop.
        let mut chain = Vec::new();
        let mut at = object;
        while let legacy::ObjectId::Id(id) = at {
            if chain.len() > self.made.len() {
                return None;
            }
            let place = self.made.get(id)?;
            chain.push(place);
            at = &place.0;
        }
        let mut path = Vec::new();
        for (_, key, sequence) in chain.into_iter().rev() {
            match key {
                Some(key) => path.push(key.clone()),
                None => return Some((path, true)),
            }
            if *sequence {
                return Some((path, true));
            }
        }
        Some((path, false))
    }
}

/// The dotted paths of every field of `fields`, nested maps and their own fields included, as
/// [`changed_fields`] reports a change that creates them all: what a document that had no changes
/// before gained. Much cheaper than diffing the document against nothing.
pub(crate) fn all_fields(fields: &Map<String, Json>) -> Vec<String> {
    fn walk(fields: &Map<String, Json>, prefix: &str, found: &mut BTreeSet<String>) {
        for (key, value) in fields {
            let path = join(prefix, key);
            if let Json::Object(children) = value {
                walk(children, &path, found);
            }
            found.insert(path);
        }
    }
    let mut found = BTreeSet::new();
    walk(fields, "", &mut found);
    found.into_iter().collect()
}

/// [`all_fields`] of the document's fields as they are now, read without turning the values
/// into JSON.
pub(crate) fn field_paths(doc: &Automerge) -> Vec<String> {
    fn walk(
        doc: &Automerge,
        obj: &ObjId,
        prefix: &str,
        depth: usize,
        found: &mut BTreeSet<String>,
    ) {
        for item in doc.map_range(obj, ..) {
            let path = join(prefix, &item.key);
            // Deeper than `object_json` reads, an object is a `null` leaf there too.
            if matches!(item.value, ValueRef::Object(ObjType::Map | ObjType::Table))
                && depth < READ_DEPTH
            {
                walk(doc, &item.id(), &path, depth + 1, found);
            }
            found.insert(path);
        }
    }
    let mut found = BTreeSet::new();
    walk(doc, &ROOT, "", 0, &mut found);
    found.into_iter().collect()
}

/// One field whose value differs between replicas that wrote it concurrently.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldConflict {
    /// The dotted path of the field.
    pub field: String,
    /// The value every replica shows (Automerge's deterministic winner).
    pub winner: Json,
    /// Every concurrent value, the winner included, with the operation that wrote it.
    pub values: Vec<ConflictValue>,
}

/// One of the concurrent values of a conflicted field.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConflictValue {
    /// The value.
    pub value: Json,
    /// The Automerge operation id that wrote it (`counter@actor`).
    pub op: String,
    /// The origin recorded on the change that wrote it, when known.
    pub origin: Option<String>,
}

/// Every conflicted field of the document, walking nested maps.
pub(crate) fn conflicts(doc: &Automerge) -> Vec<FieldConflict> {
    let mut found = Vec::new();
    collect_conflicts(doc, &ROOT, &mut Vec::new(), &mut found);
    found
}

fn collect_conflicts(
    doc: &Automerge,
    obj: &ObjId,
    path: &mut Vec<String>,
    found: &mut Vec<FieldConflict>,
) {
    let keys: Vec<String> = doc.keys(obj).collect();
    for key in keys {
        path.push(key.clone());
        let values = doc.get_all(obj, key.as_str()).unwrap_or_default();
        let as_json = |value: &Value<'_>, id: &ObjId| match value {
            Value::Scalar(scalar) => scalar_to_json(scalar),
            Value::Object(_) => object_to_json(doc, id, None),
        };
        if values.len() > 1 {
            let winner = doc
                .get(obj, key.as_str())
                .ok()
                .flatten()
                .map(|(value, id)| as_json(&value, &id))
                .unwrap_or(Json::Null);
            found.push(FieldConflict {
                field: path.join("."),
                winner,
                values: values
                    .iter()
                    .map(|(value, id)| ConflictValue {
                        value: as_json(value, id),
                        op: id.to_string(),
                        origin: doc
                            .hash_for_opid(id)
                            .and_then(|hash| doc.get_change_by_hash(&hash))
                            .and_then(|change| change.message().map(origin_of_message)),
                    })
                    .collect(),
            });
        } else if let Some((Value::Object(ObjType::Map | ObjType::Table), child)) =
            doc.get(obj, key.as_str()).ok().flatten()
        {
            collect_conflicts(doc, &child, path, found);
        }
        path.pop();
    }
}

/// The origin recorded in a change message; messages written elsewhere are shown as they are.
pub(crate) fn origin_of_message(message: &str) -> String {
    message.to_owned()
}
