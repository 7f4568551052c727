//! The running connectors: one handle per configured connector, shared by the HTTP layer
//! (webhooks, admin) and the connector's delivery worker, plus the admin operations.
//!
//! Admin operations write the connector's records and then wake its worker, which rereads its
//! outbox; they never touch the worker's in-memory state directly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value as Json};
use store::{now_ms, EntityKey, Seq, Store};
use tokio::sync::Notify;

use crate::config::Connector;
use crate::delivery;
use crate::error::{Error, Result};
use crate::inbox::Inbox;
use crate::locks::{KeyedGuard, KeyedLocks};
use crate::state::{Attempt, Records};

#[cfg(test)]
pub(crate) mod tests;

/// A monotonically increasing counter for metrics.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-connector counters since start.
#[derive(Debug, Default)]
pub struct Counters {
    /// Deltas acknowledged by the external system.
    pub deliveries: Counter,
    /// Delivery attempts that failed (retried or dead-lettered).
    pub delivery_failures: Counter,
    /// Deltas dead-lettered.
    pub dead_lettered: Counter,
    /// Webhooks applied (including those that changed nothing).
    pub webhooks_applied: Counter,
    /// Webhooks acknowledged as older than the last applied one.
    pub webhooks_stale: Counter,
    /// Repeated webhook ids answered with the original response.
    pub webhooks_duplicate: Counter,
    /// Webhooks refused (signature, body, mapping, reused id).
    pub webhooks_rejected: Counter,
}

/// What the worker last saw, for status.
#[derive(Debug, Default, Clone)]
pub(crate) struct Observed {
    pub last_error: Option<String>,
}

/// One configured connector at run time.
pub struct ConnectorHandle {
    /// Its validated configuration.
    pub connector: Connector,
    pub(crate) records: Records,
    /// The index of the webhook ids it remembers (see `inbox`).
    pub(crate) inbox: Inbox,
    /// Its counters.
    pub counters: Counters,
    pub(crate) wake: Notify,
    /// Set by admin operations: the worker must reread its outbox and state.
    pub(crate) rescan: AtomicBool,
    pub(crate) observed: Mutex<Observed>,
    /// Serializes read-modify-write of one entity's shadow and outbox records (webhooks,
    /// delivery outcomes, planning, admin), by entity (see `locks`). Webhooks hold it across the
    /// wait for their flush without holding a thread; the others lock it from blocking threads.
    entity_locks: KeyedLocks<EntityKey>,
    /// Serializes webhooks by id, shared by every connector (see `Connectors::inbound_locks`), so
    /// the inbox clean-up can hold an id's lock while it deletes its record.
    pub(crate) inbound_locks: Arc<KeyedLocks<String>>,
    /// Serializes read-modify-write of the connector's state record (cursor, paused, disabled):
    /// the worker's cursor, pause and resume, a 410 and replays. Taken before any entity lock,
    /// never while one is held.
    state_lock: Mutex<()>,
}

impl ConnectorHandle {
    /// Locks the connector's state record from a blocking thread; see `state_lock`.
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, ()> {
        self.state_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks `entity`'s connector records from a blocking thread (never from async code).
    pub(crate) fn lock_entity(&self, entity: &EntityKey) -> KeyedGuard<'_, EntityKey> {
        self.entity_locks.blocking_lock(entity.clone())
    }

    /// Locks `entity`'s connector records from async code.
    pub(crate) async fn lock_entity_async(&self, entity: &EntityKey) -> KeyedGuard<'_, EntityKey> {
        self.entity_locks.lock(entity.clone()).await
    }

    /// Locks several entities at once, in ascending order so that two callers can never wait
    /// on each other.
    pub(crate) fn lock_entities(&self, entities: &[EntityKey]) -> Vec<KeyedGuard<'_, EntityKey>> {
        self.entity_locks.blocking_lock_all(entities)
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// How many remembered webhook ids the in-memory index holds (see `inbox`).
    pub fn indexed_webhook_ids(&self) -> usize {
        self.inbox.indexed()
    }

    pub(crate) fn rescan_and_wake(&self) {
        self.rescan.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(crate) fn note_error(&self, error: Option<String>) {
        self.observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_error = error;
    }
}

/// Every configured connector; cheap to clone.
#[derive(Clone)]
pub struct Connectors {
    store: Store,
    by_name: Arc<BTreeMap<String, Arc<ConnectorHandle>>>,
    /// Serializes webhooks that carry the same id (see `locks`).
    inbound_locks: Arc<KeyedLocks<String>>,
    /// Where a webhook whose request was dropped runs on (see `inbound::RunsToEnd`), so that
    /// a shutdown that waits for the tracker's tasks waits for it too.
    pub(crate) tasks: tokio_util::task::TaskTracker,
}

/// A connector's state and lag, as `GET /v1/connectors/{name}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectorStatus {
    /// Its name.
    pub name: String,
    /// The entity kind it syncs.
    pub kind: String,
    /// `running`, `paused`, `disabled` or `inbound_only`.
    pub state: &'static str,
    /// Why it is disabled, when it is.
    pub disabled_reason: Option<String>,
    /// Whether it accepts webhooks.
    pub inbound: bool,
    /// The feed position it has planned deliveries up to.
    pub cursor: Seq,
    /// Feed rows (of any kind) after the cursor.
    pub feed_lag: u64,
    /// Entities with a delta waiting or in flight (dead letters excluded).
    pub entities_pending: usize,
    /// Entities dead-lettered.
    pub dead_letters: usize,
    /// Age of the oldest pending delta, in seconds.
    pub oldest_pending_age_seconds: Option<u64>,
    /// The last delivery error.
    pub last_error: Option<String>,
    /// When the next retry is due, in Unix milliseconds.
    pub next_retry_at_ms: Option<u64>,
    /// Deltas acknowledged since start.
    pub deliveries: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// Webhooks applied since start.
    pub webhooks_applied: u64,
    /// Stale webhooks ignored since start.
    pub webhooks_stale: u64,
    /// Duplicate webhooks answered since start.
    pub webhooks_duplicate: u64,
    /// Webhooks refused since start.
    pub webhooks_rejected: u64,
}

/// A dead-lettered delta.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// The entity's kind.
    pub kind: String,
    /// The entity's id.
    pub id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// The delta.
    pub delta: Map<String, Json>,
    /// The version it would bring the system to.
    pub version: String,
    /// Its idempotency key.
    pub idempotency_key: String,
}

/// What to resend.
#[derive(Clone, Debug, PartialEq)]
pub enum Replay {
    /// Every entity changed after this feed position.
    SinceSeq(Seq),
    /// One entity.
    Entity(EntityKey),
    /// Every entity of the connector's kind.
    All,
}

/// The delta that would be sent now.
#[derive(Clone, Debug, Serialize)]
pub struct Preview {
    /// The request body (`None` when the system is up to date).
    pub delta: Option<Map<String, Json>>,
    /// The entity version it brings the system to.
    pub version: Option<String>,
    /// The version the system is at, as far as known.
    pub previous_version: Option<String>,
    /// The idempotency key it would carry.
    pub idempotency_key: Option<String>,
    /// The attempt already in the outbox, which goes first.
    pub pending: Option<Attempt>,
}

impl Connectors {
    /// Wraps validated connectors around the store, reading the ids each remembers in arrival
    /// order (see `inbox`). Start their workers with [`Connectors::workers`].
    ///
    /// # Errors
    /// Store errors, and an inbox record key that cannot be read.
    pub fn new(store: Store, connectors: Vec<Connector>) -> Result<Self> {
        let inbound_locks = Arc::new(KeyedLocks::new());
        let by_name = connectors
            .into_iter()
            .map(|connector| {
                let records = Records::new(store.clone(), &connector.name);
                let handle = ConnectorHandle {
                    inbox: Inbox::open(&records, connector.dedupe_index_ids)?,
                    records,
                    connector,
                    counters: Counters::default(),
                    wake: Notify::new(),
                    rescan: AtomicBool::new(false),
                    observed: Mutex::new(Observed::default()),
                    entity_locks: KeyedLocks::new(),
                    state_lock: Mutex::new(()),
                    inbound_locks: Arc::clone(&inbound_locks),
                };
                Ok((handle.connector.name.clone(), Arc::new(handle)))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            store,
            by_name: Arc::new(by_name),
            inbound_locks,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Runs the webhooks whose requests are dropped before they end on `tasks`, so that whoever
    /// waits for those (the server, before it closes the store) waits for them too.
    #[must_use]
    pub fn with_task_tracker(mut self, tasks: tokio_util::task::TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// The worker futures, one per connector, each running until `shutdown` is cancelled.
    pub fn workers(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Vec<(
        String,
        impl std::future::Future<Output = ()> + Send + 'static,
    )> {
        self.by_name
            .values()
            .map(|handle| {
                (
                    handle.connector.name.clone(),
                    delivery::run(handle.clone(), shutdown.child_token()),
                )
            })
            .collect()
    }

    /// The handles, in name order.
    pub fn handles(&self) -> impl Iterator<Item = &Arc<ConnectorHandle>> {
        self.by_name.values()
    }

    pub(crate) fn handle(&self, name: &str) -> Result<Arc<ConnectorHandle>> {
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownConnector(name.to_string()))
    }

    /// The locks that serialize webhooks with the same id, shared so that a webhook's handling,
    /// which outlives its request if that is dropped, can hold its id's lock.
    pub(crate) fn inbound_locks(&self) -> Arc<KeyedLocks<String>> {
        self.inbound_locks.clone()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        name: &str,
        work: impl FnOnce(Arc<ConnectorHandle>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let handle = self.handle(name)?;
        tokio::task::spawn_blocking(move || work(handle)).await?
    }

    /// Every connector's status.
    ///
    /// # Errors
    /// Store errors only.
    pub async fn statuses(&self) -> Result<Vec<ConnectorStatus>> {
        let mut statuses = Vec::new();
        for name in self.by_name.keys() {
            statuses.push(self.status(name).await?);
        }
        Ok(statuses)
    }

    /// One connector's status.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], store errors.
    pub async fn status(&self, name: &str) -> Result<ConnectorStatus> {
        let last_seq = self.store.last_seq();
        self.blocking(name, move |handle| {
            let state = handle.records.state()?;
            let attempts = handle.records.attempts()?;
            // Entities changed while being delivered, whose next delta is not planned yet.
            let marked: std::collections::BTreeSet<EntityKey> =
                handle.records.replans()?.into_iter().collect();
            let now = now_ms();
            let pending: Vec<&Attempt> = attempts
                .iter()
                .map(|(_, a)| a)
                .filter(|a| a.dead.is_none())
                .collect();
            let counters = &handle.counters;
            Ok(ConnectorStatus {
                name: handle.connector.name.clone(),
                kind: handle.connector.kind.to_string(),
                state: if handle.connector.url.is_none() {
                    "inbound_only"
                } else if state.disabled.is_some() {
                    "disabled"
                } else if state.paused {
                    "paused"
                } else {
                    "running"
                },
                disabled_reason: state.disabled.clone(),
                inbound: handle.connector.webhook_secret.is_some(),
                cursor: state.cursor,
                // An inbound-only connector follows no feed, so nothing lags.
                feed_lag: if handle.connector.url.is_none() {
                    0
                } else {
                    last_seq.0.saturating_sub(state.cursor.0)
                },
                entities_pending: attempts
                    .iter()
                    .filter(|(entity, attempt)| attempt.dead.is_none() && !marked.contains(entity))
                    .count()
                    + marked.len(),
                dead_letters: attempts.len() - pending.len(),
                oldest_pending_age_seconds: pending
                    .iter()
                    .map(|a| now.saturating_sub(a.created_at_ms) / 1000)
                    .max(),
                last_error: handle
                    .observed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_error
                    .clone(),
                next_retry_at_ms: pending
                    .iter()
                    .filter(|a| a.attempts > 0)
                    .map(|a| a.next_at_ms)
                    .min(),
                deliveries: counters.deliveries.get(),
                failures: counters.delivery_failures.get(),
                webhooks_applied: counters.webhooks_applied.get(),
                webhooks_stale: counters.webhooks_stale.get(),
                webhooks_duplicate: counters.webhooks_duplicate.get(),
                webhooks_rejected: counters.webhooks_rejected.get(),
            })
        })
        .await
    }

    /// Stops deliveries until [`Connectors::resume`]; webhooks are still accepted.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], store errors.
    pub async fn pause(&self, name: &str) -> Result<ConnectorStatus> {
        self.set_paused(name, true).await
    }

    /// Resumes deliveries, also after the connector was disabled by a 410.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], store errors.
    pub async fn resume(&self, name: &str) -> Result<ConnectorStatus> {
        self.set_paused(name, false).await
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<ConnectorStatus> {
        self.blocking(name, move |handle| {
            let _state_locked = handle.lock_state();
            let mut state = handle.records.state()?;
            state.paused = paused;
            if !paused {
                state.disabled = None;
            }
            handle
                .records
                .write(vec![handle.records.put_state(&state)])?;
            handle.rescan_and_wake();
            Ok(())
        })
        .await?;
        self.status(name).await
    }

    /// The dead-lettered deltas.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], store errors.
    pub async fn dead_letters(&self, name: &str) -> Result<Vec<DeadLetter>> {
        self.blocking(name, |handle| {
            Ok(handle
                .records
                .attempts()?
                .into_iter()
                .filter_map(|(entity, attempt)| {
                    Some(DeadLetter {
                        kind: entity.kind.to_string(),
                        id: entity.id.to_string(),
                        reason: attempt.dead?,
                        attempts: attempt.attempts,
                        delta: attempt.delta,
                        version: attempt.version,
                        idempotency_key: attempt.key,
                    })
                })
                .collect())
        })
        .await
    }

    /// Takes an entity out of the dead letters and delivers its current delta now.
    ///
    /// # Errors
    /// [`Error::NoDeadLetter`] when the entity is not dead-lettered.
    pub async fn retry_dead_letter(&self, name: &str, entity: EntityKey) -> Result<()> {
        self.blocking(name, move |handle| {
            let _locked = handle.lock_entity(&entity);
            if handle
                .records
                .attempt(&entity)?
                .filter(|a| a.dead.is_some())
                .is_none()
            {
                return Err(Error::NoDeadLetter(entity.to_string()));
            }
            // The dead delta was never acknowledged; recompute from the entity as it is now.
            let shadow = handle.records.shadow(&entity)?;
            let writes = delivery::replan_dead(&handle, &entity, &shadow)?;
            handle.records.write(writes)?;
            handle.rescan_and_wake();
            Ok(())
        })
        .await
    }

    /// Forgets what the external system is known to have, so the affected entities are sent again
    /// (dead-lettered ones among them too); returns how many entities are affected.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], [`Error::OutboundDisabled`], store errors.
    pub async fn replay(&self, name: &str, replay: Replay) -> Result<usize> {
        self.blocking(name, move |handle| {
            if handle.connector.url.is_none() {
                return Err(Error::OutboundDisabled(handle.connector.name.clone()));
            }
            let records = &handle.records;
            let _state_locked = handle.lock_state();
            let mut state = records.state()?;
            let entities: Vec<EntityKey> = match &replay {
                Replay::Entity(entity) => {
                    check_kind(&handle, entity)?;
                    vec![entity.clone()]
                }
                Replay::All => {
                    state.cursor = Seq::ZERO;
                    // Dead letters of entities the system never acknowledged have no shadow.
                    let mut all: std::collections::BTreeSet<EntityKey> =
                        records.shadowed_entities()?.into_iter().collect();
                    all.extend(
                        records
                            .attempts()?
                            .into_iter()
                            .filter(|(_, attempt)| attempt.dead.is_some())
                            .map(|(entity, _)| entity),
                    );
                    all.into_iter().collect()
                }
                Replay::SinceSeq(since) => {
                    let mut entities = std::collections::BTreeSet::new();
                    let mut position = *since;
                    loop {
                        let rows =
                            records
                                .store()
                                .feed(position, Some(&handle.connector.kind), 1000)?;
                        let Some(last) = rows.last() else { break };
                        position = last.seq;
                        entities.extend(rows.into_iter().map(|row| EntityKey {
                            kind: row.kind,
                            id: row.id,
                        }));
                    }
                    state.cursor = state.cursor.min(*since);
                    entities.into_iter().collect()
                }
            };
            // Shadows and attempts are read and written under the entities' locks, so a webhook
            // or a delivery outcome cannot land in between; everything goes in one write.
            let _locked = handle.lock_entities(&entities);
            let mut writes = Vec::new();
            for entity in &entities {
                let forgotten = records.forgotten_shadow(entity)?;
                writes.push(records.put_shadow(entity, &forgotten));
                // A dead letter is planned afresh here (planning alone leaves a delta dead at
                // its version where it is), and so is the one entity asked for; the rest are
                // planned by the worker, from the cursor.
                match records.attempt(entity)? {
                    Some(attempt) if attempt.dead.is_some() => {
                        writes.extend(delivery::replan_dead(&handle, entity, &forgotten)?);
                    }
                    attempt if matches!(replay, Replay::Entity(_)) => {
                        writes.extend(delivery::plan_with(&handle, entity, attempt, &forgotten)?);
                    }
                    _ => {}
                }
            }
            writes.push(records.put_state(&state));
            records.write(writes)?;
            handle.rescan_and_wake();
            Ok(entities.len())
        })
        .await
    }

    /// The delta that would be sent for an entity now, without sending it.
    ///
    /// # Errors
    /// [`Error::UnknownConnector`], [`Error::Mapping`] when the entity cannot be mapped, store errors.
    pub async fn preview(&self, name: &str, entity: EntityKey) -> Result<Preview> {
        self.blocking(name, move |handle| {
            if handle.connector.url.is_none() {
                return Err(Error::OutboundDisabled(handle.connector.name.clone()));
            }
            check_kind(&handle, &entity)?;
            delivery::preview(&handle, &entity)
        })
        .await
    }
}

/// Refuses an entity of another kind than the connector's: it would never be delivered.
fn check_kind(handle: &ConnectorHandle, entity: &EntityKey) -> Result<()> {
    if entity.kind == handle.connector.kind {
        Ok(())
    } else {
        Err(Error::WrongKind {
            connector: handle.connector.name.clone(),
            expected: handle.connector.kind.to_string(),
            kind: entity.kind.to_string(),
        })
    }
}
