//! The event envelope: what every state change publishes.
//!
//! A context builds an [`EventDraft`] inside its transaction; the outbox turns it
//! into an [`Envelope`] (id, time, correlation) and the log, once appended, into a
//! [`RecordedEvent`] with a partition and an offset.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Current envelope schema version. Bumped only for incompatible envelope changes;
/// payload schemas carry their own `schema_version`.
pub const ENVELOPE_VERSION: i32 = 1;

/// An event as a context describes it, before it is stamped.
#[derive(Debug, Clone)]
pub struct EventDraft {
    /// Dotted type, `order.created`.
    pub event_type: String,
    /// Topic it is published to, `commerce.orders`.
    pub topic: String,
    /// Partition key: events with one key keep their order (e.g. user id).
    pub key: String,
    /// Version of this event type's payload schema.
    pub schema_version: i32,
    pub payload: serde_json::Value,
}

impl EventDraft {
    pub fn new(
        topic: impl Into<String>,
        event_type: impl Into<String>,
        key: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        EventDraft {
            event_type: event_type.into(),
            topic: topic.into(),
            key: key.into(),
            schema_version: 1,
            payload,
        }
    }
}

/// A stamped event: what travels through the outbox and the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub topic: String,
    pub key: String,
    pub occurred_at: Timestamp,
    /// Follows a request from the edge to the last event it causes.
    pub correlation_id: String,
    /// The request id or event id that directly caused this event.
    pub causation_id: Option<String>,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    /// W3C trace context of the span that published it, so the consumer's
    /// handling continues the same trace. Filled by the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Envelope {
    /// Stamps a draft with a fresh UUIDv7 and the current time.
    pub fn stamp(draft: EventDraft, correlation_id: &str, causation_id: Option<&str>) -> Self {
        Envelope {
            id: crate::id::new_id(),
            event_type: draft.event_type,
            topic: draft.topic,
            key: draft.key,
            occurred_at: Timestamp::now(),
            correlation_id: correlation_id.to_owned(),
            causation_id: causation_id.map(str::to_owned),
            schema_version: draft.schema_version,
            payload: draft.payload,
            traceparent: None,
        }
    }

    /// Stamps a draft caused by handling `parent`: same correlation, caused by it.
    pub fn caused_by(draft: EventDraft, parent: &Envelope) -> Self {
        let cause = parent.id.to_string();
        Self::stamp(draft, &parent.correlation_id, Some(&cause))
    }
}

/// An event as stored in the log: its envelope plus where it sits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub partition: i32,
    pub offset: i64,
    pub appended_at: Timestamp,
    #[serde(flatten)]
    pub envelope: Envelope,
}

/// Partition of `key` among `partitions`: FNV-1a, stable across processes,
/// platforms and releases (std's hasher is randomly seeded and may change).
pub fn partition_for(key: &str, partitions: u32) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioning_is_stable_and_in_range() {
        // Pinned values: changing the hash would silently reorder keys across a
        // rolling upgrade, so this test must fail if anyone touches it.
        assert_eq!(partition_for("user-1", 8), partition_for("user-1", 8));
        assert_eq!(partition_for("", 8), (0xcbf2_9ce4_8422_2325u64 % 8) as i32);
        for k in ["a", "b", "order-42", "ü"] {
            let p = partition_for(k, 4);
            assert!((0..4).contains(&p));
        }
        assert_eq!(partition_for("anything", 1), 0);
    }

    #[test]
    fn caused_by_keeps_correlation_and_links_cause() {
        let parent = Envelope::stamp(
            EventDraft::new("t", "a.b", "k", serde_json::json!({})),
            "corr-1",
            Some("req-1"),
        );
        let child = Envelope::caused_by(
            EventDraft::new("t", "c.d", "k", serde_json::json!({})),
            &parent,
        );
        assert_eq!(child.correlation_id, "corr-1");
        assert_eq!(
            child.causation_id.as_deref(),
            Some(parent.id.to_string().as_str())
        );
        assert_ne!(child.id, parent.id);
    }
}
