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
use std::future::Future;
use std::time::Duration;
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
        for t in &opts.topics {
            self.ensure_group(&opts.group, t, opts.start).await?;
        }
        let worker = Worker {
            log: self.clone(),
            opts: opts.clone(),
            handler,
            shutdown,
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
            let progressed = match self.pass().await {
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
        tracing::debug!(group = %self.opts.group, "consumer stopped");
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
            // The event's correlation id rides on every log line the handler writes.
            let span = tracing::info_span!("event", group = %self.opts.group,
                correlation_id = %ev.envelope.correlation_id, event_id = %ev.envelope.id);
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
