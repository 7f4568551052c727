//! The `lockstep` binary. `lockstep serve` runs the server: it reads the configuration (built-in
//! defaults, then `--config FILE`, then `LOCKSTEP_*` variables, then `--listen`/`--data-dir`),
//! binds the listen address, and runs `server::run` until SIGINT or SIGTERM, then shuts down
//! gracefully and exits 0.
//!
//! Logs go to stderr; `RUST_LOG` filters them (default `info`). Once the store is open and the
//! server takes requests, `serve` logs, at info level with target `lockstep` (see
//! `server::run_with_store`), a line that ends with `listening on <ip>:<port>`, with the real
//! bound address (so `--listen 127.0.0.1:0` reports the port it got), for example:
//!
//! ```text
//! 2026-11-23T10:00:00.000000Z  INFO lockstep: listening on 127.0.0.1:7878
//! ```
//!
//! Scripts and tests find the address by that `listening on ` text; keep it stable.
//! `lockstep connectors ...` calls the connector admin API of a running server (`admin`).
//! Everything else is the server's business (`crates/server`).

mod admin;

/// mimalloc rather than the system allocator: the write path allocates and frees many small
/// objects (Automerge ops, JSON values) on several threads, where glibc's malloc was a third of
/// the server's CPU time under load. It is built without transparent huge pages (`no_thp`):
/// with them, reusing memory it had returned made the kernel zero a fresh 2 MiB page each time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use server::{Config, ConfigSources};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Lockstep: entities as CRDT documents, kept in lock-step with every system that holds a copy.
#[derive(Parser)]
#[command(name = "lockstep", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the built-in configuration, with a comment on every setting, as a starting point
    /// for a `--config` file.
    DefaultConfig,
    /// Watch and steer connectors on a running server (see docs/connectors.md).
    Connectors {
        #[command(flatten)]
        remote: admin::Remote,
        #[command(subcommand)]
        command: admin::ConnectorCommand,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A TOML configuration file; `lockstep default-config` prints every setting.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The address to listen on, overriding the file and LOCKSTEP_LISTEN (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The data directory, overriding the file and LOCKSTEP_DATA_DIR.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Runs the command; an error ends the process with status 1 and one line on stderr that says
/// what failed and why (each cause after a colon), never a backtrace: anyhow prints one for an
/// error returned from `main` whenever `RUST_BACKTRACE` is set, which buried a configuration
/// error's message under frames of our own code.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Nothing more can be done when stderr itself is gone.
            let _ = writeln!(std::io::stderr(), "error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    init_tracing()?;
    match cli.command {
        Command::Serve(args) => {
            let config = load_config(args)?;
            let runtime = request_runtime(config.request_threads_nice)?;
            runtime.block_on(serve(config))
        }
        Command::DefaultConfig => std::io::stdout()
            .write_all(server::DEFAULT_TOML.as_bytes())
            .context("writing the configuration to stdout"),
        Command::Connectors { remote, command } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(admin::run(remote, command))
        }
    }
}

fn init_tracing() -> Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new("info"))
        .context("reading RUST_LOG")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr is a pipe whose reader went away) is
        // dropped. Reporting it would print to stderr with `eprintln!`, which panics when stderr
        // is broken: a thread that was logging died, and the server could no longer shut down.
        .log_internal_errors(false)
        .init();
    Ok(())
}

fn load_config(args: ServeArgs) -> Result<Config> {
    let sources = ConfigSources {
        file: args.config.as_deref(),
        env: std::env::vars().collect(),
        listen: args.listen,
        data_dir: args.data_dir,
    };
    match &args.config {
        Some(path) => Config::load(sources)
            .with_context(|| format!("loading the configuration with {}", path.display())),
        None => Config::load(sources).context("loading the configuration"),
    }
}

/// The runtime that serves requests. Each of its threads, workers and blocking threads alike,
/// lowers its own CPU priority by `nice` steps as it starts, so that when every core is busy the
/// store's writer thread (started from a thread of the process's priority, see `server::run`)
/// gets the CPU first: every write waits for it, while request threads can take what is left.
fn request_runtime(nice: u8) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if nice > 0 {
        builder.on_thread_start(move || lower_priority(nice));
    }
    builder.build().context("starting the tokio runtime")
}

/// Lowers the calling thread's priority by `nice` steps. On Linux `setpriority` with a thread
/// id applies to that thread only; threads it starts later inherit the value.
#[cfg(target_os = "linux")]
fn lower_priority(nice: u8) {
    use std::sync::atomic::{AtomicBool, Ordering};

    let thread = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(thread)).and_then(|current| {
        rustix::process::setpriority_process(Some(thread), current + i32::from(nice))
    });
    // Nothing depends on it but speed under full load; said once, not for every thread.
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(error) = lowered {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "cannot lower the request threads' CPU priority");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(_nice: u8) {}

async fn serve(config: Config) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    server::run(Arc::new(config), listener, shutdown)
        .await
        .context("running the server")?;
    Ok(())
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %error, "cannot listen for SIGINT; only SIGTERM stops the server");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for SIGTERM; only SIGINT stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
    shutdown.cancel();
}
