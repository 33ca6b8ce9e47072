//! Analytics metrics, registered into the server's Prometheus registry. They
//! count this process's work since start; the durable totals are the job
//! counters in the database (the admin API shows those).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

#[derive(Clone, Debug, Default)]
pub struct AnalyticsMetrics {
    /// Elements applied to a job's windows (on time or late).
    pub elements: Family<JobLabels, Counter>,
    /// Elements applied to a window the watermark had passed.
    pub late_applied: Family<JobLabels, Counter>,
    /// Elements dropped because their windows were final.
    pub dropped: Family<JobLabels, Counter>,
    /// Each job's watermark, in seconds since the epoch.
    pub watermark_seconds: Family<JobLabels, Gauge>,
    /// Events delivered again and skipped by the inbox.
    pub duplicates: Counter,
}

impl AnalyticsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_analytics_elements",
            "Elements applied to analytics windows, by job",
            self.elements.clone(),
        );
        registry.register(
            "flowline_analytics_late_applied",
            "Late elements applied within the allowed lateness, by job",
            self.late_applied.clone(),
        );
        registry.register(
            "flowline_analytics_dropped",
            "Elements dropped because their windows were final, by job",
            self.dropped.clone(),
        );
        registry.register(
            "flowline_analytics_watermark_seconds",
            "Event-time watermark of each analytics job (seconds since the epoch)",
            self.watermark_seconds.clone(),
        );
        registry.register(
            "flowline_analytics_duplicates",
            "Redelivered events the analytics inbox skipped",
            self.duplicates.clone(),
        );
    }

    pub(crate) fn job(&self, job: &str, applied: u64, late: u64, dropped: u64, wm: Option<i64>) {
        let l = JobLabels {
            job: job.to_owned(),
        };
        self.elements.get_or_create(&l).inc_by(applied);
        self.late_applied.get_or_create(&l).inc_by(late);
        self.dropped.get_or_create(&l).inc_by(dropped);
        if let Some(w) = wm {
            self.watermark_seconds.get_or_create(&l).set(w / 1_000_000);
        }
    }
}
