//! Gateway metrics, registered into the server's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct GatewayMetrics {
    /// Open WebSocket connections on this node.
    pub connections: Gauge,
    /// Frames written to clients (deliveries, replies, presence).
    pub frames_sent: Counter,
    /// Frames received from clients.
    pub frames_received: Counter,
    /// Connections closed by the server, by reason (slow_consumer, flood,
    /// idle, banned, unauthenticated, too_big).
    pub closed: Family<CloseLabels, Counter>,
    /// Frames refused with an error frame (bad JSON, unknown type, rate limit…).
    pub rejected: Family<CloseLabels, Counter>,
}

impl GatewayMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flowline_ws_connections",
            "Open WebSocket connections on this node",
            self.connections.clone(),
        );
        registry.register(
            "flowline_ws_frames_sent",
            "Frames written to WebSocket clients",
            self.frames_sent.clone(),
        );
        registry.register(
            "flowline_ws_frames_received",
            "Frames received from WebSocket clients",
            self.frames_received.clone(),
        );
        registry.register(
            "flowline_ws_closed",
            "WebSocket connections closed by the server, by reason",
            self.closed.clone(),
        );
        registry.register(
            "flowline_ws_rejected",
            "Client frames answered with an error frame, by code",
            self.rejected.clone(),
        );
    }

    pub(crate) fn closed(&self, reason: &str) {
        self.closed
            .get_or_create(&CloseLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn rejected(&self, code: &str) {
        self.rejected
            .get_or_create(&CloseLabels {
                reason: code.to_owned(),
            })
            .inc();
    }
}
