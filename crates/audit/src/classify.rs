//! From an event to the columns of its audit record.
//!
//! Producers describe security events in their own payloads; the record
//! pulls out who acted (actor), on whom (subject), from where (ip) and how it
//! ended (outcome) by the field names flowline's contexts use, so a new event
//! type on `audit.events` is recorded usefully without a change here.

use flowline_core::Envelope;
use serde_json::Value;

/// Every event on this topic is recorded, whatever its type.
pub const AUDIT_TOPIC: &str = "audit.events";
/// Only the security-relevant types of this topic are recorded.
pub const USER_TOPIC: &str = "user.events";

/// The `user.events` types recorded (any type naming a role is, too).
pub const SECURITY_USER_EVENTS: &[&str] = &[
    "user.banned",
    "user.unbanned",
    "user.suspended",
    "user.reinstated",
    "user.deleted",
    "user.email_changed",
    "user.password_changed",
];

/// Payload fields naming someone acting on another user, in order of preference.
const ACTING_FIELDS: &[&str] = &[
    "actor",
    "actor_id",
    "admin_id",
    "banned_by",
    "deleted_by",
    "changed_by",
];

/// Whether an event of `event_type` on `topic` belongs in the audit chain.
pub fn is_recorded(topic: &str, event_type: &str) -> bool {
    match topic {
        AUDIT_TOPIC => true,
        USER_TOPIC => SECURITY_USER_EVENTS.contains(&event_type) || event_type.contains("role"),
        _ => false,
    }
}

/// A record's columns before it takes its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub category: String,
    pub action: String,
    pub actor: Option<String>,
    pub subject: Option<String>,
    pub ip: Option<String>,
    pub outcome: &'static str,
    pub details: String,
}

/// `authentication` (`auth.*`), `authorization` (denials), `admin`
/// (`admin.*`), `data` (`data.*`), `account` (`user.*`), else the type's
/// first segment.
pub fn category(action: &str) -> String {
    let first = action.split('.').next().unwrap_or_default();
    if action.ends_with("permission_denied") || action.contains("forbidden") {
        return "authorization".into();
    }
    match first {
        "auth" => "authentication".into(),
        "admin" => "admin".into(),
        "data" => "data".into(),
        "user" => "account".into(),
        "" => "other".into(),
        other => other.to_owned(),
    }
}

/// `success` or `failure`: the payload's `outcome` when it says one of
/// those, else `failure` for types ending in failed/denied/reused/rejected/blocked.
pub fn outcome(action: &str, payload: &Value) -> &'static str {
    match payload.get("outcome").and_then(Value::as_str) {
        Some("success") => return "success",
        Some("failure") => return "failure",
        _ => {}
    }
    let last = action.rsplit('.').next().unwrap_or_default();
    let failed = ["failed", "denied", "reused", "rejected", "blocked"]
        .iter()
        .any(|s| last.ends_with(s));
    if failed {
        "failure"
    } else {
        "success"
    }
}

/// A non-empty string or a number's text.
fn text(payload: &Value, field: &str) -> Option<String> {
    match payload.get(field)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(crate) fn entry(e: &Envelope) -> Entry {
    let p = &e.payload;
    let acting = ACTING_FIELDS.iter().find_map(|f| text(p, f));
    let (actor, subject) = match acting {
        // Someone acting on someone else: the user is the subject.
        Some(a) => (
            Some(a),
            text(p, "subject")
                .or_else(|| text(p, "target"))
                .or_else(|| text(p, "user_id")),
        ),
        // The user acting for themselves (a login: the user id, or the masked
        // email a failed one carries); the key names them otherwise.
        None => (
            text(p, "user_id")
                .or_else(|| text(p, "email"))
                .or_else(|| (!e.key.trim().is_empty()).then(|| e.key.clone())),
            text(p, "subject").or_else(|| text(p, "target")),
        ),
    };
    Entry {
        category: category(&e.event_type),
        action: e.event_type.clone(),
        actor,
        subject,
        ip: text(p, "ip").or_else(|| text(p, "client_ip")),
        outcome: outcome(&e.event_type, p),
        details: serde_json::to_string(p).unwrap_or_else(|_| "null".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowline_core::EventDraft;
    use serde_json::json;

    fn env(topic: &str, t: &str, key: &str, payload: Value) -> Envelope {
        Envelope::stamp(EventDraft::new(topic, t, key, payload), "c", None)
    }

    #[test]
    fn fields_come_from_the_payload_by_their_usual_names() {
        let failed = entry(&env(
            AUDIT_TOPIC,
            "auth.login_failed",
            "a***@x.io",
            json!({"email": "a***@x.io", "ip": "10.0.0.1", "reason": "invalid_credentials"}),
        ));
        assert_eq!(failed.category, "authentication");
        assert_eq!(failed.actor.as_deref(), Some("a***@x.io"));
        assert_eq!(failed.ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(failed.outcome, "failure");
        assert_eq!(failed.subject, None);

        let ban = entry(&env(
            AUDIT_TOPIC,
            "admin.user_banned",
            "u2",
            json!({"user_id": "u2", "admin_id": "u1"}),
        ));
        assert_eq!(
            (
                ban.category.as_str(),
                ban.actor.as_deref(),
                ban.subject.as_deref()
            ),
            ("admin", Some("u1"), Some("u2"))
        );
        assert_eq!(ban.outcome, "success");

        let denied = entry(&env(AUDIT_TOPIC, "auth.permission_denied", "u3", json!({})));
        assert_eq!(denied.category, "authorization");
        assert_eq!(
            denied.actor.as_deref(),
            Some("u3"),
            "the key, failing all else"
        );
        assert_eq!(denied.outcome, "failure");

        let told = entry(&env(
            AUDIT_TOPIC,
            "data.exported",
            "u4",
            json!({"user_id": 7, "outcome": "failure"}),
        ));
        assert_eq!(
            (told.actor.as_deref(), told.outcome),
            (Some("7"), "failure")
        );
        assert_eq!(told.category, "data");
    }

    #[test]
    fn only_security_relevant_user_events_are_recorded() {
        assert!(is_recorded(AUDIT_TOPIC, "anything.at_all"));
        assert!(is_recorded(USER_TOPIC, "user.banned"));
        assert!(is_recorded(USER_TOPIC, "user.role_changed"));
        assert!(!is_recorded(USER_TOPIC, "user.updated"));
        assert!(!is_recorded(USER_TOPIC, "user.registered"));
        assert!(!is_recorded("orders.events", "order.created"));
    }
}
