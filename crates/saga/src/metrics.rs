//! Saga metrics, registered into the server's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SagaLabels {
    pub saga: String,
}

#[derive(Clone, Debug, Default)]
pub struct SagaMetrics {
    pub started: Family<SagaLabels, Counter>,
    pub completed: Family<SagaLabels, Counter>,
    pub compensated: Family<SagaLabels, Counter>,
    /// Failed attempts of actions and compensations.
    pub failed_attempts: Family<SagaLabels, Counter>,
    /// Sagas flagged stuck, ever (alert on its rate).
    pub stuck_total: Family<SagaLabels, Counter>,
    /// Sagas stuck compensating right now; refreshed from the database, so it
    /// is right across restarts and processes.
    pub stuck: Gauge,
}

impl SagaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_sagas_started",
            "Sagas started, by saga",
            self.started.clone(),
        );
        registry.register(
            "flowline_sagas_completed",
            "Sagas that completed every step, by saga",
            self.completed.clone(),
        );
        registry.register(
            "flowline_sagas_compensated",
            "Sagas that ended after compensating, by saga",
            self.compensated.clone(),
        );
        registry.register(
            "flowline_saga_failed_attempts",
            "Failed attempts of saga steps and compensations, by saga",
            self.failed_attempts.clone(),
        );
        registry.register(
            "flowline_sagas_stuck_flagged",
            "Sagas flagged stuck because a compensation keeps failing, by saga",
            self.stuck_total.clone(),
        );
        registry.register(
            "flowline_sagas_stuck",
            "Sagas stuck compensating now",
            self.stuck.clone(),
        );
    }

    pub(crate) fn label(saga: &str) -> SagaLabels {
        SagaLabels {
            saga: saga.to_owned(),
        }
    }
}
