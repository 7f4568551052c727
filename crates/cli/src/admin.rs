//! `lockstep connectors ...`: the connector admin API from the command line.
//!
//! Each subcommand is one HTTP request to a running server; the answer is printed as pretty
//! JSON on stdout, and an error answer (`{"code", "detail"}`) is printed on stderr with exit
//! status 1. What the endpoints do is the server's business (docs/connectors.md).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the server is and how to authenticate.
#[derive(Args)]
pub(crate) struct Remote {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7878", global = true)]
    url: String,
    /// A bearer token (a write token for pause, resume, retry and replay).
    #[arg(long, global = true)]
    token: Option<String>,
    /// A PEM file of certificate authorities to trust for an https:// server besides the public
    /// web's (a private CA).
    #[arg(long, global = true, value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum ConnectorCommand {
    /// Every connector's state and lag.
    List,
    /// One connector's state, lag, last error and counters.
    Status {
        /// The connector's name.
        name: String,
    },
    /// Stop deliveries (webhooks are still accepted).
    Pause {
        /// The connector's name.
        name: String,
    },
    /// Resume deliveries, also after a 410 disabled the connector.
    Resume {
        /// The connector's name.
        name: String,
    },
    /// The dead-lettered deltas.
    DeadLetters {
        /// The connector's name.
        name: String,
    },
    /// Take an entity out of the dead letters and deliver its current delta now.
    Retry {
        /// The connector's name.
        name: String,
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
    },
    /// Resend entities as if the external system had none of their fields.
    Replay {
        /// The connector's name.
        name: String,
        /// Every entity changed after this feed sequence number.
        #[arg(long, conflicts_with_all = ["entity", "all"])]
        since_seq: Option<u64>,
        /// One entity, as KIND/ID.
        #[arg(long, conflicts_with = "all")]
        entity: Option<String>,
        /// Every entity the system was sent or sent us, and every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// The exact delta that would be sent for an entity now (nothing is sent).
    Preview {
        /// The connector's name.
        name: String,
        /// The entity's kind.
        kind: String,
        /// The entity's id.
        id: String,
    },
}

/// Runs one admin subcommand against `remote`.
pub(crate) async fn run(remote: Remote, command: ConnectorCommand) -> Result<()> {
    let (method, path, body) = match command {
        ConnectorCommand::List => ("GET", "/v1/connectors".to_string(), None),
        ConnectorCommand::Status { name } => ("GET", format!("/v1/connectors/{name}"), None),
        ConnectorCommand::Pause { name } => ("POST", format!("/v1/connectors/{name}/pause"), None),
        ConnectorCommand::Resume { name } => {
            ("POST", format!("/v1/connectors/{name}/resume"), None)
        }
        ConnectorCommand::DeadLetters { name } => {
            ("GET", format!("/v1/connectors/{name}/dead-letters"), None)
        }
        ConnectorCommand::Retry { name, kind, id } => (
            "POST",
            format!("/v1/connectors/{name}/dead-letters/{kind}/{id}/retry"),
            None,
        ),
        ConnectorCommand::Replay {
            name,
            since_seq,
            entity,
            all,
        } => {
            let body = match (since_seq, entity, all) {
                (Some(since), None, false) => json!({ "since_seq": since }),
                (None, Some(entity), false) => {
                    let (kind, id) = entity
                        .split_once('/')
                        .context("--entity is KIND/ID, e.g. appointment/123")?;
                    json!({ "entity": { "kind": kind, "id": id } })
                }
                (None, None, true) => json!({ "all": true }),
                _ => bail!("give one of --since-seq N, --entity KIND/ID or --all"),
            };
            ("POST", format!("/v1/connectors/{name}/replay"), Some(body))
        }
        ConnectorCommand::Preview { name, kind, id } => (
            "GET",
            format!("/v1/connectors/{name}/preview/{kind}/{id}"),
            None,
        ),
    };
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(ca_file) = &remote.ca_file {
        if !remote.url.to_ascii_lowercase().starts_with("https://") {
            bail!("--ca-file is only used with an https:// --url");
        }
        let pem = std::fs::read(ca_file)
            .with_context(|| format!("reading --ca-file {}", ca_file.display()))?;
        let authorities = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("--ca-file {} is not PEM", ca_file.display()))?;
        if authorities.is_empty() {
            bail!("--ca-file {} holds no PEM certificate", ca_file.display());
        }
        for authority in authorities {
            client = client.add_root_certificate(authority);
        }
    }
    let client = client.build().context("building the HTTP client")?;
    let url = format!("{}{path}", remote.url.trim_end_matches('/'));
    let mut request = match method {
        "GET" => client.get(&url),
        _ => client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.unwrap_or_else(|| json!({})).to_string()),
    };
    if let Some(token) = &remote.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let text = response.text().await.context("reading the answer")?;
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if status.is_success() {
        use std::io::Write;
        let printed = writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&answer)?
        );
        match printed {
            // A reader that stops early (`| head`) is not an error.
            Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("writing the answer"),
        }
    } else {
        bail!(
            "{url} answered {status}: {} ({})",
            answer["detail"].as_str().unwrap_or("no detail"),
            answer["code"].as_str().unwrap_or("no code")
        )
    }
}
