//! The issue-4 benchmark: a site catching up from empty on 10,000 entities x 10 fields from
//! another over loopback, next to the same run's baseline of raw Automerge merges of the same
//! documents in one process; the receiving site's peak memory; and catching up after a
//! partition during which both sites made 500 edits each.
//!
//! Run with `cargo bench -p lockstep-tests --bench replication` (it builds the release
//! `lockstep` binary first). `LOCKSTEP_BENCH_ENTITIES` sets the entity count (default 10,000),
//! `LOCKSTEP_BENCH_EDITS` the partition's edits (default 1,000).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use automerge::transaction::Transactable;
use automerge::{Automerge, ROOT};
use lockstep_tests::bench::{env_number, metric, release_binary, send_all, status_mib, ten_fields};
use lockstep_tests::sites::{converged, free_port, site_toml, Dial, Process};
use serde_json::{json, Map, Value};

fn fields(index: u64) -> Map<String, Value> {
    match ten_fields(index, 0) {
        Value::Object(fields) => fields,
        _ => unreachable!("ten_fields builds an object"),
    }
}

/// The baseline: the documents built in memory, then each merged into an empty document
/// (and, separately, each decoded from its saved bytes into an empty document).
fn automerge_baseline(entities: u64) -> Result<(Duration, Duration)> {
    let mut documents = Vec::with_capacity(entities as usize);
    for index in 0..entities {
        let mut doc = Automerge::new();
        let mut transaction = doc.transaction();
        for (name, value) in fields(index) {
            match value {
                Value::String(text) => transaction.put(ROOT, name, text)?,
                Value::Number(number) => {
                    transaction.put(ROOT, name, number.as_i64().unwrap_or_default())?
                }
                Value::Bool(flag) => transaction.put(ROOT, name, flag)?,
                other => bail!("unexpected field value {other}"),
            }
        }
        transaction.commit();
        documents.push(doc);
    }
    let saved: Vec<Vec<u8>> = documents.iter().map(Automerge::save).collect();
    let started = Instant::now();
    for doc in &mut documents {
        let mut target = Automerge::new();
        target.merge(doc)?;
        assert_eq!(target.get_heads(), doc.get_heads());
    }
    let merge = started.elapsed();
    let started = Instant::now();
    for bytes in &saved {
        let mut target = Automerge::new();
        target.load_incremental(bytes)?;
    }
    Ok((merge, started.elapsed()))
}

/// PATCHes `count` entities' fields over `connections` connections.
async fn fill(base: &str, first: u64, count: u64, connections: u64) -> Result<()> {
    let base = base.to_string();
    send_all(connections, first..first + count, move |client, index| {
        client
            .patch(format!("{base}/v1/entities/permit/p{index}"))
            .header("content-type", "application/merge-patch+json")
            .body(Value::Object(fields(index)).to_string())
    })
    .await
}

/// `count` one-field edits of existing entities, `offset` apart so two sites edit different ones.
async fn edit(base: &str, entities: u64, count: u64, offset: u64) -> Result<()> {
    let client = reqwest::Client::new();
    for edit in 0..count {
        let index = (edit * 7919 + offset) % entities;
        client
            .patch(format!("{base}/v1/entities/permit/p{index}"))
            .header("content-type", "application/merge-patch+json")
            .body(json!({ "notes": format!("edit {edit} from {offset}") }).to_string())
            .send()
            .await?
            .error_for_status()?;
    }
    Ok(())
}

/// Polls `base`'s status of `peer` until it has consumed at least `head` rows of the peer's feed
/// and nothing is outstanding either way; returns when that happened.
async fn caught_up(base: &str, peer: &str, head: u64, deadline: Duration) -> Result<Instant> {
    let client = reqwest::Client::new();
    let until = Instant::now() + deadline;
    loop {
        let status: Value = client
            .get(format!("{base}/v1/peers/{peer}"))
            .send()
            .await?
            .json()
            .await?;
        if status["cursor"].as_u64() >= Some(head)
            && status["behind_in"] == 0
            && status["behind_out"] == 0
        {
            return Ok(Instant::now());
        }
        if Instant::now() > until {
            bail!("{base} did not catch up with {peer} in {deadline:?}: {status}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn feed_head(base: &str) -> Result<u64> {
    // A whole number, written as one.
    Ok(metric(base, "lockstep_feed_seq").await? as u64)
}

fn write_config(dir: &Path, name: &str, toml: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml)?;
    Ok(path)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let entities = env_number("LOCKSTEP_BENCH_ENTITIES", 10_000);
    let edits = env_number("LOCKSTEP_BENCH_EDITS", 1_000);
    let binary = release_binary()?;
    let root = tempfile::tempdir()?;

    println!("measuring: baseline, raw Automerge merges of {entities} documents in one process");
    let (merge, decode) =
        tokio::task::spawn_blocking(move || automerge_baseline(entities)).await??;

    let (source_port, receiver_port) = (free_port()?, free_port()?);
    let source_url = format!("http://127.0.0.1:{source_port}");
    let receiver_url = format!("http://127.0.0.1:{receiver_port}");
    let source_config = write_config(
        root.path(),
        "source",
        &site_toml("source", &[("receiver", "tok-receiver")], &[], "1s"),
    )?;
    let receiver_config = write_config(
        root.path(),
        "receiver",
        &site_toml(
            "receiver",
            &[],
            &[Dial {
                name: "source",
                url: &source_url,
                token: "tok-receiver",
            }],
            "200ms",
        ),
    )?;
    let (source_data, receiver_data) = (root.path().join("source"), root.path().join("receiver"));
    let source = Process::start(&binary, &source_config, &source_data, source_port).await?;
    println!("filling the source with {entities} entities x 10 fields");
    fill(&source_url, 0, entities, 32).await?;
    let head = feed_head(&source_url).await?;

    println!("measuring: catch-up from empty over loopback");
    let started = Instant::now();
    let receiver = Process::start(&binary, &receiver_config, &receiver_data, receiver_port).await?;
    let done = caught_up(&receiver_url, "source", head, Duration::from_secs(600)).await?;
    let catch_up = done - started;
    let peak = status_mib(receiver.id().context("the receiver runs")?, "VmHWM")?;
    let client = reqwest::Client::new();
    let held = converged(
        &client,
        &[&source_url, &receiver_url],
        "permit",
        Duration::from_secs(60),
    )
    .await?;
    if held.len() as u64 != entities {
        bail!("the receiver holds {} of {entities} entities", held.len());
    }

    println!("measuring: catch-up after a partition with {edits} edits, half on each side");
    receiver.kill().await?;
    edit(&source_url, entities, edits / 2, 0).await?;
    // The receiver edits its own copies while cut off, then reconnects.
    let alone = write_config(root.path(), "alone", &site_toml("receiver", &[], &[], "1s"))?;
    let cut_off = Process::start(&binary, &alone, &receiver_data, receiver_port).await?;
    edit(&receiver_url, entities, edits - edits / 2, 1).await?;
    let (source_head, receiver_head) = (
        feed_head(&source_url).await?,
        feed_head(&receiver_url).await?,
    );
    cut_off.kill().await?;
    let started = Instant::now();
    let receiver = Process::start(&binary, &receiver_config, &receiver_data, receiver_port).await?;
    let limit = Duration::from_secs(120);
    let receiver_done = caught_up(&receiver_url, "source", source_head, limit).await?;
    let source_done = caught_up(&source_url, "receiver", receiver_head, limit).await?;
    let partition = receiver_done.max(source_done) - started;
    converged(
        &client,
        &[&source_url, &receiver_url],
        "permit",
        Duration::from_secs(120),
    )
    .await?;
    drop(receiver);
    drop(source);

    println!();
    println!("| measurement | time | vs merge baseline | vs decode baseline |");
    println!("|---|---|---|---|");
    println!(
        "| baseline: raw Automerge merge of {entities} in-memory documents into empty ones | {:.0} ms | 1.00x | |",
        merge.as_secs_f64() * 1000.0
    );
    println!(
        "| baseline: raw Automerge decode of {entities} saved documents into empty ones | {:.0} ms | | 1.00x |",
        decode.as_secs_f64() * 1000.0
    );
    println!(
        "| catch-up from empty, {entities} x 10 fields, two servers on loopback | {:.0} ms | {:.2}x | {:.2}x |",
        catch_up.as_secs_f64() * 1000.0,
        catch_up.as_secs_f64() / merge.as_secs_f64(),
        catch_up.as_secs_f64() / decode.as_secs_f64()
    );
    println!(
        "| catch-up after a partition with {edits} edits (both ways, until equal) | {:.0} ms | | |",
        partition.as_secs_f64() * 1000.0
    );
    println!();
    println!("| receiving side | MiB |");
    println!("|---|---|");
    println!("| peak RSS (VmHWM) during catch-up from empty | {peak:.1} |");
    Ok(())
}
