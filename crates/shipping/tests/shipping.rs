//! Shipments against a real database: SQLite always, PostgreSQL too when
//! `FLOWLINE_TEST_POSTGRES_URL` is set.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use flowline_core::Timestamp;
use flowline_http::{Principal, RequestContext};
use flowline_shipping::routing::Point;
use flowline_shipping::{
    NewShipment, RoutePlanRequest, ShipAddress, ShipItem, ShipmentEvent, Shipping, Status, TOPIC,
};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use tower::ServiceExt;

struct Env {
    ship: Arc<Shipping>,
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
        let db = Db::open(&b, "shipping").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        let ship = Shipping::open(db, relay).await.unwrap();
        v.push(Env {
            ship: Arc::new(ship),
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

fn new_shipment(order: &str, at: Option<(f64, f64)>) -> NewShipment {
    NewShipment {
        order_id: order.into(),
        order_number: format!("FL-{order}"),
        user_id: "u1".into(),
        address: ShipAddress {
            name: "Ana Souza".into(),
            line1: "Rua Augusta 1000".into(),
            line2: None,
            city: "São Paulo".into(),
            region: Some("SP".into()),
            postal_code: "01305-100".into(),
            country: "BR".into(),
            latitude: at.map(|p| p.0),
            longitude: at.map(|p| p.1),
        },
        items: vec![ShipItem {
            product_id: "p1".into(),
            title: "Kettle".into(),
            quantity: 2,
        }],
    }
}

/// The outbox's events for one order: (type, payload), in commit order.
async fn events(ship: &Shipping, order: &str) -> Vec<(String, ShipmentEvent)> {
    let rows: Vec<(String, String)> = flowline_store::on_pool!(&ship.db, |p| {
        sqlx::query_as(
        "SELECT event_type, payload FROM outbox WHERE topic = $1 AND event_key = $2 ORDER BY id"
    )
    .bind(TOPIC)
    .bind(order)
    .fetch_all(p)
    .await
    })
    .unwrap();
    rows.into_iter()
        .map(|(t, p)| (t, serde_json::from_str(&p).unwrap()))
        .collect()
}

async fn count(ship: &Shipping, sql: &str, key: &str) -> i64 {
    flowline_store::on_pool!(&ship.db, |p| sqlx::query_scalar(sql)
        .bind(key)
        .fetch_one(p)
        .await)
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_is_idempotent_by_order_even_concurrently() {
    for env in envs().await {
        let ship = env.ship.clone();
        let name = ship.db.backend_name();
        let a = ship.create(&ctx(), new_shipment("o1", None)).await.unwrap();
        assert_eq!(a.status, Status::Pending);
        assert_eq!(a.version, 1);
        assert!(a.tracking_number.starts_with("FLS") && a.tracking_number.len() == 13);
        // A retry, even with other content, returns the shipment as it is.
        let mut other = new_shipment("o1", Some((1.0, 1.0)));
        other.items[0].quantity = 9;
        let b = ship.create(&ctx(), other).await.unwrap();
        assert_eq!(a, b, "{name}");
        assert_eq!(ship.by_order("o1").await.unwrap(), Some(a.clone()));
        assert_eq!(ship.get(&a.id).await.unwrap(), a);

        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ship = ship.clone();
                tokio::spawn(async move { ship.create(&ctx(), new_shipment("o2", None)).await })
            })
            .collect();
        let mut ids = BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().id);
        }
        assert_eq!(ids.len(), 1, "{name}: every caller gets the one shipment");
        let rows = count(
            &ship,
            "SELECT COUNT(*) FROM shipments WHERE order_id = $1",
            "o2",
        )
        .await;
        assert_eq!(rows, 1, "{name}");
        for order in ["o1", "o2"] {
            let evs = events(&ship, order).await;
            let types: Vec<&str> = evs.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(types, ["shipment.created"], "{name} {order}");
        }
        let (_, created) = &events(&ship, "o1").await[0];
        assert_eq!(
            created,
            &ShipmentEvent {
                shipment_id: a.id.clone(),
                order_id: "o1".into(),
                order_number: "FL-o1".into(),
                user_id: "u1".into(),
                status: Status::Pending,
                tracking_number: a.tracking_number.clone(),
                at: a.created_at.clone(),
            }
        );
        assert_ne!(
            a.tracking_number,
            ship.by_order("o2").await.unwrap().unwrap().tracking_number
        );
    }
}

#[tokio::test]
async fn shipments_move_forward_one_step_at_a_time() {
    for env in envs().await {
        let ship = &env.ship;
        let name = ship.db.backend_name();
        let s = ship.create(&ctx(), new_shipment("o1", None)).await.unwrap();
        // Skipping a step, going back, or cancelling by courier is refused
        // and changes nothing.
        for to in [Status::InTransit, Status::Delivered, Status::Cancelled] {
            let e = ship.advance(&ctx(), &s.id, to, None).await.unwrap_err();
            assert_eq!(e.0.code, "invalid_state", "{name} {to:?}");
            assert_eq!(e.0.status, 409);
        }
        assert_eq!(ship.get(&s.id).await.unwrap(), s);
        assert_eq!(events(ship, "o1").await.len(), 1);

        let picked = ship
            .advance(&ctx(), &s.id, Status::Picked, Some("shelf B3".into()))
            .await
            .unwrap();
        assert_eq!((picked.status, picked.version), (Status::Picked, 2));
        // A retried scan is a no-op: same shipment, no event, no history row.
        let again = ship
            .advance(&ctx(), &s.id, Status::Picked, None)
            .await
            .unwrap();
        assert_eq!(again, picked);
        let e = ship
            .advance(&ctx(), &s.id, Status::Pending, None)
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "invalid_state");
        ship.advance(&ctx(), &s.id, Status::InTransit, None)
            .await
            .unwrap();
        let done = ship
            .advance(
                &ctx(),
                &s.id,
                Status::Delivered,
                Some("left with the porter".into()),
            )
            .await
            .unwrap();
        assert_eq!((done.status, done.version), (Status::Delivered, 4));
        let e = ship
            .advance(&ctx(), &s.id, Status::InTransit, None)
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "invalid_state");
        assert_eq!(ship.get(&s.id).await.unwrap(), done);

        let evs = events(ship, "o1").await;
        let types: Vec<&str> = evs.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            types,
            [
                "shipment.created",
                "shipment.picked",
                "shipment.in_transit",
                "shipment.delivered"
            ],
            "{name}"
        );
        let statuses: Vec<Status> = evs.iter().map(|e| e.1.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Pending,
                Status::Picked,
                Status::InTransit,
                Status::Delivered
            ]
        );
        assert!(evs
            .iter()
            .all(|(_, p)| p.shipment_id == s.id && p.tracking_number == s.tracking_number));
        assert_eq!(evs[3].1.at, done.updated_at);

        let history = ship.history(&s.id).await.unwrap();
        let h: Vec<(Status, Option<&str>)> = history
            .iter()
            .map(|c| (c.status, c.note.as_deref()))
            .collect();
        assert_eq!(
            h,
            [
                (Status::Pending, None),
                (Status::Picked, Some("shelf B3")),
                (Status::InTransit, None),
                (Status::Delivered, Some("left with the porter")),
            ]
        );
        assert_eq!(
            ship.advance(&ctx(), "nope", Status::Picked, None)
                .await
                .unwrap_err()
                .0
                .code,
            "not_found"
        );
        assert_eq!(ship.history("nope").await.unwrap_err().0.code, "not_found");
    }
}

#[tokio::test]
async fn cancel_stops_a_pending_shipment_but_not_a_picked_one() {
    for env in envs().await {
        let ship = &env.ship;
        let name = ship.db.backend_name();
        let s = ship.create(&ctx(), new_shipment("o1", None)).await.unwrap();
        let c = ship.cancel(&ctx(), "o1").await.unwrap().unwrap();
        assert_eq!(
            (c.id.as_str(), c.status, c.version),
            (s.id.as_str(), Status::Cancelled, 2)
        );
        // Twice is harmless and emits nothing more.
        assert_eq!(ship.cancel(&ctx(), "o1").await.unwrap(), Some(c.clone()));
        // A cancelled shipment cannot be picked; a retried create returns it.
        let e = ship
            .advance(&ctx(), &s.id, Status::Picked, None)
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "invalid_state");
        assert_eq!(
            ship.create(&ctx(), new_shipment("o1", None)).await.unwrap(),
            c
        );
        let types: Vec<String> = events(ship, "o1").await.into_iter().map(|e| e.0).collect();
        assert_eq!(types, ["shipment.created", "shipment.cancelled"], "{name}");

        let p = ship.create(&ctx(), new_shipment("o2", None)).await.unwrap();
        ship.advance(&ctx(), &p.id, Status::Picked, None)
            .await
            .unwrap();
        let e = ship.cancel(&ctx(), "o2").await.unwrap_err();
        assert_eq!((e.0.code, e.0.status), ("invalid_state", 409));
        assert_eq!(
            e.0.detail.as_deref(),
            Some("the order has already been picked for shipping")
        );
        assert_eq!(ship.get(&p.id).await.unwrap().status, Status::Picked);
        let types: Vec<String> = events(ship, "o2").await.into_iter().map(|e| e.0).collect();
        assert_eq!(types, ["shipment.created", "shipment.picked"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_before_the_create_leaves_a_tombstone_that_refuses_it() {
    for env in envs().await {
        let ship = env.ship.clone();
        let name = ship.db.backend_name();
        assert_eq!(ship.cancel(&ctx(), "o1").await.unwrap(), None);
        assert_eq!(ship.cancel(&ctx(), "o1").await.unwrap(), None);
        let e = ship
            .create(&ctx(), new_shipment("o1", None))
            .await
            .unwrap_err();
        assert_eq!((e.0.code, e.0.status), ("invalid_state", 409), "{name}");
        assert_eq!(ship.by_order("o1").await.unwrap(), None);
        assert!(events(&ship, "o1").await.is_empty());

        // Racing: whichever lands first, the order never ends with a live
        // shipment after its cancel returned.
        for i in 0..20 {
            let order = format!("race{i}");
            let (s2, o2) = (ship.clone(), order.clone());
            let create =
                tokio::spawn(async move { s2.create(&ctx(), new_shipment(&o2, None)).await });
            let (s3, o3) = (ship.clone(), order.clone());
            let cancel = tokio::spawn(async move { s3.cancel(&ctx(), &o3).await });
            let created = create.await.unwrap();
            let cancelled = cancel.await.unwrap().unwrap();
            let now = ship.by_order(&order).await.unwrap();
            match (created, cancelled) {
                (Ok(_), Some(c)) => {
                    assert_eq!(c.status, Status::Cancelled);
                    assert_eq!(now.unwrap().status, Status::Cancelled);
                }
                (Err(e), None) => {
                    assert_eq!(e.0.code, "invalid_state");
                    assert_eq!(now, None, "{name} {order}");
                }
                (c, x) => panic!("{name} {order}: create {c:?}, cancel {x:?}"),
            }
        }
    }
}

#[tokio::test]
async fn bad_shipments_are_refused_naming_fields_and_store_nothing() {
    for env in envs().await {
        let ship = &env.ship;
        let mut n = new_shipment("o1", Some((91.0, 10.0)));
        n.items[0].quantity = 0;
        n.address.country = "br".into();
        let e = ship.create(&ctx(), n).await.unwrap_err();
        assert_eq!(e.0.code, "validation_failed");
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            ["address.country", "address.latitude", "items[0].quantity"]
        );
        let mut n = new_shipment("o1", None);
        n.address.latitude = Some(1.0);
        n.items.clear();
        let e = ship.create(&ctx(), n).await.unwrap_err();
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["address.longitude", "items"]);
        assert_eq!(ship.by_order("o1").await.unwrap(), None);
        let e = ship
            .advance(&ctx(), "x", Status::Picked, Some("n".repeat(501)))
            .await
            .unwrap_err();
        assert_eq!(e.0.errors[0].field, "note");
    }
}

fn today() -> String {
    Timestamp::now().to_rfc3339()[..10].to_owned()
}

fn plan_req(date: &str, vehicles: i64, capacity: i64) -> RoutePlanRequest {
    RoutePlanRequest {
        date: date.into(),
        depot: Point {
            latitude: -23.55,
            longitude: -46.63,
        },
        vehicles: Some(vehicles),
        capacity: Some(capacity),
    }
}

#[tokio::test]
async fn routes_are_planned_over_the_days_open_shipments() {
    for env in envs().await {
        let ship = &env.ship;
        let name = ship.db.backend_name();
        // Ten addresses around the depot; one without coordinates, one
        // delivered, one cancelled, one still open from the day before.
        let mut placed = BTreeSet::new();
        for k in 0..10 {
            let a = k as f64 * 0.63;
            let at = (-23.55 + 0.05 * a.sin(), -46.63 + 0.05 * a.cos());
            let s = ship
                .create(&ctx(), new_shipment(&format!("o{k}"), Some(at)))
                .await
                .unwrap();
            placed.insert(s.id);
        }
        let picked = ship.by_order("o3").await.unwrap().unwrap();
        ship.advance(&ctx(), &picked.id, Status::Picked, None)
            .await
            .unwrap();
        let blind = ship
            .create(&ctx(), new_shipment("blind", None))
            .await
            .unwrap();
        for (order, to) in [("gone", Status::Delivered), ("stopped", Status::Cancelled)] {
            let s = ship
                .create(&ctx(), new_shipment(order, Some((-23.5, -46.6))))
                .await
                .unwrap();
            if to == Status::Cancelled {
                ship.cancel(&ctx(), order).await.unwrap();
            } else {
                for step in [Status::Picked, Status::InTransit, Status::Delivered] {
                    ship.advance(&ctx(), &s.id, step, None).await.unwrap();
                }
            }
        }
        let old = ship
            .create(&ctx(), new_shipment("old", Some((-23.6, -46.7))))
            .await
            .unwrap();
        let yesterday = Timestamp::now().as_micros() - 86_400_000_000;
        flowline_store::on_pool!(write & ship.db, |p| sqlx::query(
            "UPDATE shipments SET created_at = $1 WHERE id = $2"
        )
        .bind(yesterday)
        .bind(&old.id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .unwrap();
        // Still open: yesterday's backlog is planned today too.
        placed.insert(old.id.clone());

        let plan = ship.plan_routes(plan_req(&today(), 3, 4)).await.unwrap();
        assert_eq!(plan.unplaced, [blind.id.as_str()], "{name}");
        assert!(plan.unassigned.is_empty());
        let sizes: Vec<usize> = plan.routes.iter().map(|r| r.stops.len()).collect();
        assert_eq!(sizes, [4, 4, 3], "{name}");
        let routed: BTreeSet<String> = plan
            .routes
            .iter()
            .flat_map(|r| r.stops.iter().map(|s| s.shipment_id.clone()))
            .collect();
        assert_eq!(
            routed, placed,
            "{name}: each open shipment once, nothing else"
        );
        assert!(plan
            .routes
            .iter()
            .flat_map(|r| &r.stops)
            .any(|s| s.status == Status::Picked));
        for r in &plan.routes {
            assert!(r.distance_km > 0.0 && r.distance_km <= r.nearest_neighbour_km + 1e-9);
        }
        let total: f64 = plan.routes.iter().map(|r| r.distance_km).sum();
        assert!((plan.distance_km - total).abs() < 1e-9);

        // Too little room: the farthest wait.
        let tight = ship.plan_routes(plan_req(&today(), 2, 4)).await.unwrap();
        assert_eq!(tight.unassigned.len(), 3);
        assert_eq!(tight.routes.len(), 2);

        // Planned for the day before, only what existed then.
        let day_before = Timestamp::from_micros(yesterday).to_rfc3339()[..10].to_owned();
        let plan = ship
            .plan_routes(plan_req(&day_before, 1, 100))
            .await
            .unwrap();
        let ids: Vec<&str> = plan.routes[0]
            .stops
            .iter()
            .map(|s| s.shipment_id.as_str())
            .collect();
        assert_eq!(ids, [old.id.as_str()]);
        let empty = ship
            .plan_routes(plan_req("2001-01-01", 1, 1))
            .await
            .unwrap();
        assert!(empty.routes.is_empty() && empty.unplaced.is_empty());
        assert_eq!(empty.distance_km, 0.0);
    }
}

#[tokio::test]
async fn bad_route_requests_name_every_field() {
    let env = envs().await.remove(0);
    let mut req = plan_req("2024-02-30", 0, 501);
    req.depot = Point {
        latitude: -91.0,
        longitude: 180.5,
    };
    let e = env.ship.plan_routes(req).await.unwrap_err();
    assert_eq!((e.0.code, e.0.status), ("validation_failed", 422));
    let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "date",
            "depot.latitude",
            "depot.longitude",
            "vehicles",
            "capacity"
        ]
    );
    let mut req = plan_req(&today(), 1, 1);
    req.vehicles = None;
    req.capacity = None;
    let plan = env.ship.plan_routes(req).await.unwrap();
    assert_eq!((plan.vehicles, plan.capacity), (1, 100));
}

/// What the server's authentication and edge steps would have attached.
async fn call(
    router: &axum::Router,
    user: &str,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let mut req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    req.extensions_mut().insert(Principal {
        user_id: user.into(),
        session_id: "s".into(),
        roles: vec![],
    });
    req.extensions_mut().insert(ctx());
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (status, v)
}

#[tokio::test]
async fn routes_serve_owners_and_couriers_with_problems_for_the_rest() {
    let env = envs().await.remove(0);
    let (customer, admin) = flowline_shipping::routes::routes(env.ship.clone());
    let (customer, admin): (axum::Router, axum::Router) = (customer, admin);
    let s = env
        .ship
        .create(&ctx(), new_shipment("o1", Some((-23.56, -46.64))))
        .await
        .unwrap();
    let own = format!("/shipments/{}", s.id);
    let (st, v) = call(&customer, "u1", Method::GET, &own, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["tracking_number"], s.tracking_number.as_str());
    assert_eq!(v["status"], "PENDING");
    let (st, v) = call(&customer, "u2", Method::GET, &own, None).await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    let status = format!("/admin/shipments/{}/status", s.id);
    let (st, v) = call(
        &admin,
        "courier",
        Method::POST,
        &status,
        Some(json!({"status": "PICKED", "note": "ok"})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "PICKED");
    let (st, v) = call(
        &admin,
        "courier",
        Method::POST,
        &status,
        Some(json!({"status": "DELIVERED"})),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("invalid_state"))
    );
    let (st, _) = call(
        &admin,
        "courier",
        Method::POST,
        &status,
        Some(json!({"status": "LOST"})),
    )
    .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);

    let (st, v) = call(
        &admin,
        "a",
        Method::GET,
        &format!("/admin/shipments/{}", s.id),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["id"], s.id.as_str());
    assert_eq!(v["history"].as_array().unwrap().len(), 2);
    assert_eq!(v["history"][1]["note"], "ok");

    let (st, v) = call(
        &admin,
        "a",
        Method::GET,
        "/admin/shipments?status=PICKED&limit=10",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    let (st, v) = call(
        &admin,
        "a",
        Method::GET,
        "/admin/shipments?status=PENDING",
        None,
    )
    .await;
    assert_eq!(
        (st, v["items"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
    let (st, _) = call(&admin, "a", Method::GET, "/admin/shipments?limit=0", None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = call(
        &admin,
        "a",
        Method::GET,
        "/admin/shipments?status=LOST",
        None,
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    let body = json!({"date": today(), "depot": {"latitude": -23.55, "longitude": -46.63}});
    let (st, v) = call(
        &admin,
        "a",
        Method::POST,
        "/admin/shipping/routes",
        Some(body),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["routes"][0]["stops"][0]["shipment_id"], s.id.as_str());
    let body = json!({"date": "yesterday", "depot": {"latitude": 0, "longitude": 0}});
    let (st, v) = call(
        &admin,
        "a",
        Method::POST,
        "/admin/shipping/routes",
        Some(body),
    )
    .await;
    assert_eq!(
        (st, v["errors"][0]["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("date"))
    );
}

#[test]
fn every_route_is_documented() {
    use utoipa::OpenApi;
    let doc = flowline_shipping::routes::ShippingApi::openapi();
    let paths: BTreeSet<&str> = doc.paths.paths.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        BTreeSet::from([
            "/api/v1/admin/shipments",
            "/api/v1/admin/shipments/{id}",
            "/api/v1/admin/shipments/{id}/status",
            "/api/v1/admin/shipping/routes",
            "/api/v1/shipments/{id}",
        ])
    );
}
