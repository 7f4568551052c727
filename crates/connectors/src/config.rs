//! A connector's configuration: the `[[connectors]]` tables of the server's config file, and
//! their validation into a ready-to-use [`Connector`].
//!
//! Validation happens once at start; every error names the connector and the key. Secrets are
//! parsed here (an empty or malformed `whsec_` secret is a configuration error) and header values
//! may refer to environment variables as `${NAME}`, resolved from the environment the caller passes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use store::Kind;

use crate::mapping::{FieldSpec, Mapping, MappingError};
use crate::signature::WebhookSecret;

/// A string that must not appear in logs; its `Debug` prints `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A duration written as text (`"500ms"`, `"5s"`, `"30m"`, `"2h"`, `"4d"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextDuration(pub Duration);

impl<'de> Deserialize<'de> for TextDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(TextDuration)
            .map_err(|error| serde::de::Error::custom(format!("{text:?} is not a duration ({error}); write e.g. \"5s\", \"30m\", \"2h\", \"4d\"")))
    }
}

/// The HTTP method outbound deltas use.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeliveryMethod {
    /// `POST` (the default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
}

impl DeliveryMethod {
    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
        }
    }
}

/// Outbound retry settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// The wait before each attempt after the first failure; the last entry repeats.
    #[serde(default = "default_schedule")]
    pub schedule: Vec<TextDuration>,
    /// Each wait is randomly shortened or lengthened by up to this fraction (0 to 1).
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_schedule() -> Vec<TextDuration> {
    ["0s", "5s", "30s", "5m", "30m", "2h", "6h", "12h"]
        .iter()
        .map(|text| {
            TextDuration(humantime::parse_duration(text).expect("the default schedule parses"))
        })
        .collect()
}

fn default_jitter() -> f64 {
    0.2
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            schedule: default_schedule(),
            jitter: default_jitter(),
        }
    }
}

/// One `[[connectors]]` table as written.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    /// Unique; used in URLs and in the origin `connector:<name>`.
    pub name: String,
    /// The entity kind it syncs.
    pub kind: String,
    /// The external field that carries the entity id.
    pub id_field: String,
    /// Where outbound deltas go; none for an inbound-only connector.
    #[serde(default)]
    pub url: Option<String>,
    /// The outbound HTTP method.
    #[serde(default)]
    pub method: DeliveryMethod,
    /// Signs outbound requests per Standard Webhooks when set.
    #[serde(default)]
    pub signing_secret: Option<SecretString>,
    /// Verifies inbound webhooks; required to accept them.
    #[serde(default)]
    pub webhook_secret: Option<SecretString>,
    /// Extra outbound headers; `${NAME}` in a value is replaced by that environment variable.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// An inbound field whose value orders deltas; older ones are acknowledged and ignored.
    #[serde(default)]
    pub version_field: Option<String>,
    /// External field name = entity field path (or a table with casts).
    pub fields: BTreeMap<String, FieldSpec>,
    /// Outbound retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The outbound request timeout.
    #[serde(default = "default_timeout")]
    pub timeout: TextDuration,
    /// How many entities are delivered at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long inbound webhook ids are remembered for deduplication.
    #[serde(default = "default_retention")]
    pub dedupe_retention: TextDuration,
    /// How many remembered webhook ids are indexed in memory; ids past it are kept in a slower
    /// layout (see `inbox`).
    #[serde(default = "default_index_ids")]
    pub dedupe_index_ids: usize,
    /// How far a webhook's timestamp may be from now.
    #[serde(default = "default_tolerance")]
    pub timestamp_tolerance: TextDuration,
}

fn default_timeout() -> TextDuration {
    TextDuration(Duration::from_secs(10))
}
fn default_concurrency() -> usize {
    8
}
/// The default `dedupe_index_ids`: as many as fit a table of 2^20 slots (see `inbox`).
pub(crate) const DEFAULT_INDEX_IDS: usize = 900_000;

fn default_index_ids() -> usize {
    DEFAULT_INDEX_IDS
}
fn default_retention() -> TextDuration {
    TextDuration(Duration::from_secs(4 * 24 * 3600 + 3600))
}
fn default_tolerance() -> TextDuration {
    TextDuration(Duration::from_secs(300))
}

/// A connector configuration that names what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connectors[{name}].{key}: {detail}")]
pub struct ConfigError {
    /// The connector (its name, or its position when the name is unusable).
    pub name: String,
    /// The offending key.
    pub key: String,
    /// What is wrong.
    pub detail: String,
}

/// A validated connector, ready to run.
#[derive(Clone, Debug)]
pub struct Connector {
    /// Its name.
    pub name: String,
    /// The kind it syncs.
    pub kind: Kind,
    /// Its field mapping.
    pub mapping: Mapping,
    /// Where deltas go (absent for inbound-only).
    pub url: Option<String>,
    /// The outbound method.
    pub method: DeliveryMethod,
    /// The outbound signing key.
    pub signing_secret: Option<WebhookSecret>,
    /// The inbound verification key.
    pub webhook_secret: Option<WebhookSecret>,
    /// Outbound headers, resolved.
    pub headers: Vec<(String, SecretString)>,
    /// The inbound ordering field.
    pub version_field: Option<String>,
    /// Waits between attempts.
    pub retry_schedule: Vec<Duration>,
    /// Jitter fraction.
    pub retry_jitter: f64,
    /// Outbound request timeout.
    pub timeout: Duration,
    /// Entities delivered at once.
    pub concurrency: usize,
    /// Inbound id retention.
    pub dedupe_retention: Duration,
    /// The most webhook ids new webhooks add to the in-memory index.
    pub dedupe_index_ids: usize,
    /// Inbound timestamp tolerance.
    pub timestamp_tolerance: Duration,
}

/// Outbound headers Lockstep sets on every delivery (or that HTTP framing owns); a configured
/// one would be sent beside Lockstep's own and make them ambiguous.
const RESERVED_HEADERS: [&str; 12] = [
    "idempotency-key",
    "lockstep-version",
    "lockstep-previous-version",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "te",
];

impl ConnectorConfig {
    /// Validates this table. `env` resolves `${NAME}` in header values.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key.
    pub fn validate(&self, env: &BTreeMap<String, String>) -> Result<Connector, ConfigError> {
        let error = |key: &str, detail: String| ConfigError {
            name: self.name.clone(),
            key: key.to_string(),
            detail,
        };
        if self.name.is_empty()
            || self.name == "."
            || self.name == ".."
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(error(
                "name",
                "must be 1 to 64 characters of [A-Za-z0-9_.-]".into(),
            ));
        }
        let kind = Kind::new(self.kind.clone()).map_err(|e| error("kind", e.to_string()))?;
        if self.fields.is_empty() {
            return Err(error(
                "fields",
                "maps no field; a connector needs at least one".into(),
            ));
        }
        let mapping = Mapping::new(&self.id_field, &self.fields).map_err(|e| match e {
            MappingError::Invalid { key, detail } if key == "id_field" => error("id_field", detail),
            other => error("fields", other.to_string()),
        })?;
        if let Some(url) = &self.url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|e| error("url", format!("{url:?} is not a URL: {e}")))?;
            if url.chars().any(char::is_whitespace) {
                return Err(error(
                    "url",
                    format!("{url:?} contains whitespace; percent-encode it (%20)"),
                ));
            }
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(error(
                    "url",
                    format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        let secret = |key: &str, value: &Option<SecretString>| {
            value
                .as_ref()
                .map(|secret| {
                    WebhookSecret::parse(&secret.0).map_err(|e| error(key, e.to_string()))
                })
                .transpose()
        };
        let signing_secret = secret("signing_secret", &self.signing_secret)?;
        let webhook_secret = secret("webhook_secret", &self.webhook_secret)?;
        if self.url.is_none() && webhook_secret.is_none() {
            return Err(error(
                "url",
                "a connector needs a url (outbound), a webhook_secret (inbound), or both".into(),
            ));
        }
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(error(
                    &format!("headers.{name}"),
                    "is not a valid header name".into(),
                ));
            }
            if RESERVED_HEADERS
                .iter()
                .any(|reserved| reserved.eq_ignore_ascii_case(name))
            {
                return Err(error(
                    &format!("headers.{name}"),
                    "is set by Lockstep itself (idempotency, versions, signature, or HTTP \
                     framing); it cannot be configured"
                        .into(),
                ));
            }
            let resolved = resolve_env(&value.0, env)
                .map_err(|detail| error(&format!("headers.{name}"), detail))?;
            if resolved.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(error(
                    &format!("headers.{name}"),
                    "contains a line break".into(),
                ));
            }
            headers.push((name.clone(), SecretString(resolved)));
        }
        if let Some(field) = &self.version_field {
            if field.is_empty() {
                return Err(error("version_field", "must not be empty".into()));
            }
            if field == &self.id_field || self.fields.contains_key(field) {
                return Err(error(
                    "version_field",
                    format!("{field:?} is the id field or a mapped field; it must be a field of its own"),
                ));
            }
        }
        for (key, duration) in [
            ("dedupe_retention", self.dedupe_retention.0),
            ("timestamp_tolerance", self.timestamp_tolerance.0),
        ] {
            if duration.is_zero() {
                return Err(error(key, "must be more than zero".into()));
            }
        }
        // Timestamps are whole seconds, and the check counts them so.
        let tolerance = self.timestamp_tolerance.0;
        if tolerance.subsec_nanos() != 0 {
            return Err(error(
                "timestamp_tolerance",
                "must be a whole number of seconds".into(),
            ));
        }
        // An id forgotten while its signed webhook is still within the tolerance could be
        // replayed by whoever captured it, and applied again. A webhook stamped `tolerance` in
        // the future is remembered from when it arrives and stays acceptable for twice the
        // tolerance from then.
        if self.dedupe_retention.0 < tolerance.saturating_mul(2) {
            return Err(error(
                "dedupe_retention",
                "must be at least twice timestamp_tolerance, or a captured webhook could be replayed once its id is forgotten".into(),
            ));
        }
        if self.retry.schedule.is_empty() {
            return Err(error("retry.schedule", "needs at least one entry".into()));
        }
        if !(0.0..=1.0).contains(&self.retry.jitter) {
            return Err(error("retry.jitter", "must be between 0 and 1".into()));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(error("concurrency", "must be between 1 and 1024".into()));
        }
        if self.timeout.0.is_zero() {
            return Err(error("timeout", "must be more than zero".into()));
        }
        Ok(Connector {
            name: self.name.clone(),
            kind,
            mapping,
            url: self.url.clone(),
            method: self.method,
            signing_secret,
            webhook_secret,
            headers,
            version_field: self.version_field.clone(),
            retry_schedule: self.retry.schedule.iter().map(|d| d.0).collect(),
            retry_jitter: self.retry.jitter,
            timeout: self.timeout.0,
            concurrency: self.concurrency,
            dedupe_retention: self.dedupe_retention.0,
            dedupe_index_ids: self.dedupe_index_ids,
            timestamp_tolerance: self.timestamp_tolerance.0,
        })
    }
}

/// Validates every connector and checks that names are unique.
///
/// # Errors
/// The first [`ConfigError`].
pub fn validate_all(
    configs: &[ConnectorConfig],
    env: &BTreeMap<String, String>,
) -> Result<Vec<Connector>, ConfigError> {
    let mut connectors: Vec<Connector> = Vec::new();
    for config in configs {
        let connector = config.validate(env)?;
        if connectors.iter().any(|other| other.name == connector.name) {
            return Err(ConfigError {
                name: connector.name,
                key: "name".into(),
                detail: "is used by another connector".into(),
            });
        }
        connectors.push(connector);
    }
    Ok(connectors)
}

fn resolve_env(value: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "has an unclosed ${".to_string())?;
        let name = &after[..end];
        let resolved = env.get(name).ok_or_else(|| {
            format!("refers to the environment variable {name}, which is not set")
        })?;
        out.push_str(resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
