//! Inventory, carts, payments and the ledger over HTTP on a running server:
//! the saga participants as a client (or the order saga) calls them.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn two_hundred_concurrent_reservations_of_fifty_units_and_expiry_returns_stock() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Arc::new(Server::start(
        &data,
        &[("FLOWLINE__INVENTORY__SWEEP_INTERVAL", "100ms")],
    ));
    let admin = admin_token(&s, &data);
    let hot = product(&s, &admin, "HOT-1", 1000, "BRL");
    set_stock(&s, &admin, &hot, 50);

    let threads: Vec<_> = (0..200)
        .map(|i| {
            let (s, admin, hot) = (s.clone(), admin.clone(), hot.clone());
            std::thread::spawn(move || {
                let body = json!({ "order_id": format!("order-{i}"), "items": [{ "product_id": hot, "quantity": 1 }] });
                let (st, _, b) = send(agent().post(&s.url("/api/v1/inventory/reservations")), &admin, Some(body));
                assert!(st == 201 || (st == 409 && b["code"] == "insufficient_stock"), "{st} {b}");
                st
            })
        })
        .collect();
    let won = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|st| *st == 201)
        .count();
    assert_eq!(won, 50);
    let (_, _, level) = send(
        agent().get(&s.url(&format!("/api/v1/inventory/{hot}"))),
        &admin,
        None,
    );
    assert_eq!(
        (
            level["on_hand"].as_i64(),
            level["reserved"].as_i64(),
            level["available"].as_i64()
        ),
        (Some(50), Some(50), Some(0))
    );

    // Availability reaches the catalog: nothing is left to sell.
    let product_url = s.url(&format!("/api/v1/products/{hot}"));
    wait_until("catalog in_stock = false", Duration::from_secs(10), || {
        send(agent().get(&product_url), &admin, None).2["in_stock"] == false
    });

    // Releasing one order and letting a short reservation expire return stock.
    let url = s.url("/api/v1/inventory/reservations");
    let winner = (0..200)
        .map(|i| format!("order-{i}"))
        .find(|o| send(agent().get(&format!("{url}/{o}")), &admin, None).0 == 200)
        .unwrap();
    let (st, _, r) = send(
        agent().post(&format!("{url}/{winner}/release")),
        &admin,
        None,
    );
    assert_eq!((st, r["status"].as_str()), (200, Some("RELEASED")));
    let body = json!({ "order_id": "short", "items": [{ "product_id": hot, "quantity": 1 }], "ttl_seconds": 1 });
    let (st, _, r) = send(agent().post(&url), &admin, Some(body.clone()));
    assert_eq!((st, r["status"].as_str()), (201, Some("HELD")));
    // The same command again is the same reservation, not a second hold.
    assert_eq!(send(agent().post(&url), &admin, Some(body)).0, 200);
    wait_until(
        "the short reservation to expire",
        Duration::from_secs(10),
        || send(agent().get(&format!("{url}/short")), &admin, None).2["status"] == "EXPIRED",
    );
    let (_, _, level) = send(
        agent().get(&s.url(&format!("/api/v1/inventory/{hot}"))),
        &admin,
        None,
    );
    assert_eq!(
        (level["reserved"].as_i64(), level["available"].as_i64()),
        (Some(49), Some(1))
    );
    let (st, _, e) = send(agent().post(&format!("{url}/short/confirm")), &admin, None);
    assert_eq!((st, e["code"].as_str()), (409, Some("invalid_state")));
    let (_, _, moves) = send(
        agent().get(&s.url(&format!("/api/v1/inventory/{hot}/movements?limit=3"))),
        &admin,
        None,
    );
    let reasons: Vec<&str> = moves["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["expired", "reserved", "released"]);
    wait_until("catalog in_stock = true", Duration::from_secs(10), || {
        send(agent().get(&product_url), &admin, None).2["in_stock"] == true
    });

    // Stock is never below zero: confirming every held order leaves exactly 0 available.
    let before = send(
        agent().get(&s.url(&format!("/api/v1/inventory/{hot}"))),
        &admin,
        None,
    )
    .2;
    assert!(before["available"].as_i64().unwrap() >= 0);
    // Only admins (and services) change stock.
    let user = register(&s, "shopper@example.com");
    let (st, _, e) = send(
        agent().put(&s.url(&format!("/api/v1/inventory/{hot}"))),
        &user,
        Some(json!({ "on_hand": 1000 })),
    );
    assert_eq!((st, e["code"].as_str()), (403, Some("permission_denied")));
}

fn pay(s: &Server, user: &str, key: &str, body: &Value) -> (u16, Option<String>, Value) {
    let req = agent()
        .post(&s.url("/api/v1/payments"))
        .set("idempotency-key", key);
    send(req, user, Some(body.clone()))
}

#[test]
fn one_key_sent_twenty_times_at_once_charges_once_and_the_ledger_books_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Provider latency keeps the first request in flight while the others arrive.
    let s = Arc::new(Server::start(
        &data,
        &[("FLOWLINE__PAYMENTS__SANDBOX_LATENCY", "50ms")],
    ));
    let admin = admin_token(&s, &data);
    let user = register(&s, "payer@example.com");
    let card = tokenize(&s, &user, "4242 4242 4242 4242");
    let body = Arc::new(json!({
        "order_id": "order-1", "amount": 29990, "currency": "BRL", "method": "credit_card",
        "card_token": card, "tax_amount": 2990,
    }));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (s, user, body) = (s.clone(), user.clone(), body.clone());
            std::thread::spawn(move || pay(&s, &user, "checkout-order-1", &body))
        })
        .collect();
    let answers: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let first = &answers[0];
    assert_eq!(first.0, 201, "{}", first.2);
    assert_eq!(first.2["status"], "CAPTURED");
    for (st, _, b) in &answers {
        assert_eq!(
            (*st, b),
            (first.0, &first.2),
            "every answer is the one response"
        );
    }
    assert_eq!(
        answers
            .iter()
            .filter(|a| a.1.as_deref() == Some("false"))
            .count(),
        1
    );
    let payment = first.2["id"].as_str().unwrap().to_owned();

    // Same key, other body: refused, nothing charged.
    let mut other = (*body).clone();
    other["amount"] = json!(1);
    let (st, _, e) = pay(&s, &user, "checkout-order-1", &other);
    assert_eq!(
        (st, e["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    let (st, _, e) = send(
        agent().post(&s.url("/api/v1/payments")),
        &user,
        Some((*body).clone()),
    );
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("idempotency_key_required"))
    );

    // The ledger books the capture exactly once: one invoice, balanced entry.
    let invoices = s.url(&format!("/api/v1/ledger/invoices?payment_id={payment}"));
    wait_until("the invoice", Duration::from_secs(10), || {
        send(agent().get(&invoices), &admin, None).2["items"]
            .as_array()
            .is_some_and(|i| !i.is_empty())
    });
    let (_, _, inv) = send(agent().get(&invoices), &admin, None);
    assert_eq!(inv["items"].as_array().unwrap().len(), 1, "{inv}");
    assert_eq!(inv["items"][0]["number"], "INV-000001");
    let balance = |account: &str| {
        let (st, _, b) = send(
            agent().get(&s.url(&format!("/api/v1/ledger/accounts/{account}/balance"))),
            &admin,
            None,
        );
        assert_eq!(st, 200, "{b}");
        b["balances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["currency"] == "BRL")
            .map(|c| c["balance"].as_i64().unwrap())
    };
    assert_eq!(balance("provider_clearing"), Some(29990));
    assert_eq!(balance("merchant_revenue"), Some(27000));
    assert_eq!(balance("tax_payable"), Some(2990));

    // A partial refund (admin) is a credit note and a reversing entry.
    let refund = agent()
        .post(&s.url(&format!("/api/v1/payments/{payment}/refund")))
        .set("idempotency-key", "refund-1");
    let (st, _, p) = send(refund, &admin, Some(json!({ "amount": 9990 })));
    assert_eq!(
        (st, p["status"].as_str()),
        (200, Some("PARTIALLY_REFUNDED")),
        "{p}"
    );
    let refund = agent()
        .post(&s.url(&format!("/api/v1/payments/{payment}/refund")))
        .set("idempotency-key", "refund-1");
    let (st, replayed, _) = send(refund, &admin, Some(json!({ "amount": 9990 })));
    assert_eq!((st, replayed.as_deref()), (200, Some("true")));
    wait_until("the credit note", Duration::from_secs(10), || {
        send(agent().get(&invoices), &admin, None).2["items"]
            .as_array()
            .is_some_and(|i| i.len() == 2)
    });
    assert_eq!(balance("provider_clearing"), Some(20000));
    let (ok, out, err) = cli(
        &["ledger", "verify", "--data-dir", data.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{out}{err}");
    assert!(out.contains("ledger ok"), "{out}");

    // Another shopper cannot see the payment.
    let stranger = register(&s, "stranger@example.com");
    let (st, _, _) = send(
        agent().get(&s.url(&format!("/api/v1/payments/{payment}"))),
        &stranger,
        None,
    );
    assert_eq!(st, 404);
}

#[test]
fn bad_input_gets_a_clear_problem_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let admin = admin_token(&s, &data);
    let user = register(&s, "careful@example.com");
    let tokens = s.url("/api/v1/payments/tokens");
    let problem = |(st, _, b): (u16, Option<String>, Value)| {
        (st, b["code"].as_str().unwrap_or("").to_owned(), b)
    };

    let (st, code, b) = problem(send(
        agent().post(&tokens),
        &user,
        Some(
            json!({ "number": "4242424242424241", "exp_month": 12, "exp_year": 2040, "cvc": "123" }),
        ),
    ));
    assert_eq!((st, code.as_str()), (422, "invalid_card"), "{b}");
    assert_eq!(b["errors"][0]["field"], "number");
    assert!(!b.to_string().contains("4242424242424241"));
    let (st, code, b) = problem(send(
        agent().post(&tokens),
        &user,
        Some(
            json!({ "number": "4242424242424242", "exp_month": 1, "exp_year": 2021, "cvc": "123" }),
        ),
    ));
    assert_eq!((st, code.as_str()), (422, "invalid_card"), "{b}");
    assert_eq!(b["errors"][0]["field"], "exp_year");

    let upi = json!({ "amount": 500, "currency": "INR", "method": "upi", "vpa": "no-at-sign" });
    let (st, code, _) = problem(pay(&s, &user, "upi-1", &upi));
    assert_eq!((st, code.as_str()), (422, "invalid_vpa"));
    // The refused request left its key free: a corrected retry with it works.
    let upi =
        json!({ "amount": 500, "currency": "INR", "method": "upi", "vpa": "success@razorpay" });
    let (st, _, p) = pay(&s, &user, "upi-1", &upi);
    assert_eq!((st, p["status"].as_str()), (201, Some("CAPTURED")), "{p}");

    // A declined card is a stored outcome, not an error.
    let declined = tokenize(&s, &user, "4000000000000002");
    let body =
        json!({ "amount": 100, "currency": "USD", "method": "card", "card_token": declined });
    let (st, _, p) = pay(&s, &user, "dec-1", &body);
    assert_eq!(
        (st, p["status"].as_str(), p["decline_reason"].as_str()),
        (201, Some("DECLINED"), Some("card_declined"))
    );

    // Carts: negative quantity and a second currency are refused; the cart is unchanged.
    let brl = product(&s, &admin, "BRL-1", 8990, "BRL");
    let usd = product(&s, &admin, "USD-1", 1500, "USD");
    let (st, _, cart) = send(agent().post(&s.url("/api/v1/carts")), &user, None);
    assert_eq!(st, 201, "{cart}");
    let items = s.url(&format!(
        "/api/v1/carts/{}/items",
        cart["id"].as_str().unwrap()
    ));
    let (st, code, b) = problem(send(
        agent().post(&items),
        &user,
        Some(json!({ "product_id": brl, "quantity": -1 })),
    ));
    assert_eq!((st, code.as_str()), (422, "validation_failed"), "{b}");
    let (st, _, c) = send(
        agent().post(&items),
        &user,
        Some(json!({ "product_id": brl, "quantity": 2 })),
    );
    assert_eq!(
        (st, c["subtotal"]["amount"].as_i64()),
        (200, Some(17980)),
        "{c}"
    );
    let (st, code, _) = problem(send(
        agent().post(&items),
        &user,
        Some(json!({ "product_id": usd, "quantity": 1 })),
    ));
    assert_eq!((st, code.as_str()), (422, "currency_mismatch"));
    // Prices are the catalog's current ones.
    let (st, _, _) = send(
        agent()
            .patch(&s.url(&format!("/api/v1/products/{brl}")))
            .set("if-match", "*"),
        &admin,
        Some(json!({ "price": { "amount": 7990, "currency": "BRL" } })),
    );
    assert_eq!(st, 200);
    let cart_url = s.url(&format!("/api/v1/carts/{}", cart["id"].as_str().unwrap()));
    wait_until("the new price in the cart", Duration::from_secs(10), || {
        send(agent().get(&cart_url), &user, None).2["subtotal"]["amount"] == 15980
    });
    let (_, _, c) = send(agent().get(&cart_url), &user, None);
    assert_eq!(c["items"].as_array().unwrap().len(), 1);

    // Reservations: a negative quantity names the field and holds nothing.
    set_stock(&s, &admin, &brl, 3);
    let res = s.url("/api/v1/inventory/reservations");
    let (st, code, b) = problem(send(
        agent().post(&res),
        &admin,
        Some(json!({ "order_id": "o-bad", "items": [{ "product_id": brl, "quantity": -2 }] })),
    ));
    assert_eq!((st, code.as_str()), (422, "validation_failed"));
    assert_eq!(b["errors"][0]["field"], "items[0].quantity");
    assert_eq!(
        send(agent().get(&format!("{res}/o-bad")), &admin, None).0,
        404
    );

    // Refund in another currency, and an unbalanced journal entry.
    let card = tokenize(&s, &user, "5555555555554444");
    let (_, _, p) = pay(
        &s,
        &user,
        "p-2",
        &json!({ "amount": 1000, "currency": "BRL", "method": "card", "card_token": card }),
    );
    let refund = agent()
        .post(&s.url(&format!(
            "/api/v1/payments/{}/refund",
            p["id"].as_str().unwrap()
        )))
        .set("idempotency-key", "r-usd");
    let (st, code, _) = problem(send(
        refund,
        &admin,
        Some(json!({ "amount": 10, "currency": "USD" })),
    ));
    assert_eq!((st, code.as_str()), (422, "currency_mismatch"));
    let entry = json!({ "reference": "manual-1", "description": "bad", "postings": [
        { "account": "cash", "direction": "debit", "amount": 100, "currency": "BRL" },
        { "account": "merchant_revenue", "direction": "credit", "amount": 90, "currency": "BRL" } ] });
    let (st, code, _) = problem(send(
        agent().post(&s.url("/api/v1/ledger/entries")),
        &admin,
        Some(entry),
    ));
    assert_eq!((st, code.as_str()), (422, "unbalanced_entry"));
    let (_, _, entries) = send(agent().get(&s.url("/api/v1/ledger/entries")), &admin, None);
    assert!(entries["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["reference"] != "manual-1"));

    // Addresses: each bad field named, nothing stored.
    let addresses = s.url("/api/v1/users/me/addresses");
    let (st, code, b) = problem(send(
        agent().post(&addresses),
        &user,
        Some(
            json!({ "name": "", "line1": "Rua A 1", "city": "São Paulo", "postal_code": "01000-000", "country": "brazil" }),
        ),
    ));
    assert_eq!((st, code.as_str()), (422, "validation_failed"), "{b}");
    let fields: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"name") && fields.contains(&"country"),
        "{fields:?}"
    );
    assert_eq!(
        send(agent().get(&addresses), &user, None).2["items"],
        json!([])
    );
    let (st, _, a) = send(
        agent().post(&addresses),
        &user,
        Some(
            json!({ "name": "Ana", "line1": "Rua A 1", "city": "São Paulo", "postal_code": "01000-000", "country": "BR" }),
        ),
    );
    assert_eq!(st, 201, "{a}");
}

#[test]
fn a_crash_mid_payment_loses_nothing_and_charges_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [
        ("FLOWLINE__PAYMENTS__SANDBOX_LATENCY", "60ms"),
        ("FLOWLINE__PAYMENTS__IDEMPOTENCY_LEASE", "1s"),
        ("FLOWLINE__PAYMENTS__IDEMPOTENCY_WAIT", "3s"),
        ("FLOWLINE__PAYMENTS__RECONCILE_INTERVAL", "200ms"),
        ("FLOWLINE__PAYMENTS__RECONCILE_MIN_AGE", "1s"),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_USER", "1000"),
        ("FLOWLINE__PAYMENTS__FRAUD_MAX_PER_CARD", "1000"),
    ];
    let s = Server::start(&data, &env);
    let admin = admin_token(&s, &data);
    let user = register(&s, "crash@example.com");
    let card = tokenize(&s, &user, "4242424242424242");
    let body = |i: usize| json!({ "order_id": format!("crash-{i}"), "amount": 1000 + i as i64, "currency": "BRL", "method": "card", "card_token": card });
    const N: usize = 12;
    // Payments in flight (each provider call takes 60 ms) when the process dies.
    let base = s.url("");
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (base, user, b) = (base.clone(), user.clone(), body(i));
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20 * i as u64));
                let req = agent()
                    .post(&format!("{base}/api/v1/payments"))
                    .set("idempotency-key", &format!("k{i}"));
                let req = req
                    .set("authorization", &format!("Bearer {user}"))
                    .set("content-type", "application/json");
                match req.send_string(&b.to_string()) {
                    Ok(r) => Some(r.status()),
                    Err(ureq::Error::Status(st, _)) => Some(st),
                    Err(_) => None, // the connection died with the server
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(250));
    s.kill9();
    let acked: Vec<Option<u16>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        acked.iter().any(Option::is_none),
        "the crash should cut some payments short: {acked:?}"
    );

    // After a restart every retry with its key ends in one captured payment.
    let s = Server::start(&data, &env);
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..N {
        let mut answer = None;
        wait_until("the retried payment", Duration::from_secs(20), || {
            let (st, _, p) = pay(&s, &user, &format!("k{i}"), &body(i));
            if st == 201 && p["status"] == "CAPTURED" {
                answer = Some(p);
                true
            } else {
                assert!(st == 201 || st == 202 || st == 409 || st == 502, "{st} {p}");
                false
            }
        });
        let p = answer.unwrap();
        assert_eq!(p["amount"].as_i64(), Some(1000 + i as i64));
        ids.insert(p["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), N, "one payment per key");
    // The ledger books each exactly once: one invoice per payment, and the clearing
    // account holds exactly what was captured.
    let captured: i64 = (0..N as i64).map(|i| 1000 + i).sum();
    let url = s.url("/api/v1/ledger/accounts/provider_clearing/balance");
    wait_until("every capture booked", Duration::from_secs(20), || {
        send(agent().get(&url), &admin, None).2["balances"][0]["balance"].as_i64() == Some(captured)
    });
    let (_, _, inv) = send(agent().get(&s.url("/api/v1/ledger/invoices")), &admin, None);
    assert_eq!(inv["items"].as_array().unwrap().len(), N);
    let (ok, out, err) = cli(
        &["ledger", "verify", "--data-dir", data.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{out}{err}");
}
