//! proptest strategies shared by the property tests: JSON values over a small key space, so that
//! random edits collide, and the number of cases from `LOCKSTEP_PROPTEST_CASES`.

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Map, Value as Json};

/// Cases per property: `LOCKSTEP_PROPTEST_CASES` (CI sets 2000), 256 when unset.
pub fn config() -> Config {
    // `var_os`: clippy.toml keeps `std::env::var` out of library code, and this is a test knob.
    let cases = std::env::var_os("LOCKSTEP_PROPTEST_CASES")
        .and_then(|value| value.into_string().ok())
        .map(|value| value.parse().expect("LOCKSTEP_PROPTEST_CASES is a number"))
        .unwrap_or(256);
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/store.txt",
        ))),
        ..Config::default()
    }
}

/// Field names: few, so that edits on different replicas hit the same fields.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_owned)
}

/// A scalar, numbers of every JSON flavour included.
fn scalar() -> impl Strategy<Value = Json> {
    prop_oneof![
        any::<bool>().prop_map(Json::from),
        (-3i64..3).prop_map(Json::from),
        Just(Json::from(u64::MAX)),
        Just(Json::from(i64::MIN)),
        prop_oneof![Just(0.5f64), Just(-2.0), Just(1e300)].prop_map(Json::from),
        prop_oneof![Just("x"), Just("y"), Just("")].prop_map(Json::from),
    ]
}

/// A value as a merge patch writes it: `null` (delete), scalars, small arrays (written whole,
/// nulls kept) and nested objects (merged).
pub fn patch_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![3 => scalar(), 1 => Just(Json::Null)];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
            object_of(inner),
        ]
    })
}

fn object_of(values: impl Strategy<Value = Json>) -> impl Strategy<Value = Json> {
    prop::collection::vec((field(), values), 0..3)
        .prop_map(|entries| Json::Object(entries.into_iter().collect::<Map<_, _>>()))
}

/// A merge patch: an object of fields.
pub fn patch() -> impl Strategy<Value = Map<String, Json>> {
    prop::collection::vec((field(), patch_value()), 0..4)
        .prop_map(|entries| entries.into_iter().collect())
}
