//! Backends, pools and transactions.

use crate::error::StoreError;
use crate::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, Postgres, Sqlite, SqlitePool};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Runs `$body` with `$c` bound to the transaction's connection, once per driver.
#[macro_export]
macro_rules! on_tx {
    ($tx:expr, |$c:ident| $body:expr) => {
        match $tx {
            $crate::Tx::Sqlite(t) => {
                let $c = &mut **t;
                $body
            }
            $crate::Tx::Postgres(t) => {
                let $c = &mut **t;
                $body
            }
        }
    };
}

/// Runs `$body` with `$p` bound to a pool: the read pool on SQLite, or the
/// writer when `write` is given.
#[macro_export]
macro_rules! on_pool {
    (write $db:expr, |$p:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite { write: $p, .. } => $body,
            $crate::Db::Postgres { pool: $p, .. } => $body,
        }
    };
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            $crate::Db::Sqlite { read: $p, .. } => $body,
            $crate::Db::Postgres { pool: $p, .. } => $body,
        }
    };
}

/// Decodes an `Envelope` from a row with the envelope columns (`event_id`,
/// `event_type`, `topic`, `event_key`, `occurred_at`, `correlation_id`,
/// `causation_id`, `schema_version`, `payload`, `traceparent`): the log's and the outbox's.
macro_rules! decode_envelope {
    ($row:expr) => {{
        let row = $row;
        let id: String = row.try_get("event_id")?;
        let payload: String = row.try_get("payload")?;
        let corrupt = |_| $crate::StoreError::CorruptEvent(id.clone());
        flowline_core::Envelope {
            id: uuid::Uuid::parse_str(&id).map_err(corrupt)?,
            event_type: row.try_get("event_type")?,
            topic: row.try_get("topic")?,
            key: row.try_get("event_key")?,
            occurred_at: flowline_core::Timestamp::from_micros(row.try_get("occurred_at")?),
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            schema_version: row.try_get("schema_version")?,
            payload: serde_json::from_str(&payload)
                .map_err(|_| $crate::StoreError::CorruptEvent(id.clone()))?,
            traceparent: row.try_get("traceparent")?,
        }
    }};
}

/// How hard a commit tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// An acknowledged commit survives power loss (SQLite `synchronous=FULL`).
    #[default]
    Full,
    /// Survives a process crash but may lose the last commits on power loss
    /// (SQLite `synchronous=NORMAL` in WAL). Faster.
    Relaxed,
}

/// Where the data lives, parsed from `database.url`.
#[derive(Debug, Clone)]
pub enum Backend {
    /// One SQLite file per service in `dir`.
    Sqlite {
        dir: PathBuf,
        durability: Durability,
    },
    /// One schema per service in one PostgreSQL database.
    Postgres {
        url: String,
        schema_prefix: String,
        max_connections: u32,
    },
}

impl Backend {
    /// `sqlite://` (the data dir), `sqlite://DIR`, or `postgres://…`.
    pub fn from_url(
        url: &str,
        data_dir: &Path,
        durability: Durability,
        schema_prefix: &str,
    ) -> Result<Self> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.trim_start_matches("//");
            let dir = if rest.is_empty() {
                data_dir.to_path_buf()
            } else {
                PathBuf::from(rest)
            };
            Ok(Backend::Sqlite { dir, durability })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres {
                url: url.to_owned(),
                schema_prefix: schema_prefix.to_owned(),
                max_connections: 16,
            })
        } else {
            Err(StoreError::BadUrl(redact_url(url)))
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres { .. } => "postgres",
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// One service's database.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite allows one writer: a single-connection write pool serialises writers
    /// in-process (no busy retries), readers use their own pool under WAL.
    Sqlite {
        write: SqlitePool,
        read: SqlitePool,
        path: PathBuf,
    },
    Postgres {
        pool: PgPool,
        schema: String,
    },
}

/// A transaction on one service's database.
pub enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub async fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => t.rollback().await?,
            Tx::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}

impl Db {
    /// Opens (creating if needed) the database of `service`.
    pub async fn open(backend: &Backend, service: &str) -> Result<Db> {
        match backend {
            Backend::Sqlite { dir, durability } => open_sqlite(dir, service, *durability).await,
            Backend::Postgres {
                url,
                schema_prefix,
                max_connections,
            } => open_postgres(url, &format!("{schema_prefix}{service}"), *max_connections).await,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres { .. } => "postgres",
        }
    }

    /// Starts a write transaction. On SQLite it is `BEGIN IMMEDIATE`: the write
    /// lock is taken up front, so a read-then-write transaction cannot fail to
    /// upgrade when another process (a CLI command) writes concurrently.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(match self {
            Db::Sqlite { write, .. } => Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres { pool, .. } => Tx::Postgres(pool.begin().await?),
        })
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<()> {
        on_pool!(self, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite { write, read, .. } => {
                write.close().await;
                read.close().await;
            }
            Db::Postgres { pool, .. } => pool.close().await,
        }
    }
}

async fn open_sqlite(dir: &Path, service: &str, durability: Durability) -> Result<Db> {
    std::fs::create_dir_all(dir).map_err(|e| StoreError::DataDir {
        path: dir.to_path_buf(),
        reason: format!("cannot create data directory: {e}"),
    })?;
    let path = dir.join(format!("{service}.db"));
    let sync = match durability {
        Durability::Full => SqliteSynchronous::Full,
        Durability::Relaxed => SqliteSynchronous::Normal,
    };
    let opts = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(sync)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(5))
        .pragma("cache_size", "-16000")
        .pragma("temp_store", "memory");
    let classify = |e: sqlx::Error| classify_sqlite(&path, e);
    let write = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone())
        .await
        .map_err(classify)?;
    // Touch the schema so a corrupt file fails here, at start-up, with its name.
    sqlx::query("SELECT count(*) FROM sqlite_master")
        .execute(&write)
        .await
        .map_err(classify)?;
    let read = SqlitePoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts)
        .await
        .map_err(classify)?;
    Ok(Db::Sqlite { write, read, path })
}

fn classify_sqlite(path: &Path, e: sqlx::Error) -> StoreError {
    let msg = e.to_string();
    if msg.contains("not a database") || msg.contains("malformed") || msg.contains("corrupt") {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: msg,
        }
    } else if msg.contains("unable to open") || msg.contains("readonly") || msg.contains("locked") {
        StoreError::DataDir {
            path: path.to_path_buf(),
            reason: msg,
        }
    } else {
        StoreError::Database(e)
    }
}

async fn open_postgres(url: &str, schema: &str, max_connections: u32) -> Result<Db> {
    let target = redact_url(url);
    let base = PgConnectOptions::from_str(url).map_err(|_| StoreError::BadUrl(target.clone()))?;
    let unreachable = |e: sqlx::Error| StoreError::Unreachable {
        target: target.clone(),
        reason: e.to_string(),
    };
    // The schema must exist before any connection can put it on its search_path.
    let bootstrap = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base.clone())
        .await
        .map_err(unreachable)?;
    let ddl = format!(
        "CREATE SCHEMA IF NOT EXISTS \"{}\"",
        schema.replace('"', "")
    );
    sqlx::raw_sql(&ddl).execute(&bootstrap).await?;
    bootstrap.close().await;
    let opts = base.options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(unreachable)?;
    Ok(Db::Postgres {
        pool,
        schema: schema.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_backend_and_secrets_are_redacted() {
        let d = Path::new("/data");
        match Backend::from_url("sqlite://", d, Durability::Full, "").unwrap() {
            Backend::Sqlite { dir, .. } => assert_eq!(dir, d),
            b => panic!("{b:?}"),
        }
        match Backend::from_url("sqlite:///var/x", d, Durability::Full, "").unwrap() {
            Backend::Sqlite { dir, .. } => assert_eq!(dir, Path::new("/var/x")),
            b => panic!("{b:?}"),
        }
        assert!(matches!(
            Backend::from_url("postgres://u:p@h/db", d, Durability::Full, "").unwrap(),
            Backend::Postgres { .. }
        ));
        let e = Backend::from_url("mysql://root:pw@h/db", d, Durability::Full, "").unwrap_err();
        assert!(!e.to_string().contains("pw"), "{e}");
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
