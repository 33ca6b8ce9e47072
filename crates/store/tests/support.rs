//! Shared by the store's test binaries: the backends every suite runs on.

#![allow(dead_code)]

use flowline_store::{Backend, Db, Durability, EventLog, LogOptions, NatsConfig};

/// A backend to test, kept alive (temp dir) for the test's duration.
pub struct TestBackend {
    pub backend: Backend,
    /// The log's events on NATS JetStream (a fresh prefix per backend).
    pub nats: Option<NatsConfig>,
    _dir: Option<tempfile::TempDir>,
}

impl TestBackend {
    pub fn name(&self) -> String {
        match &self.nats {
            Some(_) => format!("{}+nats", self.backend.name()),
            None => self.backend.name().to_owned(),
        }
    }

    /// A log on this backend; a second call is a second process's view.
    pub async fn log(&self, opts: LogOptions) -> EventLog {
        EventLog::open_with(&self.backend, opts, self.nats.clone())
            .await
            .expect("open log")
    }
}

/// SQLite always; PostgreSQL too when `FLOWLINE_TEST_POSTGRES_URL` is set. Each
/// PostgreSQL backend gets its own schema prefix, so tests running in parallel
/// never see each other's tables.
pub fn backends(durability: Durability) -> Vec<TestBackend> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v = vec![TestBackend {
        backend: Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability,
        },
        nats: None,
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        let prefix = format!("t{}_", uuid::Uuid::now_v7().simple());
        v.push(TestBackend {
            backend: Backend::Postgres {
                url,
                schema_prefix: prefix,
                max_connections: 8,
            },
            nats: None,
            _dir: None,
        });
    }
    // NATS JetStream carries the events; the log's groups, leases and dead
    // letters stay in SQL (PostgreSQL when configured, else SQLite).
    if let Ok(url) = std::env::var("FLOWLINE_TEST_NATS_URL") {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = match std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
            Ok(pg) => Backend::Postgres {
                url: pg,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 8,
            },
            Err(_) => Backend::Sqlite {
                dir: dir.path().to_path_buf(),
                durability,
            },
        };
        let mut cfg = NatsConfig::new(url);
        cfg.prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        v.push(TestBackend {
            backend,
            nats: Some(cfg),
            _dir: Some(dir),
        });
    }
    v
}

pub async fn service_db(b: &TestBackend, name: &str) -> Db {
    let db = Db::open(&b.backend, name).await.expect("open service db");
    db.migrate(flowline_store::outbox::KERNEL_MIGRATIONS)
        .await
        .expect("kernel migrations");
    db
}
