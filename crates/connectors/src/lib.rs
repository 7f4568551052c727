//! Two-way sync between Lockstep entities and external systems.
//!
//! A connector declares how an entity kind maps to an external API's flat fields. Inbound, a
//! webhook is verified (Standard Webhooks), deduplicated and mapped into a merge patch; outbound,
//! the delta an external system needs is derived from the entity and what that system is known
//! to have. HTTP routing is `server`'s business; durable state lives in `store`.
//!
//! # Layout
//! `config` validates `[[connectors]]` tables; `signature` signs and verifies Standard Webhooks
//! messages; `mapping` translates between entity fields and external fields in both directions;
//! `state` is the typed view of the connector records kept in the store (state, shadow, outbox,
//! inbox); `inbox` says where a webhook id's record goes and finds it again; `inbound` handles
//! webhooks; `delivery` is the outbound worker; `registry` holds the running connectors and the
//! admin operations.
//!
//! # Example
//! ```
//! use std::collections::BTreeMap;
//! use connectors::{FieldSpec, Mapping, WebhookSecret};
//! use serde_json::json;
//!
//! let fields = BTreeMap::from([("scheduledDate".to_string(), FieldSpec::Path("date".into()))]);
//! let mapping = Mapping::new("apptId", &fields)?;
//! let inbound = mapping.to_entity(json!({"apptId": "123", "scheduledDate": "2026-12-02"}).as_object().unwrap())?;
//! assert_eq!(inbound.patch, json!({"date": "2026-12-02"}));
//!
//! let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")?;
//! let signature = secret.sign("msg_1", 1_700_000_000, b"{}");
//! secret.verify("msg_1", "1700000000", &signature, b"{}", 1_700_000_000, 300)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod delivery;
mod error;
mod inbound;
mod inbox;
mod locks;
mod mapping;
mod registry;
mod signature;
mod state;

pub use config::{
    validate_all, ConfigError, Connector, ConnectorConfig, DeliveryMethod, RetryConfig,
    SecretString, TextDuration,
};
pub use error::{Error, Result};
pub use inbound::{WebhookOutcome, WebhookRequest};
pub use mapping::{DetailedField, FieldSpec, Inbound, Mapping, MappingError, ValueType};
pub use registry::{
    ConnectorHandle, ConnectorStatus, Connectors, Counter, Counters, DeadLetter, Preview, Replay,
};
pub use signature::{SignatureError, WebhookSecret};
pub use state::{Attempt, ConnectorState, InboxRecord, Shadow};
