//! Realtime messaging on the real binary, with a real WebSocket client
//! (tokio-tungstenite): fan-out to 2 and then 50 clients, gap-free resume,
//! authorization and bans, bad input and floods, presence and typing,
//! offline notifications, the create-workspace saga and the SSE feed.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    user_id: String,
}

fn ws_url(s: &Server) -> String {
    s.url("/api/v1/ws").replacen("http://", "ws://", 1)
}

impl Client {
    /// Connects with the token in the Authorization header and reads `ready`.
    async fn connect(s: &Server, token: &str) -> Client {
        let mut req = ws_url(s).into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        let mut c = Client {
            ws,
            user_id: String::new(),
        };
        let ready = c.next().await.expect("ready frame");
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["v"], 1);
        c.user_id = ready["user_id"].as_str().unwrap().to_owned();
        c
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Ws::text(v.to_string())).await.expect("send");
    }

    /// The next JSON frame (pings are answered by the library), or `None`
    /// when the connection closed or nothing came within 10 s.
    async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(10)).await
    }

    async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match m.ok()? {
                Ws::Text(t) => return Some(serde_json::from_str(&t).expect("frames are JSON")),
                Ws::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The next frame that is not about someone else (presence, typing).
    async fn reply(&mut self) -> Value {
        loop {
            let f = self.next().await.expect("a frame");
            if f["type"] != "presence" && f["type"] != "typing" {
                return f;
            }
        }
    }

    /// Frames until one of type `t` (others are returned alongside).
    async fn until(&mut self, t: &str) -> (Value, Vec<Value>) {
        let mut skipped = Vec::new();
        loop {
            let f = self
                .next()
                .await
                .unwrap_or_else(|| panic!("no `{t}` frame; got {skipped:?}"));
            if f["type"] == t {
                return (f, skipped);
            }
            skipped.push(f);
        }
    }

    /// Frames until `user` is reported `status`.
    async fn presence_of(&mut self, user: &str, status: &str) -> Value {
        loop {
            let (p, _) = self.until("presence").await;
            if p["user_id"] == user && p["status"] == status {
                return p;
            }
        }
    }

    async fn subscribe(&mut self, channel: &str, since: Option<i64>) -> Value {
        let mut f = json!({"v": 1, "type": "subscribe", "channel_id": channel, "ref": "s1"});
        if let Some(s) = since {
            f["since"] = json!(s);
        }
        self.send(f).await;
        let (ok, skipped) = self.until("subscribed").await;
        assert!(skipped.iter().all(|f| f["type"] != "error"), "{skipped:?}");
        ok
    }

    /// The close code once the server closes (frames before it are skipped).
    async fn closed_with(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) => frames.push(serde_json::from_str(&t).unwrap()),
                Ok(Some(Ok(Ws::Close(c)))) => return (c.map(|c| u16::from(c.code)), frames),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => {
                    eprintln!("socket error instead of a close frame: {e}");
                    return (None, frames);
                }
                Ok(None) => return (None, frames),
                Err(_) => panic!("the server did not close; frames {frames:?}"),
            }
        }
    }
}

fn user_id(s: &Server, token: &str) -> String {
    let (st, _, me) = send(agent().get(&s.url("/api/v1/users/me")), token, None);
    assert_eq!(st, 200, "{me}");
    me["id"].as_str().unwrap().to_owned()
}

/// A workspace made by `owner` with `others` added as members; (id, #general id).
fn workspace(s: &Server, owner: &str, others: &[&str]) -> (String, String) {
    let (st, _, w) = send(
        agent().post(&s.url("/api/v1/workspaces")),
        owner,
        Some(json!({"name": "Acme"})),
    );
    assert_eq!(st, 201, "{w}");
    assert_eq!(w["status"], "ACTIVE");
    assert_eq!(w["role"], "admin");
    let id = w["id"].as_str().unwrap().to_owned();
    for uid in others {
        let url = s.url(&format!("/api/v1/workspaces/{id}/members/{uid}"));
        // The directory learns users from user.events: retry until it has.
        wait_until("member added", Duration::from_secs(10), || {
            let (st, _, _) = send(agent().put(&url), owner, Some(json!({"role": "member"})));
            st == 200
        });
    }
    let (st, _, chans) = send(
        agent().get(&s.url(&format!("/api/v1/workspaces/{id}/channels"))),
        owner,
        None,
    );
    assert_eq!(st, 200, "{chans}");
    let general = chans["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "general")
        .expect("#general")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (id, general)
}

fn post(s: &Server, token: &str, channel: &str, body: &str) -> Value {
    let (st, _, m) = send(
        agent().post(&s.url(&format!("/api/v1/channels/{channel}/messages"))),
        token,
        Some(json!({ "body": body })),
    );
    assert_eq!(st, 201, "{m}");
    m
}

/// Registers `n` users; (token, id) each.
fn users(s: &Server, prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let t = register(s, &format!("{prefix}{i}@example.com"));
            let id = user_id(s, &t);
            (t, id)
        })
        .collect()
}

/// The channel frames a client receives until `n` of type `message` came.
async fn collect_messages(c: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut messages = 0;
    while messages < n {
        let f = c
            .next()
            .await
            .unwrap_or_else(|| panic!("{} of {n} messages, then nothing", messages));
        if is_change(&f) {
            if f["type"] == "message" {
                messages += 1;
            }
            out.push(f);
        }
    }
    out
}

fn is_change(f: &Value) -> bool {
    matches!(
        f["type"].as_str(),
        Some("message" | "edited" | "deleted" | "reaction")
    )
}

fn assert_contiguous(frames: &[Value], from: i64) {
    let seqs: Vec<i64> = frames.iter().map(|f| f["seq"].as_i64().unwrap()).collect();
    let want: Vec<i64> = (from + 1..=from + seqs.len() as i64).collect();
    assert_eq!(seqs, want, "every change once, in sequence order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_then_fifty_clients_receive_every_message_once_in_order_and_resume_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let people = users(&s, "p", 10);
    let ids: Vec<&str> = people[1..].iter().map(|p| p.1.as_str()).collect();
    let (_, general) = workspace(&s, &people[0].0, &ids);

    // Two clients: one sends over the socket, the other over REST.
    let mut a = Client::connect(&s, &people[0].0).await;
    let mut b = Client::connect(&s, &people[1].0).await;
    let start = a.subscribe(&general, None).await["last_seq"]
        .as_i64()
        .unwrap();
    b.subscribe(&general, None).await;
    for i in 0..10 {
        a.send(
            json!({"v": 1, "type": "send", "channel_id": general, "body": format!("a{i}"),
                      "client_id": format!("a-{i}"), "ref": i}),
        )
        .await;
        post(&s, &people[1].0, &general, &format!("b{i}"));
    }
    let fa = collect_messages(&mut a, 20).await;
    let fb = collect_messages(&mut b, 20).await;
    assert_contiguous(&fa, start);
    assert_eq!(fa, fb, "both clients see the same frames in the same order");
    let bodies: HashSet<String> = fa
        .iter()
        .map(|f| f["message"]["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies.len(), 20);
    // Only the 20 messages: nothing else took a sequence number.
    assert_eq!(fa.len(), 20);

    // A retried send (same client_id) is the same message: no new frame.
    a.send(json!({"type": "send", "channel_id": general, "body": "a0", "client_id": "a-0", "ref": "dup"}))
        .await;
    let (ack, _) = a.until("ack").await;
    let first = fa
        .iter()
        .find(|f| f["message"]["client_id"] == "a-0")
        .unwrap();
    assert_eq!(ack["message_id"], first["message"]["id"]);

    // Edits, deletes and reactions reach both, as sequenced frames.
    let mid = first["message"]["id"].as_str().unwrap().to_owned();
    // Each of a's changes is acknowledged before the next, so the order is known.
    a.send(json!({"type": "edit", "message_id": mid, "body": "a0 (edited)"}))
        .await;
    a.until("ack").await;
    a.send(json!({"type": "react", "message_id": mid, "emoji": "+1"}))
        .await;
    a.until("ack").await;
    let (st, _, _) = send(
        agent().put(&s.url(&format!("/api/v1/messages/{mid}/reactions/tada"))),
        &people[1].0,
        None,
    );
    assert_eq!(st, 200);
    a.send(json!({"type": "delete", "message_id": mid})).await;
    a.until("ack").await;
    let last_before = start + 20;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let f = b.next().await.expect("change frame");
        if is_change(&f) {
            seen.push(f);
        }
    }
    assert_contiguous(&seen, last_before);
    let kinds: Vec<&str> = seen.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["edited", "reaction", "reaction", "deleted"]);
    assert_eq!(seen[0]["message"]["body"], "a0 (edited)");
    assert_eq!(seen[1]["op"], "added");
    assert_eq!(seen[1]["emoji"], "+1");
    assert_eq!(seen[3]["message"]["deleted"], true);
    assert!(
        seen[3]["message"]["body"].is_null(),
        "a tombstone keeps no body"
    );
    let (st, _, m) = send(
        agent().get(&s.url(&format!("/api/v1/messages/{mid}"))),
        &people[0].0,
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(m["deleted"], true);
    // A resume from the start replays the deleted message as its tombstone:
    // its text is gone from storage, not just from the live stream.
    let mut late = Client::connect(&s, &people[2].0).await;
    late.subscribe(&general, Some(start)).await;
    let mut replay = Vec::new();
    while replay.len() < 24 {
        let f = late.next().await.expect("replayed change");
        if is_change(&f) {
            replay.push(f);
        }
    }
    assert_contiguous(&replay, start);
    let sent = replay
        .iter()
        .find(|f| f["type"] == "message" && f["message"]["id"] == mid.as_str())
        .unwrap();
    assert!(sent["message"]["body"].is_null(), "{sent}");
    assert!(!replay.iter().any(|f| f.to_string().contains("a0 (edited)")));
    drop(late);
    drop(a);
    drop(b);

    // Fifty clients: ten users with five connections each, in #general.
    let mut clients = Vec::new();
    for i in 0..50 {
        clients.push(Client::connect(&s, &people[i % 10].0).await);
    }
    let mut base = 0;
    for c in &mut clients {
        base = c.subscribe(&general, None).await["last_seq"]
            .as_i64()
            .unwrap();
    }
    // Ten senders at once, ten messages each, over REST.
    let mut senders = Vec::new();
    for (t, _) in people.clone() {
        let url = s.url(&format!("/api/v1/channels/{general}/messages"));
        senders.push(std::thread::spawn(move || {
            for j in 0..10 {
                let (st, _, m) = send(
                    agent().post(&url),
                    &t,
                    Some(json!({"body": format!("m{j}")})),
                );
                assert_eq!(st, 201, "{m}");
            }
        }));
    }
    for h in senders {
        h.join().unwrap();
    }
    let mut all = Vec::new();
    for c in &mut clients {
        all.push(collect_messages(c, 100).await);
    }
    for frames in &all {
        assert_contiguous(frames, base);
        assert_eq!(frames, &all[0], "every client sees the same sequence");
    }

    // Resume: client 0 drops after seq N; meanwhile 10 messages, an edit and a
    // reaction; it reconnects with since=N and gets exactly those, then live.
    let last_seen = all[0].last().unwrap()["seq"].as_i64().unwrap();
    let c0 = clients.remove(0);
    drop(c0);
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            post(&s, &people[2].0, &general, &format!("while away {i}"))["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let url = s.url(&format!("/api/v1/messages/{}", ids[3]));
    let (st, _, _) = send(
        agent().patch(&url),
        &people[2].0,
        Some(json!({"body": "edited while away"})),
    );
    assert_eq!(st, 200);
    let url = s.url(&format!("/api/v1/messages/{}/reactions/eyes", ids[5]));
    assert_eq!(send(agent().put(&url), &people[3].0, None).0, 200);
    let mut back = Client::connect(&s, &people[0].0).await;
    let sub = back.subscribe(&general, Some(last_seen)).await;
    assert_eq!(sub["last_seq"].as_i64().unwrap(), last_seen + 12);
    let mut missed = Vec::new();
    while missed.len() < 12 {
        let f = back.next().await.expect("missed frame");
        if is_change(&f) {
            missed.push(f);
        }
    }
    assert_contiguous(&missed, last_seen);
    assert_eq!(missed[10]["type"], "edited");
    assert_eq!(missed[11]["type"], "reaction");
    // Then the live stream continues with no duplicate.
    post(&s, &people[4].0, &general, "live again");
    let live = back.reply().await;
    assert_eq!(live["seq"].as_i64().unwrap(), last_seen + 13);
    assert_eq!(live["message"]["body"], "live again");
    // The others saw the same 13 changes once each.
    let mut other = Vec::new();
    while other.len() < 13 {
        let f = clients[0].next().await.expect("frame");
        if is_change(&f) {
            other.push(f);
        }
    }
    assert_contiguous(&other, last_seen);
    assert!(clients[0]
        .next_within(Duration::from_millis(300))
        .await
        .is_none_or(|f| !is_change(&f)));

    // History pages by sequence agree with what was streamed.
    let url = s.url(&format!("/api/v1/channels/{general}/messages?limit=5"));
    let (st, _, page) = send(agent().get(&url), &people[0].0, None);
    assert_eq!(st, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[4]["body"], "live again");
    assert_eq!(page["has_more"], true);
    let oldest = items[0]["seq"].as_i64().unwrap();
    let url = s.url(&format!(
        "/api/v1/channels/{general}/messages?before={oldest}&limit=3"
    ));
    let (_, _, older) = send(agent().get(&url), &people[0].0, None);
    let older = older["items"].as_array().unwrap();
    assert_eq!(older.len(), 3);
    assert!(older.iter().all(|m| m["seq"].as_i64().unwrap() < oldest));
    let url = s.url(&format!(
        "/api/v1/channels/{general}/messages?after={start}&limit=2"
    ));
    let (_, _, first_page) = send(agent().get(&url), &people[0].0, None);
    assert_eq!(first_page["items"][0]["seq"].as_i64().unwrap(), start + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_refuse_outsiders_and_banned_users_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[("FLOWLINE__MESSAGING__AUTH_TIMEOUT", "1s")]);
    let admin = admin_token(&s, &data);
    let people = users(&s, "q", 4);
    let (alice, bob, carol, eve) = (&people[0], &people[1], &people[2], &people[3]);
    let (ws_id, general) = workspace(&s, &alice.0, &[&bob.1, &carol.1]);
    let (st, _, private) = send(
        agent().post(&s.url(&format!("/api/v1/workspaces/{ws_id}/channels"))),
        &alice.0,
        Some(json!({"name": "secret", "kind": "private"})),
    );
    assert_eq!(st, 201, "{private}");
    let private = private["id"].as_str().unwrap().to_owned();
    let url = s.url(&format!("/api/v1/channels/{private}/members"));
    assert_eq!(
        send(
            agent().post(&url),
            &alice.0,
            Some(json!({"user_id": bob.1}))
        )
        .0,
        200
    );

    // Carol is in the workspace but not the channel; Eve is in neither.
    let mut c = Client::connect(&s, &carol.0).await;
    c.send(json!({"type": "subscribe", "channel_id": private, "ref": 1}))
        .await;
    let e = c.reply().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("permission_denied")),
        "{e}"
    );
    assert_eq!(e["ref"], 1);
    c.send(json!({"type": "send", "channel_id": private, "body": "let me in", "ref": 2}))
        .await;
    assert_eq!(c.reply().await["code"], "permission_denied");
    let mut e2 = Client::connect(&s, &eve.0).await;
    e2.send(json!({"type": "subscribe", "channel_id": private}))
        .await;
    assert_eq!(e2.reply().await["code"], "not_found");
    let (st, _, p) = send(
        agent().post(&s.url(&format!("/api/v1/channels/{private}/messages"))),
        &carol.0,
        Some(json!({"body": "let me in"})),
    );
    assert_eq!(st, 403, "{p}");
    assert_eq!(p["code"], "permission_denied");
    let (st, _, _) = send(
        agent().get(&s.url(&format!("/api/v1/channels/{private}/messages"))),
        &eve.0,
        None,
    );
    assert_eq!(st, 404);
    // Nothing was posted: the channel's sequence did not move.
    let (_, _, ch) = send(
        agent().get(&s.url(&format!("/api/v1/channels/{private}"))),
        &alice.0,
        None,
    );
    assert_eq!(ch["last_seq"], 0);
    // Members do get in, and carol keeps her other subscriptions working.
    let mut b = Client::connect(&s, &bob.0).await;
    b.subscribe(&private, None).await;
    c.subscribe(&general, None).await;
    // Leaving a private channel ends the subscription at once.
    let mut b2 = Client::connect(&s, &bob.0).await;
    b2.subscribe(&private, None).await;
    let url = s.url(&format!("/api/v1/channels/{private}/leave"));
    assert_eq!(send(agent().post(&url), &bob.0, None).0, 204);
    let (gone, _) = b2.until("unsubscribed").await;
    assert_eq!(gone["reason"], "access_revoked");
    post(&s, &alice.0, &private, "after bob left");
    assert!(
        b2.next_within(Duration::from_millis(500))
            .await
            .is_none_or(|f| !is_change(&f)),
        "nothing of a channel left"
    );
    drop(b2);
    // Bob is back for the ban below.
    assert_eq!(
        send(
            agent().post(&s.url(&format!("/api/v1/channels/{private}/members"))),
            &alice.0,
            Some(json!({"user_id": bob.1}))
        )
        .0,
        200
    );

    // A bad token is refused before the upgrade, as problem+json.
    let mut req = ws_url(&s).into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status(), 401);
            let body = String::from_utf8(res.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("token_invalid"), "{body}");
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    // No header: the first frame must be auth, within the timeout.
    let (mut silent, _) = tokio_tungstenite::connect_async(ws_url(&s)).await.unwrap();
    let (code, frames) = {
        let mut cl = Client {
            ws: silent,
            user_id: String::new(),
        };
        let r = cl.closed_with().await;
        silent = cl.ws;
        r
    };
    drop(silent);
    assert_eq!(code, Some(4001));
    assert_eq!(frames[0]["code"], "unauthenticated");
    let (ws, _) = tokio_tungstenite::connect_async(ws_url(&s)).await.unwrap();
    let mut browser = Client {
        ws,
        user_id: String::new(),
    };
    browser.send(json!({"type": "auth", "token": bob.0})).await;
    let ready = browser.reply().await;
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["user_id"], bob.1.as_str());

    // Banning bob closes every socket he has (4003), and new ones are refused.
    let (st, _, _) = send(
        agent().post(&s.url(&format!("/api/v1/admin/users/{}/ban", bob.1))),
        &admin,
        None,
    );
    assert!(st == 200 || st == 204, "{st}");
    for cl in [&mut b, &mut browser] {
        let (code, frames) = cl.closed_with().await;
        assert_eq!(code, Some(4003), "{frames:?}");
        assert!(
            frames.iter().any(|f| f["code"] == "account_banned"),
            "{frames:?}"
        );
    }
    let mut req = ws_url(&s).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", bob.0).parse().unwrap(),
    );
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    // Carol never noticed.
    post(&s, &alice.0, &general, "still here");
    let (m, _) = c.until("message").await;
    assert_eq!(m["message"]["body"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_frames_and_floods_are_cut_off_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(
        &data,
        &[
            ("FLOWLINE__MESSAGING__MAX_MESSAGE_CHARS", "100"),
            ("FLOWLINE__MESSAGING__MAX_FRAME_BYTES", "4096"),
            ("FLOWLINE__MESSAGING__CLIENT_RATE_PER_SEC", "20"),
            ("FLOWLINE__MESSAGING__CLIENT_BURST", "30"),
        ],
    );
    let people = users(&s, "r", 2);
    let (_, general) = workspace(&s, &people[0].0, &[&people[1].1]);
    let mut a = Client::connect(&s, &people[0].0).await;
    let mut good = Client::connect(&s, &people[1].0).await;
    good.subscribe(&general, None).await;

    let cases: [(Ws, &str); 6] = [
        (Ws::text("{not json"), "bad_frame"),
        (Ws::text("[1,2]"), "bad_frame"),
        (
            Ws::text(json!({"type": "launch_rockets"}).to_string()),
            "unknown_type",
        ),
        (
            Ws::text(json!({"v": 2, "type": "ping"}).to_string()),
            "unsupported_version",
        ),
        (
            Ws::text(json!({"type": "send", "channel_id": general}).to_string()),
            "bad_frame",
        ),
        (Ws::binary(vec![1u8, 2, 3]), "binary_not_supported"),
    ];
    for (frame, code) in cases {
        a.ws.send(frame).await.unwrap();
        let e = a.reply().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{e}"
        );
    }
    a.send(json!({"type": "send", "channel_id": general, "body": "x".repeat(101), "ref": "long"}))
        .await;
    let e = a.reply().await;
    assert_eq!(e["code"], "payload_too_large", "{e}");
    assert_eq!(e["ref"], "long");
    a.send(json!({"type": "send", "channel_id": general, "body": "   "}))
        .await;
    assert_eq!(a.reply().await["code"], "validation_failed");
    // Still a working connection.
    a.send(json!({"type": "ping", "ref": 7})).await;
    let pong = a.reply().await;
    assert_eq!(
        (pong["type"].as_str(), pong["ref"].as_i64()),
        (Some("pong"), Some(7))
    );
    // REST gives the same answers as problem+json, and nothing was stored.
    let url = s.url(&format!("/api/v1/channels/{general}/messages"));
    let (st, _, p) = send(
        agent().post(&url),
        &people[0].0,
        Some(json!({"body": "y".repeat(101)})),
    );
    assert_eq!((st, p["code"].as_str()), (413, Some("payload_too_large")));
    let (st, _, p) = send(
        agent().post(&url),
        &people[0].0,
        Some(json!({"body": "hi", "extra": 1})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("validation_failed")),
        "{p}"
    );
    let (st, _, p) = send(
        agent().post(&url),
        &people[0].0,
        Some(json!({"body": "nul \u{0} here"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (422, Some("validation_failed")),
        "{p}"
    );
    let (st, _, _) = send(
        agent().get(&s.url("/api/v1/channels/%00/messages")),
        &people[0].0,
        None,
    );
    assert_eq!(st, 404);
    let (st, _, p) = send(agent().get(&format!("{url}?limit=0")), &people[0].0, None);
    assert_eq!((st, p["code"].as_str()), (400, Some("malformed_request")));
    let (_, _, ch) = send(
        agent().get(&s.url(&format!("/api/v1/channels/{general}"))),
        &people[0].0,
        None,
    );
    assert_eq!(ch["last_seq"], 0, "bad input changed nothing");

    // A frame over max_frame_bytes closes with 1009.
    let mut big = Client::connect(&s, &people[0].0).await;
    big.ws
        .send(Ws::text(format!(
            "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
            "z".repeat(8000)
        )))
        .await
        .ok();
    let (code, _) = big.closed_with().await;
    // The close frame races the unread rest of the frame: a client may see
    // the 1009 or a reset, but the connection ends either way.
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    assert!(
        big.ws.send(Ws::text(r#"{"type":"ping"}"#)).await.is_err() || big.next().await.is_none()
    );

    // A flood: the first 30 pass, then rate_limited errors, then a close (1008).
    let mut flood = Client::connect(&s, &people[0].0).await;
    for _ in 0..400 {
        if flood
            .ws
            .send(Ws::text(json!({"type": "ping"}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, frames) = flood.closed_with().await;
    assert_eq!(code, Some(1008), "{:?}", frames.last());
    let pongs = frames.iter().filter(|f| f["type"] == "pong").count();
    assert!((30..=60).contains(&pongs), "{pongs} pongs");
    assert!(frames.iter().any(|f| f["code"] == "rate_limited"));
    assert!(frames.iter().any(|f| f["code"] == "flood"));

    // Everyone else was served throughout.
    post(&s, &people[0].0, &general, "after the flood");
    let (m, _) = good.until("message").await;
    assert_eq!(m["message"]["body"], "after the flood");
    let (_, _, metrics) = call(agent().get(&s.url("/metrics")), None);
    for needle in [
        r#"flowline_ws_closed_total{reason="too_big"} 1"#,
        r#"flowline_ws_closed_total{reason="flood"} 1"#,
        r#"flowline_ws_rejected_total{reason="unknown_type"} 1"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_users_get_one_notification_per_missed_mention_or_dm_and_presence_is_live() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let people = users(&s, "o", 2);
    let (alice, dave) = (&people[0], &people[1]);
    let (ws_id, general) = workspace(&s, &alice.0, &[&dave.1]);
    let mut a = Client::connect(&s, &alice.0).await;
    a.subscribe(&general, None).await;
    // Presence is opt-in per workspace: a snapshot, then changes.
    a.send(json!({"type": "presence_subscribe", "workspace_id": ws_id}))
        .await;
    let (snap, _) = a.until("presence_subscribed").await;
    let online: Vec<&str> = snap["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["online"] == true)
        .filter_map(|m| m["user_id"].as_str())
        .collect();
    assert!(!online.contains(&dave.1.as_str()), "{snap}");

    // Dave is offline: two mentions and a direct message.
    post(&s, &alice.0, &general, &format!("hey <@{}> look", dave.1));
    post(
        &s,
        &alice.0,
        &general,
        &format!("<@{}> and again <@{}>", dave.1, dave.1),
    );
    post(&s, &alice.0, &general, "no mention here");
    let (st, _, dm) = send(
        agent().post(&s.url(&format!("/api/v1/workspaces/{ws_id}/direct"))),
        &alice.0,
        Some(json!({"user_id": dave.1})),
    );
    assert_eq!(st, 200, "{dm}");
    let dm = dm["id"].as_str().unwrap().to_owned();
    post(&s, &alice.0, &dm, "a private word");
    let inbox = |token: &str| {
        let (_, _, n) = send(agent().get(&s.url("/api/v1/notifications")), token, None);
        n["items"].as_array().cloned().unwrap_or_default()
    };
    let of = |items: &[Value], t: &str| items.iter().filter(|n| n["type"] == t).count();
    wait_until("three notifications", Duration::from_secs(15), || {
        let items = inbox(&dave.0);
        of(&items, "message_mention") == 2 && of(&items, "message_direct") == 1
    });

    // Dave comes online: alice sees him arrive, and mentions now reach him live.
    let mut d = Client::connect(&s, &dave.0).await;
    let p = a.presence_of(&dave.1, "online").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some(dave.1.as_str()), Some("online"))
    );
    d.subscribe(&general, None).await;
    // A second connection does not announce him twice.
    let mut d2 = Client::connect(&s, &dave.0).await;
    post(&s, &alice.0, &general, &format!("live <@{}>", dave.1));
    let (m, _) = d.until("message").await;
    assert!(m["message"]["body"].as_str().unwrap().starts_with("live"));
    // His other connection, subscribed to nothing, still hears of it.
    let (n, _) = d2.until("mention").await;
    assert!(n["message"]["body"].as_str().unwrap().starts_with("live"));
    let (m, skipped) = a.until("message").await;
    assert!(
        skipped.iter().all(|f| f["type"] != "presence"),
        "{skipped:?}"
    );
    assert!(m["message"]["body"].as_str().unwrap().starts_with("live"));
    // Typing reaches the channel's subscribers.
    d.send(json!({"type": "typing", "channel_id": general}))
        .await;
    let (t, _) = a.until("typing").await;
    assert_eq!(t["user_id"], dave.1.as_str());
    assert!(t["expires_in_ms"].as_u64().unwrap() > 0);
    let (_, _, pres) = send(
        agent().get(&s.url(&format!("/api/v1/workspaces/{ws_id}/presence"))),
        &alice.0,
        None,
    );
    let me = pres["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["user_id"] == dave.1.as_str())
        .cloned()
        .unwrap();
    assert_eq!(me["online"], true);
    // Offline once both connections close, with a last-seen time.
    drop(d);
    drop(d2);
    let p = a.presence_of(&dave.1, "offline").await;
    assert!(p["last_seen_at"].is_string());
    // Still exactly three: the live mention made none, redelivery none.
    std::thread::sleep(Duration::from_millis(500));
    let items = inbox(&dave.0);
    assert_eq!(
        (of(&items, "message_mention"), of(&items, "message_direct")),
        (2, 1),
        "{items:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_saga_and_the_sse_feed_with_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[("FLOWLINE__MESSAGING__SSE_HEARTBEAT", "1s")]);
    let people = users(&s, "w", 2);
    let (alice, bob) = (&people[0], &people[1]);
    let (ws_id, general) = workspace(&s, &alice.0, &[&bob.1]);
    // Step 4: the welcome notification, in-app.
    wait_until("welcome", Duration::from_secs(10), || {
        let (_, _, n) = send(agent().get(&s.url("/api/v1/notifications")), &alice.0, None);
        n["items"]
            .as_array()
            .is_some_and(|i| i.iter().any(|n| n["type"] == "workspace_welcome"))
    });
    let (_, _, saga) = {
        let admin = admin_token(&s, &data);
        send(
            agent().get(&s.url(&format!("/api/v1/admin/sagas/{ws_id}"))),
            &admin,
            None,
        )
    };
    assert_eq!(saga["status"], "COMPLETED", "{saga}");

    // The feed: a mention for bob, read as SSE, then resumed after its id.
    let feed = |last: Option<&str>| {
        let mut req = agent()
            .get(&s.url("/api/v1/events"))
            .set("authorization", &format!("Bearer {}", bob.0));
        if let Some(l) = last {
            req = req.set("last-event-id", l);
        }
        let res = req.call().expect("sse");
        assert_eq!(res.header("content-type"), Some("text/event-stream"));
        BufReader::new(res.into_reader())
    };
    post(&s, &alice.0, &general, &format!("<@{}> first", bob.1));
    let mut r = feed(None);
    let (id, data_line) = read_event(&mut r, "mention");
    let v: Value = serde_json::from_str(&data_line).unwrap();
    assert!(v["payload"]["body"].as_str().unwrap().contains("first"));
    drop(r);
    post(&s, &alice.0, &general, &format!("<@{}> second", bob.1));
    let mut r = feed(Some(&id));
    let (id2, data_line) = read_event(&mut r, "mention");
    assert!(id2.parse::<i64>().unwrap() > id.parse::<i64>().unwrap());
    assert!(
        data_line.contains("second") && !data_line.contains("first"),
        "{data_line}"
    );
    // Heartbeats keep an idle stream open.
    let started = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with(':') {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no heartbeat");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_told_and_disconnected_and_the_others_get_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(
        &data,
        &[
            ("FLOWLINE__MESSAGING__SEND_QUEUE", "128"),
            ("FLOWLINE__MESSAGING__CLIENT_RATE_PER_SEC", "100000"),
            ("FLOWLINE__MESSAGING__CLIENT_BURST", "100000"),
        ],
    );
    let people = users(&s, "s", 3);
    let ids: Vec<&str> = people[1..].iter().map(|p| p.1.as_str()).collect();
    let (_, general) = workspace(&s, &people[0].0, &ids);
    let mut good = Client::connect(&s, &people[1].0).await;
    good.subscribe(&general, None).await;
    // The slow one: a tiny receive window.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let mut req = ws_url(&s).into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", people[2].0).parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    let mut slow = Client {
        ws,
        user_id: String::new(),
    };
    slow.until("ready").await;
    slow.subscribe(&general, None).await;
    // It reads nothing until the posting is over, then everything it can.
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let slow_reader = tokio::spawn(async move {
        let _ = wait.await;
        let mut messages = 0;
        let mut told = false;
        loop {
            match tokio::time::timeout(Duration::from_secs(15), slow.ws.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) => {
                    let f: Value = serde_json::from_str(&t).unwrap();
                    if f["type"] == "message" {
                        messages += 1;
                    }
                    told |= f["code"] == "slow_consumer";
                }
                Ok(Some(Ok(Ws::Close(c)))) => {
                    return (messages, told, c.map(|c| u16::from(c.code)));
                }
                Ok(Some(Ok(_))) => {}
                _ => return (messages, told, None),
            }
        }
    });
    // A good client reads as it goes.
    let good_reader = tokio::spawn(async move { collect_messages(&mut good, N).await.len() });
    // More than the kernel buffers (up to 4 MiB here) plus the queue:
    // 1,300 messages of ~4,000 characters, pipelined; acks read aside.
    let sender = Client::connect(&s, &people[0].0).await;
    let (mut sink, mut stream) = sender.ws.split();
    let acks = tokio::spawn(async move {
        let mut n = 0;
        while n < N {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok(Ws::Text(t)))) if t.contains("\"ack\"") => n += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        n
    });
    const N: usize = 1300;
    let body = "x".repeat(3990);
    for i in 0..N {
        let f = json!({"type": "send", "channel_id": general, "body": format!("{i} {body}")});
        sink.send(Ws::text(f.to_string())).await.unwrap();
    }
    assert_eq!(acks.await.unwrap(), N, "every send acknowledged");
    let _ = go.send(());
    assert_eq!(
        good_reader.await.unwrap(),
        N,
        "the good client got everything"
    );
    let (messages, told, code) = slow_reader.await.unwrap();
    assert!(
        messages < N,
        "the slow client was cut off ({messages} messages)"
    );
    assert!(told, "told why before the close");
    assert_eq!(code, Some(4008));
    let (_, _, metrics) = call(agent().get(&s.url("/metrics")), None);
    assert!(
        metrics.contains(r#"flowline_ws_closed_total{reason="slow_consumer"} 1"#),
        "{metrics}"
    );
}

fn read_event(r: &mut impl BufRead, kind: &str) -> (String, String) {
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut line = String::new();
    loop {
        assert!(Instant::now() < deadline, "no `{kind}` event");
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            panic!("stream ended");
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().to_owned();
        } else if let Some(v) = l.strip_prefix("event:") {
            event = v.trim().to_owned();
        } else if let Some(v) = l.strip_prefix("data:") {
            data = v.trim().to_owned();
        } else if l.is_empty() && !data.is_empty() {
            if event == kind {
                return (id, data);
            }
            data.clear();
        }
    }
}

#[test]
fn a_failed_critical_step_compensates_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(
        &data,
        &[("FLOWLINE__MESSAGING__FAILPOINTS", "add_creator_admin")],
    );
    let t = register(&s, "f@example.com");
    let res = match agent()
        .post(&s.url("/api/v1/workspaces"))
        .set("authorization", &format!("Bearer {t}"))
        .set("content-type", "application/json")
        .send_string(&json!({"name": "Doomed"}).to_string())
    {
        Err(ureq::Error::Status(500, r)) => r,
        other => panic!("expected 500, got {:?}", other.map(|r| r.status())),
    };
    let location = res.header("location").expect("Location").to_owned();
    let p = json(&res.into_string().unwrap());
    assert_eq!(p["code"], "internal_error");
    let (st, _, w) = send(agent().get(&s.url(&location)), &t, None);
    assert_eq!(st, 200, "{w}");
    assert_eq!(w["status"], "FAILED");
    assert!(
        w["failure"].as_str().unwrap().contains("add_creator_admin"),
        "{w}"
    );
    let (_, _, list) = send(agent().get(&s.url("/api/v1/workspaces")), &t, None);
    assert_eq!(list["items"], json!([]), "the creator is not left a member");
    let admin = admin_token(&s, &data);
    let (_, _, sagas) = send(
        agent().get(&s.url("/api/v1/admin/sagas?status=COMPENSATED")),
        &admin,
        None,
    );
    let saga = &sagas["items"].as_array().unwrap()[0];
    assert_eq!(saga["name"], "workspace.create");
    let (_, _, detail) = send(
        agent().get(&s.url(&format!(
            "/api/v1/admin/sagas/{}",
            saga["id"].as_str().unwrap()
        ))),
        &admin,
        None,
    );
    let undone: Vec<&str> = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["phase"] == "undo")
        .filter_map(|e| e["step"].as_str())
        .collect();
    assert_eq!(
        undone,
        ["create_default_channel", "create_workspace"],
        "{detail}"
    );
    let id = saga["id"].as_str().unwrap();
    let (st, _, _) = send(
        agent().get(&s.url(&format!("/api/v1/workspaces/{id}/channels"))),
        &t,
        None,
    );
    assert_eq!(st, 404);
}

/// Three `flowline serve` processes on one PostgreSQL (schemas, event log):
/// a socket on one node gets what is posted through another, and presence
/// counts a user once across nodes. (The distributed-mode issue adds Redis
/// and NATS; this is the bus as it stands, shared through PostgreSQL.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_channels_and_presence_through_the_bus() {
    let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") else {
        eprintln!("FLOWLINE_TEST_POSTGRES_URL not set: SQLite-only run");
        return;
    };
    let prefix = format!("m{}_", uuid::Uuid::now_v7().simple());
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            Server::start(
                &dir.path().join(n),
                &[
                    ("FLOWLINE__DATABASE__URL", url.as_str()),
                    ("FLOWLINE__DATABASE__SCHEMA_PREFIX", prefix.as_str()),
                    // Three nodes of fifteen pools within PostgreSQL's 100.
                    ("FLOWLINE__DATABASE__MAX_CONNECTIONS", "2"),
                    ("FLOWLINE__SERVER__NODE_ID", n),
                ],
            )
        })
        .collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // Accounts and tokens work on every node.
    let alice = register(a, "alice@example.com");
    let bob = register(c, "bob@example.com");
    // Tokens issued on one node work on the others.
    assert!(!user_id(c, &alice).is_empty());
    let bob_id = user_id(a, &bob);
    let (ws_id, general) = workspace(b, &alice, &[&bob_id]);

    // Bob listens on A; Alice posts through C.
    let mut on_a = Client::connect(a, &bob).await;
    let sub = on_a.subscribe(&general, None).await;
    let start = sub["last_seq"].as_i64().unwrap();
    for i in 0..5 {
        post(c, &alice, &general, &format!("from c {i}"));
    }
    let got = collect_messages(&mut on_a, 5).await;
    assert_contiguous(&got, start);
    assert_eq!(got[4]["message"]["body"], "from c 4");

    // Presence: Alice watches from B; Bob's second node does not count twice.
    let mut watcher = Client::connect(b, &alice).await;
    watcher
        .send(json!({"type": "presence_subscribe", "workspace_id": ws_id}))
        .await;
    let (snap, _) = watcher.until("presence_subscribed").await;
    let bob_row = snap["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] == bob_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(bob_row["online"], true, "{snap}");
    let on_c = Client::connect(c, &bob).await;
    // A node records a connection's presence from its own queue, shortly
    // after the handshake: let C's land before A's connection goes.
    std::thread::sleep(Duration::from_millis(500));
    drop(on_a);
    std::thread::sleep(Duration::from_millis(300));
    // Still online through C.
    let (_, _, pres) = send(
        agent().get(&b.url(&format!("/api/v1/workspaces/{ws_id}/presence"))),
        &alice,
        None,
    );
    let online = |p: &Value| {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["user_id"] == bob_id.as_str() && m["online"] == true)
    };
    assert!(online(&pres), "{pres}");
    drop(on_c);
    let p = watcher.presence_of(&bob_id, "offline").await;
    assert!(p["last_seen_at"].is_string());
}
