//! Sessions in Redis, for distributed mode: every node reads and writes the
//! same sessions, so a logout on one node holds on all of them at once.
//!
//! Keys, all under the store's prefix:
//! - `session:{id}`: a hash of the [`Session`] fields (and `revoke_reason`).
//!   It expires at `expires_at`, so a revoked session stays readable until then.
//! - `user_sessions:{user_id}`: a set of the user's session ids that may still
//!   be active. Ids of gone or revoked sessions are pruned when it is read; it
//!   expires with the user's longest-lived session.
//! - `refresh:{hash}`: a hash of `session_id`, `expires_at`, and `rotated_at`
//!   once spent. It expires with its session. Only hashes are stored, never tokens.
//!
//! Every check-then-write is a Lua script: Redis runs a script atomically, so
//! two nodes presenting one refresh token cannot both rotate it. Needs Redis ≥ 5
//! (scripts read TIME before writing); scripts touch keys of several slots, so
//! a single server or Sentinel, not Redis Cluster.

use crate::sessions::{Result, Rotation, Session, SessionStore};
use flowline_core::Envelope;
use flowline_http::BoxFuture;
use flowline_store::{redact_url, Db, StoreError};
use redis::aio::ConnectionManager;
use redis::Script;
use std::collections::HashMap;
use std::sync::LazyLock;

/// KEYS: session, user index, refresh token.
/// ARGV: expires_at, session id, then the session's field/value pairs.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local exp = ARGV[1]
        redis.call('HSET', KEYS[1], unpack(ARGV, 3))
        redis.call('EXPIREAT', KEYS[1], exp)
        redis.call('HSET', KEYS[3], 'session_id', ARGV[2], 'expires_at', exp)
        redis.call('EXPIREAT', KEYS[3], exp)
        redis.call('SADD', KEYS[2], ARGV[2])
        -- The index lives as long as the longest-lived session in it (-1: new key).
        local ttl = redis.call('TTL', KEYS[2])
        if ttl == -1 or ttl < tonumber(exp) - tonumber(redis.call('TIME')[1]) then
            redis.call('EXPIREAT', KEYS[2], exp)
        end
        ",
    )
});

/// KEYS: session. ARGV: now. A gone session must not come back as a bare hash
/// without a TTL.
static TOUCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('EXISTS', KEYS[1]) == 1 then
            redis.call('HSET', KEYS[1], 'last_seen', ARGV[1])
        end
        ",
    )
});

/// KEYS: session. ARGV: now, reason. Returns 1 if this call revoked it.
static REVOKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then
            return 0
        end
        redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1], 'revoke_reason', ARGV[2])
        return 1
        ",
    )
});

/// KEYS: user index, then the session of each id in ARGV[5..].
/// ARGV: user_id, keep, now, reason, ids. Returns the ids this call revoked.
static REVOKE_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local revoked = {}
        for i = 2, #KEYS do
            local id = ARGV[i + 3]
            local s = redis.call('HMGET', KEYS[i], 'user_id', 'revoked_at')
            if not s[1] or s[2] then
                -- Gone or revoked: it can never be active again.
                redis.call('SREM', KEYS[1], id)
            elseif s[1] == ARGV[1] and id ~= ARGV[2] then
                redis.call('HSET', KEYS[i], 'revoked_at', ARGV[3], 'revoke_reason', ARGV[4])
                redis.call('SREM', KEYS[1], id)
                revoked[#revoked + 1] = id
            end
        end
        return revoked
        ",
    )
});

/// KEYS: old refresh token, new refresh token. ARGV: now.
/// Returns {} (unknown), {'reused', sid} or {'rotated', sid}.
static ROTATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local t = redis.call('HMGET', KEYS[1], 'session_id', 'expires_at', 'rotated_at')
        if not t[1] then
            return {}
        end
        if t[3] then
            return {'reused', t[1]}
        end
        redis.call('HSET', KEYS[1], 'rotated_at', ARGV[1])
        redis.call('HSET', KEYS[2], 'session_id', t[1], 'expires_at', t[2])
        redis.call('EXPIREAT', KEYS[2], t[2])
        return {'rotated', t[1]}
        ",
    )
});

/// Sessions and refresh tokens in Redis, shared by every node.
pub struct RedisSessionStore {
    conn: ConnectionManager,
    prefix: String,
    /// The identity database: a login's audit event goes to its outbox.
    db: Db,
}

fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError::Unreachable {
        target: "redis".into(),
        reason: e.to_string(),
    }
}

fn corrupt(id: &str) -> StoreError {
    StoreError::CorruptEvent(format!("session {id}"))
}

fn session_of(id: &str, h: &HashMap<String, String>) -> Result<Session> {
    let text = |f: &str| h.get(f).cloned().ok_or_else(|| corrupt(id));
    let num = |f: &str| -> Result<i64> {
        h.get(f)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt(id))
    };
    Ok(Session {
        id: id.to_owned(),
        user_id: text("user_id")?,
        user_agent: text("user_agent")?,
        ip: text("ip")?,
        created_at: num("created_at")?,
        last_seen: num("last_seen")?,
        expires_at: num("expires_at")?,
        revoked_at: match h.contains_key("revoked_at") {
            true => Some(num("revoked_at")?),
            false => None,
        },
    })
}

impl RedisSessionStore {
    /// `prefix` namespaces every key (e.g. `flowline:`); `db` is the identity
    /// database, whose outbox receives login audit events.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>, db: Db) -> Self {
        RedisSessionStore {
            conn,
            prefix: prefix.into(),
            db,
        }
    }

    pub async fn connect(url: &str, prefix: impl Into<String>, db: Db) -> Result<Self> {
        let unreachable = |e: redis::RedisError| StoreError::Unreachable {
            target: redact_url(url),
            reason: e.to_string(),
        };
        let client = redis::Client::open(url).map_err(unreachable)?;
        let conn = ConnectionManager::new(client).await.map_err(unreachable)?;
        Ok(Self::new(conn, prefix, db))
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}{kind}:{id}", self.prefix)
    }

    async fn enqueue(&self, event: &Envelope) -> Result<()> {
        let mut tx = self.db.begin().await?;
        flowline_store::outbox::enqueue(&mut tx, event).await?;
        tx.commit().await
    }

    /// Undoes `create`.
    async fn delete(&self, s: &Session, refresh_hash: &str) -> Result<()> {
        redis::pipe()
            .atomic()
            .cmd("DEL")
            .arg(self.key("session", &s.id))
            .arg(self.key("refresh", refresh_hash))
            .cmd("SREM")
            .arg(self.key("user_sessions", &s.user_id))
            .arg(&s.id)
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(redis_error)
    }

    /// The user's indexed session ids, and their sessions (None: gone).
    async fn indexed(&self, user_id: &str) -> Result<Vec<(String, Option<Session>)>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.key("user_sessions", user_id))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        if ids.is_empty() {
            return Ok(Vec::new()); // Redis refuses an empty pipeline
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL").arg(self.key("session", id));
        }
        let maps: Vec<HashMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(redis_error)?;
        ids.into_iter()
            .zip(maps)
            .map(|(id, h)| {
                let s = match h.is_empty() {
                    true => None,
                    false => Some(session_of(&id, &h)?),
                };
                Ok((id, s))
            })
            .collect()
    }
}

impl SessionStore for RedisSessionStore {
    fn create<'a>(
        &'a self,
        s: &'a Session,
        refresh_hash: &'a str,
        event: Option<&'a Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            CREATE
                .key(self.key("session", &s.id))
                .key(self.key("user_sessions", &s.user_id))
                .key(self.key("refresh", refresh_hash))
                .arg(s.expires_at)
                .arg(&s.id)
                .arg(("user_id", &s.user_id))
                .arg(("user_agent", &s.user_agent))
                .arg(("ip", &s.ip))
                .arg(("created_at", s.created_at))
                .arg(("last_seen", s.last_seen))
                .arg(("expires_at", s.expires_at))
                .invoke_async::<()>(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            // Redis and the outbox cannot share a transaction: the session goes
            // first, and is taken back if its audit record cannot be written.
            if let Some(e) = event {
                if let Err(err) = self.enqueue(e).await {
                    if let Err(undo) = self.delete(s, refresh_hash).await {
                        tracing::error!(error = %undo, session_id = %s.id, "cannot undo session without audit event");
                    }
                    return Err(err);
                }
            }
            Ok(())
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Session>>> {
        Box::pin(async move {
            let h: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(self.key("session", id))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            match h.is_empty() {
                true => Ok(None),
                false => session_of(id, &h).map(Some),
            }
        })
    }

    fn touch<'a>(&'a self, id: &'a str, now: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            TOUCH
                .key(self.key("session", id))
                .arg(now)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)
        })
    }

    fn revoke<'a>(&'a self, id: &'a str, reason: &'a str, now: i64) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            REVOKE
                .key(self.key("session", id))
                .arg(now)
                .arg(reason)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)
        })
    }

    fn revoke_all<'a>(
        &'a self,
        user_id: &'a str,
        keep: Option<&'a str>,
        reason: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let ids: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.key("user_sessions", user_id))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            // One script: the ids returned are exactly the sessions it revoked.
            let mut call = REVOKE_ALL.key(self.key("user_sessions", user_id));
            for id in &ids {
                call.key(self.key("session", id));
            }
            call.arg(user_id)
                .arg(keep.unwrap_or(""))
                .arg(now)
                .arg(reason)
                .arg(&ids);
            call.invoke_async(&mut conn).await.map_err(redis_error)
        })
    }

    fn list<'a>(&'a self, user_id: &'a str, now: i64) -> BoxFuture<'a, Result<Vec<Session>>> {
        Box::pin(async move {
            let mut active = Vec::new();
            let mut dead = Vec::new();
            for (id, s) in self.indexed(user_id).await? {
                match s {
                    Some(s) if s.revoked_at.is_none() => {
                        if s.user_id == user_id && s.expires_at > now {
                            active.push(s);
                        }
                    }
                    // Gone or revoked: it can never be listed again.
                    _ => dead.push(id),
                }
            }
            if !dead.is_empty() {
                redis::cmd("SREM")
                    .arg(self.key("user_sessions", user_id))
                    .arg(&dead)
                    .query_async::<()>(&mut self.conn.clone())
                    .await
                    .map_err(redis_error)?;
            }
            active.sort_by_key(|s| std::cmp::Reverse(s.created_at));
            Ok(active)
        })
    }

    fn rotate<'a>(
        &'a self,
        old_hash: &'a str,
        new_hash: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Rotation>> {
        Box::pin(async move {
            let r: Vec<String> = ROTATE
                .key(self.key("refresh", old_hash))
                .key(self.key("refresh", new_hash))
                .arg(now)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_error)?;
            Ok(match <[String; 2]>::try_from(r) {
                Ok([kind, session_id]) if kind == "rotated" => Rotation::Rotated { session_id },
                Ok([kind, session_id]) if kind == "reused" => Rotation::Reused { session_id },
                _ => Rotation::Unknown,
            })
        })
    }

    fn shared(&self) -> bool {
        true
    }
}
