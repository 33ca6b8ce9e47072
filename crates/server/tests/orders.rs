//! Orders over HTTP on the real binary: the place saga end to end, every
//! failure point compensated, customer cancellation, the event-sourced
//! history and its replay, and bad input.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

/// A shop: an admin, products with stock, and a customer ready to order.
struct Shop {
    s: Server,
    admin: String,
    user: String,
    address: String,
    card: String,
}

fn open_shop(data: &Path, env: &[(&str, &str)]) -> Shop {
    let s = Server::start(data, env);
    let admin = admin_token_env(&s, data, env);
    let user = register(&s, "ana@example.com");
    let body = json!({ "name": "Ana Souza", "line1": "Rua das Flores, 100", "city": "São Paulo",
        "postal_code": "01310-100", "country": "BR", "latitude": -23.561, "longitude": -46.656 });
    let (st, _, a) = send(
        agent().post(&s.url("/api/v1/users/me/addresses")),
        &user,
        Some(body),
    );
    assert_eq!(st, 201, "{a}");
    let address = a["id"].as_str().unwrap().to_owned();
    let card = tokenize(&s, &user, "4242 4242 4242 4242");
    Shop {
        s,
        admin,
        user,
        address,
        card,
    }
}

impl Shop {
    fn cart(&self, items: &[(&str, i64)]) -> String {
        let (st, _, cart) = send(agent().post(&self.s.url("/api/v1/carts")), &self.user, None);
        assert_eq!(st, 201, "{cart}");
        let id = cart["id"].as_str().unwrap().to_owned();
        for (p, q) in items {
            let url = self.s.url(&format!("/api/v1/carts/{id}/items"));
            let (st, _, b) = send(
                agent().post(&url),
                &self.user,
                Some(json!({ "product_id": p, "quantity": q })),
            );
            assert_eq!(st, 200, "{b}");
        }
        id
    }

    fn place(&self, key: &str, cart: &str, card: &str) -> (u16, Option<String>, Value) {
        let body = json!({ "cart_id": cart, "shipping_address_id": self.address,
            "payment": { "method": "credit_card", "card_token": card } });
        let req = agent()
            .post(&self.s.url("/api/v1/orders"))
            .set("idempotency-key", key);
        send(req, &self.user, Some(body))
    }

    fn order(&self, id: &str) -> Value {
        let (st, _, o) = send(
            agent().get(&self.s.url(&format!("/api/v1/orders/{id}"))),
            &self.user,
            None,
        );
        assert_eq!(st, 200, "{o}");
        o
    }

    fn wait_status(&self, id: &str, status: &str) -> Value {
        let mut last = Value::Null;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            last = self.order(id);
            if last["status"] == status {
                return last;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let saga = self.admin_get(&format!("/api/v1/admin/sagas/{id}"));
        panic!("order {id} is not {status}: {last:#}\nsaga: {saga:#}");
    }

    fn admin_get(&self, path: &str) -> Value {
        let (st, _, b) = send(agent().get(&self.s.url(path)), &self.admin, None);
        assert_eq!(st, 200, "{path}: {b}");
        b
    }

    fn stock(&self, product: &str) -> (i64, i64, i64) {
        let l = self.admin_get(&format!("/api/v1/inventory/{product}"));
        (
            l["on_hand"].as_i64().unwrap(),
            l["reserved"].as_i64().unwrap(),
            l["available"].as_i64().unwrap(),
        )
    }

    fn history(&self, id: &str) -> Vec<String> {
        let (_, _, h) = send(
            agent().get(&self.s.url(&format!("/api/v1/orders/{id}/history"))),
            &self.user,
            None,
        );
        h["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    }

    fn payment(&self, order: &Value) -> Value {
        let id = order["payment"]["payment_id"]
            .as_str()
            .expect("a payment id");
        self.admin_get(&format!("/api/v1/payments/{id}"))
    }

    fn shipment_status(&self, id: &str, status: &str) -> (u16, Value) {
        let url = self.s.url(&format!("/api/v1/admin/shipments/{id}/status"));
        let (st, _, b) = send(
            agent().post(&url),
            &self.admin,
            Some(json!({ "status": status })),
        );
        (st, b)
    }
}

fn types(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The PostgreSQL settings for a server in its own schemas, if configured.
fn postgres() -> Option<(String, String)> {
    let url = std::env::var("FLOWLINE_TEST_POSTGRES_URL").ok()?;
    Some((url, format!("o{}_", uuid::Uuid::now_v7().simple())))
}

#[test]
fn an_order_is_placed_confirmed_followed_live_shipped_and_delivered() {
    happy_path(&[]);
}

#[test]
fn an_order_round_trip_and_a_cancellation_on_postgres() {
    let Some((url, prefix)) = postgres() else {
        eprintln!("FLOWLINE_TEST_POSTGRES_URL not set: SQLite-only run");
        return;
    };
    let env = [
        ("FLOWLINE__DATABASE__URL", url.as_str()),
        ("FLOWLINE__DATABASE__SCHEMA_PREFIX", prefix.as_str()),
    ];
    happy_path(&env);
    let prefix2 = format!("{prefix}b");
    let env = [
        ("FLOWLINE__DATABASE__URL", url.as_str()),
        ("FLOWLINE__DATABASE__SCHEMA_PREFIX", prefix2.as_str()),
    ];
    projection_and_cancellation(&env);
}

fn happy_path(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shop = open_shop(&data, env);
    let mug = product(&shop.s, &shop.admin, "MUG-1", 1250, "BRL");
    let pan = product(&shop.s, &shop.admin, "PAN-1", 8990, "BRL");
    set_stock(&shop.s, &shop.admin, &mug, 10);
    set_stock(&shop.s, &shop.admin, &pan, 5);
    let cart = shop.cart(&[(&mug, 2), (&pan, 1)]);

    let (st, replayed, placed) = shop.place("order-key-1", &cart, &shop.card);
    assert_eq!((st, replayed), (202, None), "{placed}");
    let id = placed["id"].as_str().unwrap().to_owned();
    let number = placed["number"].as_str().unwrap();
    assert!(
        number.starts_with("FL-20") && number.len() == "FL-2026-000001".len(),
        "{number}"
    );
    assert_eq!(placed["location"], format!("/api/v1/orders/{id}"));

    // A retry with the same key is the same order, not a second one.
    let (st, replayed, again) = shop.place("order-key-1", &cart, &shop.card);
    assert_eq!((st, replayed.as_deref()), (202, Some("true")), "{again}");
    assert_eq!(again["id"], placed["id"]);

    // Follow it live: the SSE stream replays from the start and goes on.
    let res = agent()
        .get(&shop.s.url(&format!("/api/v1/orders/{id}/events")))
        .set("authorization", &format!("Bearer {}", shop.user))
        .call()
        .unwrap();
    assert_eq!(res.header("content-type"), Some("text/event-stream"));
    let mut seen = Vec::new();
    for line in BufReader::new(res.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            let ev: Value = serde_json::from_str(d).unwrap();
            seen.push(ev["type"].as_str().unwrap().to_owned());
            if ev["type"] == "CONFIRMED" {
                assert_eq!(ev["status"], "CONFIRMED");
                break;
            }
        }
    }
    assert_eq!(
        seen,
        types(&[
            "CREATED",
            "STOCK_RESERVED",
            "PAYMENT_AUTHORIZED",
            "PAID",
            "CONFIRMED"
        ])
    );

    let o = shop.wait_status(&id, "CONFIRMED");
    assert_eq!(o["number"], number);
    assert_eq!(
        o["total"],
        json!({ "amount": 2 * 1250 + 8990, "currency": "BRL" })
    );
    // Enriched from read models: the user's name and the catalog's titles.
    wait_until("the user read model", Duration::from_secs(10), || {
        shop.order(&id)["user"]["name"] == "Shopper"
    });
    let o = shop.order(&id);
    let names: Vec<&str> = o["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Product MUG-1", "Product PAN-1"]);
    assert_eq!(shop.stock(&mug), (8, 0, 8));
    assert_eq!(shop.stock(&pan), (4, 0, 4));
    let pay = shop.payment(&o);
    assert_eq!(
        (pay["status"].as_str(), pay["amount"].as_i64()),
        (Some("CAPTURED"), Some(11490))
    );
    // order.confirmed reached notifications: one email (and the welcome
    // email before it) in the local mailbox, and an in-app notification.
    let subject = format!("Order {number} confirmed");
    wait_until("the confirmation email", Duration::from_secs(10), || {
        let mail = shop.admin_get("/api/v1/admin/mailbox?to=ana@example.com");
        mail["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["subject"] == subject.as_str())
    });
    let mail = shop.admin_get("/api/v1/admin/mailbox?to=ana@example.com");
    let subjects: Vec<&str> = mail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["subject"].as_str().unwrap())
        .collect();
    assert_eq!(
        subjects.iter().filter(|s| **s == subject).count(),
        1,
        "{subjects:?}"
    );
    assert!(
        subjects.iter().any(|s| s.starts_with("Welcome")),
        "{subjects:?}"
    );
    let eml = mail["items"][0]["path"].as_str().unwrap();
    assert!(
        std::fs::read_to_string(eml).unwrap().contains("To: "),
        "{eml}"
    );
    wait_until("the in-app notification", Duration::from_secs(10), || {
        let (_, _, inbox) = send(
            agent().get(&shop.s.url("/api/v1/notifications")),
            &shop.user,
            None,
        );
        inbox["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "order_confirmed")
    });
    let tracking = o["shipment"]["tracking_number"]
        .as_str()
        .unwrap()
        .to_owned();
    let shipment = o["shipment"]["id"].as_str().unwrap().to_owned();
    // Billing turned the capture into an invoice.
    wait_until("the invoice", Duration::from_secs(10), || {
        let inv = shop.admin_get(&format!(
            "/api/v1/ledger/invoices?payment_id={}",
            pay["id"].as_str().unwrap()
        ));
        inv["items"].as_array().is_some_and(|a| a.len() == 1)
    });

    // The saga's timeline shows every step, in order, once.
    let saga = shop.admin_get(&format!("/api/v1/admin/sagas/{id}"));
    assert_eq!(saga["status"], "COMPLETED");
    let steps: Vec<&str> = saga["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "reserve_stock",
            "charge_payment",
            "confirm_stock",
            "create_shipment"
        ]
    );
    assert!(
        !saga.to_string().contains(&shop.card),
        "the card token leaked into the saga view"
    );
    let list = shop.admin_get("/api/v1/admin/sagas?status=COMPLETED");
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["id"] == id.as_str()));

    // The courier moves it; the order follows through shipping's events.
    for st in ["PICKED", "IN_TRANSIT"] {
        assert_eq!(shop.shipment_status(&shipment, st).0, 200);
    }
    let o = shop.wait_status(&id, "SHIPPED");
    assert_eq!(o["shipment"]["tracking_number"], tracking.as_str());
    // Too late to cancel, and shipping refuses to go backwards.
    let (st, _, e) = send(
        agent().post(&shop.s.url(&format!("/api/v1/orders/{id}/cancel"))),
        &shop.user,
        None,
    );
    assert_eq!(
        (st, e["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    assert_eq!(shop.shipment_status(&shipment, "PICKED").0, 409);
    assert_eq!(shop.shipment_status(&shipment, "DELIVERED").0, 200);
    shop.wait_status(&id, "DELIVERED");
    assert_eq!(
        shop.history(&id),
        types(&[
            "CREATED",
            "STOCK_RESERVED",
            "PAYMENT_AUTHORIZED",
            "PAID",
            "CONFIRMED",
            "SHIPPED",
            "DELIVERED"
        ])
    );

    // Resuming after version 6 gets DELIVERED alone, and the stream ends
    // there: nothing follows a final status.
    let res = agent()
        .get(&shop.s.url(&format!("/api/v1/orders/{id}/events")))
        .set("authorization", &format!("Bearer {}", shop.user))
        .set("last-event-id", "6")
        .call()
        .unwrap();
    let body = res.into_string().unwrap();
    let sent: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(json)
        .collect();
    assert_eq!(sent.len(), 1, "{body}");
    assert_eq!(
        (
            sent[0]["type"].as_str(),
            sent[0]["status"].as_str(),
            sent[0]["version"].as_i64()
        ),
        (Some("DELIVERED"), Some("DELIVERED"), Some(7))
    );
    assert!(body.contains("retry:"), "{body}");

    // `as_of` folds the events up to a time: just after creation it was PENDING.
    let (_, _, h) = send(
        agent().get(&shop.s.url(&format!("/api/v1/orders/{id}/history"))),
        &shop.user,
        None,
    );
    let created_at = h["events"][0]["occurred_at"].as_str().unwrap();
    let url = shop.s.url(&format!(
        "/api/v1/orders/{id}?as_of={}",
        created_at.replace('+', "%2B")
    ));
    let (st, _, past) = send(agent().get(&url), &shop.user, None);
    assert_eq!(
        (st, past["status"].as_str(), past["version"].as_i64()),
        (200, Some("PENDING"), Some(1)),
        "{past}"
    );
    let url = shop
        .s
        .url(&format!("/api/v1/orders/{id}?as_of=2000-01-01T00:00:00Z"));
    assert_eq!(send(agent().get(&url), &shop.user, None).0, 404);

    // Another user sees nothing of it.
    let eve = register(&shop.s, "eve@example.com");
    for path in ["", "/history", "/events"] {
        let url = shop.s.url(&format!("/api/v1/orders/{id}{path}"));
        assert_eq!(send(agent().get(&url), &eve, None).0, 404, "{path}");
    }

    // `flowline saga show` prints the same timeline.
    let (ok, out, err) = cli(
        &["saga", "show", &id, "--data-dir", data.to_str().unwrap()],
        env,
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("COMPLETED") && out.contains("create_shipment"),
        "{out}"
    );
}

#[test]
fn the_projection_is_rebuilt_by_replay_and_a_cancellation_undoes_everything() {
    projection_and_cancellation(&[]);
}

fn projection_and_cancellation(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shop = open_shop(&data, env);
    let mug = product(&shop.s, &shop.admin, "MUG-1", 1000, "BRL");
    set_stock(&shop.s, &shop.admin, &mug, 20);

    let mut ids = Vec::new();
    for i in 0..3 {
        let cart = shop.cart(&[(&mug, 1 + i)]);
        let (st, _, p) = shop.place(&format!("k{i}"), &cart, &shop.card);
        assert_eq!(st, 202, "{p}");
        ids.push(p["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        shop.wait_status(id, "CONFIRMED");
    }
    assert_eq!(shop.stock(&mug), (14, 0, 14));

    // The customer cancels the first (confirmed, not yet picked): the cancel
    // saga cancels the shipment, returns the stock and refunds.
    let (st, _, o) = send(
        agent().post(&shop.s.url(&format!("/api/v1/orders/{}/cancel", ids[0]))),
        &shop.user,
        None,
    );
    assert_eq!(
        (st, o["cancel_requested"].as_bool()),
        (202, Some(true)),
        "{o}"
    );
    let o = shop.wait_status(&ids[0], "CANCELLED");
    assert_eq!(o["cancel_reason"], "Cancelled at your request.");
    assert_eq!(o["payment"]["refunded"], 1000);
    assert_eq!(shop.payment(&o)["status"], "REFUNDED");
    assert_eq!(shop.stock(&mug), (15, 0, 15));
    let ship = shop.admin_get(&format!(
        "/api/v1/admin/shipments/{}",
        o["shipment"]["id"].as_str().unwrap()
    ));
    assert_eq!(ship["status"], "CANCELLED", "{ship}");
    let h = shop.history(&ids[0]);
    assert_eq!(
        h[h.len() - 3..].to_vec(),
        types(&["CANCEL_REQUESTED", "REFUNDED", "CANCELLED"])
    );

    // Once picked, a cancellation is refused by shipping and recorded.
    let second = shop.order(&ids[1]);
    let sid = second["shipment"]["id"].as_str().unwrap();
    assert_eq!(shop.shipment_status(sid, "PICKED").0, 200);
    let url = shop.s.url(&format!("/api/v1/orders/{}/cancel", ids[1]));
    assert_eq!(send(agent().post(&url), &shop.user, None).0, 202);
    wait_until("the refusal", Duration::from_secs(20), || {
        shop.order(&ids[1])["cancellation_refused"].is_string()
    });
    let o = shop.order(&ids[1]);
    assert_eq!(
        (o["status"].as_str(), o["cancel_requested"].as_bool()),
        (Some("CONFIRMED"), Some(false))
    );
    assert_eq!(shop.payment(&o)["status"], "CAPTURED");
    assert_eq!(shop.stock(&mug), (15, 0, 15));

    // GET /orders is a projection; dropping and replaying it changes nothing.
    let (_, _, before) = send(agent().get(&shop.s.url("/api/v1/orders")), &shop.user, None);
    assert_eq!(before["items"].as_array().unwrap().len(), 3);
    let (st, _, r) = send(
        agent().post(&shop.s.url("/api/v1/admin/orders/rebuild")),
        &shop.admin,
        None,
    );
    assert_eq!((st, r["orders"].as_u64()), (200, Some(3)), "{r}");
    let (_, _, after) = send(agent().get(&shop.s.url("/api/v1/orders")), &shop.user, None);
    assert_eq!(before, after);
    let (_, _, cancelled) = send(
        agent().get(&shop.s.url("/api/v1/orders?status=CANCELLED&limit=1")),
        &shop.user,
        None,
    );
    assert_eq!(cancelled["items"][0]["id"], ids[0].as_str());
    // Pages follow the cursor without repeats.
    let (_, _, p1) = send(
        agent().get(&shop.s.url("/api/v1/orders?limit=2")),
        &shop.user,
        None,
    );
    let next = p1["next"].as_str().unwrap();
    let (_, _, p2) = send(
        agent().get(&shop.s.url(&format!("/api/v1/orders?limit=2&cursor={next}"))),
        &shop.user,
        None,
    );
    assert_eq!(
        (p2["items"].as_array().unwrap().len(), &p2["next"]),
        (1, &Value::Null)
    );
    assert_eq!(p2["items"][0]["id"], ids[0].as_str());
}

#[test]
fn each_failure_point_cancels_the_order_and_leaves_every_context_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shop = open_shop(&data, &[]);
    let mug = product(&shop.s, &shop.admin, "MUG-1", 1000, "BRL");
    set_stock(&shop.s, &shop.admin, &mug, 3);

    // Out of stock at reservation: nothing to undo, nothing charged.
    let cart = shop.cart(&[(&mug, 3)]);
    set_stock(&shop.s, &shop.admin, &mug, 2);
    let (_, _, p) = shop.place("oos", &cart, &shop.card);
    let o = shop.wait_status(p["id"].as_str().unwrap(), "CANCELLED");
    assert_eq!(o["cancel_reason"], "Some items are out of stock.");
    assert_eq!(o["payment"]["payment_id"], Value::Null);
    assert_eq!(shop.stock(&mug), (2, 0, 2));

    // Declined card: the reservation is released.
    let declined = tokenize(&shop.s, &shop.user, "4000 0000 0000 9995");
    let cart = shop.cart(&[(&mug, 1)]);
    let (_, _, p) = shop.place("declined", &cart, &declined);
    let id = p["id"].as_str().unwrap();
    let o = shop.wait_status(id, "CANCELLED");
    assert_eq!(o["cancel_reason"], "Your card has insufficient funds.");
    wait_until("the cancellation email", Duration::from_secs(10), || {
        shop.admin_get("/api/v1/admin/mailbox?to=ana@example.com")["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"].as_str().unwrap().contains("insufficient funds"))
    });
    assert_eq!(shop.stock(&mug), (2, 0, 2));
    assert_eq!(
        shop.history(id),
        types(&["CREATED", "STOCK_RESERVED", "CANCELLED"])
    );
    let saga = shop.admin_get(&format!("/api/v1/admin/sagas/{id}"));
    assert_eq!(saga["status"], "COMPENSATED");
    let undo: Vec<&str> = saga["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["phase"] == "undo")
        .map(|t| t["step"].as_str().unwrap())
        .collect();
    assert_eq!(undo, ["reserve_stock"]);
    drop(shop);

    // Later failures, injected: after the charge (confirm fails) and after
    // the stock is sold (shipment fails, and the refund fails three times
    // first, which flags the saga stuck until it succeeds).
    for (points, extra_undo) in [
        (
            "confirm_stock:do=fatal",
            vec!["charge_payment", "reserve_stock"],
        ),
        (
            "create_shipment:do=fatal;charge_payment:undo=fail:3",
            vec!["confirm_stock", "charge_payment", "reserve_stock"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let shop = open_shop(
            &data,
            &[
                ("FLOWLINE__ORDERS__FAILPOINTS", points),
                ("FLOWLINE__ORDERS__SAGA_STUCK_AFTER", "2"),
            ],
        );
        let mug = product(&shop.s, &shop.admin, "MUG-1", 1000, "BRL");
        set_stock(&shop.s, &shop.admin, &mug, 5);
        let cart = shop.cart(&[(&mug, 2)]);
        let (_, _, p) = shop.place("late", &cart, &shop.card);
        let id = p["id"].as_str().unwrap();
        let o = shop.wait_status(id, "CANCELLED");
        assert_eq!(o["payment"]["refunded"], 2000, "{points}: {o}");
        assert_eq!(shop.payment(&o)["status"], "REFUNDED", "{points}");
        assert_eq!(shop.stock(&mug), (5, 0, 5), "{points}");
        let h = shop.history(id);
        assert_eq!(
            h[h.len() - 2..].to_vec(),
            types(&["REFUNDED", "CANCELLED"]),
            "{points}"
        );
        let saga = shop.admin_get(&format!("/api/v1/admin/sagas/{id}"));
        let mut undone: Vec<&str> = saga["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["phase"] == "undo" && t["status"] == "ok")
            .map(|t| t["step"].as_str().unwrap())
            .collect();
        undone.dedup();
        assert_eq!(undone, extra_undo, "{points}");
        if points.contains("undo=fail") {
            // Flagged stuck on the way; the metric and event say so.
            let (_, _, metrics) = call(agent().get(&shop.s.url("/metrics")), None);
            assert!(
                metrics.contains("flowline_sagas_stuck_flagged_total{saga=\"order.place\"} 1"),
                "{}",
                metrics
                    .lines()
                    .filter(|l| l.contains("saga"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        // Billing saw the capture and the refund: an invoice and a credit note.
        let pid = shop.payment(&o)["id"].as_str().unwrap().to_owned();
        wait_until("invoice and credit note", Duration::from_secs(10), || {
            let inv = shop.admin_get(&format!("/api/v1/ledger/invoices?payment_id={pid}"));
            inv["items"].as_array().is_some_and(|a| a.len() == 2)
        });
    }
}

#[test]
fn bad_orders_are_refused_with_problems_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shop = open_shop(&data, &[]);
    let mug = product(&shop.s, &shop.admin, "MUG-1", 1000, "BRL");
    set_stock(&shop.s, &shop.admin, &mug, 5);
    let cart = shop.cart(&[(&mug, 1)]);
    let url = shop.s.url("/api/v1/orders");
    let good = json!({ "cart_id": cart, "shipping_address_id": shop.address,
        "payment": { "method": "credit_card", "card_token": shop.card } });

    let (st, _, e) = send(agent().post(&url), &shop.user, Some(good.clone()));
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("idempotency_key_required")),
        "{e}"
    );
    let cases = [
        (
            json!({ "cart_id": cart, "shipping_address_id": shop.address, "payment": { "method": "cash" } }),
            "payment.method",
        ),
        (
            json!({ "cart_id": cart, "shipping_address_id": shop.address, "payment": { "method": "upi" } }),
            "payment.vpa",
        ),
        (
            json!({ "cart_id": "nope", "shipping_address_id": shop.address, "payment": { "method": "card", "card_token": shop.card } }),
            "cart_id",
        ),
        (
            json!({ "cart_id": cart, "shipping_address_id": "nope", "payment": { "method": "card", "card_token": shop.card } }),
            "shipping_address_id",
        ),
    ];
    for (i, (body, field)) in cases.into_iter().enumerate() {
        let req = agent()
            .post(&url)
            .set("idempotency-key", &format!("bad-{i}"));
        let (st, _, e) = send(req, &shop.user, Some(body));
        assert_eq!(
            (st, e["code"].as_str()),
            (422, Some("validation_failed")),
            "{field}: {e}"
        );
        assert_eq!(e["errors"][0]["field"], field, "{e}");
    }
    // An instrument that cannot pay is refused before the cart is closed.
    for (pay, code, field) in [
        (
            json!({ "method": "credit_card", "card_token": "tok_forged" }),
            "invalid_card",
            "payment.card_token",
        ),
        (
            json!({ "method": "upi", "vpa": "no-at-sign" }),
            "invalid_vpa",
            "payment.vpa",
        ),
    ] {
        let body = json!({ "cart_id": cart, "shipping_address_id": shop.address, "payment": pay });
        let req = agent().post(&url).set("idempotency-key", code);
        let (st, _, e) = send(req, &shop.user, Some(body));
        assert_eq!((st, e["code"].as_str()), (422, Some(code)), "{e}");
        assert_eq!(e["errors"][0]["field"], field, "{e}");
    }
    let req = agent().post(&url).set("idempotency-key", "x");
    let (st, _, e) = send(
        req,
        &shop.user,
        Some(json!({ "cart_id": cart, "surprise": 1 })),
    );
    assert!(st == 400 || st == 422, "{st} {e}");
    assert_eq!(
        e["type"].as_str().map(|t| t.starts_with("https://")),
        Some(true),
        "{e}"
    );
    // Nothing was placed and the cart is still open.
    let (_, _, mine) = send(agent().get(&url), &shop.user, None);
    assert_eq!(mine["items"], json!([]));
    let (_, _, c) = send(
        agent().get(&shop.s.url(&format!("/api/v1/carts/{cart}"))),
        &shop.user,
        None,
    );
    assert_eq!(c["status"], "open");

    // A refused request keeps nothing: the corrected retry under the same
    // key runs. Then the key is bound: another body under it is refused.
    let wrong = json!({ "cart_id": cart, "shipping_address_id": "nope",
        "payment": { "method": "credit_card", "card_token": shop.card } });
    let req = agent().post(&url).set("idempotency-key", "once");
    assert_eq!(send(req, &shop.user, Some(wrong)).0, 422);
    let req = agent().post(&url).set("idempotency-key", "once");
    assert_eq!(send(req, &shop.user, Some(good.clone())).0, 202);
    let other = json!({ "cart_id": cart, "shipping_address_id": shop.address,
        "payment": { "method": "upi", "vpa": "ana@bank" } });
    let req = agent().post(&url).set("idempotency-key", "once");
    let (st, _, e) = send(req, &shop.user, Some(other));
    assert_eq!(
        (st, e["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{e}"
    );
    // A checked-out cart cannot be ordered again under a new key.
    let req = agent().post(&url).set("idempotency-key", "twice");
    let (st, _, e) = send(req, &shop.user, Some(good));
    assert_eq!(
        (st, e["code"].as_str()),
        (409, Some("invalid_state")),
        "{e}"
    );
    for q in ["?status=LOST", "?limit=0", "?cursor=zzz", "?bogus=1"] {
        let (st, _, e) = send(agent().get(&format!("{url}{q}")), &shop.user, None);
        assert_eq!(
            (st, e["code"].as_str()),
            (400, Some("malformed_request")),
            "{q}: {e}"
        );
    }
    let (st, _, _) = send(
        agent().get(&shop.s.url("/api/v1/admin/sagas")),
        &shop.user,
        None,
    );
    assert_eq!(st, 403);
}

#[test]
fn two_hundred_orders_in_flight_survive_sigkill_each_completing_once() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [
        // Slow provider calls keep sagas mid-step when the process dies.
        ("FLOWLINE__PAYMENTS__SANDBOX_LATENCY", "25ms"),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_USER", "100000"),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_CARD", "100000"),
        ("FLOWLINE__ORDERS__SAGA_LEASE", "300ms"),
        ("FLOWLINE__RATELIMIT__USER_PER_MINUTE", "100000"),
        ("FLOWLINE__RATELIMIT__USER_BURST", "10000"),
    ];
    let shop = open_shop(&data, &env);
    let mug = product(&shop.s, &shop.admin, "MUG-1", 500, "BRL");
    set_stock(&shop.s, &shop.admin, &mug, 1000);
    let carts: Vec<String> = (0..N).map(|_| shop.cart(&[(&mug, 1)])).collect();

    // Eight clients place orders; the server is killed while they do.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let base = shop.s.base.clone();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (carts, base, accepted) = (carts.clone(), base.clone(), accepted.clone());
            let (user, address, card) =
                (shop.user.clone(), shop.address.clone(), shop.card.clone());
            std::thread::spawn(move || {
                for i in (t..N).step_by(8) {
                    let body = json!({ "cart_id": carts[i], "shipping_address_id": address,
                        "payment": { "method": "credit_card", "card_token": card } });
                    let req = agent()
                        .post(&format!("{base}/api/v1/orders"))
                        .set("idempotency-key", &format!("crash-{i}"))
                        .set("authorization", &format!("Bearer {user}"))
                        .set("content-type", "application/json");
                    match req.send_string(&body.to_string()) {
                        Ok(r) if r.status() == 202 => {
                            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        // The server died under this request: the client retries later.
                        Err(ureq::Error::Transport(_)) => return,
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    wait_until("half the orders accepted", Duration::from_secs(60), || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= N / 2
    });
    let Shop {
        s,
        admin: _,
        user,
        address,
        card,
    } = shop;
    s.kill9();
    for t in threads {
        t.join().unwrap();
    }
    let acked = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (N / 2..N).contains(&acked),
        "killed too late: {acked} accepted"
    );

    // Restart; clients retry every order with its key.
    let s = Server::start(&data, &env);
    // Sagas were mid-flight when it died, and resume at once.
    assert!(
        s.log()
            .contains("resuming sagas a previous run left unfinished"),
        "no saga was in flight at the kill"
    );
    let admin = admin_token(&s, &data);
    let shop = Shop {
        s,
        admin,
        user,
        address,
        card,
    };
    let mut ids = std::collections::HashSet::new();
    for (i, cart) in carts.iter().enumerate() {
        let (st, _, p) = shop.place(&format!("crash-{i}"), cart, &shop.card);
        assert_eq!(st, 202, "order {i}: {p}");
        ids.insert(p["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), N, "one order per key");
    let mut payments = std::collections::HashSet::new();
    for id in &ids {
        let o = shop.wait_status(id, "CONFIRMED");
        let p = shop.payment(&o);
        assert_eq!(
            (p["status"].as_str(), p["amount"].as_i64()),
            (Some("CAPTURED"), Some(500))
        );
        payments.insert(p["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(payments.len(), N, "one payment per order");
    assert_eq!(shop.stock(&mug), (1000 - N as i64, 0, 1000 - N as i64));
    let sagas = shop.admin_get("/api/v1/admin/sagas?status=COMPLETED&limit=1000");
    assert_eq!(sagas["items"].as_array().unwrap().len(), N);
    for status in ["RUNNING", "COMPENSATING", "COMPENSATED"] {
        let left = shop.admin_get(&format!("/api/v1/admin/sagas?status={status}"));
        assert_eq!(left["items"], json!([]), "{status}");
    }
    let ships = shop.admin_get("/api/v1/admin/shipments?limit=500");
    assert_eq!(ships["items"].as_array().unwrap().len(), N);
    // Billing: one invoice per captured payment, no more.
    wait_until("every invoice", Duration::from_secs(30), || {
        shop.admin_get("/api/v1/ledger/invoices")["items"]
            .as_array()
            .is_some_and(|a| a.len() == N)
    });
    let (ok, out, err) = cli(
        &["ledger", "verify", "--data-dir", data.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{out}{err}");
}
