//! Where a change came from: a local user, a connector, a peer site or a client app.
//!
//! The origin is written into every Automerge change (as its commit message) and every feed row,
//! so history, blame and connectors can tell who wrote what.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The source of a change, written `<source>:<name>`, e.g. `local:alice`, `connector:scheduler`, `peer:north`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Origin(String);

/// The sources an origin may name.
const SOURCES: [&str; 4] = ["local", "connector", "peer", "client"];

impl Origin {
    /// Parses `<source>:<name>`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the source is not one of `local`, `connector`, `peer`, `client`,
    /// or the name is empty, longer than 128 bytes or outside `[A-Za-z0-9_.@-]`.
    pub fn parse(value: &str) -> Result<Self> {
        let invalid = |detail: String| Error::Invalid {
            what: "origin",
            detail,
        };
        let (source, name) = value
            .split_once(':')
            .ok_or_else(|| invalid(format!("{value:?} is not <source>:<name>")))?;
        if !SOURCES.contains(&source) {
            return Err(invalid(format!(
                "source {source:?} is not one of {}",
                SOURCES.join(", ")
            )));
        }
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'))
        {
            return Err(invalid(format!(
                "name {name:?} must be 1 to 128 characters of [A-Za-z0-9_.@-]"
            )));
        }
        Ok(Self(value.to_owned()))
    }

    /// A local user or API token, by name.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the name is not `[A-Za-z0-9_.@-]{1,128}`.
    pub fn local(name: &str) -> Result<Self> {
        Self::parse(&format!("local:{name}"))
    }

    /// The origin as written in history and the feed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Origin {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::parse(&value)
    }
}

impl From<Origin> for String {
    fn from(value: Origin) -> String {
        value.0
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests;
