//! Replication settings: the `[replication]` section and the `[[peers]]` tables, as written in
//! the server's configuration, and their validation.
//!
//! `server` composes these structs into its `Config` tree and calls [`validate`] once at
//! startup; the rest of the crate works with the validated values only.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use store::Origin;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::frame::MAX_BATCH_ENTITIES;

/// The path of the replication endpoint on every site.
pub const ENDPOINT_PATH: &str = "/v1/replication";

/// The shortest `replication.idle_timeout` taken.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(1);

/// The longest `replication.idle_timeout` taken.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The `[replication]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReplicationSettings {
    /// This site's name, sent to peers in the hello; empty means one derived from the address
    /// the server listens on.
    pub site: String,
    /// The tokens peers present when they connect here, each naming the peer that holds it.
    pub tokens: Vec<PeerToken>,
    /// How many entities one batch brings up to date at most.
    pub batch_entities: usize,
    /// How many round trips one entity's sync session may take before it is reset.
    pub max_rounds: u32,
    /// The first pause before reconnecting to a peer that is down.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// The longest pause between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// A link that receives no byte from its peer for this long (pings are sent meanwhile), or
    /// whose send moves no byte for as long, is dropped. At least 1ms, at most 24h.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How many links peers may have accepted here at once (one peer at most
    /// `MAX_LINKS_PER_PEER` of them).
    pub max_connections: usize,
}

/// One `[[replication.tokens]]` entry: a token a peer presents, and that peer's name.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PeerToken {
    /// The peer's name here: its changes are recorded as `peer:<name>`.
    pub name: String,
    /// The secret.
    pub token: Token,
}

/// One `[[peers]]` table: a site this one connects to.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PeerConfig {
    /// The peer's name here: its changes are recorded as `peer:<name>`.
    pub name: String,
    /// The peer's base URL, e.g. `https://north.example:7878` (`http://`, `ws://` and `wss://`
    /// work too).
    pub url: String,
    /// The bearer token to present, one of the peer's `[[replication.tokens]]`.
    pub token: Token,
    /// A PEM file of certificate authorities to trust for this peer's certificate besides the
    /// public web's (a private CA); only with an `https://` or `wss://` url.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A secret token: its `Debug` prints `***`, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A configuration mistake, naming the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {detail}")]
pub struct ConfigError {
    /// The dotted key, e.g. `peers[north].url`.
    pub key: String,
    /// What is wrong with it.
    pub detail: String,
}

/// A peer this site dials, validated.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its name here.
    pub name: String,
    /// The base URL as configured.
    pub url: String,
    /// The websocket URL of its replication endpoint.
    pub endpoint: String,
    /// The `host:port` that endpoint connects to (an IPv6 literal in brackets).
    pub address: String,
    /// The token to present.
    pub token: Token,
    /// How to check its certificate, for a `wss://` endpoint; `None` for `ws://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Checks the settings and the peers, and derives each peer's endpoint URL.
///
/// # Errors
/// [`ConfigError`] naming the first invalid key: a bad or repeated name, a URL that is not
/// `http://` or `ws://`, an empty token, or a limit of zero.
pub fn validate(
    settings: &ReplicationSettings,
    peers: &[PeerConfig],
) -> Result<Vec<Peer>, ConfigError> {
    let invalid = |key: String, detail: String| Err(ConfigError { key, detail });
    if !settings.site.is_empty() && !is_name(&settings.site) {
        return invalid(
            "replication.site".into(),
            format!(
                "{:?} must be 1 to 128 characters of [A-Za-z0-9_.@-]",
                settings.site
            ),
        );
    }
    for (key, value) in [
        ("replication.batch_entities", settings.batch_entities),
        ("replication.max_rounds", settings.max_rounds as usize),
        ("replication.max_connections", settings.max_connections),
    ] {
        if value == 0 {
            return invalid(key.into(), "must be at least 1".into());
        }
    }
    if settings.batch_entities > MAX_BATCH_ENTITIES {
        return invalid(
            "replication.batch_entities".into(),
            format!("must be at most {MAX_BATCH_ENTITIES}"),
        );
    }
    for (key, value) in [
        ("replication.reconnect_min", settings.reconnect_min),
        ("replication.idle_timeout", settings.idle_timeout),
    ] {
        if value.is_zero() {
            return invalid(key.into(), "must be longer than zero".into());
        }
    }
    // The link adds the idle timeout to the current instant, which panics past what an
    // `Instant` holds (a "never" written as thousands of years); a day is plenty.
    if settings.idle_timeout > MAX_IDLE_TIMEOUT {
        return invalid(
            "replication.idle_timeout".into(),
            "must be at most 24h".into(),
        );
    }
    // Pings go out every third of it, and a period of zero (a timeout of a few nanoseconds)
    // would panic in every link.
    if settings.idle_timeout < MIN_IDLE_TIMEOUT {
        return invalid(
            "replication.idle_timeout".into(),
            "must be at least 1ms".into(),
        );
    }
    if settings.reconnect_max < settings.reconnect_min {
        return invalid(
            "replication.reconnect_max".into(),
            "must not be shorter than replication.reconnect_min".into(),
        );
    }
    let mut names = HashSet::new();
    let mut secrets = HashSet::new();
    for token in &settings.tokens {
        if !is_name(&token.name) {
            return invalid(
                "replication.tokens.name".into(),
                format!(
                    "{:?} must be 1 to 128 characters of [A-Za-z0-9_.@-]",
                    token.name
                ),
            );
        }
        if !names.insert(token.name.as_str()) {
            return invalid(
                "replication.tokens.name".into(),
                format!("{:?} is used twice", token.name),
            );
        }
        if !is_secret(token.token.expose()) {
            return invalid(
                "replication.tokens.token".into(),
                format!(
                    "the token of {:?} must be non-empty, without spaces or control characters",
                    token.name
                ),
            );
        }
        if !secrets.insert(token.token.expose()) {
            return invalid(
                "replication.tokens.token".into(),
                format!("the token of {:?} is also another peer's token", token.name),
            );
        }
    }
    let mut peer_names = HashSet::new();
    let mut validated = Vec::with_capacity(peers.len());
    for peer in peers {
        if !is_name(&peer.name) {
            return invalid(
                "peers.name".into(),
                format!(
                    "{:?} must be 1 to 128 characters of [A-Za-z0-9_.@-]",
                    peer.name
                ),
            );
        }
        if !peer_names.insert(peer.name.as_str()) {
            return invalid(
                "peers.name".into(),
                format!("{:?} is used twice", peer.name),
            );
        }
        if !is_secret(peer.token.expose()) {
            return invalid(
                format!("peers[{}].token", peer.name),
                "must be non-empty, without spaces or control characters".into(),
            );
        }
        let endpoint = endpoint_of(&peer.url).map_err(|detail| ConfigError {
            key: format!("peers[{}].url", peer.name),
            detail,
        })?;
        let address = address_of(&endpoint).map_err(|detail| ConfigError {
            key: format!("peers[{}].url", peer.name),
            detail,
        })?;
        let ca_file_error = |detail: String| ConfigError {
            key: format!("peers[{}].ca_file", peer.name),
            detail,
        };
        // An empty `ca_file` is no `ca_file`, as an empty `tls.cert_file` is no certificate.
        let ca_file = peer
            .ca_file
            .as_deref()
            .filter(|path| !path.as_os_str().is_empty());
        let tls = if endpoint.starts_with("wss://") {
            Some(crate::tls::client_config(ca_file).map_err(ca_file_error)?)
        } else if ca_file.is_some() {
            return Err(ca_file_error(
                "is only used with an https:// or wss:// url".into(),
            ));
        } else {
            None
        };
        validated.push(Peer {
            name: peer.name.clone(),
            url: peer.url.clone(),
            endpoint,
            address,
            token: peer.token.clone(),
            tls,
        });
    }
    Ok(validated)
}

/// The `host:port` a websocket URL connects to: its port, or its scheme's.
fn address_of(endpoint: &str) -> Result<String, String> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = endpoint
        .parse()
        .map_err(|error| format!("{endpoint:?} is not a valid URL: {error}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{endpoint:?} has no host"))?;
    let port = uri
        .port_u16()
        .or(match uri.scheme_str() {
            Some("wss") => Some(443),
            Some("ws") => Some(80),
            _ => None,
        })
        .ok_or_else(|| format!("{endpoint:?} has no port"))?;
    Ok(format!("{host}:{port}"))
}

/// The websocket URL of the replication endpoint under `base`.
fn endpoint_of(base: &str) -> Result<String, String> {
    let base = base.trim().trim_end_matches('/');
    let schemes = [
        ("http://", "ws://"),
        ("ws://", "ws://"),
        ("https://", "wss://"),
        ("wss://", "wss://"),
    ];
    // Schemes are case-insensitive (RFC 3986).
    let Some((scheme, rest)) = schemes.iter().find_map(|(given, scheme)| {
        let prefix = base.get(..given.len())?;
        prefix
            .eq_ignore_ascii_case(given)
            .then(|| (*scheme, &base[given.len()..]))
    }) else {
        return Err(format!(
            "{base:?} must start with https://, http://, wss:// or ws://"
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{base:?} has no host"));
    }
    // A path is kept as a prefix of the endpoint (a proxy that serves the site under one); a
    // query or fragment would end up in the middle of the endpoint's URL.
    if rest.contains(['?', '#']) {
        return Err(format!("{base:?} may not have a query or a fragment"));
    }
    let endpoint = format!("{scheme}{rest}{ENDPOINT_PATH}");
    endpoint
        .as_str()
        .into_client_request()
        .map_err(|error| format!("{base:?} is not a valid URL: {error}"))?;
    Ok(endpoint)
}

/// Whether `name` can follow `peer:` in an origin.
pub(crate) fn is_name(name: &str) -> bool {
    Origin::parse(&format!("peer:{name}")).is_ok()
}

fn is_secret(secret: &str) -> bool {
    !secret.is_empty() && !secret.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests;
