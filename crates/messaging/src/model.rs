//! What the API shows: workspaces, channels, messages, and the sequenced
//! changes of a channel.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "member" => Role::Member,
            _ => return None,
        })
    }

    /// Owners and admins manage members and moderate messages.
    pub fn manages(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// Readable by every workspace member; joined to post.
    Public,
    /// Readable and writable by its members only.
    Private,
    /// Between two workspace members.
    Direct,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Public => "public",
            ChannelKind::Private => "private",
            ChannelKind::Direct => "direct",
        }
    }

    pub fn parse(s: &str) -> Option<ChannelKind> {
        Some(match s {
            "public" => ChannelKind::Public,
            "private" => ChannelKind::Private,
            "direct" => ChannelKind::Direct,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Workspace {
    pub id: String,
    pub name: String,
    /// CREATING while the create-workspace saga runs, then ACTIVE, or FAILED
    /// when it was compensated.
    pub status: String,
    pub created_by: String,
    /// Why creation failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The caller's role (absent when not a member).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Member {
    pub user_id: String,
    pub display_name: Option<String>,
    pub role: Role,
    pub joined_at: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Channel {
    pub id: String,
    pub workspace_id: String,
    /// `general`, or `dm:<user>:<user>` for a direct channel.
    pub name: String,
    pub kind: ChannelKind,
    pub topic: Option<String>,
    /// The channel's sequence: the number of its last change.
    pub last_seq: i64,
    /// Whether the caller is a member.
    pub member: bool,
    /// The caller's read marker (0 when not a member).
    pub read_seq: i64,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Reaction {
    pub emoji: String,
    /// Who reacted, in order of reaction.
    pub users: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Message {
    pub id: String,
    pub channel_id: String,
    /// The channel sequence number this message was sent at.
    pub seq: i64,
    pub author_id: String,
    /// The thread's root message, for a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// `None` once deleted (the message stays as a tombstone).
    pub body: Option<String>,
    /// The sender's own id for the message, echoed back (a retried send with
    /// the same id is the same message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    pub deleted: bool,
    #[serde(default)]
    pub reactions: Vec<Reaction>,
}

/// One sequenced change of a channel, as stored for resume and as carried
/// on the bus. `kind` is the event type (`message.sent`…).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelEvent {
    pub channel_id: String,
    pub seq: i64,
    pub kind: String,
    pub payload: Value,
}

/// The WebSocket frame type for a channel event type.
pub fn frame_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "message.sent" => "message",
        "message.edited" => "edited",
        "message.deleted" => "deleted",
        "reaction.added" | "reaction.removed" => "reaction",
        _ => return None,
    })
}

/// The frame a subscriber receives for a channel event: the event's
/// payload (which carries `channel_id` and `seq`) with `v` and `type`.
pub fn channel_frame(kind: &str, payload: &Value) -> Option<String> {
    let t = frame_type(kind)?;
    let mut obj = match payload {
        Value::Object(m) => m.clone(),
        _ => return None,
    };
    obj.insert("v".into(), Value::from(1));
    obj.insert("type".into(), Value::from(t));
    if kind.starts_with("reaction.") {
        let op = if kind == "reaction.added" {
            "added"
        } else {
            "removed"
        };
        obj.insert("op".into(), Value::from(op));
    }
    // Who to notify is the notifier's business, not every subscriber's.
    obj.remove("recipients");
    Some(Value::Object(obj).to_string())
}

/// `<@USER_ID>` tokens in a body, deduplicated, in order of appearance.
pub fn mentions(body: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("<@") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find('>') else { break };
        let id = &rest[..end];
        if !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !out.iter().any(|x| x == id)
        {
            out.push(id.to_owned());
        }
        rest = &rest[end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_parsed_once_each() {
        assert_eq!(
            mentions("hi <@u1> and <@u-2>, again <@u1>; <@> <@bad id> <@x"),
            vec!["u1".to_owned(), "u-2".to_owned()]
        );
        assert!(mentions("no one").is_empty());
    }

    #[test]
    fn frames_carry_version_type_and_op() {
        let p = serde_json::json!({"channel_id": "c", "seq": 3, "message_id": "m",
            "emoji": "+1", "user_id": "u", "recipients": ["x"]});
        let f: Value = serde_json::from_str(&channel_frame("reaction.added", &p).unwrap()).unwrap();
        assert_eq!(f["v"], 1);
        assert_eq!(f["type"], "reaction");
        assert_eq!(f["op"], "added");
        assert_eq!(f["seq"], 3);
        assert!(f.get("recipients").is_none());
        assert!(channel_frame("message.missed", &p).is_none());
    }
}
