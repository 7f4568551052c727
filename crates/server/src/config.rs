//! The server's configuration: one `Config` tree, read once at startup and shared as `Arc<Config>`.
//!
//! Layers, each overriding the one before: the defaults in `config.default.toml` (compiled in),
//! a TOML file, `LOCKSTEP_*` environment variables, and the `--listen`/`--data-dir` flags.
//! Every struct denies unknown fields, so a misspelt key is an error that names it rather than a
//! setting silently ignored, and `Config::load` validates the result once, so the rest of the
//! server never re-checks a value. This module never reads the process environment itself:
//! the caller (the `lockstep` binary) passes the variables in.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use store::{Origin, StoreConfig, SyncMode};
use toml::{Table, Value};

#[cfg(test)]
mod tests;

/// The built-in defaults, with a comment on every setting.
pub const DEFAULT_TOML: &str = include_str!("../config.default.toml");

/// The largest `request_threads_nice`: Linux nice values end at 19.
const MAX_NICE: u8 = 19;

/// The most writer threads a store may run; more only contend with each other.
const MAX_WRITER_THREADS: usize = 64;

/// The smallest `store.cache_bytes`: below it even small documents would hardly stay loaded
/// (each weighs at least 16 KiB, see `StoreStats::cached_document_bytes`).
const MIN_CACHE_BYTES: u64 = 1024 * 1024;

/// The longest `limits.request_timeout`, `header_read_timeout` and `write_timeout`.
const MAX_LIMIT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The environment variables the server reads, each with the key it sets and how its value is typed.
const ENV_KEYS: &[(&str, &[&str], EnvValue)] = &[
    ("LOCKSTEP_LISTEN", &["listen"], EnvValue::Text),
    (
        "LOCKSTEP_REQUEST_THREADS_NICE",
        &["request_threads_nice"],
        EnvValue::Integer,
    ),
    ("LOCKSTEP_DATA_DIR", &["store", "data_dir"], EnvValue::Text),
    (
        "LOCKSTEP_CACHE_ENTRIES",
        &["store", "cache_entries"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_CACHE_BYTES",
        &["store", "cache_bytes"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_SYNC_MODE",
        &["store", "sync_mode"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_COMPACT_AFTER_CHUNKS",
        &["store", "compact_after_chunks"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_SLED_CACHE_BYTES",
        &["store", "sled_cache_bytes"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_WRITER_THREADS",
        &["store", "writer_threads"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_TLS_CERT_FILE",
        &["tls", "cert_file"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_TLS_KEY_FILE",
        &["tls", "key_file"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_TLS_RELOAD_INTERVAL",
        &["tls", "reload_interval"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_MAX_BODY_BYTES",
        &["limits", "max_body_bytes"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_REQUEST_TIMEOUT",
        &["limits", "request_timeout"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_HEADER_READ_TIMEOUT",
        &["limits", "header_read_timeout"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_MAX_CONCURRENT_REQUESTS",
        &["limits", "max_concurrent_requests"],
        EnvValue::Integer,
    ),
    (
        "LOCKSTEP_SHUTDOWN_GRACE",
        &["limits", "shutdown_grace"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_WRITE_TIMEOUT",
        &["limits", "write_timeout"],
        EnvValue::Text,
    ),
    (
        "LOCKSTEP_MAX_EVENT_STREAMS",
        &["limits", "max_event_streams"],
        EnvValue::Integer,
    ),
    ("LOCKSTEP_SITE", &["replication", "site"], EnvValue::Text),
    (
        "LOCKSTEP_AUTH_TOKENS",
        &["auth", "tokens"],
        EnvValue::Tokens,
    ),
];

/// `LOCKSTEP_*` variables that belong to the test and benchmark tooling, not to the server;
/// they are inherited by servers those tools start, so they are ignored rather than refused.
const TOOLING_ENV_PREFIXES: &[&str] = &["LOCKSTEP_PROPTEST_", "LOCKSTEP_TEST_", "LOCKSTEP_BENCH_"];

#[derive(Clone, Copy)]
enum EnvValue {
    Text,
    Integer,
    /// `name:role:token` entries separated by commas.
    Tokens,
}

/// Everything the server is configured with.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// The address `lockstep serve` listens on.
    pub listen: SocketAddr,
    /// How many nice steps below the process the threads that serve requests run (tokio's worker
    /// and blocking threads), so that the store's writer thread gets the CPU first when every
    /// core is busy; 0 to 19, 0 to run them alike. Applied by the `lockstep` binary, on Linux.
    pub request_threads_nice: u8,
    /// Where and how entities are stored.
    pub store: StoreSettings,
    /// Request limits and timeouts.
    pub limits: Limits,
    /// Who may call the API.
    pub auth: AuthSettings,
    /// Whether to serve HTTPS, and with which certificate.
    pub tls: TlsSettings,
    /// The server side of TLS, loaded from `tls` at startup; `None` serves plain HTTP.
    #[serde(skip)]
    pub tls_acceptor: Option<crate::tls::Acceptor>,
    /// Connectors to external systems (`[[connectors]]`), as written.
    #[serde(default)]
    pub connectors: Vec<connectors::ConnectorConfig>,
    /// The same connectors, validated (secrets parsed, `${NAME}` in headers resolved).
    #[serde(skip)]
    pub validated_connectors: Vec<connectors::Connector>,
    /// This site's name, the tokens peers present, and how replication batches and reconnects.
    pub replication: replication::ReplicationSettings,
    /// Sites this one connects to (`[[peers]]`), as written.
    #[serde(default)]
    pub peers: Vec<replication::PeerConfig>,
    /// The same peers, validated (with their websocket endpoints).
    #[serde(skip)]
    pub validated_peers: Vec<replication::Peer>,
}

/// The `[store]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreSettings {
    /// The sled directory.
    pub data_dir: PathBuf,
    /// How many documents to keep loaded at most.
    pub cache_entries: usize,
    /// How much memory the loaded documents may take at most, in bytes (estimated).
    pub cache_bytes: u64,
    /// Which failure an acknowledged write survives.
    pub sync_mode: SyncMode,
    /// Compact an entity's incremental chunks into a snapshot once it has this many.
    pub compact_after_chunks: u32,
    /// sled's own page cache, in bytes.
    pub sled_cache_bytes: u64,
    /// How many threads apply queued writes.
    pub writer_threads: usize,
}

impl StoreSettings {
    /// How to open the store these settings describe.
    pub fn store_config(&self) -> StoreConfig {
        let mut config = StoreConfig::new(&self.data_dir);
        config.cache_entries = self.cache_entries;
        config.cache_bytes = self.cache_bytes;
        config.sync_mode = self.sync_mode;
        config.compact_after_chunks = self.compact_after_chunks;
        config.sled_cache_bytes = self.sled_cache_bytes;
        config.writer_threads = self.writer_threads;
        config
    }
}

/// The `[tls]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TlsSettings {
    /// The PEM file with the server's certificate and any intermediates; empty for plain HTTP.
    pub cert_file: PathBuf,
    /// The PEM file with the certificate's private key; empty for plain HTTP.
    pub key_file: PathBuf,
    /// How often to check the two files for a renewed certificate; zero never checks.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// The `[limits]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long a request may take until its response starts.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a client may take to send a request's headers (and an idle connection may stay open).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How many `/v1` requests are handled at once; more are refused with 503.
    pub max_concurrent_requests: usize,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a response may wait for the client to take any of it before the connection is
    /// closed (a client that stopped reading).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How many change feed event streams may be open at once; more are refused with 503.
    pub max_event_streams: usize,
}

/// The `[auth]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthSettings {
    /// The accepted bearer tokens; none means the API is open.
    pub tokens: Vec<TokenSettings>,
}

/// One `[[auth.tokens]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenSettings {
    /// Who holds the token; writes made with it are recorded as `local:<name>`.
    pub name: String,
    /// The secret itself.
    pub token: Secret,
    /// What the token may do.
    pub role: Role,
}

/// What a token may do.
///
/// More roles (`admin`, `replication`) will join these as the endpoints that need them arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// Read entities and the change feed.
    Read,
    /// Everything `Read` may do, and write entities.
    Write,
}

impl Role {
    /// Whether this role may change entities.
    pub fn is_writer(self) -> bool {
        matches!(self, Self::Write)
    }
}

/// A secret string: its `Debug` prints `***`, so it never reaches a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    /// Accepts only a string, and on anything else says so without echoing the value, which
    /// serde's usual "invalid type: integer `12345`" would print into a startup error.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret(value.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(E::custom("a token must be a string"))
            }

            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(E::custom("a token must be a string"))
            }

            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(E::custom("a token must be a string"))
            }

            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(E::custom("a token must be a string"))
            }
        }

        deserializer.deserialize_string(SecretVisitor)
    }
}

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for comparing with what a client presents.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a configuration comes from; every source but the defaults is optional.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources<'a> {
    /// A TOML file (`--config FILE`).
    pub file: Option<&'a Path>,
    /// The environment; only variables starting with `LOCKSTEP_` are looked at.
    pub env: Vec<(String, String)>,
    /// `--listen ADDR`, which overrides every other source.
    pub listen: Option<SocketAddr>,
    /// `--data-dir DIR`, which overrides every other source.
    pub data_dir: Option<PathBuf>,
}

/// Why a configuration could not be loaded; every variant names the key, variable or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file (or the built-in defaults) is not valid TOML.
    #[error("{origin} is not valid TOML")]
    Syntax {
        /// Which source.
        origin: String,
        /// Where and why, as the TOML parser says it.
        #[source]
        source: toml::de::Error,
    },
    /// A `LOCKSTEP_` environment variable that is not a setting.
    #[error(
        "unknown environment variable {name}; the settings are {}",
        ENV_KEYS.iter().map(|(name, _, _)| *name).collect::<Vec<_>>().join(", ")
    )]
    UnknownVariable {
        /// The variable.
        name: String,
    },
    /// An environment variable whose value does not fit its setting.
    #[error("environment variable {name}: {detail}")]
    BadVariable {
        /// The variable.
        name: String,
        /// What is wrong with its value.
        detail: String,
    },
    /// A key that is unknown, missing or of the wrong type, after all sources are combined.
    #[error("configuration key `{key}`: {detail}")]
    Invalid {
        /// The dotted key (`limits.max_body_bytes`), or the section holding an unknown key.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
}

impl Config {
    /// Combines the defaults with `sources` and validates the result.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or key that is unreadable, unknown or invalid.
    pub fn load(sources: ConfigSources<'_>) -> Result<Self, ConfigError> {
        let mut table = parse_toml(DEFAULT_TOML, "the built-in defaults")?;
        if let Some(path) = sources.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            merge(&mut table, parse_toml(&text, &path.display().to_string())?);
        }
        // Connector headers may name any environment variable as `${NAME}`.
        let env_map: std::collections::BTreeMap<String, String> =
            sources.env.iter().cloned().collect();
        let from_env = apply_env(&mut table, sources.env)?;
        let named = |error: ConfigError| name_variable(error, &from_env);
        let entries = entry_names(&table);
        let mut config: Config = serde_path_to_error::deserialize(Value::Table(table))
            .map_err(|error| {
                let key = error.path().to_string();
                ConfigError::Invalid {
                    key: if key == "." {
                        "(top level)".into()
                    } else {
                        by_name(key, &entries)
                    },
                    // toml appends the key path on a second line; the key is already named.
                    detail: error
                        .into_inner()
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                }
            })
            .map_err(named)?;
        if let Some(listen) = sources.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = sources.data_dir {
            config.store.data_dir = data_dir;
        }
        config.validate().map_err(named)?;
        config.validated_peers = replication::validate(&config.replication, &config.peers)
            .map_err(|error| ConfigError::Invalid {
                key: error.key,
                detail: error.detail,
            })?;
        config.validated_connectors = connectors::validate_all(&config.connectors, &env_map)
            .map_err(|error| ConfigError::Invalid {
                key: format!("connectors[{}].{}", error.name, error.key),
                detail: error.detail,
            })?;
        config.tls_acceptor = crate::tls::acceptor(&config.tls)
            .map_err(|(key, detail)| ConfigError::Invalid {
                key: key.into(),
                detail,
            })
            .map_err(named)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, detail: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                detail: detail.into(),
            })
        };
        if self.request_threads_nice > MAX_NICE {
            return invalid(
                "request_threads_nice",
                &format!("must be between 0 and {MAX_NICE}"),
            );
        }
        if self.store.data_dir.as_os_str().is_empty() {
            return invalid("store.data_dir", "must not be empty");
        }
        if self.store.cache_entries == 0 {
            return invalid("store.cache_entries", "must be at least 1");
        }
        if self.store.cache_bytes < MIN_CACHE_BYTES {
            return invalid(
                "store.cache_bytes",
                &format!("must be at least {MIN_CACHE_BYTES} (1 MiB)"),
            );
        }
        if self.store.compact_after_chunks == 0 {
            return invalid("store.compact_after_chunks", "must be at least 1");
        }
        if !(1..=MAX_WRITER_THREADS).contains(&self.store.writer_threads) {
            return invalid(
                "store.writer_threads",
                &format!("must be between 1 and {MAX_WRITER_THREADS}"),
            );
        }
        if self.limits.max_body_bytes == 0 {
            return invalid("limits.max_body_bytes", "must be at least 1");
        }
        if self.limits.max_concurrent_requests == 0 {
            return invalid("limits.max_concurrent_requests", "must be at least 1");
        }
        // A semaphore holds at most this many permits.
        if self.limits.max_concurrent_requests > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid("limits.max_concurrent_requests", "is too large");
        }
        if self.limits.max_event_streams == 0 {
            return invalid("limits.max_event_streams", "must be at least 1");
        }
        if self.limits.max_event_streams > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid("limits.max_event_streams", "is too large");
        }
        for (key, duration) in [
            ("limits.request_timeout", self.limits.request_timeout),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
            ("limits.write_timeout", self.limits.write_timeout),
        ] {
            if duration.is_zero() {
                return invalid(key, "must be longer than zero");
            }
            // hyper adds the header read timeout to the current instant, which panics past what
            // an `Instant` holds (a "never" written as thousands of years); a day is plenty.
            if duration > MAX_LIMIT_TIMEOUT {
                return invalid(key, "must be at most 24h");
            }
        }
        let mut names = HashSet::new();
        let mut secrets = HashSet::new();
        for token in &self.auth.tokens {
            if Origin::local(&token.name).is_err() {
                return invalid(
                    "auth.tokens.name",
                    &format!(
                        "{:?} must be 1 to 128 characters of [A-Za-z0-9_.@-]",
                        token.name
                    ),
                );
            }
            if !names.insert(token.name.as_str()) {
                return invalid(
                    "auth.tokens.name",
                    &format!("{:?} is used twice", token.name),
                );
            }
            let secret = token.token.expose();
            if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return invalid(
                    "auth.tokens.token",
                    &format!(
                        "the token of {:?} must be non-empty, without spaces or control characters",
                        token.name
                    ),
                );
            }
            if !secrets.insert(secret) {
                // Saying which token repeats would hint at its value; the name is enough.
                return invalid(
                    "auth.tokens.token",
                    &format!("the token of {:?} is also another name's token", token.name),
                );
            }
        }
        Ok(())
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|source| ConfigError::Syntax {
        origin: origin.into(),
        source,
    })
}

/// Overlays `overlay` on `base`: tables merge key by key, anything else is replaced whole.
fn merge(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(overlay_table)) => {
                merge(base_table, overlay_table);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Names the environment variable behind a key in an error about that key's value, since the
/// person who set `LOCKSTEP_WRITER_THREADS=0` may never have seen `store.writer_threads`.
/// Each `[[peers]]` and `[[connectors]]` entry that has a `name`, as the key prefix serde gives
/// a mistake in it (`peers[0]`) and the one the other errors use (`peers[north]`).
fn entry_names(table: &toml::Table) -> Vec<(String, String)> {
    let mut names = Vec::new();
    for list in ["peers", "connectors"] {
        let Some(Value::Array(entries)) = table.get(list) else {
            continue;
        };
        for (index, entry) in entries.iter().enumerate() {
            if let Some(Value::String(name)) = entry.get("name") {
                names.push((format!("{list}[{index}]"), format!("{list}[{name}]")));
            }
        }
    }
    names
}

/// `key` with an entry's index replaced by its name (see [`entry_names`]).
fn by_name(key: String, entries: &[(String, String)]) -> String {
    for (indexed, named) in entries {
        if let Some(rest) = key.strip_prefix(indexed.as_str()) {
            if rest.is_empty() || rest.starts_with('.') {
                return format!("{named}{rest}");
            }
        }
    }
    key
}

fn name_variable(error: ConfigError, from_env: &[(String, &'static str)]) -> ConfigError {
    match error {
        ConfigError::Invalid { key, detail } => {
            let detail = match from_env.iter().find(|(path, _)| *path == key) {
                Some((_, variable)) => {
                    format!("{detail} (set by the environment variable {variable})")
                }
                None => detail,
            };
            ConfigError::Invalid { key, detail }
        }
        other => other,
    }
}

/// Applies the `LOCKSTEP_*` variables to `table`; returns the dotted key each one set.
fn apply_env(
    table: &mut Table,
    env: Vec<(String, String)>,
) -> Result<Vec<(String, &'static str)>, ConfigError> {
    let mut applied = Vec::new();
    for (name, raw) in env {
        if !name.starts_with("LOCKSTEP_")
            || TOOLING_ENV_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        {
            continue;
        }
        let Some((variable, path, kind)) = ENV_KEYS.iter().find(|(known, _, _)| *known == name)
        else {
            return Err(ConfigError::UnknownVariable { name });
        };
        let bad = |detail: String| ConfigError::BadVariable {
            name: name.clone(),
            detail,
        };
        let value = match kind {
            EnvValue::Text => Value::String(raw),
            EnvValue::Integer => Some(raw.trim())
                // Digits, as TOML writes a whole number: `parse` would also take `+5`.
                .filter(|text| {
                    let digits = text.strip_prefix('-').unwrap_or(text);
                    !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
                })
                .and_then(|text| text.parse::<i64>().ok())
                .map(Value::Integer)
                .ok_or_else(|| bad(format!("{raw:?} is not a whole number")))?,
            // An empty list would silently open an API the file protects: refuse it.
            EnvValue::Tokens if raw.trim().is_empty() => {
                return Err(bad(
                    "is empty; unset it to keep the file's tokens (an empty list would turn authentication off)"
                        .into(),
                ))
            }
            EnvValue::Tokens => parse_env_tokens(&raw).map_err(bad)?,
        };
        set_path(table, path, value);
        applied.push((path.join("."), *variable));
    }
    Ok(applied)
}

/// Parses `name:role:token,name:role:token` into the array `[[auth.tokens]]` would give.
fn parse_env_tokens(raw: &str) -> Result<Value, String> {
    let mut tokens = Vec::new();
    for (index, entry) in raw.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(role), Some(token)) = (parts.next(), parts.next(), parts.next())
        else {
            // Only the entry's position: the entry itself holds a secret.
            return Err(format!("entry {} is not name:role:token", index + 1));
        };
        let mut entry = Table::new();
        entry.insert("name".into(), Value::String(name.into()));
        entry.insert("role".into(), Value::String(role.into()));
        entry.insert("token".into(), Value::String(token.into()));
        tokens.push(Value::Table(entry));
    }
    // Only separators (`,`, say from a template whose variables were unset) would turn
    // authentication off as surely as an empty value.
    if tokens.is_empty() {
        return Err(
            "holds no name:role:token entry; unset it to keep the file's tokens (an empty list would turn authentication off)"
                .into(),
        );
    }
    Ok(Value::Array(tokens))
}

fn set_path(table: &mut Table, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = table;
    for parent in parents {
        let entry = current
            .entry((*parent).to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        current = match entry {
            Value::Table(next) => next,
            // Made a table just above.
            _ => return,
        };
    }
    current.insert((*last).to_string(), value);
}
