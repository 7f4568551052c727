//! Two or more stores exchanging `save` bytes through `merge`, as replication will: concurrent
//! creation, concurrent edits of one field, and conflicts.

use serde_json::{json, Value as Json};
use store::{EntityKey, Origin, Store};

use crate::harness::{data, key, local, object, Harness};

fn peer(name: &str) -> Origin {
    Origin::parse(&format!("peer:{name}")).unwrap()
}

/// Sends `from`'s whole document for `entity` to `to`.
fn send(from: &Store, to: &Store, entity: &EntityKey) -> Option<store::Seq> {
    let bytes = from
        .save(entity)
        .unwrap()
        .expect("the sender has the entity");
    to.merge(entity, &bytes, &peer("other")).unwrap().seq
}

/// Sends each side's document to the other.
fn exchange(north: &Harness, south: &Harness, entity: &EntityKey) {
    send(north.store(), south.store(), entity);
    send(south.store(), north.store(), entity);
}

/// A merge patch by a local user, which must succeed.
fn edit(harness: &Harness, entity: &EntityKey, patch: Json, user: &str) {
    harness.store().patch(entity, &patch, &local(user)).unwrap();
}

/// Two stores sharing `appointment/1` as north created it with `base`, then edited apart:
/// north (ann) applies `north_edit`, south (bob) `south_edit`, and nothing is exchanged yet.
fn edited_apart(base: Json, north_edit: Json, south_edit: Json) -> (Harness, Harness, EntityKey) {
    let north = Harness::open();
    let south = Harness::open();
    let appointment = key("appointment", "1");
    edit(&north, &appointment, base, "ann");
    send(north.store(), south.store(), &appointment);
    edit(&north, &appointment, north_edit, "ann");
    edit(&south, &appointment, south_edit, "bob");
    (north, south, appointment)
}

#[test]
fn issue_2_concurrent_creation_keeps_both_sides_fields() {
    let north = Harness::open();
    let south = Harness::open();
    let appointment = key("appointment", "1");
    edit(
        &north,
        &appointment,
        json!({"date": "2026-12-01", "who": "ann"}),
        "ann",
    );
    edit(
        &south,
        &appointment,
        json!({"room": 4, "tags": ["x"]}),
        "bob",
    );
    let merged_into_south = send(north.store(), south.store(), &appointment);
    let merged_into_north = send(south.store(), north.store(), &appointment);
    assert!(merged_into_south.is_some() && merged_into_north.is_some());
    let expected = json!({"date": "2026-12-01", "who": "ann", "room": 4, "tags": ["x"]});
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), expected);
        assert_eq!(store.conflicts(&appointment).unwrap(), Some(Vec::new()));
    }
    assert_eq!(
        north.store().get(&appointment).unwrap().unwrap().version,
        south.store().get(&appointment).unwrap().unwrap().version
    );
    // The merge is a feed row with the peer as origin and the fields it brought.
    let row = north
        .store()
        .feed(store::Seq(1), None, 10)
        .unwrap()
        .remove(0);
    assert_eq!(row.origin.as_str(), "peer:other");
    assert_eq!(row.fields, vec!["room", "tags"]);
    assert!(row.exists);
    // Sending again changes nothing.
    assert_eq!(send(north.store(), south.store(), &appointment), None);
}

#[test]
fn issue_2_concurrent_nested_objects_merge_field_by_field() {
    let north = Harness::open();
    let south = Harness::open();
    let appointment = key("appointment", "1");
    edit(
        &north,
        &appointment,
        json!({"site": {"code": "A", "address": {"street": "Main"}}}),
        "ann",
    );
    edit(
        &south,
        &appointment,
        json!({"site": {"name": "B", "address": {"city": "Oslo"}}}),
        "bob",
    );
    exchange(&north, &south, &appointment);
    let expected =
        json!({"site": {"code": "A", "name": "B", "address": {"street": "Main", "city": "Oslo"}}});
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), expected);
        assert_eq!(store.conflicts(&appointment).unwrap(), Some(Vec::new()));
    }
    // Both sides keep editing the shared nested object.
    edit(&north, &appointment, json!({"site": {"code": null}}), "ann");
    edit(
        &south,
        &appointment,
        json!({"site": {"address": {"zip": "0150"}}}),
        "bob",
    );
    exchange(&north, &south, &appointment);
    let expected = json!({"site": {"name": "B", "address": {"street": "Main", "city": "Oslo", "zip": "0150"}}});
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), expected);
    }
}

#[test]
fn concurrent_edits_of_one_field_are_conflicts_with_one_winner() {
    let (north, south, appointment) = edited_apart(
        json!({"date": "d0", "site": {"code": "A"}}),
        json!({"date": "north", "site": {"code": "N"}}),
        json!({"date": "south", "site": {"code": "S"}}),
    );
    exchange(&north, &south, &appointment);
    let north_data = data(north.store(), &appointment);
    assert_eq!(north_data, data(south.store(), &appointment));
    let conflicts = north.store().conflicts(&appointment).unwrap().unwrap();
    assert_eq!(
        conflicts,
        south.store().conflicts(&appointment).unwrap().unwrap()
    );
    let fields: Vec<&str> = conflicts.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, vec!["date", "site.code"]);
    for conflict in &conflicts {
        let path: Vec<&str> = conflict.field.split('.').collect();
        let shown = path.iter().fold(&north_data, |value, part| &value[part]);
        assert_eq!(&conflict.winner, shown);
        let mut values: Vec<_> = conflict.values.iter().map(|v| v.value.clone()).collect();
        values.sort_by_key(|value| value.to_string());
        let expected = if conflict.field == "date" {
            vec![json!("north"), json!("south")]
        } else {
            vec![json!("N"), json!("S")]
        };
        assert_eq!(values, expected);
        let mut origins: Vec<_> = conflict.values.iter().map(|v| v.origin.clone()).collect();
        origins.sort();
        assert_eq!(
            origins,
            vec![Some("local:ann".into()), Some("local:bob".into())]
        );
        assert!(conflict.values.iter().any(|v| v.value == conflict.winner));
    }
    // Resolving is just another write, and it is seen everywhere.
    edit(&north, &appointment, json!({"date": "agreed"}), "ann");
    send(north.store(), south.store(), &appointment);
    let conflicts = south.store().conflicts(&appointment).unwrap().unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(data(south.store(), &appointment)["date"], "agreed");
}

#[test]
fn a_delete_and_a_concurrent_edit_converge() {
    let north = Harness::open();
    let south = Harness::open();
    let appointment = key("appointment", "1");
    edit(&north, &appointment, json!({"a": 1, "b": 1}), "ann");
    send(north.store(), south.store(), &appointment);
    north.store().delete(&appointment, &local("ann")).unwrap();
    edit(&south, &appointment, json!({"c": 3}), "bob");
    exchange(&north, &south, &appointment);
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), json!({"c": 3}));
    }
    let rows = south.store().feed(store::Seq(2), None, 10).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].fields, vec!["a", "b"]);
    assert!(rows[0].exists);
    assert_eq!(object(data(north.store(), &appointment)).len(), 1);
}

#[test]
fn issue_2_nested_objects_replacing_a_shared_scalar_merge_field_by_field() {
    let (north, south, appointment) = edited_apart(
        json!({"site": "unknown", "list": [1]}),
        json!({"site": {"code": "A"}, "list": {"x": 1}}),
        json!({"site": {"name": "B"}}),
    );
    exchange(&north, &south, &appointment);
    let expected = json!({"site": {"code": "A", "name": "B"}, "list": {"x": 1}});
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), expected);
        assert_eq!(store.conflicts(&appointment).unwrap(), Some(Vec::new()));
    }
}

#[test]
fn issue_2_nested_objects_recreated_after_a_delete_merge_field_by_field() {
    let north = Harness::open();
    let south = Harness::open();
    let appointment = key("appointment", "1");
    edit(
        &north,
        &appointment,
        json!({"a": 1, "site": {"old": true}}),
        "ann",
    );
    edit(&north, &appointment, json!({"site": null}), "ann");
    send(north.store(), south.store(), &appointment);
    edit(&north, &appointment, json!({"site": {"code": "A"}}), "ann");
    south
        .store()
        .replace(
            &appointment,
            &json!({"a": 1, "site": {"name": "B"}}),
            &local("bob"),
        )
        .unwrap();
    exchange(&north, &south, &appointment);
    let expected = json!({"a": 1, "site": {"code": "A", "name": "B"}});
    for store in [north.store(), south.store()] {
        assert_eq!(data(store, &appointment), expected);
    }
    // History shows the writes people made, not the maps the store created for them.
    let history = north.store().history(&appointment).unwrap().unwrap();
    let authors: Vec<_> = history.iter().map(|e| e.author.clone().unwrap()).collect();
    assert_eq!(
        authors,
        vec!["local:ann", "local:ann", "local:ann", "local:bob"]
    );
    // Bob's change came to north from the other replica, and history says so too.
    let origins: Vec<_> = history.iter().map(|e| e.origin.clone().unwrap()).collect();
    assert_eq!(
        origins,
        vec!["local:ann", "local:ann", "local:ann", "peer:other"]
    );
    assert!(history.iter().all(|entry| entry.time > 0));
    assert_eq!(history[0].fields, vec!["a", "site", "site.old"]);
}

#[test]
fn a_nested_object_and_a_concurrent_scalar_are_a_visible_conflict() {
    let (north, south, appointment) = edited_apart(
        json!({"a": 1}),
        json!({"site": {"code": "A"}}),
        json!({"site": "plain"}),
    );
    exchange(&north, &south, &appointment);
    let shown = data(north.store(), &appointment);
    assert_eq!(shown, data(south.store(), &appointment));
    let conflicts = north.store().conflicts(&appointment).unwrap().unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].field, "site");
    assert_eq!(conflicts[0].winner, shown["site"]);
    let mut values: Vec<_> = conflicts[0]
        .values
        .iter()
        .map(|v| v.value.to_string())
        .collect();
    values.sort();
    assert_eq!(values, vec![r#""plain""#, r#"{"code":"A"}"#]);
}

/// A merged change's feed row lists the fields whose visible value it changed: on the side whose
/// own value wins, the other side's concurrent value changes nothing visible, and its row says
/// so with no fields (it still gets a row: the entity has a new version).
#[test]
fn a_merged_change_that_loses_every_conflict_has_a_row_with_no_fields() {
    let (north, south, appointment) = edited_apart(
        json!({"date": "d0", "room": "1"}),
        json!({"date": "north"}),
        json!({"date": "south"}),
    );
    let last_row = |store: &Store| {
        let since = store::Seq(store.last_seq().0 - 1);
        let rows = store.feed(since, None, 10).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        rows.into_iter().next().unwrap()
    };
    send(north.store(), south.store(), &appointment);
    let at_south = last_row(south.store());
    send(south.store(), north.store(), &appointment);
    let at_north = last_row(north.store());
    let winner = data(north.store(), &appointment)["date"].clone();
    assert_eq!(winner, data(south.store(), &appointment)["date"]);
    // The side whose own value won saw no visible change; the other saw `date` change.
    let (won_here, lost_here) = if winner == "north" {
        (at_north, at_south)
    } else {
        (at_south, at_north)
    };
    assert_eq!(won_here.fields, Vec::<String>::new(), "{won_here:?}");
    assert_eq!(lost_here.fields, vec!["date".to_string()], "{lost_here:?}");
    assert_eq!(won_here.version, lost_here.version);
}
