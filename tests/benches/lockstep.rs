//! The issue-2 benchmark: durable PATCH throughput and latency against a raw sled baseline,
//! where the CPU went during the 64-connection phases (server and client CPU per write, and the
//! throughput that CPU per write would allow with every core busy), the same updates with 50
//! change-feed event streams following, server memory after 100,000
//! entities, server memory with entities of long histories under the cache's byte bound, and
//! bytes on disk per entity against Automerge's `save()`.
//!
//! Run with `cargo bench -p lockstep-tests --bench lockstep` (it builds the release `lockstep`
//! binary first). Figures are ratios against a baseline measured in the same run, because this
//! machine is shared and its absolute speed varies. `LOCKSTEP_BENCH_SECONDS` sets each
//! throughput phase's length (default 5), `LOCKSTEP_BENCH_ENTITIES` the memory phase's entity
//! count (default 100,000), and `LOCKSTEP_BENCH_BINARY` a `lockstep` binary to run instead of
//! building this checkout's (to compare two builds in alternating runs on a noisy machine).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use lockstep_tests::bench::{
    closed_loop, env_number, metric, print_cpu_table, release_binary, send_all, ten_fields,
    Baselines, CpuSample, Figures, Server,
};
use rand::{Rng, SeedableRng};

/// `connections` tasks PATCHing for `seconds`; each writes its own entities of the phase `phase`,
/// cycling over `cycle` of them: a cycle longer than the rounds a connection gets through makes
/// every write a creation, a short one makes nearly every write an update of a cached entity.
async fn patch_load(
    base: &str,
    phase: &'static str,
    connections: u64,
    seconds: u64,
    cycle: u64,
) -> Result<Figures> {
    let base = base.to_string();
    closed_loop(
        "PATCH requests",
        connections,
        seconds,
        move |client, connection, round| {
            let index = connection * 100_000 + round % cycle;
            client
                .patch(format!("{base}/v1/entities/bench/{phase}{index}"))
                .header("content-type", "application/merge-patch+json")
                .body(ten_fields(index, round).to_string())
        },
    )
    .await
}

/// A change-feed event stream counting the rows it receives.
struct Follower {
    rows: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// `streams` change-feed event streams following every kind from the current end of the feed.
async fn follow_feed(base: &str, streams: usize) -> Result<Vec<Follower>> {
    use futures::StreamExt;
    let since = metric(base, "lockstep_feed_seq").await?;
    let mut followers = Vec::new();
    for _ in 0..streams {
        let response = reqwest::Client::new()
            .get(format!("{base}/v1/changes?since={since}"))
            .header("accept", "text/event-stream")
            .send()
            .await?
            .error_for_status()?;
        let rows = Arc::new(AtomicU64::new(0));
        let counted = rows.clone();
        let task = tokio::spawn(async move {
            let mut body = response.bytes_stream();
            // Each row is one event with one `id:` line; a line may span chunks.
            let mut line = Vec::new();
            while let Some(Ok(chunk)) = body.next().await {
                for byte in chunk {
                    if byte == b'\n' {
                        if line.starts_with(b"id:") {
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                        line.clear();
                    } else {
                        line.push(byte);
                    }
                }
            }
        });
        followers.push(Follower { rows, task });
    }
    Ok(followers)
}

/// Writes `count` entities with 64 connections, reporting RSS at each quarter.
async fn fill(server: &Server, count: u64, report: &mut Vec<(String, f64)>) -> Result<()> {
    let quarter = count / 4;
    let mut written = 0;
    while written < count {
        let target = (written + quarter).min(count);
        let base = server.base.clone();
        send_all(64, written..target, move |client, index| {
            client
                .put(format!("{base}/v1/entities/memory/e{index}"))
                .header("content-type", "application/json")
                .body(ten_fields(index, 0).to_string())
        })
        .await?;
        written = target;
        report.push((
            format!("RSS after writing {written} entities"),
            server.rss_mib()?,
        ));
    }
    Ok(())
}

async fn random_reads(server: &Server, entities: u64, reads: u64) -> Result<()> {
    let client = reqwest::Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..reads {
        let index = rng.gen_range(0..entities);
        client
            .get(format!("{}/v1/entities/memory/e{index}", server.base))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// What one run of [`long_histories`] left the server holding.
struct HistoryMemory {
    rss_mib: f64,
    cached_documents: f64,
    cached_mib: f64,
}

/// A server with `store.cache_bytes = cache_bytes` takes `entities` entities, each written
/// `revisions` times with a new 64 KB value (Automerge keeps every one of them: about 400 KB of
/// history per entity in memory), by 16 connections, then reads each once more. The values
/// repeat a short text, which compresses to almost nothing on disk: this measures the document
/// cache's bound; [`large_values_read`] measures values that do not compress.
async fn long_histories(
    binary: &Path,
    cache_bytes: u64,
    entities: u64,
    revisions: u64,
) -> Result<HistoryMemory> {
    let server = Server::start(binary, &format!("[store]\ncache_bytes = {cache_bytes}\n")).await?;
    let base = server.base.clone();
    send_all(16, 0..entities * revisions, move |client, write| {
        // Round by round, so every entity's history grows while the others are written.
        let (index, round) = (write % entities, write / entities);
        let value = format!("{index:05}{round:03}").repeat(8 * 1024);
        client
            .patch(format!("{base}/v1/entities/scan/e{index}"))
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::json!({ "scan": value }).to_string())
    })
    .await?;
    let client = reqwest::Client::new();
    for index in 0..entities {
        client
            .get(format!("{}/v1/entities/scan/e{index}", server.base))
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(HistoryMemory {
        rss_mib: server.rss_mib()?,
        cached_documents: metric(&server.base, "lockstep_store_cached_documents").await?,
        cached_mib: metric(&server.base, "lockstep_store_cached_document_bytes").await?
            / (1024.0 * 1024.0),
    })
}

/// 64 KB of printable text that no compression shrinks much, the same for the same seed.
fn incompressible(seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..64 * 1024)
        .map(|_| char::from(rng.gen_range(b'!'..=b'z')))
        .collect()
}

/// A server with `store.cache_bytes = 32 MiB` takes `entities` entities, each written
/// `revisions` times with 64 KB that does not compress, is restarted, and reads them all once,
/// in two halves: its RSS after the restart and after each half. At this size (about 100 MB)
/// what is read fits in the document cache, sled's cache (64 MiB by default) and the pages sled
/// holds before it weighs them (see `pieces` in docs/architecture.md), so the growth is what
/// reading them costs within those bounds; the bound that pieces keep shows only past a few
/// hundred MB read, which the store-level figures in docs/configuration.md measure.
async fn large_values_read(binary: &Path, entities: u64, revisions: u64) -> Result<[f64; 3]> {
    let mut server = Server::start(binary, "[store]\ncache_bytes = 33554432\n").await?;
    let base = server.base.clone();
    send_all(16, 0..entities * revisions, move |client, write| {
        let index = write % entities;
        client
            .patch(format!("{base}/v1/entities/scan/e{index:05}"))
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::json!({ "scan": incompressible(write) }).to_string())
    })
    .await?;
    server.restart(binary).await?;
    let mut rss = [server.rss_mib()?, 0.0, 0.0];
    let client = reqwest::Client::new();
    for (half, indexes) in [(1, 0..entities / 2), (2, entities / 2..entities)] {
        // Ids in key order, so the two halves share no sled page.
        for index in indexes {
            client
                .get(format!("{}/v1/entities/scan/e{index:05}", server.base))
                .send()
                .await?
                .error_for_status()?;
        }
        rss[half] = server.rss_mib()?;
    }
    server.finish().await?;
    Ok(rss)
}

fn directory_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => directory_bytes(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes per 10-field entity (each edited 5 times) after compaction, against `save()` of the same documents.
fn disk_usage(entities: u64) -> Result<(f64, f64, f64)> {
    use store::{EntityKey, Origin, Store, StoreConfig, WriteOptions};
    let dir = tempfile::tempdir()?;
    let store = Store::open(StoreConfig::new(dir.path()))?;
    let options = WriteOptions::new(Origin::local("bench")?);
    for round in 0..5 {
        for index in 0..entities {
            let key = EntityKey::new("disk", format!("e{index}"))?;
            store.patch(&key, &ten_fields(index, round), &options)?;
        }
    }
    store.compact_all()?;
    let (mut stored, mut saved) = (0u64, 0u64);
    for index in 0..entities {
        let key = EntityKey::new("disk", format!("e{index}"))?;
        stored += store.stored_bytes(&key)?;
        saved += store.save(&key)?.map_or(0, |bytes| bytes.len() as u64);
    }
    store.close()?;
    drop(store);
    let on_disk = directory_bytes(dir.path());
    let per = |total: u64| total as f64 / entities as f64;
    Ok((per(stored), per(saved), per(on_disk)))
}

/// How many change-feed event streams follow the feed in the phase that measures their cost.
const FOLLOWERS: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let seconds = env_number("LOCKSTEP_BENCH_SECONDS", 5);
    let entities = env_number("LOCKSTEP_BENCH_ENTITIES", 100_000);
    let binary = release_binary()?;

    let baselines = Baselines::measure(seconds).await?;

    let server = Server::start(&binary, "").await?;
    // Warm up: connections, the page cache, the first entities.
    patch_load(&server.base, "warm", 8, 1, 100).await?;
    println!("measuring: durable PATCH, 1 connection ({seconds} s)");
    let single = patch_load(&server.base, "one", 1, seconds, 1000).await?;
    println!("measuring: durable PATCH, 64 connections, new entities ({seconds} s)");
    let before = CpuSample::take(&server)?;
    let many = patch_load(&server.base, "new", 64, seconds, 100_000).await?;
    let many_cpu = CpuSample::take(&server)?.since(&before);
    println!("measuring: durable PATCH, 64 connections, updates ({seconds} s)");
    let before = CpuSample::take(&server)?;
    let updates = patch_load(&server.base, "upd", 64, seconds, 16).await?;
    let updates_cpu = CpuSample::take(&server)?.since(&before);
    println!("measuring: durable PATCH, 64 connections, updates, {FOLLOWERS} event streams following the feed ({seconds} s)");
    let followers = follow_feed(&server.base, FOLLOWERS).await?;
    let writes_before = metric(&server.base, "lockstep_store_writes_total").await?;
    let followed = patch_load(&server.base, "upd", 64, seconds, 16).await?;
    // What the streams have not received yet after a second is what they fell behind by.
    let writes = metric(&server.base, "lockstep_store_writes_total").await? - writes_before;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let received: Vec<u64> = followers
        .iter()
        .map(|follower| follower.rows.load(Ordering::Relaxed))
        .collect();
    for follower in &followers {
        follower.task.abort();
    }
    server.finish().await?;

    println!("measuring: memory with {entities} entities");
    let server = Server::start(&binary, "").await?;
    let mut memory = vec![("RSS at start".to_string(), server.rss_mib()?)];
    fill(&server, entities, &mut memory).await?;
    random_reads(&server, entities, 10_000).await?;
    memory.push((
        format!("RSS after 10,000 random reads of {entities}"),
        server.rss_mib()?,
    ));
    server.finish().await?;

    println!("measuring: memory with long histories (256 entities x 6 values of 64 KB)");
    // No byte bound to speak of (the count bound, 4,096, holds every entity), then 32 MiB.
    let unbounded = long_histories(&binary, 1 << 40, 256, 6).await?;
    let bounded = long_histories(&binary, 32 << 20, 256, 6).await?;
    println!("measuring: memory reading large values (256 entities x 6 values of 64 KB that do not compress)");
    let large = large_values_read(&binary, 256, 6).await?;

    println!("measuring: bytes on disk (1,000 entities x 10 fields, 5 edits each, compacted)");
    let (stored, saved, on_disk) = tokio::task::spawn_blocking(|| disk_usage(1000)).await??;

    println!();
    baselines.print_table(&[
        (
            "durable PATCH, 1 connection (updates of 1,000 entities)",
            &single,
        ),
        (
            "durable PATCH, 64 connections, each creating new entities",
            &many,
        ),
        (
            "durable PATCH, 64 connections, each updating 16 entities",
            &updates,
        ),
        (
            "the same, with 50 change-feed event streams following every row",
            &followed,
        ),
    ]);
    println!();
    println!(
        "Each of the {FOLLOWERS} event streams received {} to {} of the {writes:.0} rows written while they followed.",
        received.iter().min().unwrap_or(&0),
        received.iter().max().unwrap_or(&0),
    );
    println!();
    print_cpu_table(
        &baselines,
        &[
            ("creations", &many, &many_cpu),
            ("updates", &updates, &updates_cpu),
        ],
    );
    println!();
    println!("| memory | MiB |");
    println!("|---|---|");
    for (name, mib) in &memory {
        println!("| {name} | {mib:.1} |");
    }
    println!();
    println!("| 256 entities x 6 values of 64 KB, all read once more | RSS MiB | documents cached | their estimated MiB |");
    println!("|---|---|---|---|");
    for (name, run) in [
        ("cache_bytes = 1 TiB (the count bound alone)", &unbounded),
        ("cache_bytes = 32 MiB", &bounded),
    ] {
        println!(
            "| {name} | {:.1} | {:.0} | {:.1} |",
            run.rss_mib, run.cached_documents, run.cached_mib
        );
    }
    println!();
    println!("| 256 entities x 6 values of 64 KB that do not compress (about 100 MB), cache_bytes = 32 MiB, read after a restart | RSS MiB |");
    println!("|---|---|");
    println!("| after the restart | {:.1} |", large[0]);
    println!("| after reading 128 of them once | {:.1} |", large[1]);
    println!("| after reading all 256 once | {:.1} |", large[2]);
    println!();
    println!("| bytes per 10-field entity | bytes | vs automerge save() |");
    println!("|---|---|---|");
    println!("| automerge save() | {saved:.0} | 1.00x |");
    println!(
        "| stored by Lockstep (record + snapshot + chunks) | {stored:.0} | {:.2}x |",
        stored / saved
    );
    println!(
        "| sled directory size / entities | {on_disk:.0} | {:.2}x |",
        on_disk / saved
    );
    Ok(())
}
