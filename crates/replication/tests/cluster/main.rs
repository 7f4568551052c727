//! Replication without sockets: three to five stores exchanging frames through `Cluster`, with
//! random writes, lost, duplicated and reordered frames and restarts, must end with every
//! entity at the same version and the same fields everywhere, in a bounded number of frames.
//!
//! Cases: `LOCKSTEP_PROPTEST_CASES / 40` (each case opens several sled stores and flushes on
//! every write), at least 8; 64 when the variable is unset.

mod harness;

use harness::Cluster;
use proptest::prelude::*;
use replication::{SessionSettings, REPLY_BYTES};
use serde_json::json;

/// Cases for this expensive property.
fn cases() -> u32 {
    std::env::var_os("LOCKSTEP_PROPTEST_CASES")
        .and_then(|value| value.to_str()?.parse::<u32>().ok())
        .map_or(64, |cases| (cases / 40).max(8))
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        node: usize,
        entity: u8,
        field: u8,
        value: u8,
    },
    Nest {
        node: usize,
        entity: u8,
        value: u8,
    },
    Delete {
        node: usize,
        entity: u8,
    },
    /// Deliver the next frame on a connection, in one direction.
    Deliver {
        link: usize,
        direction: usize,
    },
    /// The next frame is lost: the connection drops.
    Lose {
        link: usize,
    },
    /// Two frames swap places: the connection drops (TCP never reorders).
    Reorder {
        link: usize,
    },
    /// The next frame arrives twice.
    Duplicate {
        link: usize,
        direction: usize,
    },
    Restart {
        node: usize,
    },
}

fn op(nodes: usize, links: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..nodes, 0u8..6, 0u8..3, any::<u8>())
            .prop_map(|(node, entity, field, value)| Op::Write { node, entity, field, value }),
        1 => (0..nodes, 0u8..6, any::<u8>()).prop_map(|(node, entity, value)| Op::Nest { node, entity, value }),
        1 => (0..nodes, 0u8..6).prop_map(|(node, entity)| Op::Delete { node, entity }),
        8 => (0..links, 0usize..2).prop_map(|(link, direction)| Op::Deliver { link, direction }),
        1 => (0..links).prop_map(|link| Op::Lose { link }),
        1 => (0..links).prop_map(|link| Op::Reorder { link }),
        1 => (0..links, 0usize..2).prop_map(|(link, direction)| Op::Duplicate { link, direction }),
        1 => (0..nodes).prop_map(|node| Op::Restart { node }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, bool, usize, Vec<Op>)> {
    (3usize..=5, any::<bool>(), 1usize..=4).prop_flat_map(|(nodes, mesh, batch)| {
        let links = if mesh { nodes * (nodes - 1) / 2 } else { nodes };
        (
            Just(nodes),
            Just(mesh),
            Just(batch),
            proptest::collection::vec(op(nodes, links), 1..60),
        )
    })
}

fn run(nodes: usize, mesh: bool, batch: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let links = if mesh {
        Cluster::mesh(nodes)
    } else {
        Cluster::ring(nodes)
    };
    let settings = SessionSettings {
        batch_entities: batch,
        max_rounds: 16,
        // The mesh cases answer each entity of a request in a frame of its own (parts, then the
        // last), the ring cases in one frame.
        reply_bytes: if mesh { 1 } else { REPLY_BYTES },
    };
    let mut cluster = Cluster::new(nodes, &links, settings);
    for op in ops {
        match *op {
            Op::Write {
                node,
                entity,
                field,
                value,
            } => cluster.write(
                node,
                &format!("e{entity}"),
                &json!({ format!("f{field}"): value }),
            ),
            Op::Nest {
                node,
                entity,
                value,
            } => cluster.write(
                node,
                &format!("e{entity}"),
                &json!({ "site": { "code": format!("c{value}") } }),
            ),
            Op::Delete { node, entity } => cluster.delete(node, &format!("e{entity}")),
            Op::Deliver { link, direction } => {
                cluster.deliver(link, direction, 1);
            }
            Op::Lose { link } | Op::Reorder { link } => cluster.disconnect(link),
            Op::Duplicate { link, direction } => {
                cluster.deliver(link, direction, 2);
            }
            Op::Restart { node } => cluster.restart(node),
        }
    }
    let faults = cluster.tally.errors.len();
    // Termination: with no more faults, every conversation ends within a bound that depends
    // on the number of entities, batches and links, not on luck.
    let delivered = cluster.settle(20_000);
    prop_assert!(
        delivered.is_some(),
        "the cluster did not go quiet: {:?}",
        cluster.tally
    );
    prop_assert_eq!(
        cluster.tally.unexplained_errors(faults),
        Vec::<String>::new(),
        "a fault-free settle must not fail"
    );
    // Quiet means done: no batch still waits on a connection that is up.
    prop_assert_eq!(
        cluster.busy_connections(),
        Vec::<(String, String)>::new(),
        "sessions still busy once nothing moves"
    );
    // Convergence: the same version and fields everywhere.
    for (key, views) in cluster.snapshot() {
        let first = &views[0];
        prop_assert!(first.0.is_some(), "{} is missing on s0: {:?}", key, views);
        for (index, view) in views.iter().enumerate() {
            prop_assert_eq!(view, first, "{} differs between s0 and s{}", key, index);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn sites_converge_and_go_quiet_whatever_the_faults((nodes, mesh, batch, ops) in scenario()) {
        run(nodes, mesh, batch, &ops)?;
    }
}

#[test]
fn a_site_that_was_cut_off_catches_up_on_many_entities() {
    let mut cluster = Cluster::new(
        3,
        &Cluster::ring(3),
        SessionSettings {
            batch_entities: 16,
            max_rounds: 8,
            ..SessionSettings::default()
        },
    );
    for index in 0..200 {
        cluster.write(
            index % 2,
            &format!("e{index}"),
            &json!({ "n": index, "from": index % 2 }),
        );
    }
    cluster.restart(2);
    let delivered = cluster.settle(100_000).expect("the cluster goes quiet");
    assert!(cluster.tally.errors.is_empty(), "{:?}", cluster.tally);
    let snapshot = cluster.snapshot();
    assert_eq!(snapshot.len(), 200);
    for (key, views) in snapshot {
        assert!(
            views
                .iter()
                .all(|view| view == &views[0] && view.0.is_some()),
            "{key}: {views:?}"
        );
    }
    // Batched: far fewer frames than one round trip per entity per link.
    assert!(delivered < 200 * 3, "{delivered} frames for 200 entities");
}

#[test]
fn concurrent_edits_of_one_field_end_with_the_same_winner_everywhere() {
    let mut cluster = Cluster::new(3, &Cluster::ring(3), SessionSettings::default());
    for node in 0..3 {
        cluster.write(
            node,
            "shared",
            &json!({ "date": format!("2026-12-0{}", node + 1), "only": node }),
        );
    }
    cluster.settle(10_000).expect("quiet");
    let snapshot = cluster.snapshot();
    let views = &snapshot[&store::EntityKey::new("item", "shared").expect("valid")];
    assert!(views.iter().all(|view| view == &views[0]), "{views:?}");
    let conflicts = cluster.nodes[0]
        .store()
        .conflicts(&store::EntityKey::new("item", "shared").expect("valid"))
        .expect("read")
        .expect("exists");
    assert!(
        conflicts
            .iter()
            .any(|conflict| format!("{conflict:?}").contains("date")),
        "the losing dates are kept as conflicts: {conflicts:?}"
    );
}
