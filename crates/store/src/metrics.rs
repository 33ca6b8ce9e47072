//! Event-log metrics, registered into the server's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
    pub topic: String,
}

#[derive(Clone, Debug, Default)]
pub struct LogMetrics {
    pub appended: Family<TopicLabels, Counter>,
    pub delivered: Family<GroupLabels, Counter>,
    pub retried: Family<GroupLabels, Counter>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    /// Refreshed from the log on every scrape (see `EventLog::refresh_lag`).
    pub lag: Family<GroupLabels, Gauge>,
}

impl LogMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_events_appended",
            "Events appended to the log, by topic",
            self.appended.clone(),
        );
        registry.register(
            "flowline_events_delivered",
            "Events handled successfully, by consumer group and topic",
            self.delivered.clone(),
        );
        registry.register(
            "flowline_events_retried",
            "Failed handling attempts that were retried, by consumer group and topic",
            self.retried.clone(),
        );
        registry.register(
            "flowline_events_dead_lettered",
            "Events moved to the dead-letter topic, by consumer group and topic",
            self.dead_lettered.clone(),
        );
        registry.register(
            "flowline_consumer_lag",
            "Events appended but not yet consumed, by consumer group and topic",
            self.lag.clone(),
        );
    }

    pub(crate) fn group(group: &str, topic: &str) -> GroupLabels {
        GroupLabels {
            group: group.to_owned(),
            topic: topic.to_owned(),
        }
    }
}
