//! The replication crate's one error type; `server` shows it in peer status and logs.
//!
//! Every variant ends the connection it happened on: the link then reconnects with backoff and
//! both sides start again from fresh sync states, which is what Automerge's sync protocol needs
//! after anything unexpected.

use std::time::Duration;

use store::EntityKey;

/// Everything a replication link can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer sent bytes that are not a frame of this protocol.
    #[error("the peer sent a malformed frame: {0}")]
    Malformed(String),
    /// The peer sent a well-formed frame at a moment the protocol does not allow it.
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    /// The peer sent Automerge data for an entity that could not be applied (undecodable,
    /// hostile or too deeply nested); the entity is left as it was.
    #[error("the peer sent data for {key} that could not be applied")]
    Rejected {
        /// The entity.
        key: EntityKey,
        /// Why the store refused it.
        #[source]
        source: Box<store::Error>,
    },
    /// An entity did not reach the version the peer announced, even after a reset and a
    /// whole-document transfer.
    #[error("{key} did not converge within {rounds} rounds, after a reset and a whole-document transfer")]
    Stuck {
        /// The entity.
        key: EntityKey,
        /// The round cap of each attempt.
        rounds: u32,
    },
    /// The local store failed.
    #[error("the local store failed")]
    Store(#[source] Box<store::Error>),
    /// The websocket failed (connect, handshake, read or write).
    #[error("websocket failure")]
    Transport(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The peer answered the connection attempt with an HTTP status instead of a websocket.
    #[error("the peer refused the connection with HTTP {status}: {detail}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The body of the answer, cut short.
        detail: String,
    },
    /// The peer closed the connection.
    #[error("the peer closed the connection{}", reason_suffix(.0))]
    Closed(String),
    /// The peer closed the connection because it is shutting down: the link ends, but no
    /// error is counted.
    #[error("the peer is shutting down")]
    PeerShutDown,
    /// No byte moved for this long: none arrived from the peer (not even of a pong), or, when
    /// `sending`, none of a send went out (the peer stopped reading).
    #[error("{}", idle_message(*.sending, .timeout))]
    Idle {
        /// The idle timeout.
        timeout: Duration,
        /// Whether a send was stuck, rather than the peer silent.
        sending: bool,
    },
    /// Connecting took longer than the idle timeout.
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    /// A blocking task panicked.
    #[error("a replication task panicked")]
    Task(#[source] tokio::task::JoinError),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        Self::Store(Box::new(error))
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(error: tokio_tungstenite::tungstenite::Error) -> Self {
        Self::Transport(Box::new(error))
    }
}

/// The replication crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn idle_message(sending: bool, timeout: &Duration) -> String {
    if sending {
        format!("the peer took no byte of what this site sent for {timeout:?}")
    } else {
        format!("no byte from the peer for {timeout:?}")
    }
}
