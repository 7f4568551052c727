//! Outbound delivery: one worker per connector turns feed rows into deltas and delivers them.
//!
//! The delta for an entity is derived, never queued: `mapped(entity) - shadow`. The worker reads
//! the feed after its cursor, writes an attempt to the outbox for each entity whose delta is not
//! empty (in the same atomic write as the new cursor), and delivers attempts that are due, one per
//! entity at a time and at most `concurrency` at once. An acknowledged attempt is deleted and the
//! shadow advanced in one write; then the entity is planned again, so edits made meanwhile go out
//! as one coalesced delta. A crash at any point leaves either the attempt (resent under the same
//! key) or the advanced shadow (nothing to resend).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value as Json};
use store::{now_ms, EntityKey, RecordWrite};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::registry::{ConnectorHandle, Preview};
use crate::state::{sha256_hex, Attempt, Records, Shadow};

/// Feed rows read per step.
const FEED_BATCH: usize = 512;
/// How often expired inbound ids are forgotten.
const INBOX_GC_EVERY: Duration = Duration::from_secs(3600);
/// How soon a clean-up of expired ids that failed is tried again.
const INBOX_GC_RETRY: Duration = Duration::from_secs(60);
/// The most expired inbox records deleted in one write.
const INBOX_GC_BATCH: usize = 4096;
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A delivery URL as errors, logs and dead letters show it: scheme, host and port only, since
/// its path or query may hold a secret (as some webhook URLs do) and read tokens see errors.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) => {
            let host = parsed.host_str().unwrap_or("");
            match parsed.port() {
                Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
                None => format!("{}://{host}", parsed.scheme()),
            }
        }
        Err(_) => "the connector's url".into(),
    }
}

/// The idempotency key of the delta that brings `entity` to `version` for `connector`, after
/// `replays` operator replays of the entity (a replay is new, so it must not reuse the key a
/// receiver already acknowledged).
fn idempotency_key(connector: &str, entity: &EntityKey, version: &str, replays: u64) -> String {
    let digest = sha256_hex(
        format!(
            "{connector}\0{}\0{}\0{version}\0{replays}",
            entity.kind, entity.id
        )
        .as_bytes(),
    );
    format!("lsk_{}", &digest[..40])
}

/// The delta the external system needs for `entity`, given its shadow; `None` when up to date.
fn compute(
    handle: &ConnectorHandle,
    entity: &EntityKey,
    shadow: &Shadow,
) -> Result<Option<(Map<String, Json>, String)>> {
    let store = handle.records.store();
    let Some(version) = store.version(entity)? else {
        return Ok(None);
    };
    let data = store.get(entity)?.map(|e| e.data).unwrap_or_default();
    let mapped = handle.connector.mapping.to_external(&data)?;
    let mut delta = Map::new();
    for (field, value) in &mapped {
        if shadow.fields.get(field) != Some(value) {
            delta.insert(field.clone(), value.clone());
        }
    }
    for field in shadow.fields.keys() {
        if !mapped.contains_key(field) {
            delta.insert(field.clone(), Json::Null);
        }
    }
    if delta.is_empty() {
        return Ok(None);
    }
    delta.insert(
        handle.connector.mapping.id_field().to_string(),
        Json::String(entity.id.to_string()),
    );
    Ok(Some((delta, version)))
}

/// The outbox writes that bring `entity`'s pending delta up to date (empty when nothing to do).
///
/// Called, with the entity's lock held, for entities that are not being delivered right now. A waiting attempt whose delta is
/// still right is left alone, so its retries keep their key; one whose delta is out of date (the
/// entity changed again while it waited) is replaced by the coalesced delta under a new key,
/// keeping its retry schedule. That is safe because it was never acknowledged.
pub(crate) fn plan(handle: &ConnectorHandle, entity: &EntityKey) -> Result<Vec<RecordWrite>> {
    let existing = handle.records.attempt(entity)?;
    let shadow = handle.records.shadow(entity)?;
    plan_with(handle, entity, existing, &shadow)
}

/// The wait before a delta's first attempt, in milliseconds: the retry schedule's first entry.
fn first_wait(schedule: &[Duration]) -> u64 {
    schedule.first().map_or(0, |wait| {
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
    })
}

/// The writes that drop `entity`'s dead delta and plan its delta afresh against `shadow`, for
/// one atomic write: a crash cannot drop the dead letter without its replacement.
pub(crate) fn replan_dead(
    handle: &ConnectorHandle,
    entity: &EntityKey,
    shadow: &Shadow,
) -> Result<Vec<RecordWrite>> {
    let mut writes = vec![handle.records.delete_attempt(entity)];
    // A later write to the same key wins within one batch.
    writes.extend(plan_with(handle, entity, None, shadow)?);
    Ok(writes)
}

/// [`plan`] against a given outbox entry and shadow (those about to be written, when a delivery
/// outcome and the next plan go to disk in one write).
pub(crate) fn plan_with(
    handle: &ConnectorHandle,
    entity: &EntityKey,
    existing: Option<Attempt>,
    shadow: &Shadow,
) -> Result<Vec<RecordWrite>> {
    let records = &handle.records;
    let now = now_ms();
    let computed = match compute(handle, entity, shadow) {
        Ok(computed) => computed,
        Err(crate::error::Error::Mapping(error)) => {
            let version = records.store().version(entity)?.unwrap_or_default();
            if existing
                .as_ref()
                .is_some_and(|a| a.dead.is_some() && a.version == version)
            {
                return Ok(Vec::new());
            }
            // The entity holds a value the mapping cannot send: park it, keep the others flowing.
            let attempt = Attempt {
                key: idempotency_key(&handle.connector.name, entity, &version, shadow.replays),
                delta: Map::new(),
                version,
                previous_version: shadow.version.clone(),
                attempts: 0,
                next_at_ms: now,
                created_at_ms: now,
                last_error: Some(error.to_string()),
                dead: Some(format!("cannot map the entity: {error}")),
            };
            handle.counters.dead_lettered.inc();
            return Ok(vec![records.put_attempt(entity, &attempt)]);
        }
        Err(error) => return Err(error),
    };
    let Some((delta, version)) = computed else {
        // Nothing to send (the system already has it all): drop whatever was waiting.
        return Ok(match existing {
            Some(_) => vec![records.delete_attempt(entity)],
            None => Vec::new(),
        });
    };
    let mut attempt = Attempt {
        key: idempotency_key(&handle.connector.name, entity, &version, shadow.replays),
        delta,
        version,
        previous_version: shadow.version.clone(),
        attempts: 0,
        // The schedule's first entry is the wait before the first attempt ("0s": at once).
        next_at_ms: now.saturating_add(first_wait(&handle.connector.retry_schedule)),
        created_at_ms: now,
        last_error: None,
        dead: None,
    };
    match existing {
        // Still dead at the same version: only a later change or an operator retries it.
        Some(dead) if dead.dead.is_some() && dead.version == attempt.version => {
            return Ok(Vec::new())
        }
        Some(dead) if dead.dead.is_some() => {}
        // The same delta keeps its key and schedule.
        Some(waiting) if waiting.delta == attempt.delta => return Ok(Vec::new()),
        Some(waiting) => {
            attempt.attempts = waiting.attempts;
            attempt.next_at_ms = waiting.next_at_ms;
            attempt.created_at_ms = waiting.created_at_ms;
            attempt.last_error = waiting.last_error;
        }
        None => {}
    }
    Ok(vec![records.put_attempt(entity, &attempt)])
}

pub(crate) fn preview(handle: &ConnectorHandle, entity: &EntityKey) -> Result<Preview> {
    // The shadow, the entity and its pending attempt read at one moment: planning and recording
    // an attempt change them together under this lock (never held across a request).
    let _locked = handle.lock_entity(entity);
    let records = &handle.records;
    let shadow = records.shadow(entity)?;
    let computed = compute(handle, entity, &shadow)?;
    let (delta, version) = match computed {
        Some((delta, version)) => (Some(delta), Some(version)),
        None => (None, records.store().version(entity)?),
    };
    Ok(Preview {
        idempotency_key: delta.as_ref().and(version.as_ref()).map(|version| {
            idempotency_key(&handle.connector.name, entity, version, shadow.replays)
        }),
        delta,
        version,
        previous_version: shadow.version,
        pending: records.attempt(entity)?,
    })
}

/// How one attempt ended.
enum Outcome {
    Acknowledged,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Dead(String),
    Gone(String),
}

async fn send(
    handle: &ConnectorHandle,
    client: &reqwest::Client,
    url: &str,
    attempt: &Attempt,
) -> Outcome {
    let connector = &handle.connector;
    let body = serde_json::to_vec(&attempt.delta).expect("a delta always serializes");
    let method = reqwest::Method::from_bytes(connector.method.as_str().as_bytes())
        .expect("POST, PUT and PATCH are valid methods");
    let mut request = client
        .request(method, url)
        .timeout(connector.timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", &attempt.key)
        .header("lockstep-version", &attempt.version);
    if let Some(previous) = &attempt.previous_version {
        request = request.header("lockstep-previous-version", previous);
    }
    for (name, value) in &connector.headers {
        request = request.header(name.as_str(), value.0.as_str());
    }
    if let Some(secret) = &connector.signing_secret {
        let timestamp = (now_ms() / 1000) as i64;
        request = request
            .header("webhook-id", &attempt.key)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                secret.sign(&attempt.key, timestamp, &body),
            );
    }
    let response = match request.body(body).send().await {
        Ok(response) => response,
        Err(error) => {
            let kind = if error.is_timeout() {
                "timed out"
            } else {
                "could not connect"
            };
            return Outcome::Retry {
                error: format!("{} {kind}: {}", shown_url(url), error.without_url()),
                retry_after: None,
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(|seconds| Duration::from_secs(seconds).min(MAX_RETRY_AFTER));
    let detail = format!("{} answered {status}", shown_url(url));
    if status.is_success() {
        Outcome::Acknowledged
    } else if status == reqwest::StatusCode::GONE {
        Outcome::Gone(detail)
    } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry {
            error: detail,
            retry_after,
        }
    } else {
        // 3xx (redirects are not followed) and every other 4xx: the receiver refuses this delta.
        Outcome::Dead(detail)
    }
}

/// Where an entity stands in the outbox: absent, due at a time, or dead (`Some(None)`).
type Due = Option<Option<u64>>;

fn due_of(handle: &ConnectorHandle, entity: &EntityKey) -> Result<Due> {
    Ok(handle
        .records
        .attempt(entity)?
        .map(|attempt| attempt.dead.is_none().then_some(attempt.next_at_ms)))
}

/// Delivers the entity's pending attempt once and records the outcome; the worker then reads
/// where the entity stands (see `replan_marked`).
async fn deliver(
    handle: Arc<ConnectorHandle>,
    client: reqwest::Client,
    entity: EntityKey,
) -> Result<()> {
    let Some(url) = handle.connector.url.clone() else {
        return Ok(());
    };
    // Plan again right before sending: a webhook may have told us since that the system already
    // has some of these values. A changed delta gets a new key; it was never acknowledged.
    let loader = handle.clone();
    let loaded_entity = entity.clone();
    let attempt = tokio::task::spawn_blocking(move || {
        let _locked = loader.lock_entity(&loaded_entity);
        let writes = plan(&loader, &loaded_entity)?;
        loader.records.write(writes)?;
        loader.records.attempt(&loaded_entity)
    })
    .await??;
    let Some(attempt) = attempt.filter(|attempt| attempt.dead.is_none()) else {
        return Ok(());
    };
    let outcome = send(&handle, &client, &url, &attempt).await;
    let recorder = handle.clone();
    tokio::task::spawn_blocking(move || record(&recorder, &entity, attempt, outcome)).await?
}

fn record(
    handle: &ConnectorHandle,
    entity: &EntityKey,
    mut attempt: Attempt,
    outcome: Outcome,
) -> Result<()> {
    let locked = handle.lock_entity(entity);
    let records = &handle.records;
    let connector = &handle.connector;
    // The outcome and the next plan (edits made while the request was in flight, coalesced) are
    // written together, so a crash between them cannot leave a change that is never delivered.
    let mut shadow = records.shadow(entity)?;
    let remaining = match outcome {
        Outcome::Acknowledged => {
            for (field, value) in &attempt.delta {
                if field == connector.mapping.id_field() {
                    continue;
                }
                if value.is_null() {
                    shadow.fields.remove(field);
                } else {
                    shadow.fields.insert(field.clone(), value.clone());
                }
            }
            shadow.version = Some(attempt.version.clone());
            handle.counters.deliveries.inc();
            handle.note_error(None);
            tracing::debug!(connector = %connector.name, %entity, version = %attempt.version, "delta acknowledged");
            None
        }
        Outcome::Retry { error, retry_after } => {
            handle.counters.delivery_failures.inc();
            // Entry n waits before attempt n + 1, counting from 0; the last entry repeats.
            let schedule = &connector.retry_schedule;
            let index = (attempt.attempts as usize + 1).min(schedule.len() - 1);
            let jitter = connector.retry_jitter;
            let factor = if jitter > 0.0 {
                rand::thread_rng().gen_range(1.0 - jitter..=1.0 + jitter)
            } else {
                1.0
            };
            let wait = schedule[index]
                .mul_f64(factor)
                .max(retry_after.unwrap_or_default());
            attempt.attempts += 1;
            attempt.next_at_ms = now_ms() + wait.as_millis() as u64;
            tracing::warn!(connector = %connector.name, %entity, attempts = attempt.attempts, retry_in = ?wait, error = %error, "delivery failed; will retry");
            attempt.last_error = Some(error.clone());
            handle.note_error(Some(error));
            Some(attempt)
        }
        Outcome::Dead(reason) => {
            handle.counters.delivery_failures.inc();
            handle.counters.dead_lettered.inc();
            tracing::warn!(connector = %connector.name, %entity, reason = %reason, "delta dead-lettered");
            attempt.attempts += 1;
            attempt.last_error = Some(reason.clone());
            attempt.dead = Some(reason.clone());
            handle.note_error(Some(reason));
            Some(attempt)
        }
        Outcome::Gone(reason) => {
            handle.counters.delivery_failures.inc();
            tracing::error!(connector = %connector.name, %entity, reason = %reason, "external system answered 410 Gone; connector disabled");
            attempt.attempts += 1;
            attempt.last_error = Some(reason.clone());
            handle.note_error(Some(reason.clone()));
            records.write(vec![records.put_attempt(entity, &attempt)])?;
            drop(locked);
            // Then the connector is disabled, under the state's lock, which is never taken
            // while an entity's lock is held. A crash in between leaves the attempt to be
            // sent again after a restart, which meets the 410 again.
            let _state_locked = handle.lock_state();
            let mut state = records.state()?;
            state.disabled = Some(reason);
            records.write(vec![records.put_state(&state)])?;
            handle.rescan.store(true, Ordering::Release);
            return Ok(());
        }
    };
    let mut writes = vec![
        match &remaining {
            Some(attempt) => records.put_attempt(entity, attempt),
            None => records.delete_attempt(entity),
        },
        records.put_shadow(entity, &shadow),
    ];
    // A later write to the same key wins within one batch.
    writes.extend(plan_with(handle, entity, remaining, &shadow)?);
    records.write(writes)
}

/// The worker's view of the outbox: when each entity's attempt is due (`None` = dead).
type DueIndex = BTreeMap<EntityKey, Option<u64>>;

fn load_index(handle: &ConnectorHandle) -> Result<DueIndex> {
    Ok(handle
        .records
        .attempts()?
        .into_iter()
        .map(|(entity, attempt)| (entity, attempt.dead.is_none().then_some(attempt.next_at_ms)))
        .collect())
}

/// Reads feed rows after the cursor and plans their entities; returns whether more rows remain
/// and where each planned entity stands now.
fn advance(
    handle: &ConnectorHandle,
    in_flight: &HashSet<EntityKey>,
) -> Result<(bool, Vec<(EntityKey, Due)>)> {
    let records = &handle.records;
    let _state_locked = handle.lock_state();
    let mut state = records.state()?;
    // Read before the feed: every row up to here that is of our kind is in `rows`, so skipping to
    // it is safe. Read after, a row written in between would be skipped unseen.
    let last_seq = records.store().last_seq();
    let rows = records
        .store()
        .feed(state.cursor, Some(&handle.connector.kind), FEED_BATCH)?;
    let Some(last) = rows.last() else {
        // Skip past rows of other kinds so the lag shown is real.
        if last_seq > state.cursor {
            state.cursor = last_seq;
            records.write(vec![records.put_state(&state)])?;
        }
        return Ok((false, Vec::new()));
    };
    let more = rows.len() == FEED_BATCH;
    state.cursor = last.seq;
    let mut entities: Vec<EntityKey> = rows
        .into_iter()
        .map(|row| EntityKey {
            kind: row.kind,
            id: row.id,
        })
        .collect();
    entities.sort();
    entities.dedup();
    // An entity in flight is marked, in the same write as the cursor, and planned when its
    // delivery ends (see `replan_marked`), so its change is never skipped, not even by a crash.
    let (flying, entities): (Vec<EntityKey>, Vec<EntityKey>) = entities
        .into_iter()
        .partition(|entity| in_flight.contains(entity));
    // Held until the attempts are written, so no webhook changes a shadow in between.
    let locked = handle.lock_entities(&entities);
    let mut writes: Vec<RecordWrite> = flying
        .iter()
        .map(|entity| records.put_replan(entity))
        .collect();
    let mut planned = Vec::new();
    for entity in entities {
        let entity_writes = plan(handle, &entity)?;
        if !entity_writes.is_empty() {
            planned.push(entity);
        }
        writes.extend(entity_writes);
    }
    writes.push(records.put_state(&state));
    records.write(writes)?;
    drop(locked);
    let planned = planned
        .into_iter()
        .map(|entity| due_of(handle, &entity).map(|due| (entity, due)))
        .collect::<Result<_>>()?;
    Ok((more, planned))
}

/// Plans `entity` if it was marked while in flight, and removes the mark; returns where it stands.
fn replan_marked(handle: &ConnectorHandle, entity: &EntityKey) -> Result<Due> {
    let _locked = handle.lock_entity(entity);
    if handle.records.has_replan(entity)? {
        let mut writes = plan(handle, entity)?;
        writes.push(handle.records.delete_replan(entity));
        handle.records.write(writes)?;
    }
    due_of(handle, entity)
}

/// Plans every marked entity (after a restart nothing is in flight).
fn replan_all_marked(handle: &ConnectorHandle) -> Result<()> {
    for entity in handle.records.replans()? {
        replan_marked(handle, &entity)?;
    }
    Ok(())
}

/// The worker: runs until `shutdown` is cancelled. In-flight deliveries are abandoned at
/// shutdown; their attempts stay in the outbox and are resent under the same key after restart.
pub(crate) async fn run(handle: Arc<ConnectorHandle>, shutdown: CancellationToken) {
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(handle.connector.timeout)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(connector = %handle.connector.name, error = %error, "cannot build an HTTP client; connector stopped");
            return;
        }
    };
    let mut feed = handle.records.store().subscribe();
    let mut deliveries = Deliveries::new(&handle.connector.name);
    let mut index = DueIndex::new();
    let mut reload = true;
    let mut inbox_gc = InboxGc::new(shutdown.clone());
    loop {
        let outcome = step(
            &handle,
            &client,
            &mut index,
            &mut reload,
            &mut deliveries,
            &mut inbox_gc,
        )
        .await;
        let (more, next_due) = match outcome {
            Ok(result) => result,
            Err(error) => {
                tracing::error!(connector = %handle.connector.name, error = %error, "connector step failed; retrying in 1 s");
                handle.note_error(Some(error.to_string()));
                reload = true;
                (false, Some(now_ms() + 1000))
            }
        };
        if more {
            continue;
        }
        let sleep_for = next_due
            .map_or(Duration::from_secs(3600), |due| {
                Duration::from_millis(due.saturating_sub(now_ms()))
            })
            .min(inbox_gc.until_due());
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = feed.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            () = handle.wake.notified() => {}
            Some(joined) = deliveries.next(), if !deliveries.is_empty() => {
                // Every delivery that has ended is recorded in this one pass: one pass per
                // delivery fell behind at 1,000 edits a second, as each pass waits for flushes.
                let ended: Vec<_> = std::iter::once(joined)
                    .chain(std::iter::from_fn(|| deliveries.try_next()))
                    .collect();
                let count = ended.len();
                let marked = handle.clone();
                let recorded = tokio::task::spawn_blocking(move || {
                    ended
                        .into_iter()
                        .map(|(entity, result)| {
                            let due = result.and_then(|()| replan_marked(&marked, &entity));
                            (entity, due)
                        })
                        .collect::<Vec<_>>()
                })
                .await;
                match recorded {
                    Ok(recorded) => {
                        for (entity, due) in recorded {
                            match due {
                                Ok(due) => set_due(&mut index, entity, due),
                                Err(error) => {
                                    tracing::error!(connector = %handle.connector.name, %entity, error = %error, "recording a delivery failed");
                                    reload = true;
                                }
                            }
                        }
                    }
                    Err(error) => {
                        tracing::error!(connector = %handle.connector.name, entities = count, error = %error, "recording deliveries failed");
                        reload = true;
                    }
                }
            }
            () = tokio::time::sleep(sleep_for) => {}
        }
    }
    deliveries.abort_all();
    inbox_gc.finish().await;
}

/// The deliveries in progress (one per entity at most), each giving back its entity when it
/// ends, also when its task panicked: a lost entity would stay in flight and never be delivered
/// again.
struct Deliveries {
    /// The connector's name, for the log.
    connector: String,
    tasks: JoinSet<Result<()>>,
    /// The entity of each task, by task id, which a task that panicked still has.
    entities: HashMap<tokio::task::Id, EntityKey>,
    /// The same entities, to look up by entity.
    in_flight: HashSet<EntityKey>,
}

impl Deliveries {
    fn new(connector: &str) -> Self {
        Self {
            connector: connector.to_string(),
            tasks: JoinSet::new(),
            entities: HashMap::new(),
            in_flight: HashSet::new(),
        }
    }

    fn spawn(
        &mut self,
        entity: EntityKey,
        delivery: impl Future<Output = Result<()>> + Send + 'static,
    ) {
        let task = self.tasks.spawn(delivery);
        self.in_flight.insert(entity.clone());
        self.entities.insert(task.id(), entity);
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn contains(&self, entity: &EntityKey) -> bool {
        self.in_flight.contains(entity)
    }

    /// The entities being delivered.
    fn in_flight(&self) -> &HashSet<EntityKey> {
        &self.in_flight
    }

    /// Waits for the next delivery to end; `None` when none is in progress.
    async fn next(&mut self) -> Option<(EntityKey, Result<()>)> {
        loop {
            let joined = self.tasks.join_next_with_id().await?;
            if let Some(ended) = self.ended(joined) {
                return Some(ended);
            }
        }
    }

    /// A delivery that has already ended, if any.
    fn try_next(&mut self) -> Option<(EntityKey, Result<()>)> {
        loop {
            let joined = self.tasks.try_join_next_with_id()?;
            if let Some(ended) = self.ended(joined) {
                return Some(ended);
            }
        }
    }

    /// The entity of a delivery that ended and what came of it; `None` for a task this set did
    /// not spawn, which cannot happen.
    fn ended(
        &mut self,
        joined: std::result::Result<(tokio::task::Id, Result<()>), JoinError>,
    ) -> Option<(EntityKey, Result<()>)> {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        let Some(entity) = self.entities.remove(&id) else {
            tracing::error!(connector = %self.connector, task = %id, "a delivery task nobody started ended; ignored");
            return None;
        };
        self.in_flight.remove(&entity);
        match joined {
            Ok((_, outcome)) => Some((entity, outcome)),
            Err(error) => {
                tracing::error!(connector = %self.connector, %entity, error = %error, "a delivery task failed; its attempt stays on disk and is retried");
                // What happened is on disk: the attempt, if its outcome was not recorded, is
                // still due and is sent again under the same key; the worker reads it back.
                Some((entity, Ok(())))
            }
        }
    }

    fn abort_all(&mut self) {
        self.tasks.abort_all();
        self.entities.clear();
        self.in_flight.clear();
    }
}

fn set_due(index: &mut DueIndex, entity: EntityKey, due: Due) {
    match due {
        Some(due) => {
            index.insert(entity, due);
        }
        None => {
            index.remove(&entity);
        }
    }
}

/// The hourly clean-up of expired webhook ids, on a blocking thread of its own, so that the
/// worker's deliveries do not wait for it.
struct InboxGc {
    /// The worker's shutdown: a clean-up stops between batches once it is cancelled, and the
    /// worker waits for it to stop ([`InboxGc::finish`]), so that the server does not close the
    /// store under it.
    shutdown: CancellationToken,
    /// When the next clean-up is due; `None` at start (at once).
    next: Option<tokio::time::Instant>,
    /// The clean-up under way. Its task wakes the worker as it ends, well or not (a panic of
    /// the blocking thread included), and hands over how it ended.
    running: Option<CleanUp>,
}

/// A clean-up's task: the outcome of its blocking thread, or why that thread ended without one.
type CleanUp = tokio::task::JoinHandle<std::result::Result<Result<()>, tokio::task::JoinError>>;

impl InboxGc {
    fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            next: None,
            running: None,
        }
    }

    /// Takes the outcome of a clean-up that has ended, then starts one when it is due and none
    /// is running. One that ends well is due again an hour after it started; one that failed
    /// (an error or a panic) is logged, set as the connector's last error, and tried again a
    /// minute later.
    async fn start_if_due(&mut self, handle: &Arc<ConnectorHandle>) {
        if self
            .running
            .as_ref()
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        if let Some(task) = self.running.take() {
            if let Some(failure) = failure(task.await) {
                tracing::error!(connector = %handle.connector.name, error = %failure, "forgetting expired webhook ids failed; trying again in a minute");
                handle.note_error(Some(failure));
                self.next = Some(tokio::time::Instant::now() + INBOX_GC_RETRY);
            }
        }
        if self
            .next
            .is_some_and(|next| tokio::time::Instant::now() < next)
        {
            return;
        }
        let (gc, shutdown) = (handle.clone(), self.shutdown.clone());
        self.running = Some(tokio::spawn(async move {
            let cleaner = gc.clone();
            let outcome =
                tokio::task::spawn_blocking(move || clean_inbox(&cleaner, &shutdown)).await;
            gc.wake();
            outcome
        }));
        self.next = Some(tokio::time::Instant::now() + INBOX_GC_EVERY);
    }

    /// How long until the next clean-up is due (the worker sleeps no longer than that; while one
    /// runs, its end wakes the worker).
    fn until_due(&self) -> Duration {
        match (&self.running, self.next) {
            (Some(_), _) => Duration::MAX,
            (None, None) => Duration::ZERO,
            (None, Some(next)) => next.saturating_duration_since(tokio::time::Instant::now()),
        }
    }

    /// Waits for the clean-up under way, if any, to stop: it stops between batches once the
    /// worker's shutdown is cancelled, as it is when the worker ends.
    async fn finish(&mut self) {
        if let Some(task) = self.running.take() {
            // How it ended no longer matters: the next start cleans up again.
            let _ = task.await;
        }
    }
}

/// Why a clean-up failed, from its task's outcome; `None` when it ended well.
fn failure(
    ended: std::result::Result<
        std::result::Result<Result<()>, tokio::task::JoinError>,
        tokio::task::JoinError,
    >,
) -> Option<String> {
    match ended {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(error))) => Some(error.to_string()),
        Ok(Err(ended)) | Err(ended) => Some(format!("the clean-up's task ended: {ended}")),
    }
}

/// Forgets the webhook ids older than the connector's `dedupe_retention`, stopping between
/// batches once `shutdown` is cancelled (what is left waits for the next start).
fn clean_inbox(handle: &ConnectorHandle, shutdown: &CancellationToken) -> Result<()> {
    let cutoff = now_ms().saturating_sub(handle.connector.dedupe_retention.as_millis() as u64);
    let expired = handle.records.expired_inbox(cutoff)?;
    // In bounded batches (after a long stop, a day's ids may expire at once), each under its
    // ids' locks, so an id reused since the listing keeps its fresh record.
    for batch in expired.chunks(INBOX_GC_BATCH) {
        if shutdown.is_cancelled() {
            break;
        }
        let names: Vec<String> = batch.iter().map(Records::inbox_lock_name).collect();
        let _locked = handle.inbound_locks.blocking_lock_all(&names);
        for deleted in handle.records.delete_expired_inbox(batch, cutoff)? {
            handle.inbox.forget(&deleted);
        }
    }
    Ok(())
}

/// One pass: reread what changed, plan new feed rows, start due deliveries.
/// Returns whether more feed rows are waiting and when the next attempt is due.
async fn step(
    handle: &Arc<ConnectorHandle>,
    client: &reqwest::Client,
    index: &mut DueIndex,
    reload: &mut bool,
    deliveries: &mut Deliveries,
    inbox_gc: &mut InboxGc,
) -> Result<(bool, Option<u64>)> {
    inbox_gc.start_if_due(handle).await;
    if handle.connector.url.is_none() {
        return Ok((false, None));
    }
    let reader = handle.clone();
    let state = tokio::task::spawn_blocking(move || reader.records.state()).await??;
    if state.paused || state.disabled.is_some() {
        handle.rescan.store(false, Ordering::Release);
        return Ok((false, None));
    }
    if *reload || handle.rescan.swap(false, Ordering::AcqRel) {
        let loader = handle.clone();
        let flying = deliveries.in_flight().clone();
        *index = tokio::task::spawn_blocking(move || {
            if flying.is_empty() {
                replan_all_marked(&loader)?;
            }
            load_index(&loader)
        })
        .await??;
        *reload = false;
    }
    let planner = handle.clone();
    let flying = deliveries.in_flight().clone();
    let (more, planned) = tokio::task::spawn_blocking(move || advance(&planner, &flying)).await??;
    for (entity, due) in planned {
        set_due(index, entity, due);
    }
    let now = now_ms();
    let mut next_due: Option<u64> = None;
    for (entity, due) in index.iter() {
        let Some(due) = *due else { continue };
        if deliveries.contains(entity) {
            continue;
        }
        if due <= now && deliveries.len() < handle.connector.concurrency {
            let delivery = deliver(handle.clone(), client.clone(), entity.clone());
            deliveries.spawn(entity.clone(), delivery);
        } else {
            next_due = Some(next_due.map_or(due.max(now), |next: u64| next.min(due.max(now))));
        }
    }
    Ok((more, next_due))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_delivery_whose_task_panics_gives_its_entity_back() {
        let mut deliveries = Deliveries::new("test");
        let (calm, broken, failing) = (
            EntityKey::new("appointment", "calm").expect("a valid key"),
            EntityKey::new("appointment", "broken").expect("a valid key"),
            EntityKey::new("appointment", "failing").expect("a valid key"),
        );
        deliveries.spawn(calm.clone(), async { Ok(()) });
        deliveries.spawn(broken.clone(), async { panic!("a bug in a delivery") });
        deliveries.spawn(failing.clone(), async {
            Err(crate::Error::NoDeadLetter("on purpose".into()))
        });
        let mut ended = Vec::new();
        while let Some((entity, outcome)) = deliveries.next().await {
            ended.push((entity, outcome.is_ok()));
        }
        ended.sort();
        // The broken one is handed back as ended, so the worker reads where it stands from disk
        // (its attempt, still due) instead of keeping it in flight forever; an error is passed on.
        assert_eq!(ended, vec![(broken, true), (calm, true), (failing, false)]);
        assert!(deliveries.is_empty());
        assert!(deliveries.entities.is_empty());
        assert!(deliveries.in_flight().is_empty());
    }

    /// The connector `scheduler` on a store of its own.
    fn scheduler() -> (tempfile::TempDir, store::Store, Arc<ConnectorHandle>) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store =
            store::Store::open(store::StoreConfig::new(dir.path())).expect("the store opens");
        let connectors =
            crate::Connectors::new(store.clone(), crate::registry::tests::scheduler()).unwrap();
        let handle = connectors.handle("scheduler").expect("the connector");
        (dir, store, handle)
    }

    /// Writes two expired webhook ids; returns their keys.
    fn expired_ids(handle: &ConnectorHandle) -> Vec<store::RecordKey> {
        use crate::inbox::IdHash;
        use crate::state::InboxRecord;

        let keys: Vec<_> = (0..2)
            .map(|n| {
                handle
                    .records
                    .received_key(n, &IdHash::of(&format!("old-{n}")))
            })
            .collect();
        let record = InboxRecord {
            body_sha256: "0".repeat(64),
            response: serde_json::json!({"status": "applied"}),
            at_ms: 1_000,
        };
        handle
            .records
            .write(
                keys.iter()
                    .map(|key| Records::put_inbox(key.clone(), &record))
                    .collect(),
            )
            .expect("written");
        keys
    }

    /// Once the worker is shut down, a clean-up deletes no further batch, so the server can
    /// close the store; what is left waits for the next start.
    #[test]
    fn a_clean_up_stops_once_the_worker_is_shut_down() {
        let (_dir, _store, handle) = scheduler();
        let keys = expired_ids(&handle);
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        clean_inbox(&handle, &shutdown).expect("stopped, not failed");
        for key in &keys {
            assert!(handle.records.inbox(key).unwrap().is_some(), "deleted");
        }
        clean_inbox(&handle, &CancellationToken::new()).expect("cleaned");
        for key in &keys {
            assert!(handle.records.inbox(key).unwrap().is_none(), "kept");
        }
    }

    /// Waits for the clean-up under way to end, for at most 3 s of real time (the test's clock
    /// is paused, and the clean-up runs on a blocking thread).
    async fn clean_up_ended(gc: &InboxGc) {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while gc.running.as_ref().is_some_and(|task| !task.is_finished()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the clean-up did not end"
            );
            std::thread::sleep(Duration::from_millis(1));
            tokio::task::yield_now().await;
        }
    }

    /// A clean-up that ends well is due again an hour after it started; one that fails, a
    /// minute after its failure is seen, and not before.
    #[tokio::test(start_paused = true)]
    async fn a_failed_clean_up_is_tried_again_a_minute_later_and_one_that_ends_well_an_hour_later()
    {
        let (_dir, store, handle) = scheduler();
        let keys = expired_ids(&handle);
        let mut gc = InboxGc::new(CancellationToken::new());
        assert_eq!(gc.until_due(), Duration::ZERO, "due at start");
        gc.start_if_due(&handle).await;
        assert_eq!(gc.until_due(), Duration::MAX, "running");
        clean_up_ended(&gc).await;
        gc.start_if_due(&handle).await;
        assert!(gc.running.is_none());
        assert_eq!(gc.until_due(), INBOX_GC_EVERY);
        assert!(handle.records.inbox(&keys[0]).unwrap().is_none());

        tokio::time::advance(INBOX_GC_EVERY).await;
        expired_ids(&handle);
        store.close().expect("closed");
        gc.start_if_due(&handle).await;
        clean_up_ended(&gc).await;
        gc.start_if_due(&handle).await;
        assert!(gc.running.is_none(), "not started again at once");
        assert_eq!(gc.until_due(), INBOX_GC_RETRY);
        assert!(handle.observed.lock().unwrap().last_error.is_some());

        tokio::time::advance(INBOX_GC_RETRY - Duration::from_millis(1)).await;
        gc.start_if_due(&handle).await;
        assert!(gc.running.is_none(), "started early");
        tokio::time::advance(Duration::from_millis(1)).await;
        gc.start_if_due(&handle).await;
        assert!(gc.running.is_some(), "not tried again");
        clean_up_ended(&gc).await;
    }
}
