//! The order event store on a real database: SQLite always, PostgreSQL too
//! when `FLOWLINE_TEST_POSTGRES_URL` is set.

use flowline_orders::model::{kind, order_number, Created, OrderLine, OrderStatus, ShipTo};
use flowline_orders::store::{self, AppendError};
use flowline_orders::MIGRATIONS;
use flowline_store::{on_pool, Backend, Db, Durability};
use serde_json::json;

struct TestDb {
    db: Db,
    _dir: Option<tempfile::TempDir>,
}

async fn databases() -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::Sqlite {
        dir: dir.path().to_path_buf(),
        durability: Durability::Relaxed,
    };
    let mut v = vec![TestDb {
        db: Db::open(&backend, "orders").await.unwrap(),
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        let backend = Backend::Postgres {
            url,
            schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
            max_connections: 8,
        };
        v.push(TestDb {
            db: Db::open(&backend, "orders").await.unwrap(),
            _dir: None,
        });
    }
    for t in &v {
        t.db.migrate(MIGRATIONS).await.unwrap();
    }
    v
}

fn created(id: &str, n: i64) -> serde_json::Value {
    serde_json::to_value(Created {
        order_id: id.into(),
        number: order_number(2026, n),
        user_id: "u1".into(),
        cart_id: "c1".into(),
        currency: "BRL".into(),
        total: 2000,
        items: vec![OrderLine {
            product_id: "p1".into(),
            title: "Mug".into(),
            quantity: 2,
            unit_price: 1000,
        }],
        shipping_address: ShipTo {
            name: "Ana".into(),
            line1: "Rua 1".into(),
            line2: None,
            city: "São Paulo".into(),
            region: None,
            postal_code: "01310-100".into(),
            country: "BR".into(),
            latitude: None,
            longitude: None,
        },
        payment_method: "upi".into(),
    })
    .unwrap()
}

#[tokio::test]
async fn appends_are_checked_against_the_stream_version_and_the_log_is_append_only() {
    for t in databases().await {
        let db = &t.db;
        let name = db.backend_name();
        let mut tx = db.begin().await.unwrap();
        let s = store::append(&mut tx, "o1", Some(0), &[(kind::CREATED, created("o1", 1))])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!((s.version, s.status), (1, OrderStatus::Pending), "{name}");

        // A writer that decided on version 0 again is refused.
        let mut tx = db.begin().await.unwrap();
        let e = store::append(&mut tx, "o1", Some(0), &[(kind::CREATED, created("o1", 1))])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                AppendError::Conflict {
                    expected: 0,
                    actual: 1
                }
            ),
            "{name}: {e:?}"
        );
        tx.rollback().await.unwrap();

        // Two appenders at the end, at once: both land, one after the other.
        let (a, b) = tokio::join!(
            async {
                let mut tx = db.begin().await.unwrap();
                let s = store::append(&mut tx, "o1", None, &[(kind::STOCK_RESERVED, json!({}))])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                s.version
            },
            async {
                let mut tx = db.begin().await.unwrap();
                let s = store::append(&mut tx, "o1", None, &[(kind::CANCEL_REQUESTED, json!({}))])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                s.version
            }
        );
        let mut versions = [a, b];
        versions.sort_unstable();
        assert_eq!(versions, [2, 3], "{name}");
        let events = store::load(db, "o1").await.unwrap();
        let got: Vec<i64> = events.iter().map(|e| e.version).collect();
        assert_eq!(got, [1, 2, 3], "{name}");
        let s = store::projected(db, "o1").await.unwrap().unwrap();
        assert!(s.cancel_requested && s.version == 3, "{name}: {s:?}");

        // The stream cannot be edited or shortened.
        for sql in [
            "UPDATE order_events SET event_type = 'PAID' WHERE order_id = 'o1'",
            "DELETE FROM order_events WHERE order_id = 'o1'",
        ] {
            let r = on_pool!(write db, |p| sqlx::query(sql).execute(p).await.map(|_| ()));
            assert!(r.is_err(), "{name}: {sql} was allowed");
        }
    }
}

#[tokio::test]
async fn the_projection_is_rebuilt_from_the_events_alone() {
    for t in databases().await {
        let db = &t.db;
        let name = db.backend_name();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let mut tx = db.begin().await.unwrap();
            store::append(
                &mut tx,
                id,
                Some(0),
                &[(kind::CREATED, created(id, i as i64 + 1))],
            )
            .await
            .unwrap();
            store::append(
                &mut tx,
                id,
                None,
                &[(
                    kind::PAID,
                    json!({ "payment_id": format!("pay-{id}"), "amount": 2000 }),
                )],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        let mut before = Vec::new();
        for id in ["a", "b", "c"] {
            before.push(store::projected(db, id).await.unwrap());
        }
        // Damage the projection: the rebuild restores it from the events.
        on_pool!(write db, |p| sqlx::query("UPDATE orders SET status = 'DELIVERED', state = '{}'")
            .execute(p)
            .await
            .map(|_| ()))
        .unwrap();
        assert_eq!(store::rebuild(db).await.unwrap(), 3, "{name}");
        for (id, b) in ["a", "b", "c"].iter().zip(before) {
            let now = store::projected(db, id).await.unwrap();
            assert_eq!(now, b, "{name} {id}");
            assert_eq!(now.unwrap().status, OrderStatus::Paid, "{name}");
        }
        // Numbers are per year and gapless within a transaction's commit.
        let mut tx = db.begin().await.unwrap();
        let n1 = store::next_number(&mut tx, 2031).await.unwrap();
        tx.rollback().await.unwrap();
        let mut tx = db.begin().await.unwrap();
        let n2 = store::next_number(&mut tx, 2031).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            (n1, n2),
            (1, 1),
            "{name}: a rolled back number is given again"
        );
    }
}
