//! Data-flow diagrams drawn from what happened: a trace's spans become a
//! Mermaid sequence diagram (participants are the contexts, topics and stores
//! actually touched, in order, with timings), and many traces of one endpoint
//! become its data-flow graph with p50/p99 per hop.

use flowline_telemetry::SpanRecord;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// One arrow of a sequence diagram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub from: String,
    pub to: String,
    pub label: String,
    /// A reply (dashed arrow).
    pub reply: bool,
    /// Milliseconds since the trace's first span started.
    pub at_ms: f64,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diagram {
    pub participants: Vec<String>,
    pub messages: Vec<Message>,
}

/// The context that serves a route: the first path segment after `/api/v1`
/// (and after `admin/`), mapped to the context owning it.
pub fn context_of_route(route: &str) -> String {
    let mut segs = route
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty());
    let first = segs.next().unwrap_or("");
    if first != "api" {
        return "gateway".into();
    }
    let _version = segs.next();
    let mut seg = segs.next().unwrap_or("");
    if seg == "admin" {
        seg = segs.next().unwrap_or("admin");
    }
    match seg {
        "auth" | "users" | "sessions" | ".well-known" => "identity",
        "products" | "categories" => "catalog",
        "search" => "search",
        "inventory" | "stock" | "warehouses" => "inventory",
        "cart" | "carts" => "cart",
        "orders" => "orders",
        "payments" | "refunds" => "payments",
        "ledger" | "invoices" | "accounts" | "billing" => "ledger",
        "shipments" | "shipping" | "routes" => "shipping",
        "notifications" | "notification-templates" | "mailbox" => "notifications",
        "channels" | "workspaces" | "messages" | "realtime" | "ws" | "dm" => "messaging",
        "sagas" => "saga",
        "audit" => "audit",
        "analytics" => "analytics",
        "traces" | "flows" | "events" | "consumer-groups" => "console",
        other => other,
    }
    .to_owned()
}

/// The context a consumer group belongs to: `inventory.orders` → `inventory`.
pub fn context_of_group(group: &str) -> String {
    group.split('.').next().unwrap_or(group).to_owned()
}

/// The participant a saga step works on, from its name.
pub fn context_of_step(step: &str) -> String {
    let s = step.to_ascii_lowercase();
    let table = [
        ("stock", "inventory"),
        ("inventory", "inventory"),
        ("payment", "payments"),
        ("refund", "payments"),
        ("charge", "payments"),
        ("shipment", "shipping"),
        ("ship", "shipping"),
        ("ledger", "ledger"),
        ("invoice", "ledger"),
        ("notification", "notifications"),
        ("workspace", "messaging"),
        ("channel", "messaging"),
        ("admin", "messaging"),
        ("order", "orders"),
    ];
    table
        .iter()
        .find(|(k, _)| s.contains(k))
        .map(|(_, c)| (*c).to_owned())
        .unwrap_or_else(|| "saga".into())
}

fn attr<'a>(s: &'a SpanRecord, k: &str) -> &'a str {
    s.attrs.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

fn ms(us: i64) -> f64 {
    (us as f64 / 1000.0 * 100.0).round() / 100.0
}

/// Who "is" a span in the diagram: the context doing its work.
fn actor(s: &SpanRecord) -> String {
    match s.name.as_str() {
        "request" => context_of_route(attr(s, "route")),
        "event" => context_of_group(attr(s, "group")),
        "saga.step" => context_of_step(attr(s, "step")),
        "saga.transition" => format!("saga {}", attr(s, "saga")),
        _ => "flowline".into(),
    }
}

/// The sequence diagram of one trace.
pub fn sequence(spans: &[SpanRecord]) -> Diagram {
    let mut spans: Vec<&SpanRecord> = spans.iter().collect();
    spans.sort_by_key(|s| (s.start_us, s.name != "request"));
    let t0 = spans.first().map(|s| s.start_us).unwrap_or(0);
    let by_id: HashMap<&str, &SpanRecord> =
        spans.iter().map(|s| (s.span_id.as_str(), *s)).collect();
    // The actor of a span without one of its own (a publish) is its parent's.
    let owner = |s: &SpanRecord| -> String {
        let mut cur = s;
        for _ in 0..16 {
            match cur.name.as_str() {
                "request" | "event" | "saga.step" | "saga.transition" => return actor(cur),
                _ => match cur.parent_id.as_deref().and_then(|p| by_id.get(p)) {
                    Some(p) => cur = p,
                    None => break,
                },
            }
        }
        "flowline".into()
    };
    let relays: HashMap<&str, &SpanRecord> = spans
        .iter()
        .filter(|s| s.name == "relay")
        .filter_map(|s| s.parent_id.as_deref().map(|p| (p, *s)))
        .collect();
    let mut participants: Vec<String> = Vec::new();
    let mut see = |p: &str| {
        if !participants.iter().any(|x| x == p) {
            participants.push(p.to_owned());
        }
    };
    let mut messages = Vec::new();
    let mut push = |from: String, to: String, label: String, reply: bool, at: i64, dur: i64| {
        messages.push(Message {
            from,
            to,
            label,
            reply,
            at_ms: ms(at - t0),
            duration_ms: ms(dur),
        });
    };
    let mut replies: Vec<(i64, Message)> = Vec::new();
    let mut started: Vec<String> = Vec::new();
    for s in &spans {
        let at = s.start_us;
        let db = |who: &str| -> Option<(String, String)> {
            (s.db_calls > 0).then(|| {
                (
                    format!("{who} db"),
                    format!("{} statements, {} ms", s.db_calls, ms(s.db_us)),
                )
            })
        };
        match s.name.as_str() {
            "request" => {
                let ctx = actor(s);
                let label = format!("{} {}", attr(s, "method"), attr(s, "route"));
                see("client");
                see("gateway");
                see(&ctx);
                push(
                    "client".into(),
                    "gateway".into(),
                    label.clone(),
                    false,
                    at,
                    0,
                );
                push(
                    "gateway".into(),
                    ctx.clone(),
                    label,
                    false,
                    at,
                    s.duration_us,
                );
                if let Some((store, what)) = db(&ctx) {
                    see(&store);
                    push(ctx.clone(), store, what, false, at, s.db_us);
                }
                let status = s
                    .attrs
                    .get("status")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let end = at + s.duration_us;
                replies.push((
                    end,
                    Message {
                        from: "gateway".into(),
                        to: "client".into(),
                        label: format!("{status} in {} ms", ms(s.duration_us)),
                        reply: true,
                        at_ms: ms(end - t0),
                        duration_ms: ms(s.duration_us),
                    },
                ));
            }
            "publish" => {
                let from = owner(s);
                let topic = attr(s, "topic").to_owned();
                see(&from);
                see(&topic);
                let mut label = attr(s, "event_type").to_owned();
                if let Some(r) = relays.get(s.span_id.as_str()) {
                    label.push_str(&format!(" (in log after {} ms)", ms(r.duration_us)));
                }
                let dur = relays.get(s.span_id.as_str()).map_or(0, |r| r.duration_us);
                push(from, topic, label, false, at, dur);
            }
            "event" => {
                let to = actor(s);
                let topic = attr(s, "topic").to_owned();
                see(&topic);
                see(&to);
                let waited = s
                    .parent_id
                    .as_deref()
                    .and_then(|p| by_id.get(p))
                    .map(|p| at - p.start_us);
                let mut label = format!(
                    "{} → {} ({} ms",
                    attr(s, "event_type"),
                    attr(s, "group"),
                    ms(s.duration_us)
                );
                if let Some(w) = waited {
                    label.push_str(&format!(", {} ms after publish", ms(w)));
                }
                label.push(')');
                push(topic, to.clone(), label, false, at, s.duration_us);
                if let Some((store, what)) = db(&to) {
                    see(&store);
                    push(to, store, what, false, at, s.db_us);
                }
            }
            "saga.step" => {
                let saga = format!("saga {}", attr(s, "saga"));
                let to = actor(s);
                if !started.contains(&saga) {
                    // Who started it: the span that recorded the saga row.
                    if let Some(p) = s.parent_id.as_deref().and_then(|p| by_id.get(p)) {
                        let from = owner(p);
                        see(&from);
                        see(&saga);
                        push(from, saga.clone(), format!("start {saga}"), false, at, 0);
                    }
                    started.push(saga.clone());
                }
                see(&saga);
                see(&to);
                let label = format!(
                    "{} {} #{} {} ({} ms)",
                    attr(s, "phase"),
                    attr(s, "step"),
                    s.attrs
                        .get("attempt")
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    attr(s, "status"),
                    ms(s.duration_us)
                );
                push(saga, to.clone(), label, false, at, s.duration_us);
                if let Some((store, what)) = db(&to) {
                    see(&store);
                    push(to, store, what, false, at, s.db_us);
                }
            }
            _ => {}
        }
    }
    // Replies go where they happened in time.
    for (end, reply) in replies {
        let pos = messages
            .iter()
            .position(|m| m.at_ms > ms(end - t0))
            .unwrap_or(messages.len());
        messages.insert(pos, reply);
    }
    Diagram {
        participants,
        messages,
    }
}

fn mermaid_id(p: &str) -> String {
    p.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn mermaid_text(s: &str) -> String {
    // `;` and `#` end or escape a Mermaid message.
    s.replace(';', ",").replace('#', "no. ")
}

/// The diagram as Mermaid text, in the style of the seeds' diagrams.
pub fn mermaid(d: &Diagram) -> String {
    let mut out = String::from("sequenceDiagram\n");
    for p in &d.participants {
        let kind = if p == "client" {
            "actor"
        } else {
            "participant"
        };
        out.push_str(&format!("    {kind} {} as {p}\n", mermaid_id(p)));
    }
    for m in &d.messages {
        let arrow = if m.reply { "-->>" } else { "->>" };
        out.push_str(&format!(
            "    {}{arrow}{}: +{} ms {}\n",
            mermaid_id(&m.from),
            mermaid_id(&m.to),
            m.at_ms,
            mermaid_text(&m.label)
        ));
    }
    out
}

/// One edge of an endpoint's data-flow graph.
#[derive(Debug, Clone, Serialize)]
pub struct Hop {
    pub from: String,
    pub to: String,
    pub label: String,
    /// In how many of the endpoint's traces the hop occurred.
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointFlow {
    pub endpoint: String,
    pub traces: usize,
    pub hops: Vec<Hop>,
    pub mermaid: String,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Aggregates traces (each a list of spans) by the endpoint of their request.
pub fn summary(traces: &[Vec<SpanRecord>]) -> Vec<EndpointFlow> {
    // endpoint → (traces, (from, to, label) → durations)
    type Hops = BTreeMap<(String, String, String), Vec<f64>>;
    let mut by_endpoint: BTreeMap<String, (usize, Hops)> = BTreeMap::new();
    for spans in traces {
        let Some(root) = spans
            .iter()
            .filter(|s| s.name == "request")
            .min_by_key(|s| s.start_us)
        else {
            continue;
        };
        let endpoint = format!("{} {}", attr(root, "method"), attr(root, "route"));
        let entry = by_endpoint.entry(endpoint).or_default();
        entry.0 += 1;
        for m in sequence(spans).messages {
            if m.reply || m.from == "client" {
                continue;
            }
            // The event type names the hop; timings vary per trace.
            let label = m
                .label
                .split(" (")
                .next()
                .unwrap_or(&m.label)
                .split(" #")
                .next()
                .unwrap_or(&m.label)
                .to_owned();
            let label = if m.to.ends_with(" db") {
                "statements".to_owned()
            } else {
                label
            };
            entry
                .1
                .entry((m.from, m.to, label))
                .or_default()
                .push(m.duration_ms);
        }
    }
    by_endpoint
        .into_iter()
        .map(|(endpoint, (n, hops))| {
            let hops: Vec<Hop> = hops
                .into_iter()
                .map(|((from, to, label), mut d)| {
                    d.sort_by(f64::total_cmp);
                    Hop {
                        from,
                        to,
                        label,
                        count: d.len(),
                        p50_ms: percentile(&d, 50.0),
                        p99_ms: percentile(&d, 99.0),
                    }
                })
                .collect();
            let mut m = String::from("flowchart LR\n");
            for h in &hops {
                m.push_str(&format!(
                    "    {}[{}] -->|\"{} ×{} p50 {} ms p99 {} ms\"| {}[{}]\n",
                    mermaid_id(&h.from),
                    h.from,
                    mermaid_text(&h.label).replace('"', "'"),
                    h.count,
                    h.p50_ms,
                    h.p99_ms,
                    mermaid_id(&h.to),
                    h.to
                ));
            }
            EndpointFlow {
                endpoint,
                traces: n,
                hops,
                mermaid: m,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn span(
        id: &str,
        parent: Option<&str>,
        name: &str,
        start: i64,
        dur: i64,
        attrs: serde_json::Value,
    ) -> SpanRecord {
        SpanRecord {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_id: parent.map(str::to_owned),
            name: name.into(),
            start_us: start,
            duration_us: dur,
            attrs: attrs.as_object().cloned().unwrap_or_default(),
            db_calls: 0,
            db_us: 0,
        }
    }

    fn order_trace(offset: i64, handle_us: i64) -> Vec<SpanRecord> {
        vec![
            span(
                "r",
                None,
                "request",
                offset,
                5_000,
                json!({"method": "POST", "route": "/api/v1/orders", "status": 201}),
            ),
            span(
                "p",
                Some("r"),
                "publish",
                offset + 1_000,
                0,
                json!({"topic": "orders.events", "event_type": "order.created"}),
            ),
            span(
                "l",
                Some("p"),
                "relay",
                offset + 1_000,
                2_000,
                json!({"topic": "orders.events"}),
            ),
            span(
                "e",
                Some("p"),
                "event",
                offset + 4_000,
                handle_us,
                json!({"group": "notifications", "topic": "orders.events", "event_type": "order.created"}),
            ),
        ]
    }

    #[test]
    fn a_trace_becomes_a_sequence_of_contexts_and_topics() {
        let d = sequence(&order_trace(0, 700));
        assert_eq!(
            d.participants,
            [
                "client",
                "gateway",
                "orders",
                "orders.events",
                "notifications"
            ]
        );
        let arrows: Vec<(&str, &str, bool)> = d
            .messages
            .iter()
            .map(|m| (m.from.as_str(), m.to.as_str(), m.reply))
            .collect();
        assert_eq!(
            arrows,
            [
                ("client", "gateway", false),
                ("gateway", "orders", false),
                ("orders", "orders.events", false),
                ("orders.events", "notifications", false),
                ("gateway", "client", true),
            ]
        );
        assert_eq!(d.messages[2].label, "order.created (in log after 2 ms)");
        assert!(
            d.messages[3].label.contains("3 ms after publish"),
            "{:?}",
            d.messages[3]
        );
        let m = mermaid(&d);
        assert!(m.starts_with("sequenceDiagram\n    actor client as client\n"));
        assert!(m.contains("orders_events->>notifications: +4 ms order.created → notifications"));
        assert!(m.contains("gateway-->>client: +5 ms 201 in 5 ms"));
    }

    #[test]
    fn summary_has_percentiles_per_hop() {
        let traces: Vec<Vec<SpanRecord>> = (0..10)
            .map(|i| order_trace(i * 100_000, (i + 1) * 1_000))
            .collect();
        let s = summary(&traces);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].endpoint, "POST /api/v1/orders");
        assert_eq!(s[0].traces, 10);
        let handle = s[0]
            .hops
            .iter()
            .find(|h| h.from == "orders.events" && h.to == "notifications")
            .expect("hop");
        assert_eq!(handle.count, 10);
        assert_eq!(handle.p50_ms, 5.0);
        assert_eq!(handle.p99_ms, 10.0);
        assert!(s[0].mermaid.starts_with("flowchart LR\n"));
    }

    #[test]
    fn a_saga_is_started_by_the_span_that_recorded_it() {
        let spans = vec![
            span(
                "r",
                None,
                "request",
                0,
                5_000,
                json!({"method": "POST", "route": "/api/v1/orders", "status": 202}),
            ),
            span(
                "s1",
                Some("r"),
                "saga.step",
                6_000,
                2_000,
                json!({"saga": "order.place", "step": "reserve_stock", "phase": "do", "attempt": 1, "status": "ok"}),
            ),
            span(
                "s2",
                Some("r"),
                "saga.step",
                9_000,
                1_000,
                json!({"saga": "order.place", "step": "charge_payment", "phase": "do", "attempt": 1, "status": "ok"}),
            ),
        ];
        let d = sequence(&spans);
        let arrows: Vec<(&str, &str, &str)> = d
            .messages
            .iter()
            .map(|m| (m.from.as_str(), m.to.as_str(), m.label.as_str()))
            .collect();
        assert_eq!(
            arrows[3],
            ("orders", "saga order.place", "start saga order.place")
        );
        assert_eq!(arrows[4].0, "saga order.place");
        assert_eq!(arrows[4].1, "inventory");
        assert_eq!(arrows[5].1, "payments");
        assert_eq!(
            arrows.iter().filter(|a| a.2.starts_with("start")).count(),
            1
        );
    }

    #[test]
    fn what_a_saga_transition_publishes_comes_from_the_saga() {
        let spans = vec![
            span(
                "s1",
                None,
                "saga.step",
                0,
                3_000,
                json!({"saga": "order.place", "step": "create_shipment", "phase": "do", "attempt": 1, "status": "ok"}),
            ),
            span(
                "p1",
                Some("s1"),
                "publish",
                1_000,
                0,
                json!({"topic": "shipping.events", "event_type": "shipment.created"}),
            ),
            span(
                "t1",
                Some("s1"),
                "saga.transition",
                2_000,
                500,
                json!({"saga": "order.place"}),
            ),
            span(
                "p2",
                Some("t1"),
                "publish",
                2_100,
                0,
                json!({"topic": "orders.events", "event_type": "order.confirmed"}),
            ),
        ];
        let d = sequence(&spans);
        let arrows: Vec<(&str, &str)> = d
            .messages
            .iter()
            .map(|m| (m.from.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(
            arrows,
            [
                ("saga order.place", "shipping"),
                ("shipping", "shipping.events"),
                ("saga order.place", "orders.events"),
            ]
        );
    }

    #[test]
    fn routes_map_to_their_contexts() {
        assert_eq!(context_of_route("/api/v1/orders/{id}"), "orders");
        assert_eq!(context_of_route("/api/v1/admin/users/{id}/ban"), "identity");
        assert_eq!(context_of_route("/api/v1/auth/login"), "identity");
        assert_eq!(context_of_route("/healthz"), "gateway");
        assert_eq!(context_of_step("reserve_stock"), "inventory");
        assert_eq!(context_of_step("charge_payment"), "payments");
        assert_eq!(context_of_group("inventory.orders"), "inventory");
    }
}
