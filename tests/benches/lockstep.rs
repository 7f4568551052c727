//! The issue-2 benchmark: durable PATCH throughput and latency against a raw sled baseline,
//! where the CPU went during the 64-connection phases (server and client CPU per write, and the
//! throughput that CPU per write would allow with every core busy), server memory after 100,000
//! entities, and bytes on disk per entity against Automerge's `save()`.
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
    closed_loop, env_number, print_cpu_table, release_binary, ten_fields, Baselines, CpuSample,
    Figures, Server,
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

/// Writes `count` entities with 64 connections, reporting RSS at each quarter.
async fn fill(server: &Server, count: u64, report: &mut Vec<(String, f64)>) -> Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let quarter = count / 4;
    let mut written = 0;
    while written < count {
        let target = (written + quarter).min(count);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let base = server.base.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= target {
                            next.fetch_sub(1, Ordering::Relaxed);
                            return Ok::<_, anyhow::Error>(());
                        }
                        client
                            .put(format!("{base}/v1/entities/memory/e{index}"))
                            .header("content-type", "application/json")
                            .body(ten_fields(index, 0).to_string())
                            .send()
                            .await?
                            .error_for_status()?;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        next.store(target, Ordering::Relaxed);
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
    drop(server);

    println!("measuring: memory with {entities} entities");
    let server = Server::start(&binary, "").await?;
    let mut memory = vec![("RSS at start".to_string(), server.rss_mib()?)];
    fill(&server, entities, &mut memory).await?;
    random_reads(&server, entities, 10_000).await?;
    memory.push((
        format!("RSS after 10,000 random reads of {entities}"),
        server.rss_mib()?,
    ));
    drop(server);

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
    ]);
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
