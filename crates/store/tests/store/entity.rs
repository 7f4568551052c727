//! Writing and reading one entity: merge patch, replace, delete, conditional writes, time travel,
//! history and listing.

use serde_json::json;
use store::{Error, Version};

use crate::harness::{data, if_match, key, local, object, Harness};

#[test]
fn patch_creates_then_merges_fields() {
    let harness = Harness::open();
    let store = harness.store();
    let appointment = key("appointment", "1");
    let created = store
        .patch(
            &appointment,
            &json!({"date": "2026-12-01", "site": {"code": "N1", "room": 4}, "tags": ["a", "b"]}),
            &local("alice"),
        )
        .unwrap();
    assert!(created.created);
    assert!(created.seq.is_some());
    let entity = created.entity.unwrap();
    assert_eq!(entity.kind.as_str(), "appointment");
    assert_eq!(entity.id.as_str(), "1");
    assert_eq!(entity.version, created.version);

    let written = store
        .patch(
            &appointment,
            &json!({"site": {"room": null, "floor": 2}, "tags": ["c"], "date": null, "n": 1.5}),
            &local("alice"),
        )
        .unwrap();
    assert!(!written.created);
    assert_eq!(
        written.entity.unwrap().data,
        object(json!({"site": {"code": "N1", "floor": 2}, "tags": ["c"], "n": 1.5}))
    );
    assert_eq!(
        store.get(&appointment).unwrap().unwrap().data,
        object(json!({"site": {"code": "N1", "floor": 2}, "tags": ["c"], "n": 1.5}))
    );
}

#[test]
fn patch_replaces_non_objects_and_keeps_scalar_types() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("permit", "p");
    store
        .patch(
            &entity,
            &json!({"a": 1, "b": {"c": 1}, "c": [1, 2]}),
            &local("u"),
        )
        .unwrap();
    let written = store
        .patch(
            &entity,
            &json!({
                "a": {"x": true},
                "b": "flat",
                "c": {"now": "object"},
                "big": u64::MAX,
                "neg": i64::MIN,
                "float": 1.0,
                "nested": [{"k": null, "o": {"z": null}}, [null, 1]],
                "empty": {}
            }),
            &local("u"),
        )
        .unwrap();
    let data = written.entity.unwrap().data;
    assert_eq!(
        data,
        object(json!({
            "a": {"x": true},
            "b": "flat",
            "c": {"now": "object"},
            "big": u64::MAX,
            "neg": i64::MIN,
            "float": 1.0,
            "nested": [{"k": null, "o": {"z": null}}, [null, 1]],
            "empty": {}
        }))
    );
    // Integers and floats stay apart: 1.0 is not read back as 1.
    assert!(data["float"].is_f64());
    assert_eq!(data["big"].as_u64(), Some(u64::MAX));
}

#[test]
fn a_patch_that_changes_nothing_writes_nothing() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let first = store
        .patch(
            &entity,
            &json!({"a": 1, "b": {"c": [1, {"d": 2}]}, "e": {}}),
            &local("u"),
        )
        .unwrap();
    let seq = store.last_seq();
    for patch in [
        json!({}),
        json!({"a": 1}),
        json!({"missing": null}),
        json!({"b": {"c": [1, {"d": 2}]}}),
        json!({"b": {}}),
        json!({"b": {"gone": null}}),
        json!({"e": {}}),
    ] {
        let written = store.patch(&entity, &patch, &local("u")).unwrap();
        assert_eq!(written.seq, None, "{patch} made a change");
        assert_eq!(written.version, first.version, "{patch} moved the version");
        assert!(!written.created);
        assert_eq!(written.entity, first.entity);
    }
    assert_eq!(store.last_seq(), seq);
    assert_eq!(store.history(&entity).unwrap().unwrap().len(), 1);
}

#[test]
fn patch_refuses_what_it_cannot_write() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    for bad in [json!(null), json!([1]), json!("x"), json!(3)] {
        assert!(matches!(
            store.patch(&entity, &bad, &local("u")),
            Err(Error::UnwritableValue(_))
        ));
        assert!(matches!(
            store.replace(&entity, &bad, &local("u")),
            Err(Error::UnwritableValue(_))
        ));
    }
    assert!(matches!(
        store.patch(&entity, &json!({"": 1}), &local("u")),
        Err(Error::UnwritableValue(_))
    ));
    let mut deep = json!(1);
    for _ in 0..=store::MAX_DEPTH {
        deep = json!({ "d": deep });
    }
    assert!(matches!(
        store.patch(&entity, &deep, &local("u")),
        Err(Error::UnwritableValue(_))
    ));
    assert!(matches!(
        store.replace(&entity, &json!({}), &local("u")),
        Err(Error::UnwritableValue(_))
    ));
    assert!(matches!(
        store.replace(&entity, &json!({"a": null}), &local("u")),
        Err(Error::UnwritableValue(_))
    ));
    assert_eq!(store.get(&entity).unwrap(), None);
    assert_eq!(store.history(&entity).unwrap(), None);
    assert_eq!(store.last_seq(), store::Seq::ZERO);
}

/// A write holds at most `MAX_VALUES_PER_WRITE` values and `MAX_OBJECTS_PER_WRITE` nested
/// objects: beyond them Automerge's per-operation cost would stall the writer for seconds. One
/// over either bound is refused and changes nothing; exactly at them, the write lands.
#[test]
fn a_write_is_bounded_in_values_and_nested_objects() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "big");
    let flat = |count: usize, value: serde_json::Value| {
        let fields: serde_json::Map<String, serde_json::Value> = (0..count)
            .map(|index| (format!("f{index}"), value.clone()))
            .collect();
        serde_json::Value::Object(fields)
    };
    let objects = |count: usize| flat(count, json!({"x": 1}));
    let too_many = [
        flat(store::MAX_VALUES_PER_WRITE + 1, json!(1)),
        flat(store::MAX_VALUES_PER_WRITE + 1, json!(null)),
        json!({"list": vec![1; store::MAX_VALUES_PER_WRITE]}),
        objects(store::MAX_OBJECTS_PER_WRITE + 1),
    ];
    for value in &too_many {
        assert!(matches!(
            store.patch(&entity, value, &local("u")),
            Err(Error::UnwritableValue(_))
        ));
        assert!(matches!(
            store.replace(&entity, value, &local("u")),
            Err(Error::UnwritableValue(_))
        ));
    }
    assert_eq!(store.get(&entity).unwrap(), None);
    assert_eq!(store.last_seq(), store::Seq::ZERO);
    store
        .replace(
            &entity,
            &flat(store::MAX_VALUES_PER_WRITE, json!(1)),
            &local("u"),
        )
        .unwrap();
    store
        .patch(
            &entity,
            &flat(store::MAX_VALUES_PER_WRITE, json!(null)),
            &local("u"),
        )
        .unwrap();
    store
        .patch(&entity, &objects(store::MAX_OBJECTS_PER_WRITE), &local("u"))
        .unwrap();
    let data = store.get(&entity).unwrap().expect("written").data;
    assert_eq!(data.len(), store::MAX_OBJECTS_PER_WRITE);
}

#[test]
fn patching_an_absent_entity_with_nothing_creates_nothing() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    for patch in [json!({}), json!({"a": null})] {
        let written = store.patch(&entity, &patch, &local("u")).unwrap();
        assert_eq!(written.entity, None);
        assert_eq!(written.seq, None);
        assert!(!written.created);
    }
    assert_eq!(store.get(&entity).unwrap(), None);
    assert_eq!(store.save(&entity).unwrap(), None);
}

#[test]
fn replace_sets_exactly_the_given_fields() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    store
        .patch(
            &entity,
            &json!({"a": 1, "b": 2, "site": {"code": "N1", "room": 4}}),
            &local("u"),
        )
        .unwrap();
    let written = store
        .replace(
            &entity,
            &json!({"b": 3, "site": {"code": "N1"}, "c": [1]}),
            &local("u"),
        )
        .unwrap();
    assert!(!written.created);
    assert_eq!(
        written.entity.unwrap().data,
        object(json!({"b": 3, "site": {"code": "N1"}, "c": [1]}))
    );
    let again = store
        .replace(
            &entity,
            &json!({"b": 3, "site": {"code": "N1"}, "c": [1]}),
            &local("u"),
        )
        .unwrap();
    assert_eq!(
        again.seq, None,
        "replacing with the same fields is not a change"
    );
}

#[test]
fn issue_2_replace_with_a_null_field_removes_it() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    store
        .patch(&entity, &json!({"a": 1, "b": 2}), &local("u"))
        .unwrap();
    let written = store
        .replace(&entity, &json!({"a": null, "b": 2}), &local("u"))
        .unwrap();
    assert_eq!(written.entity.unwrap().data, object(json!({"b": 2})));
    assert!(written.seq.is_some());
}

#[test]
fn delete_hides_the_entity_and_keeps_its_history() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let created = store
        .patch(&entity, &json!({"a": 1, "b": {"c": 2}}), &local("alice"))
        .unwrap();
    let deleted = store.delete(&entity, &local("bob")).unwrap().unwrap();
    assert_eq!(deleted.entity, None);
    assert!(!deleted.created);
    let seq = deleted.seq.expect("a delete is a change");
    assert_ne!(deleted.version, created.version);
    assert_eq!(store.get(&entity).unwrap(), None);
    assert_eq!(store.conflicts(&entity).unwrap(), None);
    let history = store.history(&entity).unwrap().unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[1].origin.as_deref(), Some("local:bob"));
    assert_eq!(history[1].fields, vec!["a", "b"]);
    // The old version is still readable.
    let old = Version::parse(&created.version).unwrap();
    assert_eq!(
        store.get_at(&entity, &old).unwrap().unwrap().data,
        object(json!({"a": 1, "b": {"c": 2}}))
    );
    let rows = store.feed(store::Seq::ZERO, None, 10).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].seq, seq);
    assert!(!rows[1].exists);
    assert_eq!(rows[1].origin.as_str(), "local:bob");
    assert_eq!(rows[1].version, deleted.version);

    // Deleting again, or deleting what never existed, is not a change.
    assert_eq!(store.delete(&entity, &local("bob")).unwrap(), None);
    assert_eq!(
        store
            .delete(&key("appointment", "2"), &local("bob"))
            .unwrap(),
        None
    );
    assert_eq!(store.last_seq(), seq);

    // It can be created again.
    let recreated = store
        .patch(&entity, &json!({"a": 5}), &local("alice"))
        .unwrap();
    assert!(recreated.created);
    assert_eq!(recreated.entity.unwrap().data, object(json!({"a": 5})));
}

#[test]
fn if_match_guards_every_write() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let absent_version = "ab".repeat(32);
    assert!(matches!(
        store.patch(&entity, &json!({"a": 1}), &if_match("u", &absent_version)),
        Err(Error::VersionMismatch { ref current, .. }) if current.is_empty()
    ));
    assert!(matches!(
        store.delete(&entity, &if_match("u", &absent_version)),
        Err(Error::VersionMismatch { .. })
    ));
    let first = store.patch(&entity, &json!({"a": 1}), &local("u")).unwrap();
    let second = store
        .patch(&entity, &json!({"a": 2}), &if_match("u", &first.version))
        .unwrap();
    for attempt in [
        store.patch(&entity, &json!({"a": 3}), &if_match("u", &first.version)),
        store.replace(&entity, &json!({"a": 3}), &if_match("u", &first.version)),
        store
            .delete(&entity, &if_match("u", &first.version))
            .map(|written| written.unwrap()),
    ] {
        match attempt {
            Err(Error::VersionMismatch {
                expected, current, ..
            }) => {
                assert_eq!(expected, first.version);
                assert_eq!(current, second.version);
            }
            other => panic!("a stale If-Match was accepted: {other:?}"),
        }
    }
    assert_eq!(
        store.get(&entity).unwrap().unwrap().data,
        object(json!({"a": 2}))
    );
    let deleted = store
        .delete(&entity, &if_match("u", &second.version))
        .unwrap()
        .unwrap();
    assert_eq!(deleted.entity, None);
    assert_eq!(store.get(&absent_key()).unwrap(), None);
}

#[test]
fn if_match_any_needs_the_entity_to_exist() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let mut any = local("u");
    any.if_match = Some(store::IfMatch::Exists);
    let mismatch = |outcome: Result<_, Error>| {
        matches!(outcome, Err(Error::VersionMismatch { ref expected, ref current, .. })
            if expected == "*" && current.is_empty())
    };
    // Absent: refused, for every kind of write, and nothing is written.
    assert!(mismatch(
        store.patch(&entity, &json!({"a": 1}), &any).map(|_| ())
    ));
    assert!(mismatch(
        store.replace(&entity, &json!({"a": 1}), &any).map(|_| ())
    ));
    assert!(mismatch(store.delete(&entity, &any).map(|_| ())));
    assert_eq!(store.get(&entity).unwrap(), None);
    // Present, at whatever version: taken.
    store.patch(&entity, &json!({"a": 1}), &local("u")).unwrap();
    store.patch(&entity, &json!({"a": 2}), &any).unwrap();
    store.patch(&entity, &json!({"b": {"c": 1}}), &any).unwrap();
    store.replace(&entity, &json!({"a": 3}), &any).unwrap();
    assert_eq!(
        store.get(&entity).unwrap().unwrap().data,
        object(json!({"a": 3}))
    );
    assert!(store.delete(&entity, &any).unwrap().is_some());
    // Deleted: refused again.
    assert!(mismatch(
        store.patch(&entity, &json!({"a": 4}), &any).map(|_| ())
    ));
    assert_eq!(store.get(&entity).unwrap(), None);
}

fn absent_key() -> store::EntityKey {
    key("appointment", "never")
}

#[test]
fn get_at_reads_every_earlier_version() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let mut versions = Vec::new();
    for n in 0..5 {
        let written = store
            .patch(
                &entity,
                &json!({ "n": n, format!("f{n}"): true }),
                &local("u"),
            )
            .unwrap();
        versions.push((written.version, written.entity.unwrap().data));
    }
    for (version, data) in &versions {
        let at = store
            .get_at(&entity, &Version::parse(version).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(&at.data, data);
        assert_eq!(&at.version, version);
    }
    let unknown = Version::parse(&"cd".repeat(32)).unwrap();
    assert!(matches!(
        store.get_at(&entity, &unknown),
        Err(Error::UnknownVersion { .. })
    ));
    assert!(matches!(
        store.get_at(&absent_key(), &unknown),
        Err(Error::UnknownVersion { .. })
    ));
    // A version of another entity is unknown here.
    let other = store
        .patch(&key("appointment", "2"), &json!({"x": 1}), &local("u"))
        .unwrap();
    assert!(matches!(
        store.get_at(&entity, &Version::parse(&other.version).unwrap()),
        Err(Error::UnknownVersion { .. })
    ));
}

#[test]
fn history_lists_origin_time_and_fields() {
    let harness = Harness::open();
    let store = harness.store();
    let entity = key("appointment", "1");
    let before = unix_seconds();
    store
        .patch(
            &entity,
            &json!({"a": 1, "site": {"code": "N"}}),
            &local("alice"),
        )
        .unwrap();
    let options = store::WriteOptions::new(store::Origin::parse("connector:scheduler").unwrap());
    store
        .patch(
            &entity,
            &json!({"site": {"code": "S"}, "tags": [1]}),
            &options,
        )
        .unwrap();
    store
        .patch(&entity, &json!({"a": null}), &local("bob"))
        .unwrap();
    let after = unix_seconds();
    let history = store.history(&entity).unwrap().unwrap();
    let summary: Vec<(Option<&str>, Vec<&str>)> = history
        .iter()
        .map(|entry| {
            (
                entry.origin.as_deref(),
                entry.fields.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some("local:alice"), vec!["a", "site", "site.code"]),
            (Some("connector:scheduler"), vec!["site.code", "tags"]),
            (Some("local:bob"), vec!["a"]),
        ]
    );
    for entry in &history {
        assert!(
            (before..=after).contains(&entry.time),
            "{} is not between {before} and {after}",
            entry.time
        );
        assert!(store
            .get_at(&entity, &Version::parse(&entry.version).unwrap())
            .is_ok());
    }
    assert_eq!(
        history.last().unwrap().version,
        store.get(&entity).unwrap().unwrap().version
    );
    assert_eq!(store.history(&absent_key()).unwrap(), None);
}

#[test]
fn history_keeps_a_write_that_only_adds_empty_objects() {
    let harness = Harness::open();
    let store = harness.store();
    let summary = |entity: &store::EntityKey| -> Vec<(String, Vec<String>)> {
        store
            .history(entity)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|entry| (entry.origin.unwrap(), entry.fields))
            .collect()
    };
    let strings = |fields: &[&str]| fields.iter().map(|f| f.to_string()).collect::<Vec<_>>();
    // On an existing entity, then on a new one, by PATCH and by PUT.
    let existing = key("appointment", "1");
    store
        .patch(&existing, &json!({"a": 1}), &local("alice"))
        .unwrap();
    let written = store
        .patch(&existing, &json!({"notes": {}}), &local("bob"))
        .unwrap();
    store
        .patch(&existing, &json!({"b": 2}), &local("carol"))
        .unwrap();
    assert_eq!(
        summary(&existing),
        vec![
            ("local:alice".into(), strings(&["a"])),
            ("local:bob".into(), strings(&["notes"])),
            ("local:carol".into(), strings(&["b"])),
        ]
    );
    // The write's version is its own change, and the object reads back empty.
    assert_eq!(
        store.history(&existing).unwrap().unwrap()[1].version,
        written.version
    );
    assert_eq!(data(store, &existing), json!({"a": 1, "b": 2, "notes": {}}));
    let new = key("appointment", "2");
    store
        .patch(&new, &json!({"notes": {"inner": {}}}), &local("dave"))
        .unwrap();
    store
        .replace(&new, &json!({"notes": {}, "site": {}}), &local("erin"))
        .unwrap();
    assert_eq!(
        summary(&new),
        vec![
            ("local:dave".into(), strings(&["notes", "notes.inner"])),
            ("local:erin".into(), strings(&["notes.inner", "site"])),
        ]
    );
    assert_eq!(data(store, &new), json!({"notes": {}, "site": {}}));
    // A map made for an earlier write stays that write's field, and a write that had to
    // delete a value in a map's place still names the maps it made.
    let nested = key("appointment", "3");
    for (patch, who) in [
        (json!({"a": 1, "site": {"x": {}}}), "alice"),
        (json!({"b": 1, "site": {"y": {}}}), "bob"),
        (json!({"c": 1, "site": {"z": {"q": 1}}}), "carol"),
        (json!({"d": "text"}), "dave"),
        (json!({"d": {"inner": {}}}), "erin"),
        (json!({"e": 1}), "frank"),
    ] {
        store.patch(&nested, &patch, &local(who)).unwrap();
    }
    assert_eq!(
        summary(&nested),
        vec![
            ("local:alice".into(), strings(&["a", "site", "site.x"])),
            ("local:bob".into(), strings(&["b", "site.y"])),
            ("local:carol".into(), strings(&["c", "site.z", "site.z.q"])),
            ("local:dave".into(), strings(&["d"])),
            // The value in the map's place is deleted by a change of its own.
            ("local:erin".into(), strings(&["d"])),
            ("local:erin".into(), strings(&["d", "d.inner"])),
            ("local:frank".into(), strings(&["e"])),
        ]
    );
    // The name the store uses for that is not a field name a write may use.
    assert!(matches!(
        store.patch(&new, &json!({"\u{0}lockstep:write": 1}), &local("dave")),
        Err(Error::UnwritableValue(_))
    ));
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn list_pages_through_existing_entities_in_id_order() {
    let harness = Harness::open();
    let store = harness.store();
    for id in ["e", "a", "c", "b", "d", "f"] {
        store
            .patch(&key("appointment", id), &json!({ "id": id }), &local("u"))
            .unwrap();
    }
    // Neighbouring kinds and a kind that is a prefix must not leak into the listing.
    store
        .patch(&key("appointments", "a0"), &json!({"x": 1}), &local("u"))
        .unwrap();
    store
        .patch(&key("appointmen", "z"), &json!({"x": 1}), &local("u"))
        .unwrap();
    store.delete(&key("appointment", "b"), &local("u")).unwrap();
    store.delete(&key("appointment", "e"), &local("u")).unwrap();
    let kind = store::Kind::new("appointment").unwrap();
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = store.list(&kind, after.as_ref(), 2).unwrap();
        pages += 1;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|entity| entity.id.to_string()));
        for entity in &page.items {
            assert_eq!(entity.data["id"], entity.id.as_str());
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, vec!["a", "c", "d", "f"]);
    assert_eq!(pages, 2, "the last page must not promise more");
    let from_c = store
        .list(&kind, Some(&store::EntityId::new("c").unwrap()), 10)
        .unwrap();
    let ids: Vec<_> = from_c.items.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids, vec!["d", "f"]);
    assert_eq!(from_c.next, None);
    let none = store
        .list(&store::Kind::new("nothing").unwrap(), None, 10)
        .unwrap();
    assert!(none.items.is_empty() && none.next.is_none());
}
