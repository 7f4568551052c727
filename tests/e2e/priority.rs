//! Thread priorities of the release binary: the threads that serve requests run
//! `request_threads_nice` steps below the store's writer and flush threads, which keep the
//! process's priority, so that under full load every write's one shared thread gets the CPU first.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use lockstep_tests::poll_until;
use lockstep_tests::sites::{free_port, release_binary, Process};

/// Each thread's name and nice value, read from `/proc/<pid>/task`.
fn thread_nices(pid: u32) -> Result<Vec<(String, i64)>> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        // A thread may end between the listing and the reads.
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        // The fields after the name in parentheses, from the state (field 3) on; nice is field 19.
        let after_name = stat
            .rsplit_once(')')
            .context("a stat line without a name")?
            .1;
        let nice = after_name
            .split_whitespace()
            .nth(16)
            .context("a stat line without a nice value")?
            .parse()?;
        threads.push((name.trim().to_string(), nice));
    }
    Ok(threads)
}

/// Starts the release binary with `toml`, serves one request and returns the nice values of its
/// threads by name, once tokio's worker threads exist.
async fn nices_with(toml: &str, dir: &Path) -> Result<BTreeMap<String, Vec<i64>>> {
    let config = dir.join("lockstep.toml");
    std::fs::write(&config, toml)?;
    let process =
        Process::start(&release_binary()?, &config, &dir.join("data"), free_port()?).await?;
    let response = reqwest::Client::new()
        .put(format!("{}/v1/entities/probe/p1", process.base))
        .header("content-type", "application/json")
        .body(r#"{"a": 1}"#)
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    let pid = process.id().context("the process has exited")?;
    let nices = poll_until("tokio's worker threads", || async {
        let mut by_name = BTreeMap::<String, Vec<i64>>::new();
        for (name, nice) in thread_nices(pid)? {
            by_name.entry(name).or_default().push(nice);
        }
        Ok(by_name.contains_key("tokio-rt-worker").then_some(by_name))
    })
    .await?;
    process.kill().await?;
    Ok(nices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_threads_run_below_the_writer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nices = nices_with("", dir.path()).await?;
    let process_nice = nices["lockstep"][0];
    // The defaults: tokio's threads 5 steps below the process (Linux stops at 19, for a test
    // run under `nice` already), the store's own threads at it.
    let lowered = (process_nice + 5).min(19);
    assert!(
        nices["tokio-rt-worker"].iter().all(|nice| *nice == lowered),
        "{nices:?}"
    );
    for name in ["lockstep-writer", "lockstep-flush"] {
        assert_eq!(nices[name], vec![process_nice], "{name}: {nices:?}");
    }

    let dir = tempfile::tempdir()?;
    let nices = nices_with("request_threads_nice = 0\n", dir.path()).await?;
    assert!(
        nices.values().flatten().all(|nice| *nice == process_nice),
        "with 0 every thread runs alike: {nices:?}"
    );
    Ok(())
}
