//! Reservations against a real database: SQLite always, PostgreSQL too when
//! `FLOWLINE_TEST_POSTGRES_URL` is set.

use flowline_http::RequestContext;
use flowline_inventory::{Inventory, ReservationStatus, ReserveItem, ReserveRequest, SetStock};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use std::sync::Arc;

struct Env {
    inv: Arc<Inventory>,
    _log: EventLog,
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
                max_connections: 32,
            },
            tempfile::tempdir().unwrap(),
        ));
    }
    let mut v = Vec::new();
    for (b, dir) in backends {
        let log = EventLog::open(&b, LogOptions::default()).await.unwrap();
        let db = Db::open(&b, "inventory").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        let inv = Inventory::open(db, relay, &Default::default())
            .await
            .unwrap();
        v.push(Env {
            inv: Arc::new(inv),
            _log: log,
            _dir: dir,
        });
    }
    v
}

fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: "test".into(),
        request_id: flowline_core::id::new_id().to_string(),
    }
}

fn one(order: &str, product: &str, quantity: i64) -> ReserveRequest {
    ReserveRequest {
        order_id: order.into(),
        items: vec![ReserveItem {
            product_id: product.into(),
            quantity,
            warehouse: None,
        }],
        ttl_minutes: None,
        ttl_seconds: None,
    }
}

async fn stock(inv: &Inventory, product: &str, n: i64) {
    let set = SetStock {
        on_hand: n,
        warehouse: None,
        reason: None,
    };
    inv.set_stock(&ctx(), product, set).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_units_go_to_exactly_as_many_orders_as_there_are_units() {
    for env in envs().await {
        let inv = env.inv.clone();
        stock(&inv, "hot", 50).await;
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let inv = inv.clone();
                tokio::spawn(
                    async move { inv.reserve(&ctx(), one(&format!("o{i}"), "hot", 1)).await },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e.0.code, "insufficient_stock"),
            }
        }
        assert_eq!(ok, 50, "{}", inv.db.backend_name());
        let level = inv.level_now("hot").await.unwrap();
        assert_eq!(
            (level.on_hand, level.reserved, level.available),
            (50, 50, 0)
        );
        // Confirming all 50 deducts them; the count ends at zero, never below.
        for i in 0..200 {
            let _ = inv.confirm(&ctx(), &format!("o{i}")).await;
        }
        let level = inv.level_now("hot").await.unwrap();
        assert_eq!((level.on_hand, level.reserved, level.available), (0, 0, 0));
    }
}

#[tokio::test]
async fn a_reservation_is_all_or_nothing_and_idempotent_by_order() {
    for env in envs().await {
        let inv = &env.inv;
        stock(inv, "a", 5).await;
        stock(inv, "b", 1).await;
        let both = |order: &str, qa: i64, qb: i64| ReserveRequest {
            order_id: order.into(),
            items: vec![
                ReserveItem {
                    product_id: "a".into(),
                    quantity: qa,
                    warehouse: None,
                },
                ReserveItem {
                    product_id: "b".into(),
                    quantity: qb,
                    warehouse: None,
                },
            ],
            ttl_minutes: None,
            ttl_seconds: None,
        };
        let e = inv.reserve(&ctx(), both("o1", 2, 2)).await.unwrap_err();
        assert_eq!(e.0.code, "insufficient_stock");
        assert!(
            e.0.errors.iter().any(|f| f.field == "items.b"),
            "{:?}",
            e.0.errors
        );
        // Nothing was held for `a` either.
        assert_eq!(inv.level_now("a").await.unwrap().reserved, 0);
        let (r, created) = inv.reserve(&ctx(), both("o1", 2, 1)).await.unwrap();
        assert!(created);
        assert_eq!(r.status, ReservationStatus::Held);
        let (again, created) = inv.reserve(&ctx(), both("o1", 2, 1)).await.unwrap();
        assert!(!created);
        assert_eq!(again, r);
        assert_eq!(inv.level_now("a").await.unwrap().reserved, 2);
        let e = inv.reserve(&ctx(), both("o1", 1, 1)).await.unwrap_err();
        assert_eq!(e.0.code, "conflict");
        // Release returns the units; twice is harmless; confirm after release is refused.
        inv.release(&ctx(), "o1").await.unwrap();
        inv.release(&ctx(), "o1").await.unwrap();
        assert_eq!(inv.level_now("a").await.unwrap().available, 5);
        // A retried command for a finished reservation says so; it holds nothing.
        let e = inv.reserve(&ctx(), both("o1", 2, 1)).await.unwrap_err();
        assert_eq!(e.0.code, "invalid_state");
        assert_eq!(
            inv.confirm(&ctx(), "o1").await.unwrap_err().0.code,
            "invalid_state"
        );
        // Stock cannot be set below what is reserved.
        inv.reserve(&ctx(), one("o2", "b", 1)).await.unwrap();
        let e = inv
            .set_stock(
                &ctx(),
                "b",
                SetStock {
                    on_hand: 0,
                    warehouse: None,
                    reason: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "conflict");
        let moves = inv.movements("a", 100).await.unwrap();
        let reasons: Vec<&str> = moves.iter().map(|m| m.reason.as_str()).collect();
        assert_eq!(reasons, ["released", "reserved", "adjustment"]);
    }
}

#[tokio::test]
async fn expired_reservations_return_their_stock_and_cannot_be_confirmed() {
    for env in envs().await {
        let inv = &env.inv;
        stock(inv, "p", 3).await;
        let mut req = one("late", "p", 2);
        req.ttl_seconds = Some(1);
        inv.reserve(&ctx(), req).await.unwrap();
        inv.reserve(&ctx(), one("kept", "p", 1)).await.unwrap();
        assert_eq!(inv.expire_due().await.unwrap(), 0);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        assert_eq!(
            inv.confirm(&ctx(), "late").await.unwrap_err().0.code,
            "invalid_state"
        );
        assert_eq!(
            inv.reservation("late").await.unwrap().status,
            ReservationStatus::Expired
        );
        assert_eq!(inv.expire_due().await.unwrap(), 0);
        let level = inv.level_now("p").await.unwrap();
        assert_eq!((level.on_hand, level.reserved, level.available), (3, 1, 2));
        inv.confirm(&ctx(), "kept").await.unwrap();
        let level = inv.level_now("p").await.unwrap();
        assert_eq!((level.on_hand, level.reserved), (2, 0));
    }
}

#[tokio::test]
async fn bad_requests_are_refused_naming_fields_and_store_nothing() {
    for env in envs().await {
        let inv = &env.inv;
        stock(inv, "p", 3).await;
        let e = inv.reserve(&ctx(), one("o", "p", -1)).await.unwrap_err();
        assert_eq!(e.0.code, "validation_failed");
        assert_eq!(e.0.errors[0].field, "items[0].quantity");
        let mut req = one("o", "p", 1);
        req.ttl_minutes = Some(0);
        assert_eq!(
            inv.reserve(&ctx(), req).await.unwrap_err().0.errors[0].field,
            "ttl_minutes"
        );
        let e = inv
            .set_stock(
                &ctx(),
                "p",
                SetStock {
                    on_hand: -5,
                    warehouse: None,
                    reason: None,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.0.errors[0].field, "on_hand");
        assert!(inv.reservation("o").await.is_err());
        assert_eq!(inv.level_now("p").await.unwrap().on_hand, 3);
    }
}
