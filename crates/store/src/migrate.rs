//! A small migration runner: ordered, per-backend SQL, each migration applied
//! once in its own transaction and recorded in `_migrations` with its scope (the
//! kernel's tables and each context's own are versioned independently).

use crate::db::{Db, Tx};
use crate::error::StoreError;
use crate::Result;

#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub scope: &'static str,
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

const CREATE: &str = "CREATE TABLE IF NOT EXISTS _migrations (
    scope TEXT NOT NULL, version BIGINT NOT NULL, name TEXT NOT NULL,
    applied_at BIGINT NOT NULL, PRIMARY KEY (scope, version))";

impl Db {
    /// Applies every migration not yet recorded. Returns how many were applied.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<usize> {
        on_pool!(write self, |p| sqlx::query(CREATE).execute(p).await.map(|r| r.rows_affected()))?;
        let mut applied = 0;
        for m in migrations {
            let mut tx = self.begin().await?;
            let done: Option<i64> = on_tx!(&mut tx, |c| sqlx::query_scalar(
                "SELECT version FROM _migrations WHERE scope = $1 AND version = $2"
            )
            .bind(m.scope)
            .bind(m.version)
            .fetch_optional(c)
            .await)?;
            if done.is_some() {
                tx.rollback().await?;
                continue;
            }
            let sql = match tx {
                Tx::Sqlite(_) => m.sqlite,
                Tx::Postgres(_) => m.postgres,
            };
            let fail = |source| StoreError::Migration {
                scope: m.scope.into(),
                version: m.version,
                name: m.name.into(),
                source,
            };
            on_tx!(&mut tx, |c| sqlx::raw_sql(sql)
                .execute(c)
                .await
                .map(|r| r.rows_affected()))
            .map_err(fail)?;
            on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO _migrations (scope, version, name, applied_at) VALUES ($1, $2, $3, $4)"
            )
            .bind(m.scope)
            .bind(m.version)
            .bind(m.name)
            .bind(flowline_core::Timestamp::now().as_micros())
            .execute(c)
            .await.map(|r| r.rows_affected())
            })?;
            tx.commit().await?;
            applied += 1;
        }
        Ok(applied)
    }
}
