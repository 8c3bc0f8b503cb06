//! The single Lambda's store: a sync's current run as one DynamoDB item, written with
//! conditional updates and guarded by a lease.
//!
//! ## Table design
//!
//! One table, partition key `pk` (S) and sort key `sk` (S); any number of syncs share it.
//!
//! | `pk` | `sk` | attributes |
//! |---|---|---|
//! | `sync#{SYNC_ID}` | `current` | `envelope` (S, the [`persist`] envelope), `seq` (N), `run_id`, `phase`, `wake_at` (N, epoch ms, while waiting), `updated_at` (N, epoch ms), `lease_owner` (S), `lease_expires` (N, epoch ms) |
//! | `sync#{SYNC_ID}` | `run#{run_id}` | a finished run: `envelope`, `seq`, `run_id`, `phase`, `finished_at` (N, epoch ms), `expires_at` (N, epoch **seconds**, the table's TTL attribute) |
//!
//! The `current` item keeps the last run after it ends, so the next run can carry its
//! watermark (`SINCE=auto`); history items are copies for inspection that DynamoDB's TTL
//! deletes after the retention period.
//!
//! ## Why the lease lives on the `current` item
//!
//! Every write that matters — taking the lease, saving a step, starting a run — is then a
//! single-item conditional write, which DynamoDB applies atomically, with no transactions.
//! Consequently the item may exist with a lease but no `envelope` (the very first
//! invocation), so "create" is conditional on `attribute_not_exists(envelope)` rather than
//! `attribute_not_exists(pk)`.
//!
//! ## Contracts
//!
//! - [`DynamoTable::acquire`] reads the item (strongly consistent) and then takes the lease
//!   with one conditional update: the lease must be free, expired, or already this owner's, and
//!   the run must still be the one just read. Otherwise the answer is [`Acquired::Busy`], and
//!   nothing was written.
//! - A stored run that is corrupt, disagrees with its own `seq` attribute, or has a newer
//!   `schema_version` is a [`DynamoError::Corrupt`], and the item is left untouched (the error
//!   is raised before the lease is taken).
//! - [`RunStore::save`] is conditional on `lease_owner = me`, `run_id` and the `seq` this
//!   store last read or wrote (the driver leaves out saves of some per-file steps, so the
//!   saved `seq` may be further ahead than one); each save renews the lease. A failed condition is
//!   [`StoreError::Conflict`]: another worker owns the run now.
//! - The lease outlives the invocation: take a lease duration longer than the longest
//!   invocation (the default, 16 minutes, exceeds Lambda's 15), so a crashed invocation's
//!   lease expires only once it is certainly dead, and the next invocation resumes.
//! - [`DynamoStore::release`] removes the lease if it is still this owner's.

use crate::aws::{is_transient_sdk_error, LambdaFailure};
use crate::driver::{Clock, RunStore, StoreError, SystemClock};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use pathling_import_core::effect::Next;
use pathling_import_core::{persist, SyncRun, Timestamp};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The default lease: longer than Lambda's 15-minute maximum invocation.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(16 * 60);
/// The default retention of finished runs' history items.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// DynamoDB refuses items above 400 KB; keep a margin for the other attributes.
const MAX_ENVELOPE: usize = 390 * 1024;

const CURRENT: &str = "current";

/// A DynamoDB item: attribute names and values.
pub type Item = HashMap<String, AttributeValue>;

#[derive(Debug, thiserror::Error)]
pub enum DynamoError {
    /// The stored item cannot be used (corrupt, inconsistent, or from a newer version). The
    /// item was not changed.
    #[error("the stored run of sync {sync_id:?} cannot be used: {message}")]
    Corrupt { sync_id: String, message: String },
    #[error("sync id {0:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ .")]
    BadSyncId(String),
    #[error("DynamoDB: {message}")]
    Aws { transient: bool, message: String },
}

impl From<DynamoError> for LambdaFailure {
    fn from(e: DynamoError) -> Self {
        match &e {
            DynamoError::Corrupt { .. } => LambdaFailure::state(e.to_string()),
            DynamoError::BadSyncId(_) => LambdaFailure::configuration(e.to_string()),
            DynamoError::Aws {
                transient: true, ..
            } => LambdaFailure::transient(e.to_string()),
            // Access denied, missing table, validation: the deployment is wrong.
            DynamoError::Aws { .. } => LambdaFailure::configuration(e.to_string()),
        }
    }
}

fn aws_error<E: ProvideErrorMetadata + std::error::Error + 'static>(
    context: &str,
    e: &SdkError<E>,
) -> DynamoError {
    DynamoError::Aws {
        transient: is_transient_sdk_error(e),
        message: format!("{context}: {}", crate::error_chain(e)),
    }
}

/// Who holds a sync's lease, until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub owner: String,
    pub expires: Timestamp,
}

/// A sync's `current` item, read without taking the lease.
#[derive(Clone, Debug)]
pub struct Current {
    pub run: Option<SyncRun>,
    pub lease: Option<Lease>,
}

/// The answer of [`DynamoTable::acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// The lease is ours; `run` is the stored run (none before the first run).
    Leased {
        store: DynamoStore,
        run: Option<Box<SyncRun>>,
    },
    /// Another invocation holds the lease (or took it while we tried).
    Busy {
        lease: Option<Lease>,
        run: Option<Box<SyncRun>>,
    },
}

/// A table of syncs. Cheap to clone; build once per container.
#[derive(Clone)]
pub struct DynamoTable {
    client: Client,
    table: String,
    lease: Duration,
    retention: Duration,
    /// Lease expiries and timestamps are read from it (a virtual clock in lease tests).
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DynamoTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoTable")
            .field("table", &self.table)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl DynamoTable {
    pub fn new(
        client: Client,
        table: impl Into<String>,
        lease: Duration,
        retention: Duration,
    ) -> Self {
        DynamoTable {
            client,
            table: table.into(),
            lease,
            retention,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same table on another clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn table_clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The partition key of a sync: `sync#{sync_id}`.
    pub fn partition_key(sync_id: &str) -> Result<String, DynamoError> {
        let ok = !sync_id.is_empty()
            && sync_id.len() <= 128
            && sync_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(format!("sync#{sync_id}"))
        } else {
            Err(DynamoError::BadSyncId(sync_id.to_string()))
        }
    }

    /// Reads the `current` item (strongly consistent) without taking the lease.
    pub async fn current(&self, sync_id: &str) -> Result<Current, DynamoError> {
        let pk = Self::partition_key(sync_id)?;
        let item = self.get(&pk, CURRENT).await?;
        let lease = item.as_ref().and_then(lease_of);
        let run = match &item {
            Some(item) => decode_item(sync_id, item)?,
            None => None,
        };
        Ok(Current { run, lease })
    }

    /// A finished run's history item, if it has not expired yet.
    pub async fn finished_run(
        &self,
        sync_id: &str,
        run_id: &str,
    ) -> Result<Option<SyncRun>, DynamoError> {
        let pk = Self::partition_key(sync_id)?;
        match self.get(&pk, &format!("run#{run_id}")).await? {
            Some(item) => decode_item(sync_id, &item),
            None => Ok(None),
        }
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, DynamoError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| aws_error(&format!("reading {pk}/{sk} from {}", self.table), &e))?;
        Ok(out.item)
    }

    /// Takes the sync's lease for `owner` and returns the stored run, or reports who holds it.
    pub async fn acquire(&self, sync_id: &str, owner: &str) -> Result<Acquired, DynamoError> {
        let pk = Self::partition_key(sync_id)?;
        let item = self.get(&pk, CURRENT).await?;
        let t = self.table_clock().now();
        let lease = item.as_ref().and_then(lease_of);
        if let Some(l) = lease.as_ref().filter(|l| l.owner != owner && l.expires > t) {
            // Someone works on it: report what we can see, never fail on its content.
            let run = item
                .as_ref()
                .and_then(|i| decode_item(sync_id, i).ok().flatten());
            return Ok(Acquired::Busy {
                lease: Some(l.clone()),
                run: run.map(Box::new),
            });
        }
        // Decode before writing anything: a corrupt item must stay untouched.
        let run = match &item {
            Some(item) => decode_item(sync_id, item)?,
            None => None,
        };
        let expires = t.plus_ms(ms(self.lease));
        let mut values = HashMap::from([
            (":me".to_string(), s(owner)),
            (":now".to_string(), n(t.0)),
            (":expires".to_string(), n(expires.0)),
        ]);
        let mut names = HashMap::from([
            ("#owner".to_string(), "lease_owner".to_string()),
            ("#expires".to_string(), "lease_expires".to_string()),
        ]);
        // The run must still be the one just decoded: otherwise our view is stale.
        let guard = match &run {
            Some(r) => {
                values.insert(":seq".into(), n(r.seq));
                values.insert(":rid".into(), s(&r.run_id));
                names.insert("#seq".into(), "seq".into());
                names.insert("#rid".into(), "run_id".into());
                "#seq = :seq AND #rid = :rid"
            }
            None => {
                names.insert("#env".into(), "envelope".into());
                "attribute_not_exists(#env)"
            }
        };
        let condition = format!(
            "(attribute_not_exists(#owner) OR #expires < :now OR #owner = :me) AND {guard}"
        );
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(&pk))
            .key("sk", s(CURRENT))
            .update_expression("SET #owner = :me, #expires = :expires")
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Acquired::Leased {
                store: DynamoStore {
                    table: self.clone(),
                    sync_id: sync_id.to_string(),
                    pk,
                    owner: owner.to_string(),
                    current: run.as_ref().map(|r| (r.run_id.clone(), r.seq)),
                    finished: run.as_ref().filter(|r| r.is_done()).cloned().map(Box::new),
                    lease_expires: Arc::new(AtomicU64::new(expires.0)),
                },
                run: run.map(Box::new),
            }),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                // Raced by another invocation between our read and our write.
                let current = self.current(sync_id).await.ok();
                Ok(Acquired::Busy {
                    lease: current.as_ref().and_then(|c| c.lease.clone()),
                    run: current.and_then(|c| c.run).map(Box::new),
                })
            }
            Err(e) => Err(aws_error(&format!("taking the lease on {pk}"), &e)),
        }
    }
}

/// A sync's run in DynamoDB, with the lease held. Obtained from [`DynamoTable::acquire`].
#[derive(Debug)]
pub struct DynamoStore {
    table: DynamoTable,
    sync_id: String,
    pk: String,
    owner: String,
    /// `(run_id, seq)` of the stored run, as last read or written.
    current: Option<(String, u64)>,
    /// The stored run if it has ended, so its history item can be (re)written before a new
    /// run replaces it.
    finished: Option<Box<SyncRun>>,
    /// Epoch ms; shared so a watchdog can stop the invocation before the lease lapses.
    lease_expires: Arc<AtomicU64>,
}

impl DynamoStore {
    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn sync_id(&self) -> &str {
        &self.sync_id
    }

    /// When the lease expires unless renewed by a save.
    pub fn lease_expires(&self) -> Timestamp {
        Timestamp(self.lease_expires.load(Ordering::Acquire))
    }

    /// The lease's expiry (epoch ms), updated by every save: a watchdog reads it to stop
    /// starting effects before the lease could lapse (see `single_lambda`).
    pub fn lease_watch(&self) -> Arc<AtomicU64> {
        self.lease_expires.clone()
    }

    /// Replaces the stored run with a new one (the first run, or the next after one ended).
    /// The ended run's history item is written first, so a crash in between loses nothing.
    pub async fn replace(&mut self, run: &SyncRun) -> Result<(), StoreError> {
        if let Some(previous) = self.finished.clone() {
            self.write_history(&previous).await?;
        }
        let mut values = HashMap::new();
        let mut names = HashMap::from([("#env".to_string(), "envelope".to_string())]);
        let guard = match &self.current {
            Some((run_id, seq)) => {
                values.insert(":old_seq".to_string(), n(*seq));
                values.insert(":old_rid".to_string(), s(run_id));
                names.insert("#seq".into(), "seq".into());
                names.insert("#rid".into(), "run_id".into());
                "#seq = :old_seq AND #rid = :old_rid"
            }
            None => "attribute_not_exists(#env)",
        };
        self.write_current(run, guard, names, values).await?;
        Ok(())
    }

    /// Gives the lease up (if still ours). Errors are only logged: an unreleased lease merely
    /// expires.
    pub async fn release(self) {
        let result = self
            .table
            .client
            .update_item()
            .table_name(&self.table.table)
            .key("pk", s(&self.pk))
            .key("sk", s(CURRENT))
            .update_expression("REMOVE #owner, #expires")
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "lease_owner")
            .expression_attribute_names("#expires", "lease_expires")
            .expression_attribute_values(":me", s(&self.owner))
            .send()
            .await;
        if let Err(e) = result {
            let lost = e
                .as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception());
            if !lost {
                tracing::warn!(sync_id = %self.sync_id, "releasing the lease failed (it will expire): {}", crate::error_chain(&e));
            }
        }
    }

    async fn write_current(
        &mut self,
        run: &SyncRun,
        guard: &str,
        mut names: HashMap<String, String>,
        mut values: HashMap<String, AttributeValue>,
    ) -> Result<u64, StoreError> {
        let t = self.table.table_clock().now();
        let mut item = encode_item(run, t)?;
        // What the write costs is its envelope (the other attributes are a few dozen bytes).
        let bytes = item
            .get("envelope")
            .and_then(|e| e.as_s().ok())
            .map_or(0, |e| e.len() as u64);
        let mut take = |name: &str| item.remove(name).unwrap_or(AttributeValue::Null(true));
        let expires = t.plus_ms(ms(self.table.lease));
        names.extend([
            ("#env".to_string(), "envelope".to_string()),
            ("#seq".to_string(), "seq".to_string()),
            ("#rid".to_string(), "run_id".to_string()),
            ("#phase".to_string(), "phase".to_string()),
            ("#updated".to_string(), "updated_at".to_string()),
            ("#wake".to_string(), "wake_at".to_string()),
            ("#owner".to_string(), "lease_owner".to_string()),
            ("#expires".to_string(), "lease_expires".to_string()),
        ]);
        values.extend([
            (":env".to_string(), take("envelope")),
            (":seq".to_string(), take("seq")),
            (":rid".to_string(), take("run_id")),
            (":phase".to_string(), take("phase")),
            (":updated".to_string(), take("updated_at")),
            (":me".to_string(), s(&self.owner)),
            (":expires".to_string(), n(expires.0)),
        ]);
        let mut update = "SET #env = :env, #seq = :seq, #rid = :rid, #phase = :phase, \
                          #updated = :updated, #expires = :expires"
            .to_string();
        match item.remove("wake_at") {
            Some(w) => {
                values.insert(":wake".to_string(), w);
                update.push_str(", #wake = :wake");
            }
            None => update.push_str(" REMOVE #wake"),
        }
        let result = self
            .table
            .client
            .update_item()
            .table_name(&self.table.table)
            .key("pk", s(&self.pk))
            .key("sk", s(CURRENT))
            .update_expression(update)
            .condition_expression(format!("#owner = :me AND {guard}"))
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match result {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                return Err(StoreError::Conflict {
                    expected: run.seq.saturating_sub(1),
                });
            }
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "saving run {} of sync {:?}: {}",
                    run.run_id,
                    self.sync_id,
                    crate::error_chain(&e)
                )))
            }
        }
        self.current = Some((run.run_id.clone(), run.seq));
        self.lease_expires.store(expires.0, Ordering::Release);
        self.finished = None;
        if run.is_done() {
            // The run is safely recorded as ended in `current`; a failed copy is written
            // again before the next run replaces it.
            self.finished = Some(Box::new(run.clone()));
            if let Err(e) = self.write_history(run).await {
                tracing::warn!(run_id = %run.run_id, "writing the finished run's history item failed (retried before the next run): {e}");
            }
        }
        Ok(bytes)
    }

    async fn write_history(&self, run: &SyncRun) -> Result<(), StoreError> {
        let t = self.table.table_clock().now();
        let expires_at = t.plus_ms(ms(self.table.retention)).0 / 1000;
        self.table
            .client
            .put_item()
            .table_name(&self.table.table)
            .item("pk", s(&self.pk))
            .item("sk", s(&format!("run#{}", run.run_id)))
            .item("envelope", s(&persist::encode_string(run)))
            .item("seq", n(run.seq))
            .item("run_id", s(&run.run_id))
            .item("phase", s(run.state.name()))
            .item("finished_at", n(t.0))
            .item("expires_at", n(expires_at))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::Io(format!(
                    "writing the history of run {}: {}",
                    run.run_id,
                    crate::error_chain(&e)
                ))
            })
    }
}

impl RunStore for DynamoStore {
    async fn save(&mut self, run: &SyncRun) -> Result<u64, StoreError> {
        // The item must still hold the run as this store last read or wrote it.
        let expected = match &self.current {
            Some((run_id, seq)) if *run_id == run.run_id => *seq,
            _ => run.seq.saturating_sub(1),
        };
        if run.seq <= expected {
            return Err(StoreError::Conflict { expected });
        }
        let mut values = HashMap::new();
        values.insert(":expected".to_string(), n(expected));
        values.insert(":rid".to_string(), s(&run.run_id));
        let names = HashMap::new();
        // `#seq`/`#rid` are bound by write_current; `:rid` is the same value in SET and guard.
        self.write_current(run, "#seq = :expected AND #rid = :rid", names, values)
            .await
    }
}

/// The attributes of a sync's `current` item that hold `run`, as a save at `now` writes them
/// (everything but the keys and the lease): `envelope`, `seq`, `run_id`, `phase`,
/// `updated_at`, and `wake_at` while the run waits. Fails when the envelope is too large for
/// an item. [`decode_item`] reads the run back.
pub fn encode_item(run: &SyncRun, now: Timestamp) -> Result<Item, StoreError> {
    let envelope = persist::encode_string(run);
    if envelope.len() > MAX_ENVELOPE {
        return Err(StoreError::Io(format!(
            "the run's envelope is {} KB, more than a DynamoDB item can hold",
            envelope.len() / 1024
        )));
    }
    let mut item = Item::from([
        ("envelope".to_string(), s(&envelope)),
        ("seq".to_string(), n(run.seq)),
        ("run_id".to_string(), s(&run.run_id)),
        ("phase".to_string(), s(run.state.name())),
        ("updated_at".to_string(), n(now.0)),
    ]);
    if let Some(w) = wake_at(run, now) {
        item.insert("wake_at".to_string(), n(w.0));
    }
    Ok(item)
}

/// When a waiting run next wants to run (for observers of the item).
fn wake_at(run: &SyncRun, now: Timestamp) -> Option<Timestamp> {
    match run.next(now) {
        Next::SleepUntil { until, .. } => Some(until),
        _ => None,
    }
}

fn lease_of(item: &Item) -> Option<Lease> {
    let owner = item.get("lease_owner")?.as_s().ok()?.clone();
    let expires = item.get("lease_expires")?.as_n().ok()?.parse().ok()?;
    Some(Lease {
        owner,
        expires: Timestamp(expires),
    })
}

/// The run an item holds (`None`: a lease-only item), checked against its own attributes.
pub fn decode_item(sync_id: &str, item: &Item) -> Result<Option<SyncRun>, DynamoError> {
    let corrupt = |message: String| DynamoError::Corrupt {
        sync_id: sync_id.to_string(),
        message,
    };
    let Some(envelope) = item.get("envelope") else {
        if item.contains_key("seq") || item.contains_key("run_id") {
            return Err(corrupt("it has a seq or run_id but no envelope".into()));
        }
        return Ok(None);
    };
    let text = envelope
        .as_s()
        .map_err(|_| corrupt("its envelope attribute is not a string".into()))?;
    let run = persist::decode(text.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
    let seq = item
        .get("seq")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if seq != Some(run.seq) {
        return Err(corrupt(format!(
            "its seq attribute ({}) disagrees with its envelope's seq ({})",
            seq.map(|s| s.to_string())
                .unwrap_or_else(|| "missing".into()),
            run.seq
        )));
    }
    Ok(Some(run))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Creates a table of this design (on-demand billing, TTL on `expires_at`), for local
/// development and tests; deployments create it from `deploy/template.yaml`. An existing
/// table is fine.
pub async fn create_table(client: &Client, table: &str) -> Result<(), DynamoError> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        TimeToLiveSpecification,
    };
    let build = |e: aws_sdk_dynamodb::error::BuildError| DynamoError::Aws {
        transient: false,
        message: e.to_string(),
    };
    let result = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)?,
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("sk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .map_err(build)?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("sk")
                .key_type(KeyType::Range)
                .build()
                .map_err(build)?,
        )
        .send()
        .await;
    match result {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) =>
        {
            return Ok(())
        }
        Err(e) => return Err(aws_error(&format!("creating table {table}"), &e)),
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()
                .map_err(build)?,
        )
        .send()
        .await
        .map_err(|e| aws_error(&format!("enabling TTL on {table}"), &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sync_ids_are_checked() {
        assert_eq!(DynamoTable::partition_key("prod-1").unwrap(), "sync#prod-1");
        assert!(DynamoTable::partition_key("").is_err());
        assert!(DynamoTable::partition_key("a#b").is_err());
        assert!(DynamoTable::partition_key(&"x".repeat(129)).is_err());
    }

    #[test]
    fn a_lease_only_item_has_no_run_and_a_half_item_is_corrupt() {
        let lease_only = Item::from([
            ("lease_owner".to_string(), s("me")),
            ("lease_expires".to_string(), n(5)),
        ]);
        assert!(decode_item("x", &lease_only).unwrap().is_none());
        assert_eq!(
            lease_of(&lease_only),
            Some(Lease {
                owner: "me".into(),
                expires: Timestamp(5)
            })
        );
        let half = Item::from([("seq".to_string(), n(3))]);
        assert!(matches!(
            decode_item("x", &half),
            Err(DynamoError::Corrupt { .. })
        ));
        let not_json = Item::from([
            ("envelope".to_string(), s("{nope")),
            ("seq".to_string(), n(3)),
        ]);
        let e = decode_item("x", &not_json).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }
}
