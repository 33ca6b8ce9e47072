//! Session-store conformance: every behaviour runs against `SqlSessionStore`
//! on SQLite, on PostgreSQL when FLOWLINE_TEST_POSTGRES_URL is set, and against
//! `RedisSessionStore` when FLOWLINE_TEST_REDIS_URL is set. A set variable whose
//! server cannot be reached fails the test: it never turns into a skip.

use flowline_core::{Envelope, EventDraft};
use flowline_http::RequestContext;
use flowline_identity::service::MIGRATIONS;
use flowline_identity::{
    Device, Identity, IdentityConfig, RedisSessionStore, Rotation, Session, SessionStore,
    SqlSessionStore,
};
use flowline_store::outbox::{Relay, KERNEL_MIGRATIONS};
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use redis::aio::ConnectionManager;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
}

struct Harness {
    store: Arc<dyn SessionStore>,
    /// The identity database: SqlSessionStore's tables, every store's outbox.
    db: Db,
    backend: Backend,
    /// Redis stores: a connection of the test's own, and the store's prefix.
    redis: Option<(ConnectionManager, String)>,
    _dir: tempfile::TempDir,
}

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

async fn redis_conn(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).expect("FLOWLINE_TEST_REDIS_URL is not a Redis URL");
    ConnectionManager::new(client)
        .await
        .unwrap_or_else(|e| panic!("FLOWLINE_TEST_REDIS_URL is set but Redis is unreachable: {e}"))
}

/// The identity database of `backend`; without the kernel tables its outbox
/// writes fail.
async fn identity_db(backend: &Backend, service: &str, outbox: bool) -> Db {
    let db = Db::open(backend, service).await.expect("open identity db");
    if outbox {
        db.migrate(KERNEL_MIGRATIONS)
            .await
            .expect("kernel migrations");
    }
    db.migrate(MIGRATIONS).await.expect("identity migrations");
    db
}

impl Harness {
    /// None: that backend is not configured here.
    async fn new(kind: Kind) -> Option<Harness> {
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        };
        let backend = match kind {
            Kind::Postgres => Backend::Postgres {
                url: std::env::var("FLOWLINE_TEST_POSTGRES_URL").ok()?,
                schema_prefix: format!("t{}_", unique()),
                max_connections: 8,
            },
            Kind::Sqlite | Kind::Redis => sqlite,
        };
        let redis = match kind {
            Kind::Redis => {
                let url = std::env::var("FLOWLINE_TEST_REDIS_URL").ok()?;
                Some((redis_conn(&url).await, format!("t-{}:", unique())))
            }
            _ => None,
        };
        let db = identity_db(&backend, "identity", true).await;
        let mut h = Harness {
            store: Arc::new(SqlSessionStore { db: db.clone() }),
            db: db.clone(),
            backend,
            redis,
            _dir: dir,
        };
        h.store = h.store_on(db);
        Some(h)
    }

    /// A store of this harness's kind whose outbox is in `db`.
    fn store_on(&self, db: Db) -> Arc<dyn SessionStore> {
        match &self.redis {
            Some((conn, prefix)) => Arc::new(RedisSessionStore::new(conn.clone(), prefix, db)),
            None => Arc::new(SqlSessionStore { db }),
        }
    }

    /// The remaining time to live of one of the store's keys, in ms (Redis only).
    async fn pttl(&self, key: &str) -> Option<i64> {
        let (conn, prefix) = self.redis.as_ref()?;
        let ms = redis::cmd("PTTL")
            .arg(format!("{prefix}{key}"))
            .query_async(&mut conn.clone())
            .await
            .expect("PTTL");
        Some(ms)
    }

    /// Leaves nothing behind: the test's Redis keys, its PostgreSQL schemas.
    async fn finish(&self) {
        if let Some((conn, prefix)) = &self.redis {
            let mut conn = conn.clone();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut conn)
                .await
                .expect("KEYS");
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("DEL");
            }
        }
        if let (Backend::Postgres { schema_prefix, .. }, Db::Postgres { pool, .. }) =
            (&self.backend, &self.db)
        {
            let schemas: Vec<String> = sqlx::query_scalar("SELECT nspname::text FROM pg_namespace")
                .fetch_all(pool)
                .await
                .expect("list schemas");
            for s in schemas
                .iter()
                .filter(|s| s.starts_with(schema_prefix.as_str()))
            {
                sqlx::raw_sql(&format!("DROP SCHEMA \"{s}\" CASCADE"))
                    .execute(pool)
                    .await
                    .expect("drop schema");
            }
        }
    }
}

async fn run<F, Fut>(kind: Kind, case: F)
where
    F: FnOnce(Arc<Harness>) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(h) = Harness::new(kind).await else {
        eprintln!("backend not configured; skipped");
        return;
    };
    let h = Arc::new(h);
    case(h.clone()).await;
    h.finish().await;
}

fn session(user_id: &str, created_at: i64, ttl: i64) -> Session {
    Session {
        id: unique(),
        user_id: user_id.to_owned(),
        user_agent: "test-agent/1.0".into(),
        ip: "192.0.2.7".into(),
        created_at,
        last_seen: created_at,
        expires_at: created_at + ttl,
        revoked_at: None,
    }
}

fn ids(sessions: &[Session]) -> Vec<&str> {
    sessions.iter().map(|s| s.id.as_str()).collect()
}

async fn create(h: &Harness, s: &Session, refresh: &str) {
    h.store.create(s, refresh, None).await.expect("create");
}

const HOUR: i64 = 3600;

async fn create_get_list(h: Arc<Harness>) {
    let (u, v, t) = (unique(), unique(), now());
    let older = session(&u, t - 10, HOUR);
    let newer = session(&u, t - 5, HOUR);
    let theirs = session(&v, t, HOUR);
    for (s, r) in [
        (&older, "r-older"),
        (&newer, "r-newer"),
        (&theirs, "r-theirs"),
    ] {
        create(&h, s, r).await;
    }
    assert_eq!(h.store.get(&older.id).await.unwrap(), Some(older.clone()));
    assert_eq!(h.store.get("no-such-session").await.unwrap(), None);
    let listed = h.store.list(&u, t).await.unwrap();
    assert_eq!(listed, vec![newer.clone(), older.clone()], "newest first");
    assert_eq!(
        ids(&h.store.list(&v, t).await.unwrap()),
        [theirs.id.as_str()]
    );
    assert!(h.store.list(&unique(), t).await.unwrap().is_empty());
}

async fn login_event_commits_with_the_session(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let event = |sid: &str| {
        let draft = EventDraft::new(
            "audit.events",
            "auth.login_succeeded",
            &u,
            serde_json::json!({ "user_id": u, "session_id": sid }),
        );
        Envelope::stamp(draft, "corr-1", None)
    };
    let s = session(&u, t, HOUR);
    h.store
        .create(&s, "r-audited", Some(&event(&s.id)))
        .await
        .expect("create with event");
    let outbox: i64 = flowline_store::on_pool!(&h.db, |p| sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'auth.login_succeeded'"
    )
    .fetch_one(p)
    .await)
    .unwrap();
    assert_eq!(outbox, 1);
    assert!(h.store.get(&s.id).await.unwrap().is_some());

    // An identity database without an outbox: the event cannot be written, so
    // the session must not exist either.
    let broken = h.store_on(identity_db(&h.backend, "no_outbox", false).await);
    let lost = session(&u, t, HOUR);
    assert!(broken
        .create(&lost, "r-lost", Some(&event(&lost.id)))
        .await
        .is_err());
    assert_eq!(broken.get(&lost.id).await.unwrap(), None);
    assert_eq!(
        broken.rotate("r-lost", "r-next", t).await.unwrap(),
        Rotation::Unknown
    );
    assert!(!ids(&broken.list(&u, t).await.unwrap()).contains(&lost.id.as_str()));
    if let Some(ttl) = h.pttl("refresh:r-lost").await {
        assert_eq!(ttl, -2, "the refresh token key is gone too");
    }
}

async fn touch_updates_last_seen(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let s = session(&u, t - 60, HOUR);
    create(&h, &s, "r-touch").await;
    h.store.touch(&s.id, t).await.unwrap();
    let got = h.store.get(&s.id).await.unwrap().unwrap();
    assert_eq!(got.last_seen, t);
    assert_eq!(
        got,
        Session {
            last_seen: t,
            ..s.clone()
        },
        "nothing else changes"
    );
    h.store.touch("no-such-session", t).await.unwrap();
    assert_eq!(
        h.store.get("no-such-session").await.unwrap(),
        None,
        "touch does not create"
    );
}

async fn revoke_once(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let s = session(&u, t - 60, HOUR);
    create(&h, &s, "r-revoke").await;
    assert!(h.store.revoke(&s.id, "logout", t).await.unwrap());
    assert!(
        !h.store.revoke(&s.id, "logout", t + 1).await.unwrap(),
        "already revoked"
    );
    assert!(!h
        .store
        .revoke("no-such-session", "logout", t)
        .await
        .unwrap());
    let got = h.store.get(&s.id).await.unwrap().expect("still readable");
    assert_eq!(got.revoked_at, Some(t), "the first revocation's time");
    assert!(!got.is_active(t));
    assert!(h.store.list(&u, t).await.unwrap().is_empty());
    if let Some(ttl) = h.pttl(&format!("session:{}", s.id)).await {
        assert!(ttl > (HOUR - 120) * 1000, "kept until it expires: {ttl}");
    }
}

async fn revoke_all_keeps_one(h: Arc<Harness>) {
    let (u, other, t) = (unique(), unique(), now());
    let [keep, a, b, gone] = [1, 2, 3, 4].map(|i| session(&u, t - 100 + i, HOUR));
    let theirs = session(&other, t, HOUR);
    for (i, s) in [&keep, &a, &b, &gone, &theirs].into_iter().enumerate() {
        create(&h, s, &format!("r-all-{i}")).await;
    }
    assert!(h.store.revoke(&gone.id, "logout", t).await.unwrap());
    let mut revoked = h
        .store
        .revoke_all(&u, Some(&keep.id), "password_changed", t)
        .await
        .unwrap();
    revoked.sort();
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    assert_eq!(revoked, expected, "only the active ones, not `keep`");
    assert_eq!(ids(&h.store.list(&u, t).await.unwrap()), [keep.id.as_str()]);
    assert_eq!(
        ids(&h.store.list(&other, t).await.unwrap()),
        [theirs.id.as_str()]
    );
    let b_now = h.store.get(&b.id).await.unwrap().unwrap();
    assert_eq!(b_now.revoked_at, Some(t));
    assert!(h
        .store
        .revoke_all(&u, Some(&keep.id), "again", t)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        h.store.revoke_all(&u, None, "banned", t).await.unwrap(),
        vec![keep.id.clone()]
    );
    assert!(h.store.list(&u, t).await.unwrap().is_empty());
}

async fn expired_sessions_are_not_active(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let short = session(&u, t - 100, 102); // expires at t + 2
    let long = session(&u, t - 50, HOUR);
    let dead = session(&u, t - 200, 100); // expired before it was stored
    for (s, r) in [(&short, "r-short"), (&long, "r-long"), (&dead, "r-dead")] {
        create(&h, s, r).await;
    }
    assert_eq!(
        ids(&h.store.list(&u, t).await.unwrap()),
        [long.id.as_str(), short.id.as_str()]
    );
    let later = t + 3;
    assert_eq!(
        ids(&h.store.list(&u, later).await.unwrap()),
        [long.id.as_str()]
    );
    let got = h.store.get(&short.id).await.unwrap();
    assert!(
        got.is_none_or(|s| !s.is_active(later)),
        "past expires_at, not active"
    );
    let got = h.store.get(&dead.id).await.unwrap();
    assert!(got.is_none_or(|s| !s.is_active(t)));

    // Redis: every key expires on its own.
    let Some(ttl) = h.pttl(&format!("session:{}", short.id)).await else {
        return;
    };
    assert!(
        ttl > 0 && ttl <= 2000,
        "session expires at expires_at: {ttl}"
    );
    let long_ttl = h.pttl(&format!("session:{}", long.id)).await.unwrap();
    assert!((HOUR - 52) * 1000 < long_ttl && long_ttl <= (HOUR - 50) * 1000);
    let refresh_ttl = h.pttl("refresh:r-short").await.unwrap();
    assert!(refresh_ttl > 0 && refresh_ttl <= 2000, "{refresh_ttl}");
    let index_ttl = h.pttl(&format!("user_sessions:{u}")).await.unwrap();
    // Both expire at the same second; read a moment apart.
    assert!(
        index_ttl > long_ttl - 100,
        "the index lives as long as its longest session: {index_ttl} vs {long_ttl}"
    );
    assert_eq!(h.pttl(&format!("session:{}", dead.id)).await, Some(-2));
    assert_eq!(h.pttl("refresh:r-dead").await, Some(-2));

    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        h.store.get(&short.id).await.unwrap(),
        None,
        "gone at expiry"
    );
    assert_eq!(
        h.store.rotate("r-short", "r-short-2", now()).await.unwrap(),
        Rotation::Unknown
    );
}

async fn rotation_detects_reuse(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let s = session(&u, t, HOUR);
    create(&h, &s, "r0").await;
    let rotated = Rotation::Rotated {
        session_id: s.id.clone(),
    };
    let reused = Rotation::Reused {
        session_id: s.id.clone(),
    };
    assert_eq!(h.store.rotate("r0", "r1", t).await.unwrap(), rotated);
    assert_eq!(h.store.rotate("r0", "r2", t).await.unwrap(), reused);
    assert_eq!(h.store.rotate("r1", "r2", t).await.unwrap(), rotated);
    assert_eq!(h.store.rotate("r1", "r3", t).await.unwrap(), reused);
    assert_eq!(h.store.rotate("r0", "r3", t).await.unwrap(), reused);
    assert_eq!(
        h.store.rotate("never-issued", "r4", t).await.unwrap(),
        Rotation::Unknown
    );
    if let Some(ttl) = h.pttl("refresh:r2").await {
        assert!(ttl > (HOUR - 5) * 1000, "expires with its session: {ttl}");
    }
}

async fn concurrent_rotation_has_one_winner(h: Arc<Harness>) {
    let (u, t) = (unique(), now());
    let s = session(&u, t, HOUR);
    create(&h, &s, "contested").await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = h.store.clone();
            tokio::spawn(async move {
                let r = store.rotate("contested", &format!("next-{i}"), t).await;
                (i, r.expect("rotate"))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (i, Rotation::Rotated { session_id }) if session_id == s.id => winners.push(i),
            (_, Rotation::Reused { session_id }) if session_id == s.id => {}
            (_, other) => panic!("unexpected {other:?}"),
        }
    }
    let [winner] = winners[..] else {
        panic!("exactly one rotation may win, got {winners:?}");
    };
    for i in (0..8).filter(|&i| i != winner) {
        assert_eq!(
            h.store.rotate(&format!("next-{i}"), "x", t).await.unwrap(),
            Rotation::Unknown,
            "a losing rotation issued nothing"
        );
    }
    assert!(matches!(
        h.store
            .rotate(&format!("next-{winner}"), "after", t)
            .await
            .unwrap(),
        Rotation::Rotated { .. }
    ));
}

macro_rules! suite {
    ($module:ident, $kind:ident, $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::run(super::Kind::$kind, super::$case).await
                }
            )*
        }
    };
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        suite!(sqlite, Sqlite, $($case),*);
        suite!(postgres, Postgres, $($case),*);
        suite!(redis_store, Redis, $($case),*);
    };
}

conformance!(
    create_get_list,
    login_event_commits_with_the_session,
    touch_updates_last_seen,
    revoke_once,
    revoke_all_keeps_one,
    expired_sessions_are_not_active,
    rotation_detects_reuse,
    concurrent_rotation_has_one_winner,
);

/// Two nodes: one identity database, one Redis. A logout on node A ends the
/// session on node B at its very next request (no node-local cache in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_two_nodes_see_a_logout_at_once() {
    let Ok(url) = std::env::var("FLOWLINE_TEST_REDIS_URL") else {
        eprintln!("FLOWLINE_TEST_REDIS_URL not set; skipped");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = Backend::Sqlite {
        dir: dir.path().to_path_buf(),
        durability: Durability::Relaxed,
    };
    let log = EventLog::open(&backend, LogOptions::default())
        .await
        .unwrap();
    let prefix = format!("t-{}:", unique());
    let config = IdentityConfig {
        hash_concurrency: 1,
        ..IdentityConfig::default()
    };
    let mut nodes = Vec::new();
    for _ in 0..2 {
        // Opened one after the other: the first creates the signing key.
        let db = Db::open(&backend, "identity").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        let store = RedisSessionStore::connect(&url, prefix.as_str(), db.clone())
            .await
            .expect("FLOWLINE_TEST_REDIS_URL is set but Redis is unreachable");
        let node = Identity::open(db, relay, config.clone())
            .await
            .unwrap()
            .with_session_store(Arc::new(store));
        nodes.push(node);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let ctx = RequestContext::detached();
    let (email, password) = ("ann@example.com", "correct horse battery");
    a.create_user(&ctx, email, password, "Ann", false)
        .await
        .unwrap();
    let (_, tokens) = a
        .login(&ctx, &Device::default(), email, password)
        .await
        .unwrap();
    // Twice: a node-local cache, were there one, would now hold the session.
    let p = b.authenticate(&tokens.access_token).await.unwrap();
    b.authenticate(&tokens.access_token).await.unwrap();

    a.logout(&p).await.unwrap();
    let err = b.authenticate(&tokens.access_token).await.unwrap_err();
    assert_eq!(err.0.code, "token_invalid", "{:?}", err.0);
    let err = b.refresh(&ctx, &tokens.refresh_token).await.unwrap_err();
    assert_eq!(err.0.code, "token_invalid", "{:?}", err.0);

    let logins: i64 = flowline_store::on_pool!(&a.db, |p| sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE event_type = 'auth.login_succeeded'"
    )
    .fetch_one(p)
    .await)
    .unwrap();
    assert_eq!(logins, 1, "the login's audit event is in the outbox");

    let mut conn = redis_conn(&url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the session lives in Redis");
    redis::cmd("DEL")
        .arg(&keys)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}
