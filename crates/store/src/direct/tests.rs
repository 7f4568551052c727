//! The changes built without the transaction are the transaction's, byte for byte.

use automerge::ActorId;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::document::{Current, JsonEdit};

fn stamp(round: i64) -> Stamp {
    Stamp {
        message: format!("local:user{round}"),
        time: 1_700_000_000 + round,
    }
}

/// A value for a patch: scalars of each JSON flavour, `null`, now and then a list or a map.
fn patch_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        3 => (0i64..4).prop_map(Json::from),
        1 => Just(json!(1.5)),
        1 => prop_oneof![Just(json!(0.0)), Just(json!(-0.0))],
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(true)),
        2 => prop_oneof![Just("x"), Just("y"), Just("")].prop_map(Json::from),
        2 => Just(Json::Null),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            1 => prop::collection::vec(inner.clone(), 0..2).prop_map(Json::Array),
            4 => prop::collection::btree_map(prop_oneof![Just("p"), Just("q")], inner, 0..3)
                .prop_map(|fields| {
                    Json::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
        ]
    })
}

fn patch() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::btree_map(
        prop_oneof![Just("a"), Just("b"), Just("site"), Just("d")],
        patch_value(),
        0..4,
    )
    .prop_map(|fields| fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// Applies `patch` the transaction's way, as `Store::stage_write` does for a settled entity.
fn transact(doc: &mut Automerge, patch: &Map<String, Json>, stamp: &Stamp) -> Vec<u8> {
    let before = doc.get_heads();
    let fields = document::fields(doc, None);
    JsonEdit::MergePatch(patch)
        .apply_to(
            doc,
            stamp,
            Some(Current {
                fields: &fields,
                settled: true,
            }),
        )
        .unwrap();
    doc.get_changes(&before)
        .iter()
        .flat_map(|change| change.raw_bytes().to_vec())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var_os("LOCKSTEP_PROPTEST_CASES")
            .and_then(|cases| cases.into_string().ok())
            .map_or(256, |cases| cases.parse().expect("LOCKSTEP_PROPTEST_CASES is a number")),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// For random merge patches on an entity, each change the index builds is byte for byte the
    /// one Automerge's transaction makes for the same patch, the document that takes the built
    /// changes in batches saves to the same bytes as the one the transaction edited, and the
    /// fields each write reports are the transaction's. Patches the index cannot build (a map to
    /// make, a list) go through the transaction, after which the index is read again.
    #[test]
    fn the_change_is_the_one_the_transaction_makes(
        first in patch(),
        patches in prop::collection::vec(patch(), 1..12),
    ) {
        let actor = ActorId::from(vec![9; 16]);
        let mut transacted = Automerge::new().with_actor(actor.clone());
        let mut first = first;
        first.insert("a".into(), json!(0));
        transact(&mut transacted, &first, &stamp(0));
        let mut lazy = transacted.clone();
        let mut index = WriteIndex::of(&lazy).expect("a local document is settled");
        let mut pending = Vec::new();
        for (round, patch) in patches.iter().enumerate() {
            let stamp = stamp(round as i64 + 1);
            let fields = document::fields(&transacted, None);
            let mut trial = index.clone();
            let direct = trial.merge_patch(patch, &fields, &stamp);
            let mut before = transacted.clone();
            let expected = transact(&mut transacted, patch, &stamp);
            match direct {
                Some((change, touched)) => {
                    prop_assert_eq!(change.raw_bytes(), &expected[..]);
                    // The transaction's own report of the fields, from the same patch.
                    let reported = JsonEdit::MergePatch(patch)
                        .apply_to(&mut before, &stamp, Some(Current { fields: &fields, settled: true }))
                        .unwrap()
                        .fields();
                    prop_assert_eq!(touched.fields(), reported);
                    prop_assert_eq!(trial.heads(), &transacted.get_heads()[..]);
                    index = trial;
                    pending.push(change);
                }
                None => {
                    // As the store does: the document takes what is pending, then the
                    // transaction makes the write.
                    lazy.apply_changes_batch(std::mem::take(&mut pending)).unwrap();
                    prop_assert_eq!(transact(&mut lazy, patch, &stamp), expected);
                    index = WriteIndex::of(&lazy).expect("local writes leave it settled");
                }
            }
        }
        lazy.apply_changes_batch(pending).unwrap();
        prop_assert_eq!(lazy.get_heads(), transacted.get_heads());
        prop_assert_eq!(lazy.save(), transacted.save());
        prop_assert_eq!(document::fields(&lazy, None), document::fields(&transacted, None));
    }

    /// A new entity's first write, built after `prepare_new`, is byte for byte what the
    /// transaction's path writes (the maps it made, then its change), whatever order the patch
    /// names its fields in; patches the index cannot build say so.
    #[test]
    fn a_new_entity_is_built_as_the_transaction_makes_it(
        patch in patch(),
        reversed in any::<bool>(),
    ) {
        let patch: Map<String, Json> = if reversed {
            patch.into_iter().rev().collect()
        } else {
            patch
        };
        let actor = ActorId::from(vec![5; 16]);
        let stamp = stamp(0);
        let mut transacted = Automerge::new().with_actor(actor.clone());
        let expected = transact(&mut transacted, &patch, &stamp);
        let mut built = Automerge::new().with_actor(actor);
        let prepared = prepare_new(&mut built, &patch, &stamp).unwrap();
        let mut index = WriteIndex::of(&built).unwrap();
        if let Some((change, _)) = index.merge_patch(&prepared.patch, &prepared.current, &stamp) {
            let mut bytes: Vec<u8> = built
                .get_changes(&[])
                .iter()
                .flat_map(|change| change.raw_bytes().to_vec())
                .collect();
            bytes.extend_from_slice(change.raw_bytes());
            prop_assert_eq!(bytes, expected);
            built.apply_changes_batch([change]).unwrap();
            prop_assert_eq!(built.save(), transacted.save());
        } else {
            // Only a list, or no value at all to write, is left to the transaction.
            prop_assert!(
                expected.is_empty()
                    || patch.values().any(|value| value.is_array()
                        || value.as_object().is_some_and(|fields| fields.values().any(|v| v.is_array() || v.is_object())))
                    || document::fields(&transacted, None).values().all(|v| v.as_object().is_some_and(Map::is_empty)),
                "{:?}", patch
            );
        }
    }
}

/// A document with concurrent values at a field has no index: a write there settles the
/// conflict, which the transaction does.
#[test]
fn a_document_with_concurrent_values_has_no_index() {
    let mut left = Automerge::new().with_actor(ActorId::from(vec![1; 16]));
    transact(
        &mut left,
        &json!({"a": 1}).as_object().unwrap().clone(),
        &stamp(0),
    );
    let mut right = left.fork().with_actor(ActorId::from(vec![2; 16]));
    transact(
        &mut left,
        &json!({"a": 2}).as_object().unwrap().clone(),
        &stamp(1),
    );
    transact(
        &mut right,
        &json!({"a": 3}).as_object().unwrap().clone(),
        &stamp(1),
    );
    assert!(WriteIndex::of(&left).is_some());
    left.merge(&mut right).unwrap();
    assert!(WriteIndex::of(&left).is_none());
}

/// A write that changes nothing builds no change, and patches the index cannot build say so.
#[test]
fn patches_that_need_the_transaction_build_nothing() {
    let mut doc = Automerge::new().with_actor(ActorId::from(vec![1; 16]));
    transact(
        &mut doc,
        &json!({"a": 1, "site": {"code": "x"}})
            .as_object()
            .unwrap()
            .clone(),
        &stamp(0),
    );
    let fields = document::fields(&doc, None);
    let index = WriteIndex::of(&doc).unwrap();
    for patch in [
        json!({"a": 1}),
        json!({"gone": null}),
        json!({"list": [1]}),
        json!({"new": {"x": 1}}),
        json!({"a": {"x": 1}}),
        json!({"site": {"more": {"x": 1}}}),
    ] {
        let mut trial = index.clone();
        assert!(
            trial
                .merge_patch(patch.as_object().unwrap(), &fields, &stamp(1))
                .is_none(),
            "{patch}"
        );
    }
    let mut trial = index.clone();
    let (_, touched) = trial
        .merge_patch(
            json!({"site": {"code": "y"}, "a": null})
                .as_object()
                .unwrap(),
            &fields,
            &stamp(1),
        )
        .unwrap();
    assert_eq!(
        touched.fields(),
        Some(vec!["a".to_string(), "site.code".to_string()])
    );
}

/// A document knows its actor's changes as its own only once it made one itself; loaded from
/// bytes, it does not, and the index still counts them: the next change is the transaction's.
#[test]
fn an_index_counts_this_replicas_changes_however_the_document_got_them() {
    let actor = ActorId::from(vec![4; 16]);
    let mut made = Automerge::new().with_actor(actor.clone());
    for round in 0..3 {
        transact(
            &mut made,
            json!({ "n": round }).as_object().unwrap(),
            &stamp(round),
        );
    }
    let loaded = Automerge::load(&made.save()).unwrap().with_actor(actor);
    let mut index = WriteIndex::of(&loaded).unwrap();
    let patch = json!({"n": 3});
    let fields = document::fields(&loaded, None);
    let (change, _) = index
        .merge_patch(patch.as_object().unwrap(), &fields, &stamp(3))
        .unwrap();
    assert_eq!(change.seq(), 4);
    let expected = transact(&mut made, patch.as_object().unwrap(), &stamp(3));
    assert_eq!(change.raw_bytes(), &expected[..]);
}
