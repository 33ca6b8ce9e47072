//! The built-in jobs and the events they read.
//!
//! Event time is the domain's: `occurred_at` of the envelope, or a request
//! sample's own `at` (a gateway batch spans many requests). Keys and values
//! come from the payloads the other contexts publish:
//!
//! | job | input | key | value |
//! |---|---|---|---|
//! | `orders_per_minute` | `orders.events` `order.created` | `total.currency` | `total.amount` (minor units) |
//! | `active_users` | `auth.login_succeeded`, `order.created`, `message.sent` | `all` | the user id |
//! | `messages_per_channel` | `messaging.messages` `message.sent` | `channel_id` | – |
//! | `login_failures_per_minute` | `audit.events` `auth.login_failed` | `all` | – |
//! | `endpoint_latency` | `gateway.requests` `http.requests_sampled`, per sample | `METHOD route` | `duration_ms` |
//! | `session_duration` | as `active_users` | the user id | – |

use crate::job::{Aggregate, Element, ElementValue, Job, WindowKind};
use crate::AnalyticsConfig;
use flowline_core::{Envelope, Timestamp};
use serde::Deserialize;
use std::time::Duration;

pub const ORDERS_TOPIC: &str = "orders.events";
pub const AUDIT_TOPIC: &str = "audit.events";
pub const MESSAGES_TOPIC: &str = "messaging.messages";
/// Request samples the server publishes (`http.requests_sampled`).
pub const REQUESTS_TOPIC: &str = "gateway.requests";

pub const ORDERS_PER_MINUTE: &str = "orders_per_minute";
pub const ACTIVE_USERS: &str = "active_users";
pub const MESSAGES_PER_CHANNEL: &str = "messages_per_channel";
pub const LOGIN_FAILURES_PER_MINUTE: &str = "login_failures_per_minute";
pub const ENDPOINT_LATENCY: &str = "endpoint_latency";
pub const SESSION_DURATION: &str = "session_duration";

/// The key of jobs that aggregate over everything.
pub const ALL: &str = "all";

const MINUTE: Duration = Duration::from_secs(60);

/// The built-in jobs, with the config's watermark, idleness and lateness
/// settings.
pub fn builtin_jobs(cfg: &AnalyticsConfig) -> Vec<Job> {
    let job = |name, description, window, aggregate, extract| Job {
        name,
        description,
        window,
        aggregate,
        extract,
        out_of_orderness: cfg.out_of_orderness,
        allowed_lateness: cfg.allowed_lateness,
        idle_timeout: cfg.idle_timeout,
    };
    vec![
        job(
            ORDERS_PER_MINUTE,
            "Orders created and their total (minor units) per minute, by currency",
            WindowKind::Tumbling { size: MINUTE },
            Aggregate::Sum,
            orders,
        ),
        job(
            ACTIVE_USERS,
            "Distinct users who logged in, ordered or posted a message, over 5 minutes every minute",
            WindowKind::Sliding {
                size: 5 * MINUTE,
                slide: MINUTE,
            },
            Aggregate::Distinct,
            active_users,
        ),
        job(
            MESSAGES_PER_CHANNEL,
            "Messages sent per minute, by channel",
            WindowKind::Tumbling { size: MINUTE },
            Aggregate::Count,
            messages,
        ),
        job(
            LOGIN_FAILURES_PER_MINUTE,
            "Failed logins per minute",
            WindowKind::Tumbling { size: MINUTE },
            Aggregate::Count,
            login_failures,
        ),
        job(
            ENDPOINT_LATENCY,
            "Request latency per minute, by `METHOD route`: count, p50, p99, max",
            WindowKind::Tumbling { size: MINUTE },
            Aggregate::Latency,
            latency,
        ),
        job(
            SESSION_DURATION,
            "User sessions: activity separated by less than the gap",
            WindowKind::Session {
                gap: cfg.session_gap,
            },
            Aggregate::Count,
            sessions,
        ),
    ]
}

fn is(e: &Envelope, topic: &str, event_type: &str) -> bool {
    e.topic == topic && e.event_type == event_type
}

fn parse<T: serde::de::DeserializeOwned>(e: &Envelope) -> Result<T, String> {
    serde_json::from_value(e.payload.clone())
        .map_err(|err| format!("{} {}: bad payload: {err}", e.event_type, e.id))
}

fn one(key: impl Into<String>, at: Timestamp, value: ElementValue) -> Vec<Element> {
    vec![Element {
        key: key.into(),
        at,
        value,
    }]
}

#[derive(Deserialize)]
struct Total {
    amount: i64,
    currency: String,
}

#[derive(Deserialize)]
struct OrderCreated {
    user_id: String,
    total: Total,
}

fn orders(e: &Envelope) -> Result<Vec<Element>, String> {
    if !is(e, ORDERS_TOPIC, "order.created") {
        return Ok(Vec::new());
    }
    let o: OrderCreated = parse(e)?;
    Ok(one(
        o.total.currency,
        e.occurred_at,
        ElementValue::Amount(o.total.amount),
    ))
}

#[derive(Deserialize)]
struct LoginSucceeded {
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct Author {
    author_id: String,
}

#[derive(Deserialize)]
struct MessageSent {
    channel_id: Option<String>,
    message: Author,
}

/// The user an event shows active, if it is an activity event.
fn active_user(e: &Envelope) -> Result<Option<String>, String> {
    Ok(if is(e, AUDIT_TOPIC, "auth.login_succeeded") {
        // Keyed by the user id; the payload repeats it.
        let p: LoginSucceeded = parse(e)?;
        Some(p.user_id.unwrap_or_else(|| e.key.clone()))
    } else if is(e, ORDERS_TOPIC, "order.created") {
        Some(parse::<OrderCreated>(e)?.user_id)
    } else if is(e, MESSAGES_TOPIC, "message.sent") {
        Some(parse::<MessageSent>(e)?.message.author_id)
    } else {
        None
    })
}

fn active_users(e: &Envelope) -> Result<Vec<Element>, String> {
    Ok(match active_user(e)? {
        Some(u) => one(ALL, e.occurred_at, ElementValue::Member(u)),
        None => Vec::new(),
    })
}

fn sessions(e: &Envelope) -> Result<Vec<Element>, String> {
    Ok(match active_user(e)? {
        Some(u) => one(u, e.occurred_at, ElementValue::None),
        None => Vec::new(),
    })
}

fn messages(e: &Envelope) -> Result<Vec<Element>, String> {
    if !is(e, MESSAGES_TOPIC, "message.sent") {
        return Ok(Vec::new());
    }
    // The event is keyed by channel; the payload names it too.
    let m: MessageSent = parse(e)?;
    let channel = m.channel_id.unwrap_or_else(|| e.key.clone());
    Ok(one(channel, e.occurred_at, ElementValue::None))
}

fn login_failures(e: &Envelope) -> Result<Vec<Element>, String> {
    if !is(e, AUDIT_TOPIC, "auth.login_failed") {
        return Ok(Vec::new());
    }
    Ok(one(ALL, e.occurred_at, ElementValue::None))
}

#[derive(Deserialize)]
struct Sample {
    method: String,
    route: String,
    duration_ms: f64,
    /// When the request arrived; the batch's time when absent.
    at: Option<Timestamp>,
}

#[derive(Deserialize)]
struct Sampled {
    samples: Vec<Sample>,
}

fn latency(e: &Envelope) -> Result<Vec<Element>, String> {
    if !is(e, REQUESTS_TOPIC, "http.requests_sampled") {
        return Ok(Vec::new());
    }
    let batch: Sampled = parse(e)?;
    batch
        .samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            if !s.duration_ms.is_finite() || s.duration_ms < 0.0 {
                return Err(format!(
                    "{} {}: samples[{i}].duration_ms must be a non-negative number",
                    e.event_type, e.id
                ));
            }
            Ok(Element {
                key: format!("{} {}", s.method.to_ascii_uppercase(), s.route),
                at: s.at.unwrap_or(e.occurred_at),
                value: ElementValue::DurationUs((s.duration_ms * 1000.0).round() as i64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline_core::EventDraft;
    use serde_json::json;

    fn env(topic: &str, ty: &str, key: &str, payload: serde_json::Value) -> Envelope {
        Envelope::stamp(EventDraft::new(topic, ty, key, payload), "c", None)
    }

    fn extract(name: &str, e: &Envelope) -> Result<Vec<Element>, String> {
        let jobs = builtin_jobs(&AnalyticsConfig::default());
        let job = jobs.iter().find(|j| j.name == name).unwrap();
        (job.extract)(e)
    }

    #[test]
    fn order_created_feeds_revenue_activity_and_sessions() {
        let e = env(
            ORDERS_TOPIC,
            "order.created",
            "o1",
            json!({"order_id": "o1", "user_id": "u1", "total": {"amount": 1250, "currency": "BRL"}}),
        );
        let o = extract(ORDERS_PER_MINUTE, &e).unwrap();
        assert_eq!(o[0].key, "BRL");
        assert_eq!(o[0].value, ElementValue::Amount(1250));
        assert_eq!(o[0].at, e.occurred_at);
        let a = extract(ACTIVE_USERS, &e).unwrap();
        assert_eq!(a[0].value, ElementValue::Member("u1".into()));
        assert_eq!(extract(SESSION_DURATION, &e).unwrap()[0].key, "u1");
        assert!(extract(MESSAGES_PER_CHANNEL, &e).unwrap().is_empty());
        // order.confirmed is not an order creation.
        let c = env(ORDERS_TOPIC, "order.confirmed", "o1", e.payload.clone());
        assert!(extract(ORDERS_PER_MINUTE, &c).unwrap().is_empty());
        let bad = env(
            ORDERS_TOPIC,
            "order.created",
            "o1",
            json!({"user_id": "u1"}),
        );
        assert!(extract(ORDERS_PER_MINUTE, &bad).is_err());
    }

    #[test]
    fn messages_logins_and_samples() {
        let m = env(
            MESSAGES_TOPIC,
            "message.sent",
            "ch1",
            json!({"channel_id": "ch1", "message": {"id": "m1", "author_id": "u2"}}),
        );
        assert_eq!(extract(MESSAGES_PER_CHANNEL, &m).unwrap()[0].key, "ch1");
        assert_eq!(
            extract(ACTIVE_USERS, &m).unwrap()[0].value,
            ElementValue::Member("u2".into())
        );
        let ok = env(
            AUDIT_TOPIC,
            "auth.login_succeeded",
            "u3",
            json!({"session_id": "s"}),
        );
        assert_eq!(extract(SESSION_DURATION, &ok).unwrap()[0].key, "u3");
        let failed = env(AUDIT_TOPIC, "auth.login_failed", "a***@x", json!({}));
        assert_eq!(
            extract(LOGIN_FAILURES_PER_MINUTE, &failed).unwrap()[0].key,
            ALL
        );
        assert!(extract(ACTIVE_USERS, &failed).unwrap().is_empty());

        let r = env(
            REQUESTS_TOPIC,
            "http.requests_sampled",
            "node-a",
            json!({"node": "a", "samples": [
                {"method": "post", "route": "/api/v1/orders", "status": 201, "duration_ms": 12.5,
                 "at": "2026-11-22T10:00:00.123456Z"},
                {"method": "GET", "route": "/api/v1/products", "status": 200, "duration_ms": 0.25}]}),
        );
        let s = extract(ENDPOINT_LATENCY, &r).unwrap();
        assert_eq!(s[0].key, "POST /api/v1/orders");
        assert_eq!(s[0].value, ElementValue::DurationUs(12_500));
        assert_eq!(
            s[0].at,
            Timestamp::parse_rfc3339("2026-11-22T10:00:00.123456Z").unwrap()
        );
        assert_eq!(s[1].at, r.occurred_at);
        assert_eq!(s[1].value, ElementValue::DurationUs(250));
        let bad = env(
            REQUESTS_TOPIC,
            "http.requests_sampled",
            "n",
            json!({"samples": [{"method": "GET", "route": "/", "duration_ms": -1.0}]}),
        );
        assert!(extract(ENDPOINT_LATENCY, &bad).is_err());
    }
}
