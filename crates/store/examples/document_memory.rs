//! Measures what loaded Automerge documents take in memory against the cache's estimate of it
//! (`cache::document_weight`: 16 KiB plus 1.25 times the bytes of the document's changes).
//!
//! `cargo run --release -p lockstep-store --example document_memory` prints one row per shape of
//! document, built by transactions and loaded from `save()` bytes, 50 documents each.
#![allow(
    unsafe_code,
    reason = "a counting allocator needs `GlobalAlloc`; this example is a measurement, not shipped"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use automerge::transaction::Transactable;
use automerge::{Automerge, AutomergeError, ROOT};

/// The system allocator, counting the bytes it holds.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

fn signed(bytes: usize) -> isize {
    isize::try_from(bytes).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed on to `System` unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(signed(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `alloc` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(signed(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `dealloc` are passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `realloc` are passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One transaction putting `fields`, each as `value(field)`.
fn put_all(doc: &mut Automerge, fields: usize, value: impl Fn(usize) -> String) {
    doc.transact::<_, _, AutomergeError>(|tx| {
        for field in 0..fields {
            tx.put(ROOT, format!("field{field}"), value(field))?;
        }
        Ok(())
    })
    .expect("puts into the root map succeed");
}

fn build(shape: &str, seed: usize) -> Automerge {
    let mut doc = Automerge::new();
    let short = |n: usize| format!("value-{seed}-{n}");
    match shape {
        "10 fields, 1 change" => put_all(&mut doc, 10, short),
        "10 fields, 400 changes of 6" => {
            put_all(&mut doc, 10, short);
            for change in 0..400 {
                put_all(&mut doc, 6, |n| short(change * 7 + n));
            }
        }
        "1 field of 100 KB" => put_all(&mut doc, 1, |_| "x".repeat(100_000)),
        "1 field of 100-200 KB, 20 changes" => {
            for change in 0..20 {
                put_all(&mut doc, 1, |_| change.to_string().repeat(100_000));
            }
        }
        "1,000 fields, 1 change" => put_all(&mut doc, 1000, short),
        _ => unreachable!("a shape listed in main"),
    }
    doc
}

fn main() {
    const DOCUMENTS: usize = 50;
    let shapes = [
        "10 fields, 1 change",
        "10 fields, 400 changes of 6",
        "1 field of 100 KB",
        "1 field of 100-200 KB, 20 changes",
        "1,000 fields, 1 change",
    ];
    println!(
        "| document | held as | measured per document | changes' bytes | estimate | estimate / measured |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for shape in shapes {
        for loaded in [false, true] {
            let saved: Vec<Vec<u8>> = (0..DOCUMENTS)
                .map(|seed| build(shape, seed).save())
                .collect();
            let before = HELD.load(Ordering::Relaxed);
            let held: Vec<Automerge> = if loaded {
                saved
                    .iter()
                    .map(|bytes| Automerge::load(bytes).expect("its own save() loads"))
                    .collect()
            } else {
                (0..DOCUMENTS).map(|seed| build(shape, seed)).collect()
            };
            let measured = (HELD.load(Ordering::Relaxed) - before) as f64 / DOCUMENTS as f64;
            let history: usize = held[0]
                .get_changes(&[])
                .iter()
                .map(|change| change.raw_bytes().len())
                .sum();
            // `cache::document_weight`, which this example cannot reach (it is crate-private).
            let estimate = 16.0 * 1024.0 + history as f64 * 1.25;
            println!(
                "| {shape} | {} | {measured:.0} | {history} | {estimate:.0} | {:.2} |",
                if loaded { "loaded" } else { "built" },
                estimate / measured
            );
            drop(held);
        }
    }
}
