//! Inbound webhooks: verify, deduplicate by webhook id, drop stale deltas, map, and commit with
//! origin `connector:<name>`, writing the idempotency record and the connector's shadow in the
//! same atomic set of writes as the change.
//!
//! Concurrent deliveries of one webhook id are serialized by a lock on the exact id (see
//! `locks`), so a webhook posted many times at once makes exactly one change. HTTP framing is `server`'s job.

use std::cmp::Ordering;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use serde_json::{json, Map, Value as Json};
use store::{now_ms, Edit, EntityKey, Origin, WriteOptions, WriteRequest};

use crate::error::{Error, Result};
use crate::inbox::IdHash;
use crate::mapping::MappingError;
use crate::registry::{ConnectorHandle, Connectors};
use crate::signature::SignatureError;
use crate::state::{sha256_hex, InboxRecord, Records};

#[cfg(test)]
mod tests;

/// The parts of an inbound request the connector needs.
#[derive(Clone, Copy, Debug)]
pub struct WebhookRequest<'a> {
    /// The `webhook-id` header.
    pub id: Option<&'a str>,
    /// The `webhook-timestamp` header.
    pub timestamp: Option<&'a str>,
    /// The `webhook-signature` header.
    pub signature: Option<&'a str>,
    /// The raw body, exactly as received.
    pub body: &'a [u8],
}

/// What a webhook did; every outcome is a success for the sender.
#[derive(Clone, Debug, PartialEq)]
pub struct WebhookOutcome {
    /// The response body: `status` is `applied`, `unchanged` or `stale`, with the entity and version.
    pub response: Json,
    /// Whether this is a repeat of an id already processed (the original response is returned).
    pub replayed: bool,
}

/// Refuses a `version_field` value that cannot be ordered against the last one applied: only
/// numbers and strings order, and only against their own kind. Letting such a value through
/// would make it the entity's new mark, and an older delta after it would then be applied,
/// since nothing could say it is older.
fn check_mark(field: &str, mark: &Json, applied: Option<&Json>) -> Result<()> {
    let uncastable = |detail: String| {
        Error::Mapping(MappingError::Uncastable {
            field: field.to_string(),
            detail,
        })
    };
    if !matches!(mark, Json::Number(_) | Json::String(_)) {
        return Err(uncastable(format!(
            "{mark} is not a version: a version must be a number or a string"
        )));
    }
    match applied {
        Some(applied) if compare_marks(mark, applied).is_none() => Err(uncastable(format!(
            "{mark} cannot be ordered against the last version applied, {applied}: an entity's \
             versions must be all numbers or all strings"
        ))),
        _ => Ok(()),
    }
}

/// Orders two `version_field` values: numbers numerically, strings lexically (ISO 8601 timestamps
/// sort that way); values of different types are not comparable ([`check_mark`] refuses them).
fn compare_marks(a: &Json, b: &Json) -> Option<Ordering> {
    match (a, b) {
        (Json::Number(a), Json::Number(b)) => a.as_f64()?.partial_cmp(&b.as_f64()?),
        (Json::String(a), Json::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

impl Connectors {
    /// Counts a webhook for the connector `name` that was refused before it could be handled
    /// (its body too large or not JSON); nothing for an unknown connector.
    pub fn count_rejected_webhook(&self, name: &str) {
        if let Ok(handle) = self.handle(name) {
            handle.counters.webhooks_rejected.inc();
        }
    }

    /// Handles one inbound webhook for the connector `name`.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], [`Error::InboundDisabled`], [`Error::Signature`] (bad or stale
    /// signature, missing headers), [`Error::InvalidJson`] / [`Error::NotAnObject`] /
    /// [`Error::Mapping`] / [`store::Error::Invalid`] for a body that cannot be applied,
    /// [`Error::IdReused`] for a known id with a different body. On every error nothing changes.
    pub async fn receive_webhook(
        &self,
        name: &str,
        request: WebhookRequest<'_>,
    ) -> Result<WebhookOutcome> {
        let handle = self.handle(name)?;
        let checked = check(&handle, &request);
        let (id, body) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                handle.counters.webhooks_rejected.inc();
                return Err(error);
            }
        };
        let body_sha256 = sha256_hex(request.body);
        // Once started, a webhook runs to its end, even if its request is dropped (the client
        // hangs up, the request times out): its write may already be queued, and its id's and
        // entity's locks must be held until that write has landed, or another webhook could read
        // the inbox or shadow from before it. It runs on the request's own task, and on a task
        // of its own only if the request is dropped first (see `RunsToEnd`).
        let inbound_locks = self.inbound_locks();
        let (task_handle, task_id) = (handle.clone(), id.to_string());
        // The outcome is counted inside it, so a dropped request's webhook still counts.
        RunsToEnd::new(self.tasks.clone(), async move {
            // By the id's hash, which ends its inbox record's key, which the clean-up locks by.
            let hash = IdHash::of(&task_id);
            let _serialized = inbound_locks.lock(hash.hex()).await;
            let outcome = apply(&task_handle, &task_id, &hash, &body, body_sha256).await;
            let counters = &task_handle.counters;
            match &outcome {
                Ok(outcome) if outcome.replayed => counters.webhooks_duplicate.inc(),
                Ok(outcome) if outcome.response["status"] == "stale" => {
                    counters.webhooks_stale.inc()
                }
                Ok(_) => counters.webhooks_applied.inc(),
                Err(_) => counters.webhooks_rejected.inc(),
            }
            if matches!(&outcome, Ok(outcome) if !outcome.replayed) {
                task_handle.wake();
            }
            outcome
        })
        .await
    }
}

/// A webhook's handling, polled in place by its request and moved to a task of its own if the
/// request is dropped before it ends, so that it always runs to its end. It saves the hand-off
/// to a task of its own and back that every webhook made before (measured no worse, +2% within
/// the noise: docs/architecture.md). A panic while it runs is [`Error::Panicked`], as a task's
/// panic was an error before.
struct RunsToEnd {
    work: Option<Pin<Box<dyn Future<Output = Result<WebhookOutcome>> + Send>>>,
    /// Where it goes on if dropped.
    tasks: tokio_util::task::TaskTracker,
}

impl RunsToEnd {
    fn new(
        tasks: tokio_util::task::TaskTracker,
        work: impl Future<Output = Result<WebhookOutcome>> + Send + 'static,
    ) -> Self {
        Self {
            work: Some(Box::pin(work)),
            tasks,
        }
    }
}

impl Future for RunsToEnd {
    type Output = Result<WebhookOutcome>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Empty only once it has answered (`.await` never polls it again) or panicked.
        let Some(work) = self.work.as_mut() else {
            return Poll::Ready(Err(Error::Panicked));
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(outcome)) => {
                self.work = None;
                Poll::Ready(outcome)
            }
            Err(_) => {
                self.work = None;
                Poll::Ready(Err(Error::Panicked))
            }
        }
    }
}

impl Drop for RunsToEnd {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            // Outside a runtime (a process tearing down) there is nothing left to run it on.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                self.tasks.spawn_on(work, &runtime);
            }
        }
    }
}

/// Checks a webhook before anything is read or written: the connector takes webhooks, the
/// headers are there, the signature is valid and current, and the body is a JSON object.
/// Returns the webhook id and the body.
fn check<'a>(
    handle: &ConnectorHandle,
    request: &WebhookRequest<'a>,
) -> Result<(&'a str, Map<String, Json>)> {
    let secret = handle
        .connector
        .webhook_secret
        .as_ref()
        .ok_or_else(|| Error::InboundDisabled(handle.connector.name.clone()))?;
    let id = request
        .id
        .filter(|id| !id.is_empty())
        .ok_or(SignatureError::MissingHeader("webhook-id"))?;
    let timestamp = request
        .timestamp
        .ok_or(SignatureError::MissingHeader("webhook-timestamp"))?;
    let signature = request
        .signature
        .ok_or(SignatureError::MissingHeader("webhook-signature"))?;
    let now_seconds = (now_ms() / 1000) as i64;
    secret.verify(
        id,
        timestamp,
        signature,
        request.body,
        now_seconds,
        handle.connector.timestamp_tolerance.as_secs(),
    )?;
    let body: Json = serde_json::from_slice(request.body)
        .map_err(|error| Error::InvalidJson(error.to_string()))?;
    let Json::Object(body) = body else {
        return Err(Error::NotAnObject);
    };
    Ok((id, body))
}

/// Runs with the webhook id's lock held, on its request's task (or a task of its own once the
/// request is dropped, see [`RunsToEnd`]). It reads small records there (sled serves them from
/// its cache) and waits for the flush without holding a thread: a thread per webhook, parked
/// until its flush, cost more than the webhook's own work under load.
async fn apply(
    handle: &ConnectorHandle,
    webhook_id: &str,
    hash: &IdHash,
    body: &Map<String, Json>,
    body_sha256: String,
) -> Result<WebhookOutcome> {
    let records = &handle.records;
    // An id is remembered for `dedupe_retention`: a record older than that, which the hourly
    // clean-up has not removed yet, no longer makes the webhook a repeat.
    let retention_ms =
        u64::try_from(handle.connector.dedupe_retention.as_millis()).unwrap_or(u64::MAX);
    let remembered_since = now_ms().saturating_sub(retention_ms);
    let mut lookup = handle.inbox.lookup(records, hash, remembered_since)?;
    let previous = lookup
        .found
        .take()
        .filter(|previous| previous.at_ms >= remembered_since);
    if let Some(previous) = previous {
        // The record is durable unless the flush of the write that made it failed (the first
        // request held the id's lock until its flush ended): the store then refuses writes, and
        // a repeat is refused as the first was, so the sender keeps retrying; so is a reuse of
        // the id with another body, which a restart may find was never taken.
        records.store().writable()?;
        if previous.body_sha256 != body_sha256 {
            return Err(Error::IdReused {
                id: webhook_id.to_string(),
            });
        }
        return Ok(WebhookOutcome {
            response: previous.response,
            replayed: true,
        });
    }
    let connector = &handle.connector;
    let inbound = connector.mapping.to_entity(body)?;
    let key = EntityKey {
        kind: connector.kind.clone(),
        id: store::EntityId::new(inbound.id.clone())?,
    };
    let _locked = handle.lock_entity_async(&key).await;
    let mut shadow = records.shadow(&key)?;
    let mark = connector
        .version_field
        .as_ref()
        .and_then(|field| body.get(field))
        .filter(|value| !value.is_null())
        .cloned();
    let inbox = move |response: &Json| InboxRecord {
        body_sha256: body_sha256.clone(),
        response: response.clone(),
        at_ms: now_ms(),
    };
    if let Some(mark) = &mark {
        check_mark(
            connector.version_field.as_deref().unwrap_or_default(),
            mark,
            shadow.inbound_mark.as_ref(),
        )?;
    }
    if let (Some(mark), Some(applied)) = (&mark, &shadow.inbound_mark) {
        if compare_marks(mark, applied) == Some(Ordering::Less) {
            let response = json!({
                "status": "stale",
                "kind": key.kind, "id": key.id,
                "detail": format!("{} {mark} is older than {applied}, already applied; ignored",
                    connector.version_field.as_deref().unwrap_or_default()),
            });
            let inbox_key = handle.inbox.place(records, &lookup, hash);
            records
                .write_async(vec![Records::put_inbox(inbox_key, &inbox(&response))])
                .await?;
            return Ok(WebhookOutcome {
                response,
                replayed: false,
            });
        }
    }
    // What the system sent us, in its own representation after a round trip through the
    // mapping, so the no-echo comparison sees exactly what delivery would send.
    let patch_fields = inbound.patch.as_object().cloned().unwrap_or_default();
    let normalized = connector.mapping.to_external(&patch_fields)?;
    for (field, value) in normalized {
        if value.is_null() {
            shadow.fields.remove(&field);
        } else {
            shadow.fields.insert(field, value);
        }
    }
    if mark.is_some() {
        shadow.inbound_mark = mark;
    }
    let origin = Origin::parse(&format!("connector:{}", connector.name))?;
    // The version field orders deltas; it is expected, not unknown.
    let unknown: Vec<String> = inbound
        .unknown
        .iter()
        .filter(|field| connector.version_field.as_ref() != Some(*field))
        .cloned()
        .collect();
    let request = WriteRequest {
        key: key.clone(),
        edit: Edit::MergePatch(inbound.patch),
        options: WriteOptions::new(origin),
    };
    // The change, its feed row, the inbox record and the new shadow go through the store's
    // writer queue, so concurrent webhooks share an application to sled and a flush. The webhook
    // keeps the entity's connector lock until the write is durable, as the shadow it wrote is
    // then the one on disk. Everything but the response is worked out here, off the store's writer
    // thread, which runs the closure.
    let shadow_write = records.put_shadow(&key, &shadow);
    let inbox_key = handle.inbox.place(records, &lookup, hash);
    let (entity, inbox_unknown) = (key.clone(), unknown.clone());
    let written = records
        .store()
        .submit_with(
            request,
            Box::new(move |view| {
                let response = applied(&entity, view.changed, view.version, &inbox_unknown);
                vec![
                    Records::put_inbox(inbox_key, &inbox(&response)),
                    shadow_write,
                ]
            }),
        )
        .await?;
    let response_out = applied(&key, written.seq.is_some(), &written.version, &unknown);
    if !unknown.is_empty() {
        tracing::warn!(connector = %connector.name, entity = %key, unknown = ?unknown, "webhook carried unmapped fields; they were not applied");
    }
    Ok(WebhookOutcome {
        response: response_out,
        replayed: false,
    })
}

/// The answer to a webhook that was applied: the same whether it is sent now or replayed later
/// from the inbox record.
fn applied(key: &EntityKey, changed: bool, version: &str, unknown: &[String]) -> Json {
    json!({
        "status": if changed { "applied" } else { "unchanged" },
        "kind": key.kind, "id": key.id,
        // An entity that does not exist has no version (a webhook of only unmapped fields, or
        // of nulls, for an entity this site does not hold changes nothing).
        "version": (!version.is_empty()).then_some(version),
        "unknown_fields": unknown,
    })
}
