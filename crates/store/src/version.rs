//! Versions: the heads of an entity's Automerge document, as one opaque string.
//!
//! The string is the sorted head hashes in hex joined by `.`; callers should treat it as opaque
//! and only hand it back (as an `ETag`, an `If-Match` or an `?at=`).

use std::fmt;

use automerge::ChangeHash;

use crate::error::{Error, Result};
use crate::key::EntityKey;

/// A document version: the set of heads it was at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Version(Vec<ChangeHash>);

/// More heads than any real document has concurrently; bounds the parse of hostile input.
const MAX_HEADS: usize = 64;

impl Version {
    /// The version of a document at these heads.
    pub fn from_heads(mut heads: Vec<ChangeHash>) -> Self {
        heads.sort();
        heads.dedup();
        Self(heads)
    }

    /// Parses a version string produced by `Version`'s `Display`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when it is not 1 to 64 `.`-separated 64-digit hex hashes.
    pub fn parse(value: &str) -> Result<Self> {
        let invalid = |detail: String| Error::Invalid {
            what: "version",
            detail,
        };
        let value = value.trim();
        // An ETag's quotes, both or neither.
        let value = match value.strip_prefix('"') {
            Some(quoted) => quoted.strip_suffix('"').ok_or_else(|| {
                invalid("a quoted version must end with its closing quote".into())
            })?,
            None => value,
        };
        if value.is_empty() {
            return Err(invalid("empty version".into()));
        }
        let parts: Vec<&str> = value.split('.').collect();
        if parts.len() > MAX_HEADS {
            return Err(invalid(format!("more than {MAX_HEADS} heads")));
        }
        let heads = parts
            .iter()
            .map(|part| {
                if part.len() != 64 {
                    return Err(invalid(format!(
                        "{} is not a 64-digit hex change hash",
                        shown(part)
                    )));
                }
                part.parse::<ChangeHash>()
                    .map_err(|_| invalid(format!("{} is not a hex change hash", shown(part))))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_heads(heads))
    }

    /// The heads, sorted.
    pub fn heads(&self) -> &[ChangeHash] {
        &self.0
    }
}

/// What a write asks of the entity it changes, as HTTP's `If-Match` does. Judged under the
/// entity's stripe lock, so no other write can come between the check and the write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfMatch {
    /// The entity must exist, at whatever version (`If-Match: *`).
    Exists,
    /// The entity must exist at exactly this version.
    At(Version),
}

impl IfMatch {
    /// Whether an entity that `exists` (has fields) at `current` meets it.
    pub(crate) fn holds(&self, exists: bool, current: &Version) -> bool {
        exists
            && match self {
                Self::Exists => true,
                Self::At(expected) => expected == current,
            }
    }

    /// [`IfMatch::holds`], or the [`Error::VersionMismatch`] that says why not.
    pub(crate) fn check(&self, key: &EntityKey, exists: bool, current: &Version) -> Result<()> {
        if self.holds(exists, current) {
            return Ok(());
        }
        Err(Error::VersionMismatch {
            key: key.clone(),
            expected: self.to_string(),
            current: if exists {
                current.to_string()
            } else {
                String::new()
            },
        })
    }
}

impl fmt::Display for IfMatch {
    /// `*`, or the version, as the client sent it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists => f.write_str("*"),
            Self::At(version) => version.fmt(f),
        }
    }
}

impl From<Version> for IfMatch {
    fn from(version: Version) -> Self {
        Self::At(version)
    }
}

/// A part of a version as an error shows it: quoted, and cut short when it is much longer than
/// a hash, so that an error does not echo a large header back.
fn shown(part: &str) -> String {
    const SHOWN: usize = 80;
    match part.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}... ({} bytes)", &part[..end], part.len()),
        None => format!("{part:?}"),
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, head) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(".")?;
            }
            write!(f, "{head}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
