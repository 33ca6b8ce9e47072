//! Audit metrics, registered into the server's Prometheus registry: alerts
//! are meant to page someone, so their rate is what dashboards watch.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    /// Records appended to the chain.
    pub records: Counter,
    /// Alerts raised, by rule.
    pub alerts: Family<RuleLabels, Counter>,
}

impl AuditMetrics {
    /// `flowline_audit_records_total`, `flowline_audit_alerts_total{rule}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_audit_records",
            "Records appended to the audit chain",
            self.records.clone(),
        );
        registry.register(
            "flowline_audit_alerts",
            "Audit alerts raised, by rule",
            self.alerts.clone(),
        );
    }

    pub(crate) fn rule(rule: &str) -> RuleLabels {
        RuleLabels {
            rule: rule.to_owned(),
        }
    }
}
