//! Shared by the cart tests: a cart context on every backend under test, priced
//! from an in-memory catalog.

#![allow(dead_code)]

use flowline_cart::{Carts, PriceSource, PricedProduct};
use flowline_core::{Currency, Money};
use flowline_http::{ApiError, BoxFuture, RequestContext};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The catalog as the cart sees it; tests change it between reads.
#[derive(Default)]
pub struct Prices(Mutex<HashMap<String, PricedProduct>>);

impl Prices {
    pub fn set(&self, id: &str, amount: i64, currency: &str, in_stock: bool) {
        let p = PricedProduct {
            title: format!("Product {id}"),
            price: Money {
                amount,
                currency: Currency::parse(currency).unwrap(),
            },
            in_stock,
        };
        self.0.lock().unwrap().insert(id.to_owned(), p);
    }

    pub fn remove(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}

impl PriceSource for Prices {
    fn product<'a>(
        &'a self,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<PricedProduct>, ApiError>> {
        let p = self.0.lock().unwrap().get(product_id).cloned();
        Box::pin(async move { Ok(p) })
    }
}

/// One backend's cart context, kept alive (temp dir) for the test.
pub struct Env {
    pub name: &'static str,
    pub carts: Arc<Carts>,
    pub prices: Arc<Prices>,
    _dir: Option<tempfile::TempDir>,
}

/// SQLite always; PostgreSQL too when `FLOWLINE_TEST_POSTGRES_URL` is set, in
/// a schema prefix of its own so parallel tests never meet.
pub async fn envs() -> Vec<Env> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut backends = vec![(
        Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: Durability::Relaxed,
        },
        Some(dir),
    )];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        backends.push((
            Backend::Postgres {
                url,
                schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
                max_connections: 8,
            },
            None,
        ));
    }
    let mut out = Vec::new();
    for (backend, dir) in backends {
        let db = Db::open(&backend, "cart").await.expect("open cart db");
        let log = EventLog::open(&backend, LogOptions::default())
            .await
            .expect("open log");
        let prices = Arc::new(Prices::default());
        let carts = flowline_cart::open(db.clone(), Relay::new(db, log), prices.clone())
            .await
            .expect("open carts");
        out.push(Env {
            name: backend.name(),
            carts: Arc::new(carts),
            prices,
            _dir: dir,
        });
    }
    out
}

pub fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: "corr-1".into(),
        request_id: "req-1".into(),
    }
}

/// Events waiting in the outbox, oldest first: (type, key, payload).
pub async fn events(db: &Db) -> Vec<(String, String, serde_json::Value)> {
    let rows: Vec<(String, String, String, String)> = flowline_store::on_pool!(db, |p| {
        sqlx::query_as("SELECT event_type, event_key, topic, payload FROM outbox ORDER BY id")
            .fetch_all(p)
            .await
    })
    .unwrap();
    rows.into_iter()
        .map(|(t, k, topic, p)| {
            assert_eq!(topic, flowline_cart::TOPIC);
            (t, k, serde_json::from_str(&p).unwrap())
        })
        .collect()
}

pub fn fields(e: &ApiError) -> Vec<String> {
    e.0.errors.iter().map(|f| f.field.clone()).collect()
}
