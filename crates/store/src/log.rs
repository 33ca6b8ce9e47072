//! The durable event log on SQL.
//!
//! Topics are split into a fixed number of partitions by key; each partition
//! has dense offsets. Offsets are allocated by bumping a per-partition counter
//! row inside the append transaction: the row lock is held until commit, so on
//! PostgreSQL too, offsets in a partition become visible in offset order and a
//! reader can never skip an event that commits late.

use crate::bus::{NatsBus, NatsConfig};
use crate::db::{Backend, Db, Tx};
use crate::error::StoreError;
use crate::metrics::{LogMetrics, TopicLabels};
use crate::migrate::Migration;
use crate::Result;
use flowline_core::event::partition_for;
use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use serde::Serialize;
use sqlx::Row;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Dead-lettered events of group `G` are appended to topic `dlq.G`.
pub const DLQ_TOPIC_PREFIX: &str = "dlq.";

pub(crate) const LOG_MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "log",
        version: 1,
        name: "init",
        sqlite: include_str!("../migrations/sqlite/log_0001_init.sql"),
        postgres: include_str!("../migrations/postgres/log_0001_init.sql"),
    },
    Migration {
        scope: "log",
        version: 2,
        name: "leases",
        sqlite: include_str!("../migrations/sqlite/log_0002_leases.sql"),
        postgres: include_str!("../migrations/postgres/log_0002_leases.sql"),
    },
    Migration {
        scope: "log",
        version: 3,
        name: "traceparent",
        sqlite: include_str!("../migrations/sqlite/log_0003_traceparent.sql"),
        postgres: include_str!("../migrations/postgres/log_0003_traceparent.sql"),
    },
];

#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Partitions per topic. Fixed for the life of a log: changing it would move keys.
    pub partitions: u32,
    /// Handling attempts before an event is dead-lettered.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Events fetched per partition per round.
    pub fetch_batch: i64,
    /// How often an idle consumer looks for appends made by other processes.
    pub idle_poll: Duration,
    /// Names this process as a partition owner (unique per process).
    pub owner: String,
    /// How long a partition stays with an owner that stops renewing it.
    pub lease: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: 4,
            max_attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            fetch_batch: 1000,
            idle_poll: Duration::from_millis(500),
            owner: Uuid::now_v7().to_string(),
            lease: Duration::from_secs(10),
        }
    }
}

/// Where a replay or a tail starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Earliest,
    Latest,
    /// The same offset in every partition.
    Offset(i64),
    /// The first event appended at or after this time, per partition.
    Time(Timestamp),
}

impl std::str::FromStr for ReplayFrom {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "earliest" | "beginning" => Ok(ReplayFrom::Earliest),
            "latest" | "end" => Ok(ReplayFrom::Latest),
            _ => {
                if let Ok(n) = s.parse::<i64>() {
                    if n < 0 {
                        return Err(format!("offset must be >= 0, got {n}"));
                    }
                    return Ok(ReplayFrom::Offset(n));
                }
                Timestamp::parse_rfc3339(s)
                    .map(ReplayFrom::Time)
                    .map_err(|_| {
                        format!(
                            "`{s}` is neither an offset, an RFC 3339 time, `earliest` nor `latest`"
                        )
                    })
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupPosition {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// Next offset the group will consume.
    pub next_offset: i64,
    /// Next offset the log will assign.
    pub end_offset: i64,
    pub lag: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopicStats {
    pub topic: String,
    pub partitions: i64,
    pub events: i64,
    pub bytes: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub event_type: String,
    pub error: String,
    pub attempts: i32,
    pub status: String,
    pub dead_at: Timestamp,
}

/// The event log. Cheap to clone.
#[derive(Clone)]
pub struct EventLog {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) opts: LogOptions,
    pub(crate) appended: watch::Sender<u64>,
    pub(crate) metrics: LogMetrics,
    /// Distributed mode: events live in NATS JetStream; `db` keeps groups'
    /// leases and dead letters.
    pub(crate) bus: Option<NatsBus>,
}

const EVENT_COLUMNS: &str = "topic, partition_no, log_offset, event_id, event_type, event_key, \
    occurred_at, appended_at, correlation_id, causation_id, schema_version, payload, traceparent";

macro_rules! decode_event {
    ($row:expr) => {{
        let row = $row;
        RecordedEvent {
            partition: row.try_get("partition_no")?,
            offset: row.try_get("log_offset")?,
            appended_at: Timestamp::from_micros(row.try_get("appended_at")?),
            envelope: decode_envelope!(row),
        }
    }};
}

impl EventLog {
    /// Opens the log in its own database (`eventlog`) and applies its migrations.
    pub async fn open(backend: &Backend, opts: LogOptions) -> Result<EventLog> {
        let db = Db::open(backend, "eventlog").await?;
        Self::with_db(db, opts).await
    }

    pub async fn with_db(db: Db, opts: LogOptions) -> Result<EventLog> {
        Self::with_bus(db, opts, None).await
    }

    /// The log on NATS JetStream (`Some`) or in `db` (`None`); `db` holds the
    /// groups' leases and dead letters either way.
    pub async fn with_bus(db: Db, opts: LogOptions, nats: Option<NatsConfig>) -> Result<EventLog> {
        db.migrate(LOG_MIGRATIONS).await?;
        let (appended, _) = watch::channel(0);
        let bus = match nats {
            Some(cfg) => {
                let bus = NatsBus::connect(cfg).await?;
                bus.forward_wakeups(appended.clone()).await?;
                Some(bus)
            }
            None => None,
        };
        Ok(EventLog {
            inner: Arc::new(Inner {
                db,
                opts,
                appended,
                metrics: LogMetrics::default(),
                bus,
            }),
        })
    }

    /// Opens the log's database and, when `nats` is given, the bus.
    pub async fn open_with(
        backend: &Backend,
        opts: LogOptions,
        nats: Option<NatsConfig>,
    ) -> Result<EventLog> {
        let db = Db::open(backend, "eventlog").await?;
        Self::with_bus(db, opts, nats).await
    }

    /// The log's database answers and, in distributed mode, the bus is connected.
    pub async fn ping(&self) -> Result<()> {
        self.inner.db.ping().await?;
        if let Some(bus) = &self.inner.bus {
            use async_nats::connection::State;
            if bus.client.connection_state() != State::Connected {
                return Err(StoreError::Bus("not connected to NATS".into()));
            }
        }
        Ok(())
    }

    /// Deletes this log's streams from the bus (a benchmark's or a test's
    /// scratch prefix). Returns how many went.
    pub async fn delete_bus_streams(&self) -> Result<usize> {
        match &self.inner.bus {
            Some(bus) => bus.delete_streams().await,
            None => Ok(0),
        }
    }

    /// `nats` or `embedded`.
    pub fn kind(&self) -> &'static str {
        if self.inner.bus.is_some() {
            "nats"
        } else {
            "embedded"
        }
    }

    pub(crate) fn bus(&self) -> Option<&NatsBus> {
        self.inner.bus.as_ref()
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn options(&self) -> &LogOptions {
        &self.inner.opts
    }

    pub fn metrics(&self) -> &LogMetrics {
        &self.inner.metrics
    }

    /// Ticks after every append in this process; consumers wait on it.
    pub fn appends(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }

    /// Appends events atomically. Events whose id is already in the log are
    /// skipped (the relay may resend after a crash). Returns how many were new.
    #[tracing::instrument(skip_all, fields(events = events.len()))]
    pub async fn append(&self, events: &[Envelope]) -> Result<usize> {
        if events.is_empty() {
            return Ok(0);
        }
        if let Some(bus) = &self.inner.bus {
            let n = bus.publish(events, self.inner.opts.partitions).await?;
            self.announce(n, events);
            return Ok(n);
        }
        let mut tx = self.inner.db.begin().await?;
        let n = self.append_in(&mut tx, events).await?;
        tx.commit().await?;
        self.announce(n, events);
        Ok(n)
    }

    fn announce(&self, n: usize, events: &[Envelope]) {
        if n == 0 {
            return;
        }
        // Count per topic; most batches hold one topic, so one label lookup.
        let mut last: Option<(&str, u64)> = None;
        for e in events {
            match &mut last {
                Some((t, c)) if *t == e.topic => *c += 1,
                _ => {
                    if let Some((t, c)) = last.take() {
                        self.count_appended(t, c);
                    }
                    last = Some((&e.topic, 1));
                }
            }
        }
        if let Some((t, c)) = last {
            self.count_appended(t, c);
        }
        self.inner
            .appended
            .send_modify(|v| *v = v.wrapping_add(n as u64));
    }

    fn count_appended(&self, topic: &str, n: u64) {
        self.inner
            .metrics
            .appended
            .get_or_create(&TopicLabels {
                topic: topic.to_owned(),
            })
            .inc_by(n);
    }

    async fn append_in(&self, tx: &mut Tx, events: &[Envelope]) -> Result<usize> {
        let existing = existing_ids(tx, events).await?;
        let mut seen: HashSet<Uuid> = HashSet::with_capacity(events.len());
        let mut by_partition: BTreeMap<(&str, i32), Vec<&Envelope>> = BTreeMap::new();
        for e in events {
            if existing.contains(&e.id.to_string()) || !seen.insert(e.id) {
                continue;
            }
            let p = partition_for(&e.key, self.inner.opts.partitions);
            by_partition
                .entry((e.topic.as_str(), p))
                .or_default()
                .push(e);
        }
        let now = Timestamp::now().as_micros();
        let mut appended = 0;
        for ((topic, partition), evs) in by_partition {
            let n = evs.len() as i64;
            on_tx!(&mut *tx, |c| sqlx::query(
                "INSERT INTO log_partitions (topic, partition_no, next_offset) VALUES ($1, $2, 0)
                 ON CONFLICT (topic, partition_no) DO NOTHING"
            )
            .bind(topic)
            .bind(partition)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
            let end: i64 = on_tx!(&mut *tx, |c| sqlx::query_scalar(
                "UPDATE log_partitions SET next_offset = next_offset + $3
                 WHERE topic = $1 AND partition_no = $2 RETURNING next_offset"
            )
            .bind(topic)
            .bind(partition)
            .bind(n)
            .fetch_one(c)
            .await)?;
            let mut offset = end - n;
            // Multi-row inserts: one statement per chunk instead of per event.
            for chunk in evs.chunks(INSERT_CHUNK) {
                let sql = insert_sql(chunk.len(), matches!(tx, Tx::Sqlite(_)));
                let rows: Vec<(i64, &Envelope, String)> = chunk
                    .iter()
                    .map(|e| {
                        let o = offset;
                        offset += 1;
                        Ok((o, *e, serde_json::to_string(&e.payload)?))
                    })
                    .collect::<Result<_>>()?;
                on_tx!(&mut *tx, |c| {
                    let mut q = sqlx::query(&sql);
                    for (o, e, payload) in &rows {
                        let size = (payload.len() + e.event_type.len() + e.key.len() + 64) as i64;
                        q = q
                            .bind(topic)
                            .bind(partition)
                            .bind(*o)
                            .bind(e.id.to_string())
                            .bind(&e.event_type)
                            .bind(&e.key)
                            .bind(e.occurred_at.as_micros())
                            .bind(now)
                            .bind(&e.correlation_id)
                            .bind(e.causation_id.as_deref())
                            .bind(e.schema_version)
                            .bind(payload)
                            .bind(size)
                            .bind(e.traceparent.as_deref());
                    }
                    q.execute(c).await.map(|r| r.rows_affected())
                })?;
                appended += rows.len();
            }
        }
        Ok(appended)
    }

    /// Reads up to `limit` events of one partition from `from` on.
    pub async fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        if let Some(bus) = &self.inner.bus {
            return bus
                .read_at(topic, partition, ReplayFrom::Offset(from), limit)
                .await;
        }
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM log_events
             WHERE topic = $1 AND partition_no = $2 AND log_offset >= $3
             ORDER BY log_offset LIMIT $4"
        );
        let rows: Vec<RecordedEvent> = on_pool!(&self.inner.db, |p| {
            let rows = sqlx::query(&sql)
                .bind(topic)
                .bind(partition)
                .bind(from)
                .bind(limit)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| Ok(decode_event!(r)))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(rows)
    }

    /// Events of a topic across partitions, in append order, from a position.
    pub async fn tail(
        &self,
        topic: &str,
        from: ReplayFrom,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        if let Some(bus) = &self.inner.bus {
            let mut all = Vec::new();
            for p in 0..self.inner.opts.partitions as i32 {
                all.extend(bus.read_at(topic, p, from, limit).await?);
            }
            all.sort_by_key(|e| (e.appended_at, e.offset));
            all.truncate(limit.max(0) as usize);
            return Ok(all);
        }
        let (cond, arg) = match from {
            ReplayFrom::Earliest => ("log_offset >= $2", 0),
            ReplayFrom::Offset(o) => ("log_offset >= $2", o),
            ReplayFrom::Time(t) => ("appended_at >= $2", t.as_micros()),
            ReplayFrom::Latest => ("appended_at >= $2", Timestamp::now().as_micros()),
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM log_events WHERE topic = $1 AND {cond}
             ORDER BY appended_at, partition_no, log_offset LIMIT $3"
        );
        on_pool!(&self.inner.db, |p| {
            let rows = sqlx::query(&sql)
                .bind(topic)
                .bind(arg)
                .bind(limit)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|r| Ok(decode_event!(r)))
                .collect::<Result<Vec<_>>>()
        })
    }

    pub async fn topics(&self) -> Result<Vec<TopicStats>> {
        if let Some(bus) = &self.inner.bus {
            return bus.topics().await;
        }
        let rows = on_pool!(&self.inner.db, |p| {
            let rows = sqlx::query(
                "SELECT p.topic AS topic, count(DISTINCT p.partition_no) AS partitions,
                        (SELECT count(*) FROM log_events e WHERE e.topic = p.topic) AS events,
                        (SELECT CAST(coalesce(sum(size_bytes), 0) AS BIGINT) FROM log_events e WHERE e.topic = p.topic) AS bytes
                 FROM log_partitions p GROUP BY p.topic ORDER BY p.topic",
            )
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(TopicStats {
                        topic: r.try_get("topic")?,
                        partitions: r.try_get("partitions")?,
                        events: r.try_get("events")?,
                        bytes: r.try_get("bytes")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        })?;
        Ok(rows)
    }

    /// Registers `group` on `topic` (idempotent). A new group starts at `start`.
    pub async fn ensure_group(&self, group: &str, topic: &str, start: ReplayFrom) -> Result<()> {
        let mut tx = self.inner.db.begin().await?;
        for partition in 0..self.inner.opts.partitions as i32 {
            let exists: Option<i64> = on_tx!(&mut tx, |c| {
                sqlx::query_scalar(
                "SELECT next_offset FROM log_groups WHERE group_name = $1 AND topic = $2 AND partition_no = $3"
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .fetch_optional(c)
            .await
            })?;
            if exists.is_some() {
                continue;
            }
            let offset = resolve_start(&mut tx, topic, partition, start).await?;
            on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO log_groups (group_name, topic, partition_no, next_offset, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (group_name, topic, partition_no) DO NOTHING"
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await
    }

    /// Marks `owner` a live member of `group` for one lease; returns the
    /// number of live members.
    pub(crate) async fn lease_heartbeat(&self, group: &str, owner: &str) -> Result<i64> {
        let now = Timestamp::now().as_micros();
        let until = now + self.inner.opts.lease.as_micros() as i64;
        // Plain statements, no transaction: nothing here needs one, and a
        // worker cancelled mid-way (an aborted task) leaves no transaction
        // open on the writer connection.
        on_pool!(write & self.inner.db, |p| sqlx::query(
            "INSERT INTO log_members (group_name, owner, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (group_name, owner) DO UPDATE SET expires_at = excluded.expires_at"
        )
        .bind(group)
        .bind(owner)
        .bind(until)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        on_pool!(write & self.inner.db, |p| sqlx::query(
            "DELETE FROM log_members WHERE group_name = $1 AND expires_at < $2"
        )
        .bind(group)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        let n: i64 = on_pool!(&self.inner.db, |p| sqlx::query_scalar(
            "SELECT count(*) FROM log_members WHERE group_name = $1"
        )
        .bind(group)
        .fetch_one(p)
        .await)?;
        Ok(n)
    }

    /// Extends every lease `owner` holds in `group` (even one that lapsed but
    /// nobody took) and returns them.
    pub(crate) async fn lease_renew(&self, group: &str, owner: &str) -> Result<Vec<(String, i32)>> {
        let until = Timestamp::now().as_micros() + self.inner.opts.lease.as_micros() as i64;
        let rows: Vec<(String, i32)> = on_pool!(write & self.inner.db, |p| sqlx::query_as(
            "UPDATE log_leases SET expires_at = $3 WHERE group_name = $1 AND owner = $2
             RETURNING topic, partition_no"
        )
        .bind(group)
        .bind(owner)
        .bind(until)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    /// Takes one unit if it is free or its lease has lapsed. Atomic: of two
    /// claimants one wins.
    pub(crate) async fn lease_claim(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        owner: &str,
    ) -> Result<bool> {
        let now = Timestamp::now().as_micros();
        let until = now + self.inner.opts.lease.as_micros() as i64;
        let won: Option<i32> = on_pool!(write & self.inner.db, |p| sqlx::query_scalar(
            "INSERT INTO log_leases (group_name, topic, partition_no, owner, expires_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (group_name, topic, partition_no) DO UPDATE
               SET owner = excluded.owner, expires_at = excluded.expires_at
               WHERE log_leases.owner = excluded.owner OR log_leases.expires_at < $6
             RETURNING partition_no"
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(owner)
        .bind(until)
        .bind(now)
        .fetch_optional(p)
        .await)?;
        Ok(won.is_some())
    }

    /// Frees every partition lease and membership. Only for a process that
    /// knows it is the log's sole user (embedded, under the data-dir lock): a
    /// crashed run's leases need not lapse before its consumers resume.
    pub async fn release_all_leases(&self) -> Result<u64> {
        let n = on_pool!(write & self.inner.db, |p| sqlx::query(
            "DELETE FROM log_leases"
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        on_pool!(write & self.inner.db, |p| sqlx::query(
            "DELETE FROM log_members"
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(n)
    }

    /// Gives up one unit, or (with `None`) everything `owner` holds in `group`
    /// and its membership.
    pub(crate) async fn lease_release(
        &self,
        group: &str,
        owner: &str,
        unit: Option<&(String, i32)>,
    ) -> Result<()> {
        let (topic, partition) = match unit {
            Some((t, p)) => (t.as_str(), *p),
            None => ("", -1),
        };
        on_pool!(write & self.inner.db, |p| sqlx::query(
            "DELETE FROM log_leases WHERE group_name = $1 AND owner = $2
               AND ($3 = '' OR (topic = $3 AND partition_no = $4))"
        )
        .bind(group)
        .bind(owner)
        .bind(topic)
        .bind(partition)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        if unit.is_none() {
            on_pool!(write & self.inner.db, |p| sqlx::query(
                "DELETE FROM log_members WHERE group_name = $1 AND owner = $2"
            )
            .bind(group)
            .bind(owner)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        }
        Ok(())
    }

    /// Where `from` points in each partition of `topic` (for readers that are
    /// not consumer groups, such as `events tail`).
    pub async fn resolve(&self, topic: &str, from: ReplayFrom) -> Result<Vec<(i32, i64)>> {
        if let Some(bus) = &self.inner.bus {
            let mut out = Vec::new();
            for p in 0..self.inner.opts.partitions as i32 {
                out.push((p, bus.resolve(topic, p, from).await?));
            }
            return Ok(out);
        }
        let mut tx = self.inner.db.begin().await?;
        let mut out = Vec::new();
        for partition in 0..self.inner.opts.partitions as i32 {
            out.push((
                partition,
                resolve_start(&mut tx, topic, partition, from).await?,
            ));
        }
        tx.rollback().await?;
        Ok(out)
    }

    /// Next offset per partition for `group` on `topic`.
    pub async fn positions(&self, group: &str, topic: &str) -> Result<Vec<(i32, i64)>> {
        let rows: Vec<(i32, i64)> = on_pool!(&self.inner.db, |p| sqlx::query_as(
            "SELECT partition_no, next_offset FROM log_groups
             WHERE group_name = $1 AND topic = $2 ORDER BY partition_no"
        )
        .bind(group)
        .bind(topic)
        .fetch_all(p)
        .await)?;
        Ok(rows)
    }

    /// Moves a group's positions, `(partition, expected, next)` each, in one
    /// transaction. A row whose position is no longer `expected` was moved by
    /// a replay meanwhile and is left alone. Returns how many rows moved.
    pub async fn commit_positions(
        &self,
        group: &str,
        topic: &str,
        moves: &[(i32, i64, i64)],
    ) -> Result<u64> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.inner.db.begin().await?;
        let mut moved = 0;
        for (partition, expected, next) in moves {
            moved += on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE log_groups SET next_offset = $5, updated_at = $6
                 WHERE group_name = $1 AND topic = $2 AND partition_no = $3 AND next_offset = $4"
            )
            .bind(group)
            .bind(topic)
            .bind(*partition)
            .bind(*expected)
            .bind(*next)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Every group's position and lag.
    pub async fn groups(&self) -> Result<Vec<GroupPosition>> {
        if let Some(bus) = &self.inner.bus {
            return bus.groups().await;
        }
        let rows: Vec<(String, String, i32, i64, Option<i64>)> = on_pool!(&self.inner.db, |p| {
            sqlx::query_as(
                "SELECT g.group_name, g.topic, g.partition_no, g.next_offset, p.next_offset
                 FROM log_groups g LEFT JOIN log_partitions p
                   ON p.topic = g.topic AND p.partition_no = g.partition_no
                 ORDER BY g.group_name, g.topic, g.partition_no",
            )
            .fetch_all(p)
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(group, topic, partition, next_offset, end)| {
                let end_offset = end.unwrap_or(0);
                GroupPosition {
                    group,
                    topic,
                    partition,
                    next_offset,
                    end_offset,
                    lag: (end_offset - next_offset).max(0),
                }
            })
            .collect())
    }

    /// Updates the lag gauges from the log (called on each metrics scrape).
    pub async fn refresh_lag(&self) -> Result<()> {
        let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
        for g in self.groups().await? {
            *sums.entry((g.group, g.topic)).or_default() += g.lag;
        }
        for ((group, topic), lag) in sums {
            self.inner
                .metrics
                .lag
                .get_or_create(&LogMetrics::group(&group, &topic))
                .set(lag);
        }
        Ok(())
    }

    /// Rewinds (or forwards) `group` on `topic`, or on every topic it consumes.
    /// Returns the number of partitions moved.
    pub async fn replay(
        &self,
        group: &str,
        topic: Option<&str>,
        from: ReplayFrom,
    ) -> Result<usize> {
        if let Some(bus) = &self.inner.bus {
            let n = bus.replay(group, topic, from).await?;
            self.inner.appended.send_modify(|v| *v = v.wrapping_add(1));
            return Ok(n);
        }
        let mut tx = self.inner.db.begin().await?;
        let parts: Vec<(String, i32)> = on_tx!(&mut tx, |c| {
            sqlx::query_as(
            "SELECT topic, partition_no FROM log_groups WHERE group_name = $1 ORDER BY topic, partition_no"
        )
        .bind(group)
        .fetch_all(c)
        .await
        })?;
        let parts: Vec<_> = parts
            .into_iter()
            .filter(|(t, _)| topic.is_none_or(|x| x == t))
            .collect();
        if parts.is_empty() {
            return Err(StoreError::UnknownGroup(match topic {
                Some(t) => format!("{group}` on topic `{t}"),
                None => group.to_owned(),
            }));
        }
        for (t, partition) in &parts {
            let offset = resolve_start(&mut tx, t, *partition, from).await?;
            on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE log_groups SET next_offset = $4, updated_at = $5
                 WHERE group_name = $1 AND topic = $2 AND partition_no = $3"
            )
            .bind(group)
            .bind(t)
            .bind(*partition)
            .bind(offset)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        // Wake local consumers so the replay starts now.
        self.inner.appended.send_modify(|v| *v = v.wrapping_add(1));
        Ok(parts.len())
    }

    /// Records a dead letter and appends it to `dlq.<group>`, in one transaction.
    pub(crate) async fn dead_letter(
        &self,
        group: &str,
        event: &RecordedEvent,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        let e = &event.envelope;
        let now = Timestamp::now().as_micros();
        // On the bus the event is not in `log_events`: keep it for retries.
        let event_json = match self.inner.bus {
            Some(_) => Some(serde_json::to_string(event)?),
            None => None,
        };
        let mut tx = self.inner.db.begin().await?;
        let inserted = on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO log_dead_letters (group_name, topic, partition_no, log_offset, event_id,
                event_type, error, attempts, status, dead_at, updated_at, event_json)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'dead', $9, $9, $10)
             ON CONFLICT (group_name, event_id) DO NOTHING"
        )
        .bind(group)
        .bind(&e.topic)
        .bind(event.partition)
        .bind(event.offset)
        .bind(e.id.to_string())
        .bind(&e.event_type)
        .bind(error)
        .bind(attempts as i32)
        .bind(now)
        .bind(event_json.as_deref())
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })?;
        if inserted == 0 {
            // Already dead-lettered before a crash: nothing new to record.
            tx.rollback().await?;
            return Ok(());
        }
        let dlq = Envelope::caused_by(
            EventDraft::new(
                format!("{DLQ_TOPIC_PREFIX}{group}"),
                "event.dead_lettered",
                e.id.to_string(),
                serde_json::json!({
                    "group": group,
                    "topic": e.topic,
                    "partition": event.partition,
                    "offset": event.offset,
                    "error": error,
                    "attempts": attempts,
                    "event": e,
                }),
            ),
            e,
        );
        let dlq = std::slice::from_ref(&dlq);
        if let Some(bus) = &self.inner.bus {
            // Recorded first: a crash before the publish loses only the
            // notice on `dlq.<group>`, never the dead letter.
            tx.commit().await?;
            let n = bus.publish(dlq, self.inner.opts.partitions).await?;
            self.announce(n, dlq);
        } else {
            let n = self.append_in(&mut tx, dlq).await?;
            tx.commit().await?;
            self.announce(n, dlq);
        }
        self.inner
            .metrics
            .dead_lettered
            .get_or_create(&LogMetrics::group(group, &e.topic))
            .inc();
        Ok(())
    }

    pub async fn dead_letters(
        &self,
        group: Option<&str>,
        include_resolved: bool,
    ) -> Result<Vec<DeadLetter>> {
        let rows = on_pool!(&self.inner.db, |p| {
            let rows = sqlx::query(
                "SELECT id, group_name, topic, partition_no, log_offset, event_id, event_type, error,
                        attempts, status, dead_at
                 FROM log_dead_letters
                 WHERE ($1 = '' OR group_name = $1) AND ($2 = 1 OR status <> 'resolved')
                 ORDER BY id",
            )
            .bind(group.unwrap_or(""))
            .bind(include_resolved as i32)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(DeadLetter {
                        id: r.try_get("id")?,
                        group: r.try_get("group_name")?,
                        topic: r.try_get("topic")?,
                        partition: r.try_get("partition_no")?,
                        offset: r.try_get("log_offset")?,
                        event_id: r.try_get("event_id")?,
                        event_type: r.try_get("event_type")?,
                        error: r.try_get("error")?,
                        attempts: r.try_get("attempts")?,
                        status: r.try_get("status")?,
                        dead_at: Timestamp::from_micros(r.try_get("dead_at")?),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
        })?;
        Ok(rows)
    }

    /// Marks dead letters for redelivery to their group: one id, or all of a
    /// group's. The group's consumer picks them up when it is next idle.
    pub async fn retry_dead_letters(&self, id: Option<i64>, group: Option<&str>) -> Result<u64> {
        let n = on_pool!(write & self.inner.db, |p| sqlx::query(
            "UPDATE log_dead_letters SET status = 'retry', updated_at = $3
             WHERE status = 'dead' AND ($1 < 0 OR id = $1) AND ($2 = '' OR group_name = $2)"
        )
        .bind(id.unwrap_or(-1))
        .bind(group.unwrap_or(""))
        .bind(Timestamp::now().as_micros())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        if n == 0 {
            if let Some(id) = id {
                return Err(StoreError::UnknownDeadLetter(id));
            }
        }
        self.inner.appended.send_modify(|v| *v = v.wrapping_add(1));
        Ok(n)
    }

    /// Dead letters of `group` marked for retry, with their events.
    pub(crate) async fn pending_retries(
        &self,
        group: &str,
    ) -> Result<Vec<(i64, i32, RecordedEvent)>> {
        if self.inner.bus.is_some() {
            let rows: Vec<(i64, i32, Option<String>)> = on_pool!(&self.inner.db, |p| {
                sqlx::query_as(
                    "SELECT id, attempts, event_json FROM log_dead_letters
                     WHERE group_name = $1 AND status = 'retry' ORDER BY id LIMIT 100",
                )
                .bind(group)
                .fetch_all(p)
                .await
            })?;
            return rows
                .into_iter()
                .filter_map(|(id, attempts, json)| Some((id, attempts, json?)))
                .map(|(id, attempts, json)| {
                    let ev: RecordedEvent = serde_json::from_str(&json)
                        .map_err(|_| StoreError::CorruptEvent(format!("dead letter {id}")))?;
                    Ok((id, attempts, ev))
                })
                .collect();
        }
        // A retried event that retention already dropped can never be delivered:
        // put it back to `dead` with the reason instead of leaving it pending.
        on_pool!(write & self.inner.db, |p| {
            sqlx::query(
            "UPDATE log_dead_letters SET status = 'dead', error = 'event no longer in the log (retention)',
                updated_at = $2
             WHERE group_name = $1 AND status = 'retry' AND NOT EXISTS (
                SELECT 1 FROM log_events e WHERE e.topic = log_dead_letters.topic
                  AND e.partition_no = log_dead_letters.partition_no
                  AND e.log_offset = log_dead_letters.log_offset)"
        )
        .bind(group)
        .bind(Timestamp::now().as_micros())
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        let sql = format!(
            "SELECT d.id AS dl_id, d.attempts AS dl_attempts, {cols}
             FROM log_dead_letters d JOIN log_events e
               ON e.topic = d.topic AND e.partition_no = d.partition_no AND e.log_offset = d.log_offset
             WHERE d.group_name = $1 AND d.status = 'retry' ORDER BY d.id LIMIT 100",
            cols = EVENT_COLUMNS
                .split(", ")
                .map(|c| format!("e.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        on_pool!(&self.inner.db, |p| {
            let rows = sqlx::query(&sql).bind(group).fetch_all(p).await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get("dl_id")?,
                        r.try_get("dl_attempts")?,
                        decode_event!(r),
                    ))
                })
                .collect::<Result<Vec<_>>>()
        })
    }

    pub(crate) async fn settle_retry(
        &self,
        id: i64,
        outcome: std::result::Result<(), String>,
    ) -> Result<()> {
        let now = Timestamp::now().as_micros();
        on_pool!(write & self.inner.db, |p| {
            match &outcome {
            Ok(()) => sqlx::query("UPDATE log_dead_letters SET status = 'resolved', updated_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(p)
                .await.map(|r| r.rows_affected()),
            Err(e) => sqlx::query(
                "UPDATE log_dead_letters SET status = 'dead', attempts = attempts + 1, error = $3, updated_at = $2
                 WHERE id = $1"
            )
            .bind(id)
            .bind(now)
            .bind(e)
            .execute(p)
            .await.map(|r| r.rows_affected()),
        }
        })?;
        Ok(())
    }

    /// Drops events older than `max_age` and, per topic, the oldest events past
    /// `max_bytes`. Offsets are never reused. Returns the number of events dropped.
    pub async fn enforce_retention(
        &self,
        max_age: Option<Duration>,
        max_bytes: Option<u64>,
    ) -> Result<u64> {
        if self.inner.bus.is_some() {
            // The streams' own `max_age` retention applies.
            return Ok(0);
        }
        let mut dropped = 0;
        if let Some(age) = max_age {
            let cutoff = Timestamp::now().saturating_sub(age).as_micros();
            dropped += on_pool!(write & self.inner.db, |p| sqlx::query(
                "DELETE FROM log_events WHERE appended_at < $1"
            )
            .bind(cutoff)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        }
        if let Some(max) = max_bytes {
            for t in self.topics().await? {
                if (t.bytes as u64) <= max {
                    continue;
                }
                // Walk newest to oldest until the budget is spent; in each
                // partition, everything at or below the first offset past the
                // budget goes.
                let sizes: Vec<(i32, i64, i64)> = on_pool!(&self.inner.db, |p| {
                    sqlx::query_as(
                    "SELECT partition_no, log_offset, size_bytes FROM log_events WHERE topic = $1
                     ORDER BY appended_at DESC, log_offset DESC"
                )
                .bind(&t.topic)
                .fetch_all(p)
                .await
                })?;
                let mut total = 0u64;
                let mut cut: BTreeMap<i32, i64> = BTreeMap::new();
                for (partition, offset, size) in sizes {
                    total += size as u64;
                    if total > max {
                        cut.entry(partition).or_insert(offset);
                    }
                }
                for (partition, offset) in cut {
                    dropped += on_pool!(write & self.inner.db, |p| {
                        sqlx::query(
                        "DELETE FROM log_events WHERE topic = $1 AND partition_no = $2 AND log_offset <= $3"
                    )
                    .bind(&t.topic)
                    .bind(partition)
                    .bind(offset)
                    .execute(p)
                    .await
                    .map(|r| r.rows_affected())
                    })?;
                }
            }
        }
        Ok(dropped)
    }
}

/// Rows per multi-row INSERT (13 parameters each; far below both drivers' limits).
const INSERT_CHUNK: usize = 64;

/// Placeholders for `n` parameters after `start`. SQLite gets anonymous `?`:
/// sqlx looks up each numbered parameter's name, and SQLite's lookup is linear
/// in the number of named parameters, so `$n` binding is quadratic in a long
/// statement (it dominated the append profile). PostgreSQL needs `$n`.
pub(crate) fn placeholders(sqlite: bool, start: usize, n: usize) -> Vec<String> {
    (start + 1..=start + n)
        .map(|i| {
            if sqlite {
                "?".to_owned()
            } else {
                format!("${i}")
            }
        })
        .collect()
}

fn insert_sql(rows: usize, sqlite: bool) -> String {
    let mut sql = String::from(
        "INSERT INTO log_events (topic, partition_no, log_offset, event_id, event_type, event_key, \
         occurred_at, appended_at, correlation_id, causation_id, schema_version, payload, size_bytes, \
         traceparent) VALUES ",
    );
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        let params = placeholders(sqlite, r * 14, 14);
        sql.push('(');
        sql.push_str(&params.join(", "));
        sql.push(')');
    }
    sql
}

async fn existing_ids(tx: &mut Tx, events: &[Envelope]) -> Result<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in events.chunks(500) {
        let sql = format!(
            "SELECT event_id FROM log_events WHERE event_id IN ({})",
            placeholders(matches!(tx, Tx::Sqlite(_)), 0, chunk.len()).join(", ")
        );
        let ids: Vec<String> = on_tx!(&mut *tx, |c| {
            let mut q = sqlx::query_scalar(&sql);
            for e in chunk {
                q = q.bind(e.id.to_string());
            }
            q.fetch_all(c).await
        })?;
        found.extend(ids);
    }
    Ok(found)
}

async fn resolve_start(tx: &mut Tx, topic: &str, partition: i32, from: ReplayFrom) -> Result<i64> {
    let end: Option<i64> = on_tx!(&mut *tx, |c| sqlx::query_scalar(
        "SELECT next_offset FROM log_partitions WHERE topic = $1 AND partition_no = $2"
    )
    .bind(topic)
    .bind(partition)
    .fetch_optional(c)
    .await)?;
    let end = end.unwrap_or(0);
    Ok(match from {
        ReplayFrom::Latest => end,
        ReplayFrom::Offset(o) => o.min(end),
        ReplayFrom::Earliest | ReplayFrom::Time(_) => {
            let t = match from {
                ReplayFrom::Time(t) => t.as_micros(),
                _ => i64::MIN,
            };
            let first: Option<i64> = on_tx!(&mut *tx, |c| sqlx::query_scalar(
                "SELECT min(log_offset) FROM log_events
                 WHERE topic = $1 AND partition_no = $2 AND appended_at >= $3"
            )
            .bind(topic)
            .bind(partition)
            .bind(t)
            .fetch_one(c)
            .await)?;
            first.unwrap_or(end)
        }
    })
}
