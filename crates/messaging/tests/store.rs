//! Messaging against a real database: SQLite always, PostgreSQL too when
//! `FLOWLINE_TEST_POSTGRES_URL` is set (each test in its own schemas).
//! Users reach the directory as the log would deliver `user.registered`;
//! the create-workspace saga runs on a real orchestrator.

use flowline_core::{Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_messaging::saga::Welcome;
use flowline_messaging::{
    ChannelKind, Directory, Message, Messaging, MessagingConfig, Role, WelcomeSender,
};
use flowline_saga::{BoxFuture, SagaOptions};
use flowline_store::outbox::Relay;
use flowline_store::{on_pool, Backend, Db, Durability, EventLog, Handler, LogOptions};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct Env {
    name: &'static str,
    backend: Backend,
    log: EventLog,
    relay: Relay,
    db: Db,
    _dir: tempfile::TempDir,
}

async fn envs() -> Vec<Env> {
    let mut backends = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    backends.push((
        Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        dir,
    ));
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        backends.push((
            Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 16,
            },
            tempfile::tempdir().unwrap(),
        ));
    }
    let mut v = Vec::new();
    for (backend, dir) in backends {
        let log = EventLog::open(&backend, LogOptions::default())
            .await
            .unwrap();
        let db = Db::open(&backend, "messaging").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        v.push(Env {
            name: backend.name(),
            backend,
            log,
            relay,
            db,
            _dir: dir,
        });
    }
    v
}

fn config(tweak: impl FnOnce(&mut MessagingConfig)) -> MessagingConfig {
    let mut cfg = MessagingConfig {
        saga: SagaOptions {
            idle_poll: Duration::from_millis(50),
            ..SagaOptions::default()
        },
        ..MessagingConfig::default()
    };
    tweak(&mut cfg);
    cfg
}

/// A messaging instance whose create-workspace saga runner is running.
struct Node {
    m: Arc<Messaging>,
    stop: watch::Sender<bool>,
    runner: JoinHandle<()>,
}

impl Node {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.runner.await.unwrap();
    }
}

impl Env {
    /// Another node `name`: its own pool on the same database.
    async fn peer(&self, name: &str, tweak: impl FnOnce(&mut MessagingConfig)) -> Arc<Messaging> {
        let db = Db::open(&self.backend, "messaging").await.unwrap();
        let relay = Relay::new(db.clone(), self.log.clone());
        let cfg = config(|c| {
            c.node_id = name.to_owned();
            tweak(c)
        });
        Messaging::open(db, relay, Welcomes::ok(), cfg)
            .await
            .unwrap()
    }

    async fn node(&self, cfg: MessagingConfig, welcome: Arc<Welcomes>) -> Node {
        let m = Messaging::open(self.db.clone(), self.relay.clone(), welcome, cfg)
            .await
            .expect("open messaging");
        let (stop, rx) = watch::channel(false);
        let runner = tokio::spawn(m.orchestrator().clone().run(rx));
        Node { m, stop, runner }
    }
}

/// Records every welcome asked for; refuses them all when `fail`.
#[derive(Default)]
struct Welcomes {
    fail: bool,
    sent: Mutex<Vec<(String, String, String)>>,
}

impl Welcomes {
    fn ok() -> Arc<Welcomes> {
        Arc::new(Welcomes::default())
    }

    fn failing() -> Arc<Welcomes> {
        Arc::new(Welcomes {
            fail: true,
            ..Welcomes::default()
        })
    }

    fn sent(&self) -> Vec<(String, String, String)> {
        self.sent.lock().unwrap().clone()
    }
}

impl WelcomeSender for Welcomes {
    fn send<'a>(&'a self, w: Welcome<'a>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.sent.lock().unwrap().push((
                w.workspace_id.to_owned(),
                w.workspace_name.to_owned(),
                w.user_id.to_owned(),
            ));
            if self.fail {
                Err("notifications unavailable".to_owned())
            } else {
                Ok(())
            }
        })
    }
}

fn ctx() -> RequestContext {
    RequestContext::detached()
}

fn registered(user: &str) -> RecordedEvent {
    RecordedEvent {
        partition: flowline_core::event::partition_for(user, 4),
        offset: 0,
        appended_at: Timestamp::now(),
        envelope: Envelope::stamp(
            EventDraft::new(
                "user.events",
                "user.registered",
                user,
                json!({"user_id": user, "email": format!("{user}@example.com"),
                       "display_name": format!("User {user}"), "role": "customer"}),
            ),
            &flowline_core::id::new_correlation_id(),
            None,
        ),
    }
}

/// Makes `users` known to the directory, as the log would.
async fn register(m: &Arc<Messaging>, users: &[&str]) {
    let dir = Directory(m.clone());
    for u in users {
        dir.handle(&registered(u)).await.unwrap();
    }
}

/// An ACTIVE workspace of `owner` (its admin) with `members` added as
/// members; returns its id and `#general`'s.
async fn workspace(m: &Messaging, owner: &str, members: &[&str]) -> (String, String) {
    let ws = m.create_workspace(&ctx(), owner, "Acme").await.unwrap();
    assert_eq!(ws.status, "ACTIVE", "{ws:?}");
    for u in members {
        m.put_member(&ctx(), &ws.id, owner, u, Role::Member)
            .await
            .unwrap();
    }
    let general = m
        .channels(&ws.id, owner)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == "general")
        .expect("#general");
    (ws.id, general.id)
}

async fn post(
    m: &Messaging,
    user: &str,
    channel: &str,
    body: &str,
    client_id: Option<&str>,
) -> Result<(Message, bool), ApiError> {
    // `NewMessage` is not exported; it is what the API deserializes.
    let new = serde_json::from_value(json!({"body": body, "client_id": client_id}))
        .expect("a NewMessage");
    m.post(&ctx(), user, channel, new).await
}

/// (HTTP status, problem code) of a refusal.
fn refusal<T: std::fmt::Debug>(r: Result<T, ApiError>) -> (u16, &'static str) {
    let e = r.expect_err("a refusal");
    (e.0.status, e.0.code)
}

const DENIED: (u16, &str) = (403, "permission_denied");
const NOT_FOUND: (u16, &str) = (404, "not_found");
const INVALID_STATE: (u16, &str) = (409, "invalid_state");

async fn last_seq(m: &Messaging, channel: &str, user: &str) -> i64 {
    m.readable(channel, user).await.unwrap().last_seq
}

/// (seq, kind) of every change of a channel, in order.
async fn changes(m: &Messaging, channel: &str) -> Vec<(i64, String)> {
    m.events_after(channel, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.kind))
        .collect()
}

async fn count(db: &Db, sql: &str, key: &str) -> i64 {
    on_pool!(write db, |p| sqlx::query_scalar::<_, i64>(sql)
        .bind(key)
        .fetch_one(p)
        .await)
    .expect(sql)
}

async fn outbox_count(db: &Db, event_type: &str) -> i64 {
    count(
        db,
        "SELECT COUNT(*) FROM outbox WHERE event_type = $1",
        event_type,
    )
    .await
}

/// Payloads of the outbox's events of one type, in commit order.
async fn outbox_payloads(db: &Db, event_type: &str) -> Vec<Value> {
    let rows: Vec<String> = on_pool!(write db, |p| sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE event_type = $1 ORDER BY id"
    )
    .bind(event_type)
    .fetch_all(p)
    .await)
    .unwrap();
    rows.iter()
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_posters_get_distinct_gap_free_sequence_numbers() {
    for env in envs().await {
        let name = env.name;
        let node = env.node(config(|_| {}), Welcomes::ok()).await;
        let m = node.m.clone();
        let users = ["u1", "u2", "u3", "u4"];
        register(&m, &users).await;
        let (_, general) = workspace(&m, "u1", &users[1..]).await;

        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let m = m.clone();
                let general = general.clone();
                let user = users[t % users.len()];
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for i in 0..25 {
                        let (msg, created) = post(&m, user, &general, &format!("t{t} m{i}"), None)
                            .await
                            .unwrap();
                        assert!(created, "t{t} m{i}");
                        mine.push(msg);
                    }
                    mine
                })
            })
            .collect();
        let mut by_seq: BTreeMap<i64, Message> = BTreeMap::new();
        for t in tasks {
            let mine = t.await.unwrap();
            // One poster's messages are sequenced in the order it sent them.
            assert!(
                mine.windows(2).all(|w| w[0].seq < w[1].seq),
                "{name}: {:?}",
                mine.iter().map(|m| m.seq).collect::<Vec<_>>()
            );
            for msg in mine {
                let seq = msg.seq;
                assert!(by_seq.insert(seq, msg).is_none(), "{name}: seq {seq} twice");
            }
        }
        assert_eq!(
            by_seq.keys().copied().collect::<Vec<_>>(),
            (1..=200).collect::<Vec<i64>>(),
            "{name}"
        );
        assert_eq!(last_seq(&m, &general, "u1").await, 200, "{name}");

        let evs = m.events_after(&general, 0, 1000).await.unwrap();
        assert_eq!(evs.len(), 200, "{name}");
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e.seq, i as i64 + 1, "{name}");
            assert_eq!(e.kind, "message.sent", "{name}");
            assert_eq!(e.channel_id, general);
            assert_eq!(e.payload["seq"], e.seq, "{name}");
            let sent = &by_seq[&e.seq];
            assert_eq!(e.payload["message"]["id"], sent.id.as_str(), "{name}");
            assert_eq!(
                e.payload["message"]["body"],
                sent.body.as_deref().unwrap(),
                "{name}"
            );
        }
        // Resuming after any seq gives exactly the rest.
        let rest: Vec<i64> = m
            .events_after(&general, 150, 1000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(rest, (151..=200).collect::<Vec<i64>>(), "{name}");
        let few: Vec<i64> = m
            .events_after(&general, 10, 5)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(few, [11, 12, 13, 14, 15], "{name}");
        assert_eq!(outbox_count(&env.db, "message.sent").await, 200, "{name}");

        // Backwards from the newest, 30 at a time.
        let mut seen = Vec::new();
        let mut before = None;
        let mut pages = 0;
        loop {
            let page = m
                .history("u2", &general, before, None, None, 30)
                .await
                .unwrap();
            pages += 1;
            let seqs: Vec<i64> = page.items.iter().map(|m| m.seq).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: {seqs:?}");
            let expect_len = if page.has_more { 30 } else { 200 - 6 * 30 };
            assert_eq!(seqs.len(), expect_len, "{name}: page {pages}");
            for msg in &page.items {
                assert_eq!(msg, &by_seq[&msg.seq], "{name}");
            }
            before = seqs.first().copied();
            seen.splice(0..0, seqs);
            if !page.has_more {
                break;
            }
        }
        assert_eq!(pages, 7, "{name}");
        assert_eq!(seen, (1..=200).collect::<Vec<i64>>(), "{name}");

        // Forwards from the start, 50 at a time: the last full page says
        // there is no more.
        let mut seen = Vec::new();
        let mut after = 0;
        let mut more = Vec::new();
        loop {
            let page = m
                .history("u3", &general, None, Some(after), None, 50)
                .await
                .unwrap();
            let seqs: Vec<i64> = page.items.iter().map(|m| m.seq).collect();
            assert_eq!(seqs.len(), 50, "{name}: after {after}");
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: {seqs:?}");
            after = *seqs.last().unwrap();
            seen.extend(seqs);
            more.push(page.has_more);
            if !page.has_more {
                break;
            }
        }
        assert_eq!(more, [true, true, true, false], "{name}");
        assert_eq!(seen, (1..=200).collect::<Vec<i64>>(), "{name}");

        let end = m
            .history("u1", &general, None, Some(200), None, 10)
            .await
            .unwrap();
        assert!(end.items.is_empty() && !end.has_more, "{name}");
        let start = m
            .history("u1", &general, Some(1), None, None, 10)
            .await
            .unwrap();
        assert!(start.items.is_empty() && !start.has_more, "{name}");
        let mid = m
            .history("u1", &general, Some(101), None, None, 3)
            .await
            .unwrap();
        let seqs: Vec<i64> = mid.items.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, mid.has_more), (vec![98, 99, 100], true), "{name}");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_post_with_its_client_id_is_the_same_message() {
    for env in envs().await {
        let name = env.name;
        let node = env.node(config(|_| {}), Welcomes::ok()).await;
        let m = &node.m;
        register(m, &["u1", "u2"]).await;
        let (_, general) = workspace(m, "u1", &["u2"]).await;

        let (first, created) = post(m, "u1", &general, "hello", Some("c-1")).await.unwrap();
        assert!(created, "{name}");
        assert_eq!(
            (first.seq, first.client_id.as_deref()),
            (1, Some("c-1")),
            "{name}"
        );
        // A retry, even with another body, is the message already posted.
        for body in ["hello", "hello again"] {
            let (again, created) = post(m, "u1", &general, body, Some("c-1")).await.unwrap();
            assert!(!created, "{name}");
            assert_eq!(again, first, "{name}");
        }
        assert_eq!(last_seq(m, &general, "u1").await, 1, "{name}");
        assert_eq!(changes(m, &general).await.len(), 1, "{name}");
        assert_eq!(outbox_count(&env.db, "message.sent").await, 1, "{name}");

        // The id is the sender's own: another sender's c-1, or another id,
        // is a new message with the next number.
        let (other, created) = post(m, "u2", &general, "hello", Some("c-1")).await.unwrap();
        assert!(created && other.id != first.id, "{name}");
        assert_eq!(other.seq, 2, "{name}");
        let (next, created) = post(m, "u1", &general, "hello", Some("c-2")).await.unwrap();
        assert!(created, "{name}");
        assert_eq!(next.seq, 3, "{name}");
        let page = m
            .history("u1", &general, None, None, None, 10)
            .await
            .unwrap();
        assert_eq!(page.items.len(), 3, "{name}");
        node.stop().await;
    }
}

// Racing retries of one send (same client_id) queue on the channel's row
// lock and then find the first: one message, no 500 (PostgreSQL runs them
// truly concurrently; SQLite one transaction at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_with_one_client_id_post_once() {
    for env in envs().await {
        let name = env.name;
        let node = env.node(config(|_| {}), Welcomes::ok()).await;
        let m = node.m.clone();
        register(&m, &["u1"]).await;
        let (_, general) = workspace(&m, "u1", &[]).await;

        for round in 1..=5 {
            let cid = format!("c-race-{round}");
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let (m, general, cid) = (m.clone(), general.clone(), cid.clone());
                    tokio::spawn(async move { post(&m, "u1", &general, "once", Some(&cid)).await })
                })
                .collect();
            let mut ids = BTreeSet::new();
            let mut created = 0;
            for t in tasks {
                let (msg, new) = t
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{name} round {round}: {e:?}"));
                ids.insert(msg.id);
                created += usize::from(new);
            }
            assert_eq!((ids.len(), created), (1, 1), "{name} round {round}");
            assert_eq!(last_seq(&m, &general, "u1").await, round, "{name}");
        }
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_deletes_and_reactions_are_sequenced_changes() {
    for env in envs().await {
        let name = env.name;
        let node = env.node(config(|_| {}), Welcomes::ok()).await;
        let m = &node.m;
        register(m, &["admin", "ana", "bob"]).await;
        let (_, ch) = workspace(m, "admin", &["ana", "bob"]).await;
        let (msg, _) = post(m, "ana", &ch, "first", None).await.unwrap();
        let (other, _) = post(m, "bob", &ch, "second", None).await.unwrap();
        assert_eq!((msg.seq, other.seq), (1, 2), "{name}");

        // Only the author edits.
        assert_eq!(
            refusal(m.edit(&ctx(), "bob", &msg.id, "bob's").await),
            DENIED
        );
        assert_eq!(
            refusal(m.edit(&ctx(), "admin", &msg.id, "admin's").await),
            DENIED
        );
        assert_eq!(last_seq(m, &ch, "ana").await, 2, "{name}");
        let edited = m
            .edit(&ctx(), "ana", &msg.id, "first, fixed")
            .await
            .unwrap();
        assert_eq!(edited.body.as_deref(), Some("first, fixed"), "{name}");
        assert!(edited.edited_at.is_some() && !edited.deleted, "{name}");
        assert_eq!(edited.seq, 1, "{name}: a message keeps its own seq");
        assert_eq!(last_seq(m, &ch, "ana").await, 3, "{name}");

        // Reactions: a repeat, or removing what is not there, changes nothing.
        let r = m.react(&ctx(), "bob", &msg.id, "+1", true).await.unwrap();
        assert_eq!(r.reactions.len(), 1, "{name}");
        assert_eq!(r.reactions[0].users, ["bob"], "{name}");
        let again = m.react(&ctx(), "bob", &msg.id, "+1", true).await.unwrap();
        assert_eq!(again.reactions, r.reactions, "{name}");
        assert_eq!(last_seq(m, &ch, "ana").await, 4, "{name}");
        let r = m.react(&ctx(), "ana", &msg.id, "+1", true).await.unwrap();
        assert_eq!(r.reactions[0].users, ["bob", "ana"], "{name}");
        let r = m.react(&ctx(), "bob", &msg.id, "+1", false).await.unwrap();
        assert_eq!(r.reactions[0].users, ["ana"], "{name}");
        let r = m.react(&ctx(), "bob", &msg.id, "+1", false).await.unwrap();
        assert_eq!(r.reactions[0].users, ["ana"], "{name}");
        assert_eq!(last_seq(m, &ch, "ana").await, 6, "{name}");
        assert_eq!(
            m.message("bob", &msg.id).await.unwrap().reactions,
            r.reactions,
            "{name}"
        );

        // Deleting: the author or an admin, not another member; once.
        assert_eq!(refusal(m.delete(&ctx(), "bob", &msg.id).await), DENIED);
        let gone = m.delete(&ctx(), "ana", &msg.id).await.unwrap();
        assert_eq!(
            (gone.body.as_deref(), gone.deleted, gone.seq),
            (None, true, 1),
            "{name}"
        );
        assert_eq!(last_seq(m, &ch, "ana").await, 7, "{name}");
        let twice = m.delete(&ctx(), "ana", &msg.id).await.unwrap();
        assert!(twice.deleted && twice.body.is_none(), "{name}");
        assert_eq!(last_seq(m, &ch, "ana").await, 7, "{name}");
        let tomb = m.message("bob", &msg.id).await.unwrap();
        assert_eq!(
            (tomb.body.as_deref(), tomb.deleted, tomb.reactions.len()),
            (None, true, 0),
            "{name}"
        );
        let page = m.history("bob", &ch, None, None, None, 10).await.unwrap();
        assert_eq!(
            page.items.len(),
            2,
            "{name}: the tombstone stays in history"
        );
        assert_eq!(page.items[0].id, msg.id, "{name}");
        assert!(
            page.items[0].deleted && page.items[0].body.is_none(),
            "{name}"
        );

        // A tombstone is neither edited nor reacted to.
        assert_eq!(
            refusal(m.edit(&ctx(), "ana", &msg.id, "back").await),
            INVALID_STATE
        );
        assert_eq!(
            refusal(m.react(&ctx(), "bob", &msg.id, "+1", true).await),
            INVALID_STATE
        );
        assert_eq!(last_seq(m, &ch, "ana").await, 7, "{name}");
        // An admin deletes anyone's message.
        let moderated = m.delete(&ctx(), "admin", &other.id).await.unwrap();
        assert!(moderated.deleted, "{name}");

        assert_eq!(
            changes(m, &ch).await,
            [
                (1, "message.sent"),
                (2, "message.sent"),
                (3, "message.edited"),
                (4, "reaction.added"),
                (5, "reaction.added"),
                (6, "reaction.removed"),
                (7, "message.deleted"),
                (8, "message.deleted"),
            ]
            .map(|(s, k)| (s, k.to_owned())),
            "{name}"
        );
        let evs = m.events_after(&ch, 2, 100).await.unwrap();
        // The message was deleted since: its stored edit replays as the
        // tombstone, so its text cannot come back through a resume.
        assert_eq!(evs[0].kind, "message.edited", "{name}");
        assert!(evs[0].payload["message"]["body"].is_null(), "{name}");
        assert_eq!(evs[0].payload["message"]["deleted"], true, "{name}");
        assert_eq!(
            (&evs[1].payload["user_id"], &evs[1].payload["emoji"]),
            (&json!("bob"), &json!("+1")),
            "{name}"
        );
        assert_eq!(evs[3].payload["user_id"], "bob", "{name}");
        assert_eq!(evs[4].payload["message_id"], msg.id.as_str(), "{name}");
        assert_eq!(evs[5].payload["deleted_by"], "admin", "{name}");
        for (kind, n) in [
            ("message.sent", 2),
            ("message.edited", 1),
            ("reaction.added", 2),
            ("reaction.removed", 1),
            ("message.deleted", 2),
        ] {
            assert_eq!(outbox_count(&env.db, kind).await, n, "{name}: {kind}");
        }
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_are_closed_to_non_members_and_workspaces_to_outsiders() {
    for env in envs().await {
        let name = env.name;
        let node = env.node(config(|_| {}), Welcomes::ok()).await;
        let m = &node.m;
        register(m, &["admin", "ana", "eve"]).await;
        let (ws, general) = workspace(m, "admin", &["ana"]).await;
        let secret = m
            .create_channel(&ctx(), &ws, "admin", "secret", ChannelKind::Private, None)
            .await
            .unwrap();
        let (hidden, _) = post(m, "admin", &secret.id, "for admins", None)
            .await
            .unwrap();

        // A workspace member outside the private channel: refused.
        assert_eq!(refusal(m.readable(&secret.id, "ana").await), DENIED);
        assert_eq!(
            refusal(post(m, "ana", &secret.id, "hi", None).await),
            DENIED
        );
        assert_eq!(
            refusal(m.history("ana", &secret.id, None, None, None, 10).await),
            DENIED
        );
        assert_eq!(refusal(m.message("ana", &hidden.id).await), DENIED);
        assert_eq!(
            refusal(m.react(&ctx(), "ana", &hidden.id, "+1", true).await),
            DENIED
        );
        assert!(
            !m.channels(&ws, "ana")
                .await
                .unwrap()
                .iter()
                .any(|c| c.id == secret.id),
            "{name}"
        );
        // Not in the workspace: nothing there at all.
        for ch in [&secret.id, &general] {
            assert_eq!(refusal(m.readable(ch, "eve").await), NOT_FOUND);
            assert_eq!(refusal(post(m, "eve", ch, "hi", None).await), NOT_FOUND);
            assert_eq!(
                refusal(m.history("eve", ch, None, None, None, 10).await),
                NOT_FOUND
            );
        }
        assert_eq!(refusal(m.message("eve", &hidden.id).await), NOT_FOUND);
        assert_eq!(refusal(m.channels(&ws, "eve").await), NOT_FOUND);
        assert_eq!(refusal(m.workspace(&ws, "eve").await), NOT_FOUND);
        // Members are added by admins, and only users the directory knows.
        assert_eq!(
            refusal(m.put_member(&ctx(), &ws, "ana", "eve", Role::Member).await),
            DENIED
        );
        assert_eq!(
            refusal(m.put_member(&ctx(), &ws, "eve", "eve", Role::Member).await),
            NOT_FOUND
        );
        assert_eq!(
            refusal(
                m.put_member(&ctx(), &ws, "admin", "ghost", Role::Member)
                    .await
            ),
            NOT_FOUND
        );
        assert_eq!(refusal(m.readable(&general, "eve").await), NOT_FOUND);
        // Nothing refused took a number.
        assert_eq!(last_seq(m, &secret.id, "admin").await, 1, "{name}");
        assert_eq!(last_seq(m, &general, "admin").await, 0, "{name}");

        // A public channel is readable by every member, writable once joined.
        let open = m
            .create_channel(&ctx(), &ws, "admin", "open", ChannelKind::Public, None)
            .await
            .unwrap();
        let seen = m.readable(&open.id, "ana").await.unwrap();
        assert!(!seen.member, "{name}");
        assert_eq!(refusal(post(m, "ana", &open.id, "hi", None).await), DENIED);
        m.join(&ctx(), &open.id, "ana").await.unwrap();
        post(m, "ana", &open.id, "hi", None).await.unwrap();

        // Invited, the member reads and writes the private channel.
        m.invite(&ctx(), &secret.id, "admin", "ana").await.unwrap();
        assert!(
            m.readable(&secret.id, "ana").await.unwrap().member,
            "{name}"
        );
        let (msg, _) = post(m, "ana", &secret.id, "thanks", None).await.unwrap();
        assert_eq!(msg.seq, 2, "{name}");
        // Leaving ends it again.
        m.leave(&ctx(), &secret.id, "ana").await.unwrap();
        assert_eq!(refusal(m.readable(&secret.id, "ana").await), DENIED);
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_workspace_runs_the_saga_to_an_active_workspace() {
    for env in envs().await {
        let name = env.name;
        let welcomes = Welcomes::ok();
        let node = env.node(config(|_| {}), welcomes.clone()).await;
        let m = &node.m;
        let ws = m.create_workspace(&ctx(), "ana", " Acme ").await.unwrap();
        assert_eq!(ws.status, "ACTIVE", "{name}: {ws:?}");
        assert_eq!(ws.name, "Acme", "{name}");
        assert_eq!(ws.role, Some(Role::Admin), "{name}");
        assert_eq!(ws.created_by, "ana", "{name}");
        assert!(ws.failure.is_none(), "{name}");
        let channels = m.channels(&ws.id, "ana").await.unwrap();
        assert_eq!(channels.len(), 1, "{name}: {channels:?}");
        let general = &channels[0];
        assert_eq!(
            (general.name.as_str(), general.kind, general.member),
            ("general", ChannelKind::Public, true),
            "{name}"
        );
        let mine = m.workspaces("ana").await.unwrap();
        assert_eq!(mine.len(), 1, "{name}");
        assert_eq!(
            (mine[0].id.as_str(), mine[0].role),
            (ws.id.as_str(), Some(Role::Admin))
        );
        assert_eq!(
            welcomes.sent(),
            [(ws.id.clone(), "Acme".to_owned(), "ana".to_owned())],
            "{name}"
        );
        assert_eq!(outbox_count(&env.db, "workspace.created").await, 1);
        assert_eq!(outbox_count(&env.db, "workspace.failed").await, 0);
        let created = &outbox_payloads(&env.db, "workspace.created").await[0];
        assert_eq!(
            (&created["workspace_id"], &created["status"]),
            (&json!(ws.id), &json!("ACTIVE")),
            "{name}"
        );
        // The creator posts in #general straight away.
        let (msg, _) = post(m, "ana", &general.id, "hello", None).await.unwrap();
        assert_eq!(msg.seq, 1, "{name}");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_critical_step_compensates_the_workspace() {
    for env in envs().await {
        let name = env.name;
        let welcomes = Welcomes::ok();
        let cfg = config(|c| c.failpoints = vec!["add_creator_admin".into()]);
        let node = env.node(cfg, welcomes.clone()).await;
        let m = &node.m;
        let ws = m.create_workspace(&ctx(), "ana", "Acme").await.unwrap();
        assert_eq!(ws.status, "FAILED", "{name}: {ws:?}");
        assert!(
            ws.failure
                .as_deref()
                .is_some_and(|f| f.contains("add_creator_admin")),
            "{name}: {ws:?}"
        );
        assert_eq!(ws.role, None, "{name}");
        // The creator still sees why; nothing else of it stands.
        let seen = m.workspace(&ws.id, "ana").await.unwrap();
        assert_eq!(seen.status, "FAILED", "{name}");
        assert!(m.workspaces("ana").await.unwrap().is_empty(), "{name}");
        assert_eq!(refusal(m.channels(&ws.id, "ana").await), NOT_FOUND);
        for sql in [
            "SELECT COUNT(*) FROM channels WHERE workspace_id = $1",
            "SELECT COUNT(*) FROM workspace_members WHERE workspace_id = $1",
        ] {
            assert_eq!(count(&env.db, sql, &ws.id).await, 0, "{name}: {sql}");
        }
        assert_eq!(
            count(
                &env.db,
                "SELECT COUNT(*) FROM channel_members WHERE user_id = $1",
                "ana"
            )
            .await,
            0,
            "{name}"
        );
        assert!(welcomes.sent().is_empty(), "{name}");
        assert_eq!(outbox_count(&env.db, "workspace.created").await, 0);
        let failed = outbox_payloads(&env.db, "workspace.failed").await;
        assert_eq!(failed.len(), 1, "{name}");
        assert_eq!(failed[0]["workspace_id"], ws.id.as_str(), "{name}");
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_welcome_does_not_fail_the_workspace() {
    for env in envs().await {
        let name = env.name;
        // The step's failpoint: nothing is sent, and the workspace stands.
        let welcomes = Welcomes::ok();
        let cfg = config(|c| c.failpoints = vec!["welcome_notification".into()]);
        let node = env.node(cfg, welcomes.clone()).await;
        let ws = node
            .m
            .create_workspace(&ctx(), "ana", "Acme")
            .await
            .unwrap();
        assert_eq!(
            (ws.status.as_str(), ws.role),
            ("ACTIVE", Some(Role::Admin)),
            "{name}: {ws:?}"
        );
        assert!(ws.failure.is_none(), "{name}");
        assert!(welcomes.sent().is_empty(), "{name}");
        let names: Vec<String> = node
            .m
            .channels(&ws.id, "ana")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["general"], "{name}");
        node.stop().await;
    }
    for env in envs().await {
        let name = env.name;
        // The notifications context refuses: the same.
        let welcomes = Welcomes::failing();
        let node = env.node(config(|_| {}), welcomes.clone()).await;
        let ws = node
            .m
            .create_workspace(&ctx(), "bob", "Initech")
            .await
            .unwrap();
        assert_eq!(
            (ws.status.as_str(), ws.role),
            ("ACTIVE", Some(Role::Admin)),
            "{name}: {ws:?}"
        );
        assert_eq!(welcomes.sent().len(), 1, "{name}");
        assert_eq!(node.m.workspaces("bob").await.unwrap().len(), 1, "{name}");
        assert_eq!(outbox_count(&env.db, "workspace.created").await, 1);
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_online_while_any_node_has_them() {
    for env in envs().await {
        let name = env.name;
        let (n1, n2) = (
            env.peer("node-1", |_| {}).await,
            env.peer("node-2", |_| {}).await,
        );
        let online = || outbox_count(&env.db, "presence.user_online");
        let offline = || outbox_count(&env.db, "presence.user_offline");

        assert!(!n1.online("ana").await.unwrap(), "{name}");
        n1.presence_up("ana").await.unwrap();
        assert!(n2.online("ana").await.unwrap(), "{name}");
        n2.presence_up("ana").await.unwrap();
        // A second connection on a node it already counts changes nothing.
        n1.presence_up("ana").await.unwrap();
        assert!(n1.online("ana").await.unwrap(), "{name}");
        assert_eq!((online().await, offline().await), (1, 0), "{name}");
        n1.presence_down("ana").await.unwrap();
        assert!(n1.online("ana").await.unwrap(), "{name}: node-2 has them");
        assert!(n2.online("ana").await.unwrap(), "{name}");
        assert_eq!((online().await, offline().await), (1, 0), "{name}");
        n2.presence_down("ana").await.unwrap();
        assert!(!n1.online("ana").await.unwrap(), "{name}");
        assert!(!n2.online("ana").await.unwrap(), "{name}");
        assert_eq!((online().await, offline().await), (1, 1), "{name}");
        // A late close of a connection already gone is no news.
        n2.presence_down("ana").await.unwrap();
        n1.presence_down("ana").await.unwrap();
        assert_eq!((online().await, offline().await), (1, 1), "{name}");
        let on = outbox_payloads(&env.db, "presence.user_online").await;
        let off = outbox_payloads(&env.db, "presence.user_offline").await;
        assert_eq!(
            (&on[0]["user_id"], &off[0]["user_id"]),
            (&json!("ana"), &json!("ana"))
        );
        assert!(off[0]["last_seen_at"].is_string(), "{name}: {off:?}");

        // Others are counted apart; a node's restart forgets only its own.
        n2.presence_up("bob").await.unwrap();
        n1.presence_up("ana").await.unwrap();
        assert_eq!(online().await, 3, "{name}");
        assert_eq!(n1.presence_reset().await.unwrap(), 1, "{name}");
        assert!(!n1.online("ana").await.unwrap(), "{name}");
        assert!(n1.online("bob").await.unwrap(), "{name}");
        assert_eq!(offline().await, 2, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_users_go_offline_when_its_heartbeat_lapses() {
    for env in envs().await {
        let name = env.name;
        let ttl = |c: &mut MessagingConfig| c.presence_ttl = std::time::Duration::from_millis(300);
        let (dead, live) = (env.peer("dies", ttl).await, env.peer("lives", ttl).await);
        assert!(
            dead.presence_heartbeat().await.unwrap(),
            "{name}: first beat"
        );
        assert!(
            live.presence_heartbeat().await.unwrap(),
            "{name}: first beat"
        );
        dead.presence_up("ana").await.unwrap();
        live.presence_up("bob").await.unwrap();
        // While its heartbeat holds, nothing is swept.
        assert_eq!(live.presence_sweep().await.unwrap(), 0, "{name}");
        assert!(live.online("ana").await.unwrap(), "{name}");
        // `dies` stops beating (killed); `lives` keeps beating.
        for _ in 0..4 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert!(
                !live.presence_heartbeat().await.unwrap(),
                "{name}: renewed in time"
            );
        }
        assert_eq!(live.presence_sweep().await.unwrap(), 1, "{name}");
        assert!(
            !live.online("ana").await.unwrap(),
            "{name}: ana went with her node"
        );
        assert!(
            live.online("bob").await.unwrap(),
            "{name}: a live node's users stay"
        );
        let off = outbox_payloads(&env.db, "presence.user_offline").await;
        assert_eq!(off.len(), 1, "{name}: {off:?}");
        assert_eq!(off[0]["user_id"], json!("ana"));
        // The node comes back: its heartbeat had lapsed, so it must re-announce.
        assert!(dead.presence_heartbeat().await.unwrap(), "{name}: lapsed");
        assert_eq!(
            live.presence_sweep().await.unwrap(),
            0,
            "{name}: swept once"
        );
    }
}

// Two nodes changing one user's presence at once: each counts the other's
// rows, so the changes must queue (the user's `last_seen` row lock) or both
// would announce online, and neither offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_transitions_on_two_nodes_announce_once_each() {
    for env in envs().await {
        let name = env.name;
        let mut nodes = Vec::new();
        for node in ["node-1", "node-2"] {
            nodes.push(env.peer(node, |_| {}).await);
        }
        let users: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
        for up in [true, false] {
            for u in &users {
                let both: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        let (n, u) = (n.clone(), u.clone());
                        tokio::spawn(async move {
                            if up {
                                n.presence_up(&u).await
                            } else {
                                n.presence_down(&u).await
                            }
                        })
                    })
                    .collect();
                for t in both {
                    t.await.unwrap().unwrap();
                }
                assert_eq!(nodes[0].online(u).await.unwrap(), up, "{name} {u}");
            }
        }
        // Announcements per user: (online, offline).
        let mut per_user: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (kind, online) in [
            ("presence.user_online", true),
            ("presence.user_offline", false),
        ] {
            for p in outbox_payloads(&env.db, kind).await {
                let e = per_user
                    .entry(p["user_id"].as_str().unwrap().to_owned())
                    .or_default();
                if online {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
        }
        let expected: BTreeMap<String, (usize, usize)> =
            users.iter().map(|u| (u.clone(), (1, 1))).collect();
        assert_eq!(per_user, expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_is_typing_lapses_and_is_the_same_on_every_node_with_redis() {
    let redis_url = std::env::var("FLOWLINE_TEST_REDIS_URL").ok();
    for env in envs().await {
        let name = env.name;
        let ttl = |c: &mut MessagingConfig| c.typing_ttl = std::time::Duration::from_millis(400);
        let node_a = env.node(config(ttl), Welcomes::ok()).await;
        let a = node_a.m.clone();
        let users = ["ana", "bob", "eve"];
        register(&a, &users).await;
        let (_, general) = workspace(&a, "ana", &["bob"]).await;
        // Two nodes on one database; with Redis they share the typing board.
        let node_b = env.node(config(ttl), Welcomes::ok()).await;
        let b = node_b.m.clone();
        let prefix = format!("t{}:", uuid::Uuid::now_v7().simple());
        if let Some(url) = &redis_url {
            let conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection_manager()
                .await
                .expect("FLOWLINE_TEST_REDIS_URL unreachable");
            a.share_typing(conn.clone(), &prefix);
            b.share_typing(conn, &prefix);
        }
        a.typing(&ctx(), "bob", &general).await.unwrap();
        let now = a.typing_now(&general, "ana").await.unwrap();
        assert_eq!(now.len(), 1, "{name}: {now:?}");
        assert_eq!(now[0].user_id, "bob");
        if redis_url.is_some() {
            let there = b.typing_now(&general, "ana").await.unwrap();
            assert_eq!(
                there.len(),
                1,
                "{name}: node B sees A's typing through Redis"
            );
        }
        // An outsider can neither type nor look.
        assert_eq!(
            refusal(a.typing(&ctx(), "eve", &general).await).0,
            404,
            "{name}"
        );
        assert_eq!(
            refusal(a.typing_now(&general, "eve").await).0,
            404,
            "{name}"
        );
        // The indication lapses by itself.
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert!(
            a.typing_now(&general, "ana").await.unwrap().is_empty(),
            "{name}"
        );
        assert!(
            b.typing_now(&general, "ana").await.unwrap().is_empty(),
            "{name}"
        );
        node_a.stop().await;
        node_b.stop().await;
    }
}
