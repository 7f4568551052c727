//! Shared pieces of the benchmarks in `tests/benches`: the raw sled baseline every figure is
//! compared with, latency summaries, and a release `lockstep serve` process to measure.
//!
//! Only the benchmarks use this module; tests do not.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A whole-number setting from the environment, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var_os(name)
        .and_then(|value| value.to_str()?.parse().ok())
        .unwrap_or(default)
}

/// Throughput and latency of one phase.
pub struct Figures {
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

/// Throughput and percentiles of `latencies` measured over `elapsed`.
pub fn summarize(mut latencies: Vec<Duration>, elapsed: Duration) -> Figures {
    latencies.sort();
    let at = |quantile: f64| {
        latencies
            .get(
                ((latencies.len() as f64 * quantile) as usize)
                    .min(latencies.len().saturating_sub(1)),
            )
            .copied()
            .unwrap_or_default()
    };
    Figures {
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// The raw sled baseline: `threads` threads, each inserting a 200-byte value and flushing, one
/// after another, for `seconds`.
///
/// # Errors
/// When sled fails.
pub fn sled_baseline(seconds: u64, threads: usize) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let db = raw_sled(dir.path())?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..threads)
        .map(|thread| {
            let db = db.clone();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let mut latencies = Vec::new();
                let value = vec![7u8; 200];
                let mut counter = 0u64;
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    db.insert(format!("t{thread}-{counter}"), value.as_slice())?;
                    db.flush()?;
                    latencies.push(begun.elapsed());
                    counter += 1;
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("a baseline thread panicked")?);
    }
    let figures = summarize(latencies, started.elapsed());
    drop(db);
    dir.close()?;
    settle_disk()?;
    Ok(figures)
}

/// Runs `sync`, so that the next measurement does not start while the kernel writes back what
/// the last one left (a removed data directory's writeback took a later phase's p99 from a few
/// milliseconds to tens of them).
///
/// # Errors
/// When `sync` cannot be run or fails.
pub fn settle_disk() -> Result<()> {
    let status = std::process::Command::new("sync").status()?;
    ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// A fresh sled database in `dir`, configured as every raw-sled measurement here is.
fn raw_sled(dir: &Path) -> Result<sled::Db> {
    Ok(sled::Config::new()
        .path(dir)
        .cache_capacity(64 * 1024 * 1024)
        .open()?)
}

/// The floor of a durable write over HTTP, at one connection for `seconds`: a server on its own
/// 2-worker tokio runtime (as `lockstep serve` runs on this machine) whose one route, `POST /`,
/// inserts the body (200 bytes) into raw sled under a new key and flushes, inline on the
/// request's worker, with nothing else: no parsing, no hand-off to another thread. No request
/// of Lockstep's that makes a write durable can be faster at one connection; measured beside
/// the baselines, it says how much of the 1-thread baseline HTTP alone leaves for everything
/// else. The server is stopped, its directory removed and the disk settled before it returns.
///
/// # Errors
/// When sled, the listener or a request fails.
pub async fn sled_over_http(seconds: u64) -> Result<Figures> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir()?;
    let db = raw_sled(dir.path())?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}/", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let counter = Arc::new(AtomicU64::new(0));
    let server = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let put = move |body: axum::body::Bytes| {
                let (db, counter) = (db.clone(), Arc::clone(&counter));
                async move {
                    let key = counter.fetch_add(1, Ordering::Relaxed).to_be_bytes();
                    match db.insert(key, body.as_ref()).and_then(|_| db.flush()) {
                        Ok(_) => axum::http::StatusCode::NO_CONTENT,
                        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    }
                }
            };
            let app = axum::Router::new().route("/", axum::routing::post(put));
            axum::serve(tokio::net::TcpListener::from_std(listener)?, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await?;
            Ok(())
        })
    });
    let figures = closed_loop("sled writes over HTTP", 1, seconds, move |client, _, _| {
        client.post(&url).body(vec![7u8; 200])
    })
    .await;
    let _ = stop.send(());
    tokio::task::spawn_blocking(move || -> Result<()> {
        server.join().expect("the floor's server thread panicked")?;
        dir.close()?;
        settle_disk()
    })
    .await??;
    figures
}

/// The two baselines every throughput figure is set against, measured in the same run: the
/// issues' target baseline of 8 threads, and 1 thread, the like of a single connection (whose
/// requests each wait for their own flush, so it can only be as fast as one flushing thread).
pub struct Baselines {
    /// 8 threads of insert+flush.
    pub eight: Figures,
    /// 1 thread of insert+flush.
    pub one: Figures,
}

impl Baselines {
    /// Measures both, `seconds` each, printing what it measures.
    ///
    /// # Errors
    /// When sled fails.
    pub async fn measure(seconds: u64) -> Result<Self> {
        println!("measuring: raw sled insert+flush baselines ({seconds} s, 8 threads, then 1)");
        let eight = tokio::task::spawn_blocking(move || sled_baseline(seconds, 8)).await??;
        let one = tokio::task::spawn_blocking(move || sled_baseline(seconds, 1)).await??;
        Ok(Self { eight, one })
    }

    /// Prints the throughput table: both baselines, then `rows`, each with its rate against
    /// the 8-thread baseline (the target's) and the 1-thread one.
    pub fn print_table(&self, rows: &[(&str, &Figures)]) {
        println!("| measurement | ops/s | p50 | p99 | vs baseline (8 threads) | vs 1 thread |");
        println!("|---|---|---|---|---|---|");
        let baselines = [
            ("baseline: raw sled insert+flush, 8 threads", &self.eight),
            ("raw sled insert+flush, 1 thread", &self.one),
        ];
        for (name, figures) in baselines.iter().chain(rows) {
            println!(
                "| {name} | {:.0} | {} | {} | {:.2}x | {:.2}x |",
                figures.ops_per_sec,
                ms(figures.p50),
                ms(figures.p99),
                figures.ops_per_sec / self.eight.ops_per_sec,
                figures.ops_per_sec / self.one.ops_per_sec
            );
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// Builds and locates the release `lockstep` binary, or returns the one `LOCKSTEP_BENCH_BINARY`
/// names without building anything.
///
/// # Errors
/// When the build fails.
pub fn release_binary() -> Result<PathBuf> {
    // A binary built elsewhere (another checkout, for an A/B comparison) is run as it is.
    if let Some(binary) = std::env::var_os("LOCKSTEP_BENCH_BINARY") {
        let mut binary = PathBuf::from(binary);
        // `cargo bench` runs this in the package's directory; a relative path is taken from
        // the workspace root, where the command is usually typed.
        if binary.is_relative() {
            binary = workspace_root().join(binary);
        }
        ensure!(
            binary.is_file(),
            "LOCKSTEP_BENCH_BINARY names {}, which is not a file",
            binary.display()
        );
        return Ok(binary);
    }
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "lockstep-cli"])
        .current_dir(workspace_root())
        .status()
        .context("building the release binary")?;
    if !status.success() {
        bail!("cargo build --release -p lockstep-cli failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release").join("lockstep"))
}

/// A release `lockstep serve` on 127.0.0.1:0 over a fresh data directory; killed on drop.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    data: tempfile::TempDir,
}

impl Server {
    /// Starts the server with a configuration file holding `config`.
    ///
    /// # Errors
    /// When it does not start listening within 30 s.
    pub async fn start(binary: &Path, config: &str) -> Result<Self> {
        let data = tempfile::tempdir()?;
        std::fs::write(data.path().join("lockstep.toml"), config)?;
        let (child, base) = spawn(binary, data.path()).await?;
        Ok(Self { child, base, data })
    }

    /// Kills the server (as `kill -9` would) and starts it again on the same data and
    /// configuration, so that what it holds in memory is what it read since.
    ///
    /// # Errors
    /// When it cannot be killed, or does not start listening again within 30 s.
    pub async fn restart(&mut self, binary: &Path) -> Result<()> {
        self.child.kill().await?;
        let (child, base) = spawn(binary, self.data.path()).await?;
        self.child = child;
        self.base = base;
        Ok(())
    }

    /// Kills the server, waits for it to exit, removes its data directory and syncs every
    /// file system, so that what comes next is not measured against the kernel writing back
    /// and freeing this server's data (after the webhook phases, that took the next phase's
    /// first-second p99 from 1.5–3.6 ms to 27–44 ms).
    ///
    /// # Errors
    /// When the process cannot be killed, the directory removed or `sync` run.
    pub async fn finish(mut self) -> Result<()> {
        self.child.kill().await?;
        let data = self.data;
        tokio::task::spawn_blocking(move || {
            data.close()?;
            settle_disk()
        })
        .await?
    }

    /// The server's resident memory, in MiB.
    ///
    /// # Errors
    /// When /proc cannot be read.
    pub fn rss_mib(&self) -> Result<f64> {
        let pid = self.child.id().context("the server has exited")?;
        status_mib(pid, "VmRSS")
    }
}

/// Runs the server on `data/data` with the configuration file `data/lockstep.toml`, and
/// waits until it listens; returns the process and its base URL.
async fn spawn(binary: &Path, data: &Path) -> Result<(Child, String)> {
    let mut child = Command::new(binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.join("data"))
        .arg("--config")
        .arg(data.join("lockstep.toml"))
        .env("RUST_LOG", "warn,lockstep=info,server=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let base = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("listening") {
                if let Some(start) = line.find("127.0.0.1:") {
                    let port: String = line[start + 10..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    return Ok(format!("http://127.0.0.1:{port}"));
                }
            }
        }
        bail!("the server exited before listening")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, base))
}

/// A memory figure of process `pid` from `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...), in MiB.
///
/// # Errors
/// When /proc cannot be read or has no such field.
pub fn status_mib(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))?;
    Ok(kib / 1024.0)
}

/// CPU time used so far by a process and by the whole machine, to work out where a phase's CPU
/// went (see [`CpuSample::since`]).
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    at: Instant,
    server: f64,
    writer: f64,
    client: f64,
    machine_busy: f64,
    cpus: f64,
}

/// Where the CPU went during a phase.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    /// The server's CPU time, in cores (1.0 = one core busy all the time).
    pub server_cores: f64,
    /// The CPU time of the server's store writer thread(s), in cores.
    pub writer_cores: f64,
    /// This benchmark process's CPU time (the client), in cores.
    pub client_cores: f64,
    /// The whole machine's busy time, in cores, everything included.
    pub machine_cores: f64,
    /// The cores the machine has (the `cpuN` lines of /proc/stat).
    pub cores: f64,
}

impl CpuSample {
    /// Takes a sample of `server`'s, this process's and the machine's CPU time.
    ///
    /// # Errors
    /// When /proc cannot be read.
    pub fn take(server: &Server) -> Result<Self> {
        let pid = server.child.id().context("the server has exited")?;
        let (machine_busy, cpus) = machine_cpu()?;
        Ok(Self {
            at: Instant::now(),
            server: process_cpu_seconds(&format!("/proc/{pid}/stat"))?,
            writer: writer_cpu_seconds(pid)?,
            client: process_cpu_seconds("/proc/self/stat")?,
            machine_busy,
            cpus,
        })
    }

    /// The CPU used between `earlier` and this sample, per second of wall time.
    pub fn since(&self, earlier: &CpuSample) -> CpuUse {
        let wall = (self.at - earlier.at).as_secs_f64().max(1e-9);
        CpuUse {
            server_cores: (self.server - earlier.server) / wall,
            writer_cores: (self.writer - earlier.writer) / wall,
            client_cores: (self.client - earlier.client) / wall,
            machine_cores: (self.machine_busy - earlier.machine_busy) / wall,
            cores: self.cpus,
        }
    }
}

/// Prints where the CPU went during each phase of `rows`: the server's and this client's CPU per
/// request, how busy the store's writer thread and the machine were, and the requests a second
/// the same work would give with every core busy, against the 8-thread baseline.
pub fn print_cpu_table(baselines: &Baselines, rows: &[(&str, &Figures, &CpuUse)]) {
    println!(
        "| where the CPU went (64 connections) | server CPU per request | client CPU per request | writer thread busy | machine busy | requests/s with every core busy | vs baseline |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, figures, cpu) in rows {
        let per_op = |cores: f64| cores / figures.ops_per_sec * 1e6;
        // What the server and this client spend per request, spread over every core: the most
        // requests a second this machine could serve with this code, if nothing else ran.
        let ceiling = cpu.cores / ((cpu.server_cores + cpu.client_cores) / figures.ops_per_sec);
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0}% of a core | {:.0}% of {:.0} cores | {ceiling:.0} | {:.2}x |",
            per_op(cpu.server_cores),
            per_op(cpu.client_cores),
            100.0 * cpu.writer_cores,
            100.0 * cpu.machine_cores / cpu.cores,
            cpu.cores,
            ceiling / baselines.eight.ops_per_sec
        );
    }
}

/// Clock ticks per second of /proc's CPU times: Linux reports them in USER_HZ, which its ABI
/// fixes at 100 on every architecture it runs this project on (x86-64, arm64).
const USER_HZ: f64 = 100.0;

/// User plus system CPU seconds of the process whose `stat` file is `path`.
fn process_cpu_seconds(path: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // The command name is in parentheses and may hold spaces; the fields after it start with
    // the state (field 3), so utime and stime (fields 14 and 15) are the 12th and 13th.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("a /proc stat line")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        Ok(fields
            .get(index)
            .context("utime and stime in /proc stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// User plus system CPU seconds of the threads of process `pid` named `lockstep-writer`.
fn writer_cpu_seconds(pid: u32) -> Result<f64> {
    let mut seconds = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        // A thread that ended between the listing and the read counts for nothing.
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if name.trim_end() == "lockstep-writer" {
            seconds += process_cpu_seconds(&task.join("stat").to_string_lossy())?;
        }
    }
    Ok(seconds)
}

/// The CPU seconds the whole machine has spent busy (anything but idle and waiting for IO), and
/// how many CPUs it has, from /proc/stat.
fn machine_cpu() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("the cpu line of /proc/stat")?;
    let values = line
        .split_whitespace()
        .skip(1)
        .map(|value| value.parse::<f64>())
        .collect::<Result<Vec<f64>, _>>()
        .context("the cpu line of /proc/stat")?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&index| {
            values
                .get(index)
                .context("8 counters on the cpu line of /proc/stat")
        })
        .sum::<Result<f64>>()?;
    let cpus = stat
        .lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .count();
    Ok((busy / USER_HZ, cpus.max(1) as f64))
}

/// A duration in milliseconds, for tables.
pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// A closed-loop load: `connections` tasks, each with its own HTTP client, sending the request
/// `request(client, connection, round)` builds, one after another, for `seconds`.
///
/// # Errors
/// When any request fails or answers other than 2xx (`what` names them in the error).
pub async fn closed_loop<F>(
    what: &str,
    connections: u64,
    seconds: u64,
    request: F,
) -> Result<Figures>
where
    F: Fn(&reqwest::Client, u64, u64) -> reqwest::RequestBuilder + Clone + Send + 'static,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|connection| {
            let request = request.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut latencies = Vec::new();
                let mut failures = 0u64;
                let mut round = 0u64;
                while Instant::now() < deadline {
                    let begun = Instant::now();
                    match request(&client, connection, round).send().await {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            latencies.push(begun.elapsed());
                        }
                        _ => failures += 1,
                    }
                    round += 1;
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        let (task_latencies, task_failures) = task.await?;
        latencies.extend(task_latencies);
        failures += task_failures;
    }
    if failures > 0 {
        bail!("{failures} {what} failed");
    }
    Ok(summarize(latencies, started.elapsed()))
}

/// The value of the gauge or counter `name` (without labels) in the `/metrics` of the server at
/// `base`.
///
/// # Errors
/// When `/metrics` cannot be read or has no such line.
pub async fn metric(base: &str, name: &str) -> Result<f64> {
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await?
        .text()
        .await?;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("{name} in {base}/metrics"))
}

/// Sends the requests `request(client, index)` builds for every index in `indexes`, over
/// `connections` connections, as fast as they are answered.
///
/// # Errors
/// When any request fails or answers other than 2xx.
pub async fn send_all<F>(connections: u64, indexes: std::ops::Range<u64>, request: F) -> Result<()>
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Clone + Send + 'static,
{
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(indexes.start));
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (next, request, end) = (next.clone(), request.clone(), indexes.end);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if index >= end {
                        return Ok::<_, anyhow::Error>(());
                    }
                    request(&client, index).send().await?.error_for_status()?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The ten fields of benchmark entity `index` as written in round `round` (fixed, no randomness).
pub fn ten_fields(index: u64, round: u64) -> serde_json::Value {
    let mut fields = serde_json::Map::new();
    fields.insert(
        "date".into(),
        serde_json::json!(format!("2026-12-{:02}", 1 + (index + round) % 28)),
    );
    fields.insert("slot".into(), serde_json::json!((index * 7 + round) % 96));
    fields.insert(
        "status".into(),
        serde_json::json!(["booked", "moved", "done"][(round % 3) as usize]),
    );
    fields.insert(
        "office".into(),
        serde_json::json!(format!("office-{}", index % 50)),
    );
    fields.insert(
        "applicant".into(),
        serde_json::json!(format!("applicant {index}")),
    );
    fields.insert("permit".into(), serde_json::json!(format!("P-{index:08}")));
    fields.insert("priority".into(), serde_json::json!(index % 5));
    fields.insert(
        "confirmed".into(),
        serde_json::json!(round.is_multiple_of(2)),
    );
    fields.insert(
        "notes".into(),
        serde_json::json!(format!("round {round} for {index}")),
    );
    fields.insert("updated".into(), serde_json::json!(1_790_000_000 + round));
    serde_json::Value::Object(fields)
}
