//! Convergence: 3 to 5 stores make random edits to a few shared entities (creating them
//! concurrently, nesting objects, deleting fields, replacing them all), exchange `save` bytes through `merge` in any
//! order with duplicates, delays and restarts, and after a last full exchange every store shows
//! the same version and the same JSON for every entity.

use proptest::prelude::*;
use serde_json::{Map, Value as Json};
use store::{EntityKey, Origin};

use crate::harness::{key, local, Harness};
use crate::strategies;

const ENTITIES: usize = 2;

#[derive(Clone, Debug)]
enum Step {
    /// A local merge patch on one store.
    Patch {
        store: usize,
        entity: usize,
        patch: Map<String, Json>,
    },
    /// A local replace of all fields on one store.
    Replace {
        store: usize,
        entity: usize,
        fields: Map<String, Json>,
    },
    /// A local delete on one store.
    Delete { store: usize, entity: usize },
    /// One store saves an entity now; the bytes travel until a `Deliver` picks them.
    Send {
        from: usize,
        to: usize,
        entity: usize,
    },
    /// One message in flight arrives; `keep` leaves a copy in flight, to be delivered again.
    Deliver { pick: usize, keep: bool },
    /// A store is closed, dropped and opened again from its directory.
    Restart { store: usize },
}

fn step() -> impl Strategy<Value = Step> {
    let store = 0..5usize;
    let entity = 0..ENTITIES;
    prop_oneof![
        6 => (store.clone(), entity.clone(), strategies::patch())
            .prop_map(|(store, entity, patch)| Step::Patch { store, entity, patch }),
        2 => (store.clone(), entity.clone(), strategies::patch())
            .prop_map(|(store, entity, fields)| Step::Replace { store, entity, fields }),
        1 => (store.clone(), entity.clone()).prop_map(|(store, entity)| Step::Delete { store, entity }),
        4 => (store.clone(), store.clone(), entity)
            .prop_map(|(from, to, entity)| Step::Send { from, to, entity }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, keep)| Step::Deliver { pick, keep }),
        1 => store.prop_map(|store| Step::Restart { store }),
    ]
}

struct Message {
    to: usize,
    entity: usize,
    bytes: Vec<u8>,
}

fn peer() -> Origin {
    Origin::parse("peer:test").unwrap()
}

/// Every change the store holds for the entity, in a canonical order.
fn change_hashes(replica: &Harness, entity: &EntityKey) -> Vec<String> {
    let mut versions: Vec<String> = replica
        .store()
        .history(entity)
        .unwrap()
        .unwrap_or_default()
        .into_iter()
        .map(|entry| entry.version)
        .collect();
    versions.sort();
    versions
}

fn run(replica_count: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut replicas: Vec<Harness> = (0..replica_count).map(|_| Harness::open()).collect();
    let entities: Vec<EntityKey> = (0..ENTITIES).map(|n| key("case", &n.to_string())).collect();
    let mut in_flight: Vec<Message> = Vec::new();
    for step in steps {
        match step {
            Step::Patch {
                store,
                entity,
                patch,
            } => {
                let store = replicas[store % replica_count].store();
                store
                    .patch(
                        &entities[*entity],
                        &Json::Object(patch.clone()),
                        &local("u"),
                    )
                    .unwrap();
            }
            Step::Replace {
                store,
                entity,
                fields,
            } => {
                let store = replicas[store % replica_count].store();
                let fields = Json::Object(fields.clone());
                match store.replace(&entities[*entity], &fields, &local("u")) {
                    // A replace with no field left is refused; see the model test.
                    Ok(_) | Err(store::Error::UnwritableValue(_)) => {}
                    Err(other) => return Err(TestCaseError::fail(other.to_string())),
                }
            }
            Step::Delete { store, entity } => {
                let store = replicas[store % replica_count].store();
                store.delete(&entities[*entity], &local("u")).unwrap();
            }
            Step::Send { from, to, entity } => {
                let from = replicas[from % replica_count].store();
                if let Some(bytes) = from.save(&entities[*entity]).unwrap() {
                    in_flight.push(Message {
                        to: to % replica_count,
                        entity: *entity,
                        bytes,
                    });
                }
            }
            Step::Deliver { pick, keep } => {
                if in_flight.is_empty() {
                    continue;
                }
                let index = pick % in_flight.len();
                let message = if *keep {
                    let message = &in_flight[index];
                    Message {
                        to: message.to,
                        entity: message.entity,
                        bytes: message.bytes.clone(),
                    }
                } else {
                    in_flight.swap_remove(index)
                };
                replicas[message.to]
                    .store()
                    .merge(&entities[message.entity], &message.bytes, &peer())
                    .unwrap();
            }
            Step::Restart { store } => replicas[store % replica_count].reopen(),
        }
    }
    // The last full exchange: everything into the first store, then its result to every other.
    for entity in &entities {
        for replica in &replicas[1..] {
            if let Some(bytes) = replica.store().save(entity).unwrap() {
                replicas[0].store().merge(entity, &bytes, &peer()).unwrap();
            }
        }
        let Some(merged) = replicas[0].store().save(entity).unwrap() else {
            continue;
        };
        for replica in &replicas[1..] {
            replica.store().merge(entity, &merged, &peer()).unwrap();
        }
        let expected = replicas[0].store().get(entity).unwrap();
        let expected_conflicts = replicas[0].store().conflicts(entity).unwrap();
        for replica in &replicas[1..] {
            prop_assert_eq!(&replica.store().get(entity).unwrap(), &expected);
            prop_assert_eq!(
                &replica.store().conflicts(entity).unwrap(),
                &expected_conflicts
            );
            // Equal heads even when the entity is deleted everywhere (`get` is then `None`).
            // `save` bytes may differ: each replica lays out its actor table in its own order.
            prop_assert_eq!(
                change_hashes(replica, entity),
                change_hashes(&replicas[0], entity)
            );
        }
    }
    // What converged is also what is on disk, byte for byte.
    let survivor = replicas.len() - 1;
    let before: Vec<_> = entities
        .iter()
        .map(|entity| {
            let store = replicas[survivor].store();
            (store.get(entity).unwrap(), store.save(entity).unwrap())
        })
        .collect();
    replicas[survivor].reopen();
    for (entity, (current, saved)) in entities.iter().zip(&before) {
        let store = replicas[survivor].store();
        prop_assert_eq!(&store.get(entity).unwrap(), current);
        prop_assert_eq!(&store.save(entity).unwrap(), saved);
    }
    Ok(())
}

proptest! {
    #![proptest_config(strategies::config())]

    #[test]
    fn replicas_converge_whatever_the_order_of_exchange(
        replica_count in 3..=5usize,
        steps in prop::collection::vec(step(), 1..30),
    ) {
        run(replica_count, &steps)?;
    }
}
