//! HTTP for messaging: the REST API (authenticated), the WebSocket upgrade
//! (which authenticates itself), and the user's SSE feed.

use crate::gateway::{self, Gateway};
use crate::service::{MessagePage, NewMessage, Presence, MAX_PAGE};
use crate::{Channel, ChannelKind, Member, Message, Messaging, Role, Workspace};
use axum::extract::{Path, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, ApiJson, ApiQuery, Principal, ProblemDoc, RequestContext};
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// (authenticated routes, the WebSocket route). The server puts
/// authentication in front of the first; `/ws` checks its token itself.
pub fn routes<S: Clone + Send + Sync + 'static>(gw: Arc<Gateway>) -> (Router<S>, Router<S>) {
    let m = gw.messaging().clone();
    let api = Router::new()
        .route("/workspaces", post(create_workspace).get(list_workspaces))
        .route("/workspaces/{id}", get(get_workspace))
        .route("/workspaces/{id}/members", get(members))
        .route("/workspaces/{id}/members/{user_id}", put(put_member))
        .route("/workspaces/{id}/presence", get(presence))
        .route(
            "/workspaces/{id}/channels",
            get(channels).post(create_channel),
        )
        .route("/workspaces/{id}/direct", post(open_direct))
        .route("/channels/{id}", get(channel))
        .route("/channels/{id}/join", post(join))
        .route("/channels/{id}/leave", post(leave))
        .route("/channels/{id}/members", post(invite))
        .route("/channels/{id}/read", post(mark_read))
        .route("/channels/{id}/typing", get(typing_now).post(typing))
        .route("/channels/{id}/messages", get(history).post(post_message))
        .route(
            "/messages/{id}",
            get(get_message).patch(edit_message).delete(delete_message),
        )
        .route(
            "/messages/{id}/reactions/{emoji}",
            put(add_reaction).delete(remove_reaction),
        )
        .route("/events", get(events))
        .with_state(m);
    let ws = Router::new()
        .route("/ws", get(gateway::upgrade))
        .with_state(gw);
    (api, ws)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWorkspace {
    /// 1 to 80 characters.
    pub name: String,
}

#[utoipa::path(post, path = "/api/v1/workspaces", tag = "messaging", security(("bearer" = [])),
    request_body = NewWorkspace,
    responses((status = 201, description = "Created by the create-workspace saga: ACTIVE, with `#general`, the caller its admin", body = Workspace),
        (status = 202, description = "The saga is still running (status CREATING)", body = Workspace),
        (status = 422, description = "Bad name", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 500, description = "The saga failed and was compensated; `Location` names the FAILED workspace and its reason", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create_workspace(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    ApiJson(body): ApiJson<NewWorkspace>,
) -> Result<Response, ApiError> {
    let w = m.create_workspace(&ctx, &who.user_id, &body.name).await?;
    match w.status.as_str() {
        "ACTIVE" => Ok((StatusCode::CREATED, Json(w)).into_response()),
        "CREATING" => Ok((StatusCode::ACCEPTED, Json(w)).into_response()),
        _ => {
            // A server error carries no detail; the workspace (FAILED, with
            // the reason) is at Location for its creator.
            let mut r = ApiError::from(Problem::new(ErrorCode::Internal)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/workspaces/{}", w.id)) {
                r.headers_mut().insert(LOCATION, v);
            }
            Ok(r)
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkspaceList {
    pub items: Vec<Workspace>,
}

#[utoipa::path(get, path = "/api/v1/workspaces", tag = "messaging", security(("bearer" = [])),
    responses((status = 200, description = "The caller's workspaces", body = WorkspaceList),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list_workspaces(
    State(m): State<Arc<Messaging>>,
    who: Principal,
) -> Result<Json<WorkspaceList>, ApiError> {
    Ok(Json(WorkspaceList {
        items: m.workspaces(&who.user_id).await?,
    }))
}

#[utoipa::path(get, path = "/api/v1/workspaces/{id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")),
    responses((status = 200, description = "The workspace and the caller's role", body = Workspace),
        (status = 404, description = "No such workspace of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn get_workspace(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Workspace>, ApiError> {
    Ok(Json(m.workspace(&id, &who.user_id).await?))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemberList {
    pub items: Vec<Member>,
}

#[utoipa::path(get, path = "/api/v1/workspaces/{id}/members", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")),
    responses((status = 200, description = "Members and roles", body = MemberList),
        (status = 404, description = "No such workspace of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn members(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<MemberList>, ApiError> {
    Ok(Json(MemberList {
        items: m.members(&id, &who.user_id).await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMember {
    pub role: Role,
}

#[utoipa::path(put, path = "/api/v1/workspaces/{id}/members/{user_id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id"), ("user_id" = String, Path, description = "The user to add")),
    request_body = PutMember,
    responses((status = 200, description = "Added (and joined to #general) or role changed", body = Member),
        (status = 403, description = "Only owners and admins add members", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such workspace or user", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn put_member(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path((id, user_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PutMember>,
) -> Result<Json<Member>, ApiError> {
    Ok(Json(
        m.put_member(&ctx, &id, &who.user_id, &user_id, body.role)
            .await?,
    ))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PresenceList {
    pub items: Vec<Presence>,
}

#[utoipa::path(get, path = "/api/v1/workspaces/{id}/presence", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")),
    responses((status = 200, description = "Online state and last seen of every member", body = PresenceList),
        (status = 404, description = "No such workspace of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn presence(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<PresenceList>, ApiError> {
    Ok(Json(PresenceList {
        items: m.presence(&id, &who.user_id).await?,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TypingList {
    pub items: Vec<crate::Typing>,
}

#[utoipa::path(get, path = "/api/v1/channels/{id}/typing", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, description = "Who is typing in the channel now (the same on every instance)", body = TypingList),
        (status = 403, description = "A private channel you are not in", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such channel of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn typing_now(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<TypingList>, ApiError> {
    Ok(Json(TypingList {
        items: m.typing_now(&id, &who.user_id).await?,
    }))
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/typing", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 204, description = "The caller is typing for `messaging.typing_ttl`; members get a `typing` frame"),
        (status = 403, description = "Not a member of the channel", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such channel of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn typing(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.typing(&ctx, &who.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChannelList {
    pub items: Vec<Channel>,
}

#[utoipa::path(get, path = "/api/v1/workspaces/{id}/channels", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")),
    responses((status = 200, description = "Public channels and the caller's private and direct ones", body = ChannelList),
        (status = 404, description = "No such workspace of yours", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn channels(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<ChannelList>, ApiError> {
    Ok(Json(ChannelList {
        items: m.channels(&id, &who.user_id).await?,
    }))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    /// 1 to 80 of a-z, 0-9, '-' and '_' (a leading '#' is dropped).
    pub name: String,
    /// public (default) or private.
    #[serde(default)]
    pub kind: Option<ChannelKind>,
    #[serde(default)]
    pub topic: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/workspaces/{id}/channels", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")), request_body = NewChannel,
    responses((status = 201, description = "Created; the caller is its first member", body = Channel),
        (status = 409, description = "A channel of that name exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Bad name, kind or topic", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn create_channel(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NewChannel>,
) -> Result<(StatusCode, Json<Channel>), ApiError> {
    let kind = body.kind.unwrap_or(ChannelKind::Public);
    let ch = m
        .create_channel(
            &ctx,
            &id,
            &who.user_id,
            &body.name,
            kind,
            body.topic.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(ch)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserRef {
    pub user_id: String,
}

#[utoipa::path(post, path = "/api/v1/workspaces/{id}/direct", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Workspace id")), request_body = UserRef,
    responses((status = 200, description = "The direct channel with that member (created the first time)", body = Channel),
        (status = 422, description = "Not another member of the workspace", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn open_direct(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UserRef>,
) -> Result<Json<Channel>, ApiError> {
    Ok(Json(
        m.open_direct(&ctx, &id, &who.user_id, &body.user_id)
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/channels/{id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, description = "The channel, its sequence and the caller's read marker", body = Channel),
        (status = 403, description = "A private channel you are not in", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such channel", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn channel(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Channel>, ApiError> {
    Ok(Json(m.readable(&id, &who.user_id).await?))
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/join", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 200, description = "A member now (or already)", body = Channel),
        (status = 403, description = "Private channels are joined by invitation", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn join(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Channel>, ApiError> {
    Ok(Json(m.join(&ctx, &id, &who.user_id).await?))
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/leave", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")),
    responses((status = 204, description = "Left (or was not a member)"),
        (status = 422, description = "Direct channels cannot be left", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn leave(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    m.leave(&ctx, &id, &who.user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/members", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")), request_body = UserRef,
    responses((status = 200, description = "The workspace member was added to the channel", body = Channel),
        (status = 403, description = "Only members add members", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn invite(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UserRef>,
) -> Result<Json<Channel>, ApiError> {
    Ok(Json(
        m.invite(&ctx, &id, &who.user_id, &body.user_id).await?,
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadMarker {
    pub seq: i64,
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/read", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")), request_body = ReadMarker,
    responses((status = 200, description = "The read marker (it never moves back)", body = Channel),
        (status = 422, description = "seq beyond the channel's sequence", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn mark_read(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ReadMarker>,
) -> Result<Json<Channel>, ApiError> {
    Ok(Json(m.mark_read(&id, &who.user_id, body.seq).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// Messages with a sequence below this (the newest of them).
    pub before: Option<i64>,
    /// Messages with a sequence above this (the oldest of them).
    pub after: Option<i64>,
    /// Only this thread (its root and replies).
    pub thread: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/channels/{id}/messages", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id"), HistoryParams),
    responses((status = 200, description = "A page of messages, ascending by sequence", body = MessagePage),
        (status = 400, description = "Bad cursor or limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "A private channel you are not in", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn history(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<HistoryParams>,
) -> Result<Json<MessagePage>, ApiError> {
    let limit = q.limit.unwrap_or(50).min(MAX_PAGE + 1);
    Ok(Json(
        m.history(
            &who.user_id,
            &id,
            q.before,
            q.after,
            q.thread.as_deref(),
            limit,
        )
        .await?,
    ))
}

#[utoipa::path(post, path = "/api/v1/channels/{id}/messages", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Channel id")), request_body = NewMessage,
    responses((status = 201, description = "Stored, sequenced and broadcast (the same as a `send` frame)", body = Message),
        (status = 200, description = "A retry with a known client_id: the message already posted", body = Message),
        (status = 403, description = "Not a member of the channel", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "Body longer than the limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Empty body or bad parent", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn post_message(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NewMessage>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let (msg, new) = m.post(&ctx, &who.user_id, &id, body).await?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(msg)))
}

#[utoipa::path(get, path = "/api/v1/messages/{id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "The message with its reactions", body = Message),
        (status = 404, description = "No such message", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn get_message(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Message>, ApiError> {
    Ok(Json(m.message(&who.user_id, &id).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMessage {
    pub body: String,
}

#[utoipa::path(patch, path = "/api/v1/messages/{id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Message id")), request_body = EditMessage,
    responses((status = 200, description = "Edited (`message.edited` at the channel's next sequence)", body = Message),
        (status = 403, description = "Not the author", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "The message was deleted", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn edit_message(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<EditMessage>,
) -> Result<Json<Message>, ApiError> {
    Ok(Json(m.edit(&ctx, &who.user_id, &id, &body.body).await?))
}

#[utoipa::path(delete, path = "/api/v1/messages/{id}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Message id")),
    responses((status = 200, description = "The tombstone (body null, deleted true)", body = Message),
        (status = 403, description = "Not the author or a workspace admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn delete_message(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<Message>, ApiError> {
    Ok(Json(m.delete(&ctx, &who.user_id, &id).await?))
}

#[utoipa::path(put, path = "/api/v1/messages/{id}/reactions/{emoji}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Message id"), ("emoji" = String, Path, description = "The reaction (URL-encoded)")),
    responses((status = 200, description = "Added (or already there)", body = Message),
        (status = 422, description = "Bad emoji", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn add_reaction(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path((id, emoji)): Path<(String, String)>,
) -> Result<Json<Message>, ApiError> {
    Ok(Json(m.react(&ctx, &who.user_id, &id, &emoji, true).await?))
}

#[utoipa::path(delete, path = "/api/v1/messages/{id}/reactions/{emoji}", tag = "messaging", security(("bearer" = [])),
    params(("id" = String, Path, description = "Message id"), ("emoji" = String, Path, description = "The reaction (URL-encoded)")),
    responses((status = 200, description = "Removed (or was not there)", body = Message),
        (status = 404, description = "No such message", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn remove_reaction(
    State(m): State<Arc<Messaging>>,
    Extension(ctx): Extension<RequestContext>,
    who: Principal,
    Path((id, emoji)): Path<(String, String)>,
) -> Result<Json<Message>, ApiError> {
    Ok(Json(m.react(&ctx, &who.user_id, &id, &emoji, false).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    /// Resume after this feed id (the `Last-Event-ID` header wins).
    pub after: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "messaging", security(("bearer" = [])),
    params(EventsParams, ("Last-Event-ID" = Option<String>, Header, description = "The last id seen: the stream resumes after it")),
    responses((status = 200, description = "Server-Sent Events of the caller's own events: `order` (status changes), `notification` (in-app), `mention`, `direct_message`; id = feed id; comments as heartbeats", content_type = "text/event-stream"),
        (status = 400, description = "Last-Event-ID is not a feed id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn events(
    State(m): State<Arc<Messaging>>,
    who: Principal,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsParams>,
) -> Result<Response, ApiError> {
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let after = match header {
        Some(h) => h.parse::<i64>().map_err(|_| {
            ApiError::from(
                Problem::new(ErrorCode::MalformedRequest)
                    .with_field("Last-Event-ID", "a feed id (an integer)"),
            )
        })?,
        None => q.after.unwrap_or(0),
    };
    let heartbeat = m.config().sse_heartbeat;
    // Subscribed before the first read, so no row added between is missed.
    let rx = m.feed_watch();
    let st = (m, who.user_id, after, rx, Vec::<Event>::new());
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.4.pop() {
                return Some((Ok::<Event, Infallible>(e), st));
            }
            match st.0.feed_after(&st.1, st.2, 100).await {
                Ok(rows) if !rows.is_empty() => {
                    let mut out = Vec::with_capacity(rows.len());
                    for r in rows {
                        st.2 = r.id;
                        let data = serde_json::json!({"id": r.id, "kind": r.kind,
                            "payload": r.payload, "at": r.at});
                        out.push(
                            Event::default()
                                .id(r.id.to_string())
                                .event(r.kind)
                                .data(data.to_string()),
                        );
                    }
                    out.reverse();
                    st.4 = out;
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "feed read failed"),
            }
            // Woken by this node's feed writer; the poll covers other nodes.
            let _ = tokio::time::timeout(Duration::from_millis(1000), st.3.changed()).await;
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(heartbeat))
        .into_response())
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(
    create_workspace,
    list_workspaces,
    get_workspace,
    members,
    put_member,
    presence,
    channels,
    create_channel,
    open_direct,
    channel,
    join,
    leave,
    invite,
    mark_read,
    typing_now,
    typing,
    history,
    post_message,
    get_message,
    edit_message,
    delete_message,
    add_reaction,
    remove_reaction,
    events,
    ws_doc
))]
pub struct MessagingApi;

/// Documents the upgrade route (the handler is [`gateway::upgrade`]).
#[utoipa::path(get, path = "/api/v1/ws", tag = "messaging",
    params(("Authorization" = Option<String>, Header, description = "Bearer access token; without it, send an `auth` frame within 5 s")),
    responses((status = 101, description = "Switching to the WebSocket protocol of docs/realtime.md"),
        (status = 401, description = "The token in the header is invalid", body = ProblemDoc, content_type = "application/problem+json")))]
#[allow(dead_code)]
fn ws_doc() {}
