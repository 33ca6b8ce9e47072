//! NATS JetStream as the event bus (distributed mode).
//!
//! - One stream per topic family (`orders.events` and `orders.commands` share
//!   `{PREFIX}_ORDERS`), one subject per topic and partition
//!   (`{prefix}.orders.events.3`), so per-key order is kept per subject.
//! - The relay publishes with `Nats-Msg-Id` = event id: a resend after a crash
//!   or a lost ack is dropped by the broker's duplicate window, and outbox rows
//!   are deleted only after every ack.
//! - Each (group, topic, partition) is one durable pull consumer with explicit
//!   ack. The consumer worker that holds the partition's lease (see
//!   `consumer.rs`) is its only reader, so delivery stays in order.

use crate::error::StoreError;
use crate::log::ReplayFrom;
use crate::Result;
use async_nats::jetstream::{self, consumer::pull, stream, Context};
use flowline_core::event::partition_for;
use flowline_core::{Envelope, RecordedEvent, Timestamp};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

pub(crate) type PullConsumer = jetstream::consumer::PullConsumer;

/// Where the bus is and how it is named.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
    /// Subject prefix and stream-name prefix: lets deployments share a server.
    pub prefix: String,
    /// Stream retention; zero keeps events until deleted.
    pub max_age: Duration,
    /// Deliveries of one event (across node crashes) before it is dead-lettered.
    pub max_deliver: i64,
    /// Stream replicas in a NATS cluster (3: an ack means a quorum has it).
    pub replicas: usize,
}

impl NatsConfig {
    pub fn new(url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            prefix: "flowline".into(),
            max_age: Duration::ZERO,
            max_deliver: 10,
            replicas: 1,
        }
    }
}

pub(crate) struct NatsBus {
    pub(crate) client: async_nats::Client,
    js: Context,
    pub(crate) cfg: NatsConfig,
    streams: Mutex<HashSet<String>>,
    consumers: Mutex<HashMap<String, PullConsumer>>,
}

fn bus_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Bus(format!("{what}: {e}"))
}

/// Stream and consumer names allow only letters, digits, `-` and `_`.
fn token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl NatsBus {
    pub(crate) async fn connect(cfg: NatsConfig) -> Result<NatsBus> {
        if cfg.prefix.is_empty() || token(&cfg.prefix) != cfg.prefix {
            return Err(StoreError::Bus(format!(
                "bus prefix `{}` must be letters, digits, `-` or `_`",
                cfg.prefix
            )));
        }
        // Fail fast at start; once connected the client reconnects forever and
        // publishes fail (and are retried by the relay) while it is away.
        let client = async_nats::ConnectOptions::new()
            .name("flowline")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .max_reconnects(None)
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| StoreError::Unreachable {
                target: cfg.url.clone(),
                reason: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        // A server without JetStream has no responder for its API (or
        // answers with an error): say so at start, not at the first publish.
        let info = client
            .request("$JS.API.INFO", bytes::Bytes::new())
            .await
            .map_err(|e| bus_err("JetStream is not enabled on the NATS server", e))?;
        let info: serde_json::Value = serde_json::from_slice(&info.payload)?;
        if let Some(err) = info.get("error") {
            return Err(bus_err("JetStream is not usable on the NATS server", err));
        }
        Ok(NatsBus {
            client,
            js,
            cfg,
            streams: Mutex::default(),
            consumers: Mutex::default(),
        })
    }

    fn family(topic: &str) -> &str {
        topic.split('.').next().unwrap_or(topic)
    }

    fn stream_name(&self, topic: &str) -> String {
        token(&format!("{}_{}", self.cfg.prefix, Self::family(topic)).to_uppercase())
    }

    pub(crate) fn subject(&self, topic: &str, partition: i32) -> String {
        format!("{}.{topic}.{partition}", self.cfg.prefix)
    }

    fn wake_subject(&self) -> String {
        format!("{}._wake", self.cfg.prefix)
    }

    fn check_topic(topic: &str) -> Result<()> {
        let ok = !topic.is_empty()
            && topic.split('.').all(|t| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if ok {
            Ok(())
        } else {
            Err(StoreError::Bus(format!(
                "topic `{topic}` is not a valid subject (letters, digits, `-`, `_`, dots between)"
            )))
        }
    }

    async fn ensure_stream(&self, topic: &str) -> Result<String> {
        let name = self.stream_name(topic);
        if self.streams.lock().expect("poisoned").contains(&name) {
            return Ok(name);
        }
        Self::check_topic(topic)?;
        self.js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![format!("{}.{}.>", self.cfg.prefix, Self::family(topic))],
                storage: stream::StorageType::File,
                max_age: self.cfg.max_age,
                duplicate_window: Duration::from_secs(120),
                num_replicas: self.cfg.replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| bus_err(&format!("stream {name}"), e))?;
        self.streams.lock().expect("poisoned").insert(name.clone());
        Ok(name)
    }

    /// Publishes every event and waits for every ack; returns how many the
    /// broker had not seen before.
    pub(crate) async fn publish(&self, events: &[Envelope], partitions: u32) -> Result<usize> {
        let mut acks = Vec::with_capacity(events.len());
        for e in events {
            self.ensure_stream(&e.topic).await?;
            let subject = self.subject(&e.topic, partition_for(&e.key, partitions));
            let body = serde_json::to_vec(e)?;
            let msg = jetstream::message::PublishMessage::build()
                .payload(body.into())
                .message_id(e.id.to_string());
            acks.push(
                self.js
                    .send_publish(subject, msg)
                    .await
                    .map_err(|e| bus_err("publish", e))?,
            );
        }
        let mut new = 0;
        for ack in acks {
            let ack = ack.await.map_err(|e| bus_err("publish ack", e))?;
            if !ack.duplicate {
                new += 1;
            }
        }
        if new > 0 {
            // Best effort: peers also poll.
            let _ = self
                .client
                .publish(self.wake_subject(), bytes::Bytes::new())
                .await;
        }
        Ok(new)
    }

    /// Ticks `appended` whenever any node publishes, so idle consumers here
    /// wake at once instead of at their next poll.
    pub(crate) async fn forward_wakeups(&self, appended: watch::Sender<u64>) -> Result<()> {
        let mut sub = self
            .client
            .subscribe(self.wake_subject())
            .await
            .map_err(|e| bus_err("subscribe", e))?;
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                appended.send_modify(|v| *v = v.wrapping_add(1));
            }
        });
        Ok(())
    }

    fn consumer_name(group: &str, topic: &str, partition: i32) -> String {
        token(&format!("{group}__{topic}__{partition}"))
    }

    fn deliver_policy(from: ReplayFrom) -> pull::Config {
        use jetstream::consumer::DeliverPolicy;
        let deliver_policy = match from {
            ReplayFrom::Earliest => DeliverPolicy::All,
            ReplayFrom::Latest => DeliverPolicy::New,
            // Offsets are 0-based like the SQL log's: offset = sequence - 1.
            ReplayFrom::Offset(o) => DeliverPolicy::ByStartSequence {
                start_sequence: o.max(0) as u64 + 1,
            },
            ReplayFrom::Time(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(t.as_micros()) * 1000,
                )
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        };
        pull::Config {
            deliver_policy,
            ..Default::default()
        }
    }

    fn consumer_config(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        from: ReplayFrom,
    ) -> pull::Config {
        pull::Config {
            durable_name: Some(Self::consumer_name(group, topic, partition)),
            description: Some(format!("{group}|{topic}|{partition}")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            // Long: a partition changes owner by lease, and the new owner
            // rewinds to the ack floor itself (see `take_over`).
            ack_wait: Duration::from_secs(300),
            filter_subject: self.subject(topic, partition),
            max_ack_pending: 20_000,
            ..Self::deliver_policy(from)
        }
    }

    /// The durable consumer of one partition for `group`, created at `start`
    /// the first time.
    pub(crate) async fn consumer(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        start: ReplayFrom,
    ) -> Result<PullConsumer> {
        let name = Self::consumer_name(group, topic, partition);
        if let Some(c) = self.consumers.lock().expect("poisoned").get(&name) {
            return Ok(c.clone());
        }
        let stream = self.ensure_stream(topic).await?;
        let c = self
            .js
            .get_stream_no_info(&stream)
            .await
            .map_err(|e| bus_err("stream", e))?
            .get_or_create_consumer(&name, self.consumer_config(group, topic, partition, start))
            .await
            .map_err(|e| bus_err(&format!("consumer {name}"), e))?;
        self.consumers
            .lock()
            .expect("poisoned")
            .insert(name, c.clone());
        Ok(c)
    }

    /// Drops a cached consumer handle (after an error: it may have been
    /// replaced by a replay).
    pub(crate) fn forget(&self, group: &str, topic: &str, partition: i32) {
        self.consumers
            .lock()
            .expect("poisoned")
            .remove(&Self::consumer_name(group, topic, partition));
    }

    /// Recreates a consumer at `from`, dropping its pending deliveries.
    async fn recreate(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        from: ReplayFrom,
    ) -> Result<()> {
        let name = Self::consumer_name(group, topic, partition);
        let stream = self
            .js
            .get_stream_no_info(self.ensure_stream(topic).await?)
            .await
            .map_err(|e| bus_err("stream", e))?;
        self.forget(group, topic, partition);
        // A worker may recreate it with its default start between our delete
        // and create: delete again.
        let mut last = None;
        for _ in 0..3 {
            let _ = stream.delete_consumer(&name).await;
            match stream
                .create_consumer(self.consumer_config(group, topic, partition, from))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(bus_err(
            &format!("recreate consumer {name}"),
            last.expect("tried"),
        ))
    }

    /// A new owner of a partition: if the previous owner died with deliveries
    /// unacknowledged, rewind to the ack floor so they come again, in order,
    /// before anything later.
    pub(crate) async fn take_over(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        start: ReplayFrom,
    ) -> Result<()> {
        let mut c = self.consumer(group, topic, partition, start).await?;
        let info = c.info().await.map_err(|e| bus_err("consumer info", e))?;
        if info.num_ack_pending == 0 {
            return Ok(());
        }
        let floor = info.ack_floor.stream_sequence;
        tracing::info!(
            group,
            topic,
            partition,
            floor,
            pending = info.num_ack_pending,
            "partition taken over with unacknowledged deliveries; rewinding to the ack floor"
        );
        self.recreate(group, topic, partition, ReplayFrom::Offset(floor as i64))
            .await
    }

    /// Up to `max` messages available now (does not wait for more).
    pub(crate) async fn fetch(
        &self,
        consumer: &PullConsumer,
        max: usize,
    ) -> Result<Vec<jetstream::Message>> {
        // Bounded twice: the server ends the pull after `expires`, and if the
        // connection drops mid-pull (a NATS restart) that end never arrives,
        // so we give up ourselves and pull again once reconnected.
        let pull = async {
            let mut batch = consumer
                .fetch()
                .max_messages(max)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| bus_err("fetch", e))?;
            let mut out = Vec::new();
            while let Some(m) = batch.next().await {
                out.push(m.map_err(|e| bus_err("fetch", e))?);
            }
            Ok(out)
        };
        tokio::time::timeout(Duration::from_secs(5), pull)
            .await
            .map_err(|_| StoreError::Bus("fetch: no answer within 5s (reconnecting?)".into()))?
    }

    /// Decodes a delivered message; also returns how often it was delivered.
    pub(crate) fn decode(msg: &jetstream::Message, partition: i32) -> Result<(RecordedEvent, i64)> {
        let info = msg.info().map_err(|e| bus_err("message metadata", e))?;
        let envelope: Envelope = serde_json::from_slice(&msg.payload).map_err(|_| {
            StoreError::CorruptEvent(format!("stream seq {}", info.stream_sequence))
        })?;
        let micros = (info.published.unix_timestamp_nanos() / 1000) as i64;
        Ok((
            RecordedEvent {
                partition,
                offset: info.stream_sequence as i64 - 1,
                appended_at: Timestamp::from_micros(micros),
                envelope,
            },
            info.delivered,
        ))
    }

    async fn prefixed_streams(&self) -> Result<Vec<jetstream::stream::Stream>> {
        let want = format!("{}_", token(&self.cfg.prefix).to_uppercase());
        let mut names = self.js.stream_names();
        let mut out = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| bus_err("stream list", e))?;
            if n.starts_with(&want) {
                out.push(
                    self.js
                        .get_stream(&n)
                        .await
                        .map_err(|e| bus_err("stream", e))?,
                );
            }
        }
        Ok(out)
    }

    pub(crate) async fn delete_streams(&self) -> Result<usize> {
        let streams = self.prefixed_streams().await?;
        for s in &streams {
            let name = s.cached_info().config.name.clone();
            self.js
                .delete_stream(&name)
                .await
                .map_err(|e| bus_err("delete stream", e))?;
        }
        self.streams.lock().expect("poisoned").clear();
        self.consumers.lock().expect("poisoned").clear();
        Ok(streams.len())
    }

    /// Every (group, topic, partition) consumer: (next stream sequence, lag).
    pub(crate) async fn groups(&self) -> Result<Vec<crate::GroupPosition>> {
        let mut out = Vec::new();
        for s in self.prefixed_streams().await? {
            let mut consumers = s.consumers();
            while let Some(info) = consumers.next().await {
                let info = info.map_err(|e| bus_err("consumer list", e))?;
                let Some((group, topic, partition)) = info
                    .config
                    .description
                    .as_deref()
                    .and_then(|d| {
                        let mut it = d.split('|');
                        Some((it.next()?, it.next()?, it.next()?.parse::<i32>().ok()?))
                    })
                    .map(|(g, t, p)| (g.to_owned(), t.to_owned(), p))
                else {
                    continue; // not ours (an ephemeral reader)
                };
                let lag = info.num_pending as i64 + info.num_ack_pending as i64;
                let next = info.ack_floor.stream_sequence as i64;
                out.push(crate::GroupPosition {
                    group,
                    topic,
                    partition,
                    next_offset: next,
                    end_offset: next + lag,
                    lag,
                });
            }
        }
        out.sort_by(|a, b| {
            (&a.group, &a.topic, a.partition).cmp(&(&b.group, &b.topic, b.partition))
        });
        Ok(out)
    }

    pub(crate) async fn topics(&self) -> Result<Vec<crate::TopicStats>> {
        let mut per: BTreeMap<String, (HashSet<i32>, i64)> = BTreeMap::new();
        let mut bytes: BTreeMap<String, i64> = BTreeMap::new();
        for mut s in self.prefixed_streams().await? {
            let state = s
                .info()
                .await
                .map_err(|e| bus_err("stream info", e))?
                .state
                .clone();
            let mut subjects = s
                .info_with_subjects(format!("{}.>", self.cfg.prefix))
                .await
                .map_err(|e| bus_err("stream subjects", e))?;
            let mut topics_here = Vec::new();
            while let Some(item) = subjects.next().await {
                let (subject, count) = item.map_err(|e| bus_err("stream subjects", e))?;
                let rest = subject
                    .strip_prefix(&format!("{}.", self.cfg.prefix))
                    .unwrap_or(&subject);
                let Some((topic, p)) = rest.rsplit_once('.') else {
                    continue;
                };
                let Ok(p) = p.parse::<i32>() else { continue };
                let e = per.entry(topic.to_owned()).or_default();
                e.0.insert(p);
                e.1 += count as i64;
                topics_here.push((topic.to_owned(), count as i64));
            }
            // The stream knows its bytes, not each subject's: share them out.
            let total: i64 = topics_here.iter().map(|(_, c)| c).sum();
            for (t, c) in topics_here {
                if total > 0 {
                    *bytes.entry(t).or_default() += state.bytes as i64 * c / total;
                }
            }
        }
        Ok(per
            .into_iter()
            .map(|(topic, (parts, events))| crate::TopicStats {
                bytes: bytes.get(&topic).copied().unwrap_or(0),
                topic,
                partitions: parts.len() as i64,
                events,
            })
            .collect())
    }

    /// Moves every consumer of `group` (on `topic`, or all) to `from`.
    pub(crate) async fn replay(
        &self,
        group: &str,
        topic: Option<&str>,
        from: ReplayFrom,
    ) -> Result<usize> {
        let targets: Vec<_> = self
            .groups()
            .await?
            .into_iter()
            .filter(|g| g.group == group && topic.is_none_or(|t| t == g.topic))
            .collect();
        if targets.is_empty() {
            return Err(StoreError::UnknownGroup(match topic {
                Some(t) => format!("{group}` on topic `{t}"),
                None => group.to_owned(),
            }));
        }
        for g in &targets {
            self.recreate(group, &g.topic, g.partition, from).await?;
        }
        Ok(targets.len())
    }

    /// Where `from` points in one partition, as a stream sequence.
    pub(crate) async fn resolve(
        &self,
        topic: &str,
        partition: i32,
        from: ReplayFrom,
    ) -> Result<i64> {
        match from {
            ReplayFrom::Earliest => Ok(0),
            ReplayFrom::Offset(o) => Ok(o.max(0)),
            ReplayFrom::Latest | ReplayFrom::Time(_) => {
                let name = self.ensure_stream(topic).await?;
                let mut s = self
                    .js
                    .get_stream(&name)
                    .await
                    .map_err(|e| bus_err("stream", e))?;
                let end = s
                    .info()
                    .await
                    .map_err(|e| bus_err("stream info", e))?
                    .state
                    .last_sequence as i64;
                if from == ReplayFrom::Latest {
                    return Ok(end);
                }
                let first = self.read_at(topic, partition, from, 1).await?;
                Ok(first.first().map_or(end, |e| e.offset))
            }
        }
    }

    /// Reads without a group: an ephemeral consumer on one partition.
    pub(crate) async fn read_at(
        &self,
        topic: &str,
        partition: i32,
        from: ReplayFrom,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let name = self.ensure_stream(topic).await?;
        let stream = self
            .js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| bus_err("stream", e))?;
        let c: PullConsumer = stream
            .create_consumer(pull::Config {
                ack_policy: jetstream::consumer::AckPolicy::None,
                filter_subject: self.subject(topic, partition),
                inactive_threshold: Duration::from_secs(30),
                ..Self::deliver_policy(from)
            })
            .await
            .map_err(|e| bus_err("reader", e))?;
        let msgs = self.fetch(&c, limit.clamp(1, 10_000) as usize).await?;
        let _ = stream.delete_consumer(&c.cached_info().name).await;
        msgs.iter()
            .map(|m| Ok(Self::decode(m, partition)?.0))
            .collect()
    }
}
