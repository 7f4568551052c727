//! The store's hot paths, on a real sled directory: apply a merge patch (durable, so a flush is
//! part of it), load an entity from disk on a cache miss, and save one replica's document and
//! merge it into another. Inputs come from a fixed seed, so runs compare.
//!
//! Run with `cargo bench -p lockstep-store`; CI only compiles it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value as Json};
use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};
use tempfile::TempDir;

/// The allocator the `lockstep` binary uses, so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    divan::main();
}

/// A store in its own temp dir.
struct Fixture {
    _dir: TempDir,
    store: Store,
}

impl Fixture {
    fn open(cache_entries: usize) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut config = StoreConfig::new(dir.path());
        config.cache_entries = cache_entries;
        let store = Store::open(config).expect("the store opens");
        Self { _dir: dir, store }
    }
}

fn options() -> WriteOptions {
    WriteOptions::new(Origin::local("bench").expect("a valid origin"))
}

fn key(id: usize) -> EntityKey {
    EntityKey::new("appointment", id.to_string()).expect("a valid key")
}

/// A 10-field patch like a scheduling system sends: dates, codes, a nested site, a list.
fn patches(count: usize) -> Vec<Json> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            let mut fields = Map::new();
            for field in 0..8 {
                fields.insert(format!("field{field}"), json!(rng.gen_range(0..1000)));
            }
            fields.insert(
                "site".into(),
                json!({"code": format!("S{}", rng.gen_range(0..50)), "room": rng.gen_range(1..20)}),
            );
            fields.insert("tags".into(), json!(["a", rng.gen_range(0..5)]));
            Json::Object(fields)
        })
        .collect()
}

#[divan::bench(sample_count = 50)]
fn patch(bencher: divan::Bencher) {
    let fixture = Fixture::open(4096);
    let inputs = patches(64);
    let entity = key(1);
    let mut next = 0;
    bencher.bench_local(|| {
        next = (next + 1) % inputs.len();
        fixture
            .store
            .patch(&entity, &inputs[next], &options())
            .expect("the patch applies")
    });
}

/// 32 entities of 20 edits each, read round-robin through a cache of `cache_entries` documents.
fn bench_reads(bencher: divan::Bencher, cache_entries: usize) {
    let fixture = Fixture::open(cache_entries);
    let inputs = patches(20);
    for id in 0..32 {
        for patch in &inputs {
            fixture
                .store
                .patch(&key(id), patch, &options())
                .expect("the patch applies");
        }
    }
    let mut next = 0;
    bencher.bench_local(|| {
        next = (next + 1) % 32;
        fixture
            .store
            .get(&key(next))
            .expect("the read works")
            .expect("the entity exists")
    });
}

/// Reading entities whose documents are cached: the cost of turning a document into JSON.
#[divan::bench(sample_count = 50)]
fn get_cached(bencher: divan::Bencher) {
    bench_reads(bencher, 64);
}

/// One cached document: reading 32 entities round-robin always misses.
#[divan::bench(sample_count = 50)]
fn load_from_disk(bencher: divan::Bencher) {
    bench_reads(bencher, 1);
}

#[divan::bench(sample_count = 50)]
fn save_and_merge(bencher: divan::Bencher) {
    let source = Fixture::open(4096);
    let target = Fixture::open(4096);
    let origin = Origin::parse("peer:bench").expect("a valid origin");
    for patch in patches(20) {
        source
            .store
            .patch(&key(0), &patch, &options())
            .expect("the patch applies");
    }
    let mut next = 0;
    bencher.bench_local(|| {
        next += 1;
        let bytes = source
            .store
            .save(&key(0))
            .expect("the save works")
            .expect("the entity exists");
        // A fresh entity each time, so every merge brings the whole document.
        target
            .store
            .merge(&key(next), &bytes, &origin)
            .expect("the merge works")
    });
}

/// What a replica catching up does per batch: 256 new entities' stored bytes merged at once.
#[divan::bench(sample_count = 20)]
fn merge_many_new_entities(bencher: divan::Bencher) {
    let source = Fixture::open(4096);
    let target = Fixture::open(4096);
    let origin = Origin::parse("peer:bench").expect("a valid origin");
    let inputs = patches(256);
    let documents: Vec<Vec<u8>> = inputs
        .iter()
        .enumerate()
        .map(|(id, patch)| {
            source
                .store
                .patch(&key(id), patch, &options())
                .expect("the patch applies");
            source
                .store
                .stored_document(&key(id))
                .expect("the read works")
                .expect("the entity exists")
        })
        .collect();
    let mut round = 0;
    bencher.bench_local(|| {
        round += 1;
        let keys: Vec<EntityKey> = (0..documents.len())
            .map(|id| key(round * 1000 + id))
            .collect();
        target
            .store
            .merge_many(
                keys.iter()
                    .zip(&documents)
                    .map(|(key, bytes)| (key, bytes.as_slice())),
                &origin,
            )
            .expect("the batch merges")
    });
}

/// History of an entity with `edits` changes, each setting one of its 10 fields: what
/// `GET /v1/entities/{kind}/{id}/history` costs. Its time should grow with the number of
/// changes, not with changes times the document's size.
#[divan::bench(args = [100, 1000, 4000], sample_count = 10)]
fn history(bencher: divan::Bencher, edits: usize) {
    bench_history(
        bencher,
        edits,
        |edit| json!({ format!("field{}", edit % 8): edit }),
    );
}

/// As [`history`], but each edit adds a record to one nested map (`items.k<N>`), so every edit
/// makes a map of its own under a map that an earlier edit made.
#[divan::bench(args = [100, 1000, 4000], sample_count = 10)]
fn history_of_added_records(bencher: divan::Bencher, edits: usize) {
    bench_history(
        bencher,
        edits,
        |edit| json!({ "items": { format!("k{edit}"): { "n": edit } } }),
    );
}

fn bench_history(bencher: divan::Bencher, edits: usize, edit: impl Fn(usize) -> Json) {
    let fixture = Fixture::open(4096);
    let entity = key(1);
    let inputs = patches(1);
    fixture
        .store
        .patch(&entity, &inputs[0], &options())
        .expect("the entity is created");
    for number in 1..edits {
        fixture
            .store
            .patch(&entity, &edit(number), &options())
            .expect("the edit applies");
    }
    bencher.bench_local(|| {
        fixture
            .store
            .history(&entity)
            .expect("history reads")
            .expect("the entity exists")
    });
}
