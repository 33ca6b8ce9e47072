//! Sessions and refresh tokens behind a trait: the embedded default keeps them
//! in the identity database; a Redis store (distributed mode) plugs in here.

use flowline_http::BoxFuture;
use flowline_store::{Db, StoreError};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub user_agent: String,
    pub ip: String,
    /// Unix seconds.
    pub created_at: i64,
    pub last_seen: i64,
    pub expires_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

impl Session {
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was current; it is now spent and `new_hash` is current.
    Rotated {
        session_id: String,
    },
    /// The token had already been rotated: someone replayed it.
    Reused {
        session_id: String,
    },
    Unknown,
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub trait SessionStore: Send + Sync + 'static {
    /// Stores a new session and its first refresh token. `event` (the login's
    /// audit record) commits with them where the store can do that atomically.
    fn create<'a>(
        &'a self,
        s: &'a Session,
        refresh_hash: &'a str,
        event: Option<&'a flowline_core::Envelope>,
    ) -> BoxFuture<'a, Result<()>>;
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Session>>>;
    fn touch<'a>(&'a self, id: &'a str, now: i64) -> BoxFuture<'a, Result<()>>;
    /// Marks the session revoked. True if it was active.
    fn revoke<'a>(&'a self, id: &'a str, reason: &'a str, now: i64) -> BoxFuture<'a, Result<bool>>;
    /// Revokes every active session of `user_id` except `keep`; returns their ids.
    fn revoke_all<'a>(
        &'a self,
        user_id: &'a str,
        keep: Option<&'a str>,
        reason: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Vec<String>>>;
    fn list<'a>(&'a self, user_id: &'a str, now: i64) -> BoxFuture<'a, Result<Vec<Session>>>;
    /// Spends `old_hash` and makes `new_hash` the session's current refresh token.
    fn rotate<'a>(
        &'a self,
        old_hash: &'a str,
        new_hash: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Rotation>>;
    /// Whether other nodes write this store too. Then a node must not cache
    /// what it read: another node's revocation would go unseen until expiry.
    fn shared(&self) -> bool {
        false
    }
}

/// Sessions in the identity database.
pub struct SqlSessionStore {
    pub db: Db,
}

type Row = (String, String, String, String, i64, i64, i64, Option<i64>);

fn session(r: Row) -> Session {
    Session {
        id: r.0,
        user_id: r.1,
        user_agent: r.2,
        ip: r.3,
        created_at: r.4,
        last_seen: r.5,
        expires_at: r.6,
        revoked_at: r.7,
    }
}

const COLUMNS: &str = "id, user_id, user_agent, ip, created_at, last_seen, expires_at, revoked_at";

impl SessionStore for SqlSessionStore {
    fn create<'a>(
        &'a self,
        s: &'a Session,
        refresh_hash: &'a str,
        event: Option<&'a flowline_core::Envelope>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut tx = self.db.begin().await?;
            if let Some(e) = event {
                flowline_store::outbox::enqueue(&mut tx, e).await?;
            }
            flowline_store::on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO sessions (id, user_id, user_agent, ip, created_at, last_seen, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            )
            .bind(&s.id)
            .bind(&s.user_id)
            .bind(&s.user_agent)
            .bind(&s.ip)
            .bind(s.created_at)
            .bind(s.last_seen)
            .bind(s.expires_at)
            .execute(c)
            .await
            .map(|_| ())
            })?;
            flowline_store::on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, session_id, issued_at) VALUES ($1, $2, $3)"
            )
            .bind(refresh_hash)
            .bind(&s.id)
            .bind(s.created_at)
            .execute(c)
            .await
            .map(|_| ())
            })?;
            tx.commit().await
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Session>>> {
        Box::pin(async move {
            let sql = format!("SELECT {COLUMNS} FROM sessions WHERE id = $1");
            let row: Option<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
                .bind(id)
                .fetch_optional(p)
                .await)?;
            Ok(row.map(session))
        })
    }

    fn touch<'a>(&'a self, id: &'a str, now: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            flowline_store::on_pool!(write & self.db, |p| sqlx::query(
                "UPDATE sessions SET last_seen = $2 WHERE id = $1"
            )
            .bind(id)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))?;
            Ok(())
        })
    }

    fn revoke<'a>(&'a self, id: &'a str, reason: &'a str, now: i64) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let n = flowline_store::on_pool!(write & self.db, |p| {
                sqlx::query(
                "UPDATE sessions SET revoked_at = $2, revoke_reason = $3 WHERE id = $1 AND revoked_at IS NULL"
            )
            .bind(id)
            .bind(now)
            .bind(reason)
            .execute(p)
            .await
            .map(|r| r.rows_affected())
            })?;
            Ok(n == 1)
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
            // One statement: the ids returned are exactly the sessions revoked.
            let ids: Vec<String> =
                flowline_store::on_pool!(write & self.db, |p| sqlx::query_scalar(
                    "UPDATE sessions SET revoked_at = $3, revoke_reason = $4
                 WHERE user_id = $1 AND revoked_at IS NULL AND id <> $2
                 RETURNING id"
                )
                .bind(user_id)
                .bind(keep.unwrap_or(""))
                .bind(now)
                .bind(reason)
                .fetch_all(p)
                .await)?;
            Ok(ids)
        })
    }

    fn list<'a>(&'a self, user_id: &'a str, now: i64) -> BoxFuture<'a, Result<Vec<Session>>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {COLUMNS} FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2
                 ORDER BY created_at DESC"
            );
            let rows: Vec<Row> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
                .bind(user_id)
                .bind(now)
                .fetch_all(p)
                .await)?;
            Ok(rows.into_iter().map(session).collect())
        })
    }

    fn rotate<'a>(
        &'a self,
        old_hash: &'a str,
        new_hash: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Rotation>> {
        Box::pin(async move {
            let mut tx = self.db.begin().await?;
            if let flowline_store::Tx::Postgres(t) = &mut tx {
                // Two concurrent refreshes with one token: exactly one may rotate.
                sqlx::query("SELECT 1 FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE")
                    .bind(old_hash)
                    .execute(&mut **t)
                    .await?;
            }
            let found: Option<(String, Option<i64>)> =
                flowline_store::on_tx!(&mut tx, |c| sqlx::query_as(
                    "SELECT session_id, rotated_at FROM refresh_tokens WHERE token_hash = $1"
                )
                .bind(old_hash)
                .fetch_optional(c)
                .await)?;
            let outcome = match found {
                None => Rotation::Unknown,
                Some((session_id, Some(_))) => Rotation::Reused { session_id },
                Some((session_id, None)) => {
                    flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                        "UPDATE refresh_tokens SET rotated_at = $2 WHERE token_hash = $1"
                    )
                    .bind(old_hash)
                    .bind(now)
                    .execute(c)
                    .await
                    .map(|_| ()))?;
                    flowline_store::on_tx!(&mut tx, |c| {
                        sqlx::query(
                        "INSERT INTO refresh_tokens (token_hash, session_id, issued_at) VALUES ($1, $2, $3)"
                    )
                    .bind(new_hash)
                    .bind(&session_id)
                    .bind(now)
                    .execute(c)
                    .await
                    .map(|_| ())
                    })?;
                    Rotation::Rotated { session_id }
                }
            };
            tx.commit().await?;
            Ok(outcome)
        })
    }
}
