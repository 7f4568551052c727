//! Entity identity: a `Kind` and an `EntityId`, validated before they go anywhere near a sled key.
//!
//! Both are limited to `[A-Za-z0-9_.-]{1,128}`, so neither can contain the `\0` that separates them
//! in `layout`'s keys, a `/` that would confuse a URL, or anything a terminal would render oddly.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAX_NAME_LEN: usize = 128;

fn validate_name(what: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(Error::Invalid {
            what,
            detail: format!(
                "must be 1 to {MAX_NAME_LEN} characters long, got {}",
                value.len()
            ),
        });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::Invalid {
            what,
            detail: format!("{bad:?} is not allowed; use letters, digits, '_', '.' and '-'"),
        });
    }
    if value == "." || value == ".." {
        return Err(Error::Invalid {
            what,
            detail: format!("{value:?} is reserved"),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            ///
            /// # Errors
            /// [`Error::Invalid`] when it is empty, longer than 128 bytes or has a character outside `[A-Za-z0-9_.-]`.
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                validate_name($what, &value)?;
                Ok(Self(value))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The kind of an entity (`appointment`, `permit`): a namespace of ids.
    Kind,
    "kind"
);
name_type!(
    /// The id of an entity within its kind.
    EntityId,
    "id"
);

/// The full identity of an entity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntityKey {
    /// Its kind.
    pub kind: Kind,
    /// Its id within the kind.
    pub id: EntityId,
}

impl EntityKey {
    /// Validates both parts.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the part that is wrong.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Result<Self> {
        Ok(Self {
            kind: Kind::new(kind)?,
            id: EntityId::new(id)?,
        })
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

#[cfg(test)]
mod tests;
