//! Replicating sites for the end-to-end tests and the benchmark: configuration snippets that
//! peer servers with each other, `lockstep serve` processes of the release binary that can be
//! killed with SIGKILL and restarted on the same port and data, and readers that compare what
//! several sites hold.
//!
//! In-process servers are `TestServer`s started with [`site_toml`]; processes are [`Process`]es.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::TIMEOUT;

/// A peer this site dials: its name here, its base URL and the token to present.
pub struct Dial<'a> {
    /// The peer's name here.
    pub name: &'a str,
    /// Its base URL, e.g. `http://127.0.0.1:7878`.
    pub url: &'a str,
    /// The token it accepts.
    pub token: &'a str,
}

/// The configuration of a site named `site` that accepts the peers in `accepts` (name, token)
/// and dials those in `dials`, reconnecting within `reconnect_max`.
pub fn site_toml(
    site: &str,
    accepts: &[(&str, &str)],
    dials: &[Dial<'_>],
    reconnect_max: &str,
) -> String {
    let mut toml = format!(
        "[replication]\nsite = \"{site}\"\nreconnect_min = \"50ms\"\nreconnect_max = \"{reconnect_max}\"\nidle_timeout = \"10s\"\n"
    );
    for (name, token) in accepts {
        toml.push_str(&format!(
            "[[replication.tokens]]\nname = \"{name}\"\ntoken = \"{token}\"\n"
        ));
    }
    for dial in dials {
        toml.push_str(&format!(
            "[[peers]]\nname = \"{}\"\nurl = \"{}\"\ntoken = \"{}\"\n",
            dial.name, dial.url, dial.token
        ));
    }
    toml
}

/// `target/release/lockstep`, which `.ci/run` builds before the tests.
///
/// # Errors
/// When it has not been built.
pub fn release_binary() -> Result<PathBuf> {
    // The test executable lives in target/<profile>/deps/; the binary in target/release/.
    let exe = std::env::current_exe().context("locating the test executable")?;
    // `target/<profile>/deps/<exe>`: the target directory is three levels up, also when
    // CARGO_TARGET_DIR names a directory that is not called `target`.
    let target = exe
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .or_else(|| exe.ancestors().nth(3))
        .map(Path::to_path_buf)
        .context("finding the target directory")?;
    let binary = target.join("release").join("lockstep");
    ensure!(
        binary.exists(),
        "{} is missing: run `cargo build --release -p lockstep-cli` first (.ci/run does)",
        binary.display()
    );
    Ok(binary)
}

/// A free port on 127.0.0.1, for a process that must come back on the same address.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running `lockstep serve` process.
pub struct Process {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Every line it has logged, when started with [`Process::start_capturing`].
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl Process {
    /// Starts `binary serve --config <config> --data-dir <data> --listen 127.0.0.1:<port>` and
    /// waits for its "listening on" line.
    ///
    /// # Errors
    /// When it does not start listening within the deadline.
    pub async fn start(binary: &Path, config: &Path, data: &Path, port: u16) -> Result<Self> {
        Self::spawn(binary, config, data, port, "info", false).await
    }

    /// [`Process::start`] with `RUST_LOG=<rust_log>`, keeping every line the process logs for
    /// [`Process::log`].
    ///
    /// # Errors
    /// When it does not start listening within the deadline.
    pub async fn start_capturing(
        binary: &Path,
        config: &Path,
        data: &Path,
        port: u16,
        rust_log: &str,
    ) -> Result<Self> {
        Self::spawn(binary, config, data, port, rust_log, true).await
    }

    /// The lines logged so far (empty unless started with [`Process::start_capturing`]).
    pub fn log(&self) -> Vec<String> {
        self.log.as_ref().map_or_else(Vec::new, |log| {
            log.lock().unwrap_or_else(|p| p.into_inner()).clone()
        })
    }

    async fn spawn(
        binary: &Path,
        config: &Path,
        data: &Path,
        port: u16,
        rust_log: &str,
        capture: bool,
    ) -> Result<Self> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting lockstep serve")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let mut lines = BufReader::new(stderr).lines();
        let log = capture.then(|| Arc::new(Mutex::new(Vec::new())));
        let keep = |line: String| keep_line(log.as_ref(), line);
        let wanted = format!("listening on 127.0.0.1:{port}");
        tokio::time::timeout(TIMEOUT * 2, async {
            while let Some(line) = lines.next_line().await? {
                let listening = line.contains(&wanted);
                keep(line);
                if listening {
                    return Ok(());
                }
            }
            bail!("lockstep serve exited before it was listening")
        })
        .await
        .context("waiting for the listening line")??;
        // Keep draining stderr so the child never blocks on a full pipe.
        let drained = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                keep_line(drained.as_ref(), line);
            }
        });
        Ok(Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process with SIGKILL and waits for it to be gone.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub async fn kill(mut self) -> Result<()> {
        self.child.start_kill().context("sending SIGKILL")?;
        tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .context("the killed process did not exit")??;
        Ok(())
    }
}

/// Adds `line` to `log`, when lines are kept.
fn keep_line(log: Option<&Arc<Mutex<Vec<String>>>>, line: String) {
    if let Some(log) = log {
        log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
}

/// Every entity of `kind` on the server at `base`, by id, with its version and fields.
///
/// # Errors
/// When the list cannot be read.
pub async fn entities(
    client: &reqwest::Client,
    base: &str,
    kind: &str,
) -> Result<BTreeMap<String, (String, Value)>> {
    let mut all = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/entities/{kind}?limit=1000");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let page: Value = client
            .get(&url)
            .timeout(TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for item in page["items"].as_array().context("a page has items")? {
            all.insert(
                item["id"].as_str().unwrap_or_default().to_string(),
                (
                    item["version"].as_str().unwrap_or_default().to_string(),
                    item["data"].clone(),
                ),
            );
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Ok(all),
        }
    }
}

/// Polls until every server in `bases` holds the same entities of `kind` at the same versions,
/// for at most `within`; returns what they hold.
///
/// # Errors
/// When they still differ at the deadline (the error shows how).
pub async fn converged(
    client: &reqwest::Client,
    bases: &[&str],
    kind: &str,
    within: Duration,
) -> Result<BTreeMap<String, (String, Value)>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let mut views = Vec::new();
        for base in bases {
            views.push(entities(client, base, kind).await?);
        }
        if views.iter().all(|view| view == &views[0]) {
            return Ok(views.swap_remove(0));
        }
        if tokio::time::Instant::now() >= deadline {
            let differing: Vec<&String> = views[0]
                .keys()
                .chain(views.iter().skip(1).flat_map(|view| view.keys()))
                .filter(|id| views.iter().any(|view| view.get(*id) != views[0].get(*id)))
                .take(5)
                .collect();
            bail!(
                "not converged after {within:?}: sizes {:?}, differing ids {differing:?}",
                views.iter().map(BTreeMap::len).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
