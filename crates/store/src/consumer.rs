//! Consumer groups: at-least-once delivery with per-partition order, retries
//! with exponential backoff, and dead letters after `max_attempts`.
//!
//! One task per subscription walks its topics' partitions; within a partition
//! events are handled strictly in offset order (a failing event holds its
//! partition while it is retried, so per-key order is never broken). The
//! position is committed after each batch; a crash redelivers at most the
//! uncommitted tail of a batch, which the handler's inbox turns into a no-op.

use crate::log::{EventLog, ReplayFrom};
use crate::metrics::{GroupLabels, LogMetrics};
use crate::Result;
use flowline_core::RecordedEvent;
use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Why a handler could not process an event.
#[derive(Debug, Clone)]
pub struct HandlerError {
    pub message: String,
    /// A permanent error (malformed payload…) skips the remaining retries.
    pub permanent: bool,
}

impl HandlerError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        HandlerError {
            message: message.to_string(),
            permanent: false,
        }
    }
    pub fn permanent(message: impl std::fmt::Display) -> Self {
        HandlerError {
            message: message.to_string(),
            permanent: true,
        }
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::transient(e)
    }
}

/// Something that reacts to events. Must tolerate redelivery (use the inbox).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Makes everything handled so far durable. Called before the group's
    /// positions are committed, so a handler that buffers (a search index
    /// writer) never has events counted as done that it could still lose.
    fn flush(&self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }
}

impl<H: Handler> Handler for std::sync::Arc<H> {
    fn handle(
        &self,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).handle(event)
    }

    fn flush(&self) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (**self).flush()
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    pub group: String,
    pub topics: Vec<String>,
    /// Where a group seen for the first time starts.
    pub start: ReplayFrom,
}

impl ConsumerOptions {
    pub fn new(group: impl Into<String>, topics: &[&str]) -> Self {
        ConsumerOptions {
            group: group.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            start: ReplayFrom::Earliest,
        }
    }
}

/// A running consumer. Stops when the shutdown signal turns true, after the
/// event in hand and a final commit.
pub struct Subscription {
    pub group: String,
    pub task: JoinHandle<()>,
}

impl EventLog {
    /// Registers the group and starts consuming in a background task.
    pub async fn subscribe<H: Handler>(
        &self,
        opts: ConsumerOptions,
        handler: H,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Subscription> {
        let partitions = self.options().partitions as i32;
        for t in &opts.topics {
            match self.bus() {
                // Created now, so the group's start is fixed at registration.
                Some(bus) => {
                    for p in 0..partitions {
                        bus.consumer(&opts.group, t, p, opts.start).await?;
                    }
                }
                None => self.ensure_group(&opts.group, t, opts.start).await?,
            }
        }
        let units = opts
            .topics
            .iter()
            .flat_map(|t| (0..partitions).map(move |p| (t.clone(), p)))
            .collect();
        let worker = Worker {
            log: self.clone(),
            opts: opts.clone(),
            handler,
            shutdown,
            leases: Leases::new(units),
        };
        let task = tokio::spawn(worker.run());
        Ok(Subscription {
            group: opts.group,
            task,
        })
    }
}

struct Worker<H> {
    log: EventLog,
    opts: ConsumerOptions,
    handler: H,
    shutdown: watch::Receiver<bool>,
    leases: Leases,
}

/// The (topic, partition) units of a group this process handles. Several
/// processes running one group share its units by lease: each takes its fair
/// share of the live members' total, renews what it holds, and takes over
/// units whose owner stopped renewing. A unit has one owner at a time, so
/// per-key order holds across instances.
struct Leases {
    units: Vec<(String, i32)>,
    owned: BTreeSet<(String, i32)>,
    renewed: Option<Instant>,
}

impl Leases {
    fn new(units: Vec<(String, i32)>) -> Leases {
        Leases {
            units,
            owned: BTreeSet::new(),
            renewed: None,
        }
    }

    /// Renews and rebalances when a third of the lease has passed. Returns
    /// the units newly acquired.
    async fn refresh(&mut self, log: &EventLog, group: &str) -> Result<Vec<(String, i32)>> {
        let lease = log.options().lease;
        if self.renewed.is_some_and(|t| t.elapsed() < lease / 3) {
            return Ok(Vec::new());
        }
        let owner = log.options().owner.clone();
        let members = log.lease_heartbeat(group, &owner).await?.max(1);
        let target = self.units.len().div_ceil(members as usize);
        let mut owned: BTreeSet<_> = log.lease_renew(group, &owner).await?.into_iter().collect();
        let mut acquired = Vec::new();
        for u in &self.units {
            if owned.len() >= target {
                break;
            }
            if !owned.contains(u) && log.lease_claim(group, &u.0, u.1, &owner).await? {
                owned.insert(u.clone());
                acquired.push(u.clone());
            }
        }
        // Give back the surplus so a member that joined gets its share.
        while owned.len() > target {
            let u = owned.pop_last().expect("non-empty");
            log.lease_release(group, &owner, Some(&u)).await?;
        }
        if owned != self.owned {
            tracing::info!(group, owner = %owner, members, units = owned.len(), "partition leases changed");
        }
        self.owned = owned;
        self.renewed = Some(Instant::now());
        Ok(acquired)
    }
}

enum Outcome {
    Delivered,
    DeadLettered,
    Stopped,
}

impl<H: Handler> Worker<H> {
    async fn run(mut self) {
        let mut appends = self.log.appends();
        let idle_poll = self.log.options().idle_poll;
        loop {
            appends.borrow_and_update();
            if let Err(e) = self.refresh_leases().await {
                tracing::warn!(group = %self.opts.group, error = %e, "lease renewal failed; retrying");
            }
            let pass = if self.log.bus().is_some() {
                self.pass_bus().await
            } else {
                self.pass().await
            };
            let progressed = match pass {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(group = %self.opts.group, error = %e, "consumer pass failed; retrying");
                    false
                }
            };
            if self.stopping() {
                break;
            }
            if progressed {
                continue;
            }
            if let Err(e) = self.retry_dead_letters().await {
                tracing::warn!(group = %self.opts.group, error = %e, "dead-letter retry failed");
            }
            tokio::select! {
                _ = appends.changed() => {}
                _ = tokio::time::sleep(idle_poll) => {}
                _ = self.shutdown.changed() => {}
            }
            if self.stopping() {
                break;
            }
        }
        // Hand the partitions over now rather than at lease expiry.
        let owner = self.log.options().owner.clone();
        if let Err(e) = self.log.lease_release(&self.opts.group, &owner, None).await {
            tracing::warn!(group = %self.opts.group, error = %e, "could not release leases");
        }
        tracing::debug!(group = %self.opts.group, "consumer stopped");
    }

    async fn refresh_leases(&mut self) -> Result<()> {
        let acquired = self.leases.refresh(&self.log, &self.opts.group).await?;
        let mut failed = None;
        if let Some(bus) = self.log.bus() {
            for unit in acquired {
                let (topic, p) = (&unit.0, unit.1);
                if let Err(e) = bus
                    .take_over(&self.opts.group, topic, p, self.opts.start)
                    .await
                {
                    // Not rewound, so not ours to read yet: give it back and
                    // claim it again (and rewind) at the next renewal.
                    self.leases.owned.remove(&unit);
                    let owner = self.log.options().owner.clone();
                    self.log
                        .lease_release(&self.opts.group, &owner, Some(&unit))
                        .await?;
                    failed = Some(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The bus flavour of [`Self::pass`]: every owned partition pulled at
    /// once, each handled in order; acknowledged after the handler's flush.
    async fn pass_bus(&mut self) -> Result<bool> {
        let log = self.log.clone();
        let bus = log.bus().expect("bus pass without a bus");
        let batch = self.log.options().fetch_batch.clamp(1, 10_000) as usize;
        let max_deliver = bus.cfg.max_deliver;
        let group = self.opts.group.clone();
        let start = self.opts.start;
        // Pull every owned partition at once (one round trip for all), then
        // handle them one after another, each in order.
        let units: Vec<_> = self.leases.owned.iter().cloned().collect();
        let fetched = futures_util::future::join_all(units.iter().map(|(topic, partition)| {
            let group = &group;
            async move {
                let consumer = bus.consumer(group, topic, *partition, start).await?;
                bus.fetch(&consumer, batch).await
            }
        }))
        .await;
        let mut failed = None;
        let mut handled: Vec<((String, i32), Vec<async_nats::jetstream::Message>)> = Vec::new();
        for ((topic, partition), msgs) in units.into_iter().zip(fetched) {
            let msgs = match msgs {
                Ok(m) => m,
                Err(e) => {
                    // A replay may have replaced the consumer; or the pull was
                    // cut (NATS restarted) after the server had delivered
                    // part of it: those stay pending until `ack_wait`, so
                    // rewind to the ack floor now to keep order.
                    bus.forget(&group, &topic, partition);
                    if let Err(e) = bus.take_over(&group, &topic, partition, start).await {
                        tracing::warn!(group = %group, error = %e, "rewind after a failed fetch failed");
                    }
                    failed = Some(e);
                    continue;
                }
            };
            if msgs.is_empty() {
                continue;
            }
            let labels = LogMetrics::group(&group, &topic);
            let mut done = Vec::with_capacity(msgs.len());
            let mut delivered = 0;
            let mut stopped = false;
            for m in msgs {
                if self.stopping() {
                    stopped = true;
                    break;
                }
                let (ev, deliveries) = match crate::bus::NatsBus::decode(&m, partition) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!(group = %group, topic = %topic, error = %e, "undecodable message skipped");
                        done.push(m);
                        continue;
                    }
                };
                if deliveries > max_deliver {
                    let why = format!("delivered {deliveries} times (max_deliver {max_deliver})");
                    self.log
                        .dead_letter(&group, &ev, &why, deliveries as u32)
                        .await?;
                    done.push(m);
                    continue;
                }
                match self.deliver(&ev, &labels).await? {
                    Outcome::Delivered => {
                        delivered += 1;
                        done.push(m);
                    }
                    Outcome::DeadLettered => done.push(m),
                    Outcome::Stopped => {
                        stopped = true;
                        break;
                    }
                }
            }
            self.log
                .metrics()
                .delivered
                .get_or_create(&labels)
                .inc_by(delivered);
            if !done.is_empty() {
                handled.push(((topic, partition), done));
            }
            if stopped {
                break;
            }
        }
        if handled.is_empty() {
            return failed.map_or(Ok(false), Err);
        }
        let rewind = |handled: &Vec<((String, i32), Vec<async_nats::jetstream::Message>)>| {
            let units: Vec<(String, i32)> = handled.iter().map(|(u, _)| u.clone()).collect();
            let group = group.clone();
            async move {
                for (topic, partition) in units {
                    bus.take_over(&group, &topic, partition, start).await?;
                }
                Ok::<(), crate::StoreError>(())
            }
        };
        if let Err(e) = self.handler.flush().await {
            // Unacknowledged: rewind, and they come again.
            tracing::warn!(group = %group, error = %e.message, "handler flush failed");
            rewind(&handled).await?;
            return Ok(true);
        }
        // The acks are applied before the lease can change hands, so a new
        // owner does not rewind over them (hence the flush).
        let acked = tokio::time::timeout(Duration::from_secs(10), async {
            for (_, msgs) in &handled {
                for m in msgs {
                    m.ack().await.map_err(|e| e.to_string())?;
                }
            }
            bus.client.flush().await.map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer within 10s".into()));
        if let Err(e) = acked {
            // Handled but maybe unacknowledged: rewind so the rest of each
            // partition does not overtake them (redelivery is a no-op).
            tracing::warn!(group = %group, error = %e, "acks failed; rewinding");
            rewind(&handled).await?;
        }
        failed.map_or(Ok(true), Err)
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// One batch from every partition of every topic; the positions of a topic
    /// are committed together in one transaction. True if anything was handled.
    async fn pass(&mut self) -> Result<bool> {
        let mut progressed = false;
        let batch = self.log.options().fetch_batch;
        for topic in self.opts.topics.clone() {
            let labels = LogMetrics::group(&self.opts.group, &topic);
            let mut moves = Vec::new();
            let mut delivered = 0;
            let mut stopped = false;
            for (partition, next) in self.log.positions(&self.opts.group, &topic).await? {
                if !self.leases.owned.contains(&(topic.clone(), partition)) {
                    continue;
                }
                let events = self.log.read(&topic, partition, next, batch).await?;
                let Some(first) = events.first() else {
                    continue;
                };
                // Retention may have dropped events below our position.
                let mut done = first.offset.min(next);
                for ev in &events {
                    if self.stopping() {
                        stopped = true;
                        break;
                    }
                    match self.deliver(ev, &labels).await? {
                        Outcome::Delivered => {
                            delivered += 1;
                            done = ev.offset + 1;
                        }
                        Outcome::DeadLettered => done = ev.offset + 1,
                        Outcome::Stopped => {
                            stopped = true;
                            break;
                        }
                    }
                }
                if done > next {
                    moves.push((partition, next, done));
                }
                if stopped {
                    break;
                }
            }
            // One metric update per batch, not per event (hot path).
            self.log
                .metrics()
                .delivered
                .get_or_create(&labels)
                .inc_by(delivered);
            if !moves.is_empty() {
                progressed = true;
                if let Err(e) = self.handler.flush().await {
                    // Nothing is committed: the next pass redelivers from the last positions.
                    tracing::warn!(group = %self.opts.group, error = %e.message, "handler flush failed");
                    return Ok(progressed);
                }
                // Rows moved by a replay meanwhile are left alone; the next pass re-reads.
                self.log
                    .commit_positions(&self.opts.group, &topic, &moves)
                    .await?;
            }
            if stopped {
                break;
            }
        }
        Ok(progressed)
    }

    /// Handles one event, retrying with backoff, dead-lettering at the limit.
    async fn deliver(&mut self, ev: &RecordedEvent, labels: &GroupLabels) -> Result<Outcome> {
        let (max_attempts, base, max) = {
            let o = self.log.options();
            (o.max_attempts, o.backoff_base, o.backoff_max)
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // The event's correlation id rides on every log line the handler
            // writes; its trace context makes the handling part of the trace
            // that published it.
            let span = tracing::info_span!("event", group = %self.opts.group,
                correlation_id = %ev.envelope.correlation_id, event_id = %ev.envelope.id,
                topic = %ev.envelope.topic, event_type = %ev.envelope.event_type,
                partition = ev.partition, offset = ev.offset, attempt,
                traceparent = ev.envelope.traceparent.as_deref());
            match self.handler.handle(ev).instrument(span).await {
                Ok(()) => return Ok(Outcome::Delivered),
                Err(err) if err.permanent || attempt >= max_attempts => {
                    tracing::error!(group = %self.opts.group, event_id = %ev.envelope.id,
                        event_type = %ev.envelope.event_type, attempts = attempt,
                        error = %err.message, "event dead-lettered");
                    self.log
                        .dead_letter(&self.opts.group, ev, &err.message, attempt)
                        .await?;
                    return Ok(Outcome::DeadLettered);
                }
                Err(err) => {
                    self.log.metrics().retried.get_or_create(labels).inc();
                    let delay = backoff(base, max, attempt);
                    tracing::warn!(group = %self.opts.group, event_id = %ev.envelope.id,
                        attempt, delay_ms = delay.as_millis() as u64, error = %err.message,
                        "handler failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.changed() => {}
                    }
                    if self.stopping() {
                        return Ok(Outcome::Stopped);
                    }
                }
            }
        }
    }

    async fn retry_dead_letters(&mut self) -> Result<()> {
        for (id, _attempts, ev) in self.log.pending_retries(&self.opts.group).await? {
            if !self.opts.topics.contains(&ev.envelope.topic) {
                continue;
            }
            let outcome = self.handler.handle(&ev).await.map_err(|e| e.message);
            if outcome.is_ok() {
                let labels = LogMetrics::group(&self.opts.group, &ev.envelope.topic);
                self.log.metrics().delivered.get_or_create(&labels).inc();
            }
            self.log.settle_retry(id, outcome).await?;
        }
        Ok(())
    }
}

/// `base * 2^(attempt-1)`, capped at `max`.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        assert_eq!(backoff(b, m, 1), Duration::from_millis(100));
        assert_eq!(backoff(b, m, 2), Duration::from_millis(200));
        assert_eq!(backoff(b, m, 4), Duration::from_millis(800));
        assert_eq!(backoff(b, m, 6), m);
        assert_eq!(backoff(b, m, 60), m);
    }
}
