//! Shared by the store's test binaries: the backends every suite runs on.

#![allow(dead_code)]

use flowline_store::{Backend, Db, Durability};

/// A backend to test, kept alive (temp dir) for the test's duration.
pub struct TestBackend {
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl TestBackend {
    pub fn name(&self) -> &'static str {
        self.backend.name()
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
            _dir: None,
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
