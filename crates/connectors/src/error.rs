//! The connectors' error type; `server` maps each variant to an HTTP status.

use crate::mapping::MappingError;
use crate::signature::SignatureError;

/// Everything a connector operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connector has this name.
    #[error("no connector is named {0:?}")]
    UnknownConnector(String),
    /// The connector has no `webhook_secret`, so it does not accept webhooks.
    #[error("connector {0:?} does not accept webhooks (it has no webhook_secret)")]
    InboundDisabled(String),
    /// The connector has no `url`, so it sends nothing.
    #[error("connector {0:?} has no url, so it delivers nothing")]
    OutboundDisabled(String),
    /// The webhook's signature or timestamp was refused.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The webhook body is not JSON.
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The webhook body is JSON but not an object.
    #[error("the body must be a JSON object of the external system's fields")]
    NotAnObject,
    /// The body could not be mapped (missing id, uncastable value).
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The same webhook id arrived before with a different body.
    #[error("webhook id {id:?} was already received with a different body")]
    IdReused {
        /// The webhook id.
        id: String,
    },
    /// The entity is of a kind the connector does not sync.
    #[error("connector {connector:?} syncs entities of kind {expected:?}, not {kind:?}")]
    WrongKind {
        /// The connector.
        connector: String,
        /// Its kind.
        expected: String,
        /// The kind asked for.
        kind: String,
    },
    /// Nothing is dead-lettered for this entity.
    #[error("no dead letter for {0}")]
    NoDeadLetter(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A stored connector record could not be decoded.
    #[error("connector record {key} is corrupt: {detail}")]
    CorruptRecord {
        /// The record.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[from] tokio::task::JoinError),
    /// Handling a webhook panicked (a bug); nothing it had not written yet is written.
    #[error("handling the webhook panicked")]
    Panicked,
}

/// The connectors' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
