//! The catalog over HTTP: admin writes with optimistic concurrency, public
//! reads, validation, and the product events the search index will follow.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// (status, ETag, body).
fn send(
    req: ureq::Request,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    send_reading(req, token, body, "etag")
}

fn shirt(sku: &str, category: &str, brand: &str, price: i64) -> Value {
    json!({
        "sku": sku, "title": format!("Basic Cotton T-Shirt {sku}"), "description": "100% cotton",
        "price": { "amount": price, "currency": "BRL" }, "original_price": { "amount": price + 3000, "currency": "BRL" },
        "category": category, "brand": brand, "attributes": { "color": ["blue", "red"], "size": ["m", "l"] },
        "in_stock": true, "popularity_score": 0.85,
    })
}

#[test]
fn admins_write_with_if_match_everyone_reads_and_every_change_is_an_event() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let a = agent();
    let admin = admin_token(&s, &data);
    let products = s.url("/api/v1/products");

    // Only admins write.
    let (st, _, body) = send(
        a.post(&products),
        None,
        Some(shirt("TS-1", "t-shirts", "basics", 8990)),
    );
    assert_eq!((st, body["code"].as_str()), (401, Some("unauthenticated")));
    let reg = json!({ "email": "u@example.com", "password": "correct horse battery", "display_name": "U" });
    let (_, _, u) = send(a.post(&s.url("/api/v1/auth/register")), None, Some(reg));
    let user = u["access_token"].as_str().unwrap().to_owned();
    let (st, _, body) = send(
        a.post(&products),
        Some(&user),
        Some(shirt("TS-1", "t-shirts", "basics", 8990)),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (403, Some("permission_denied"))
    );

    // Bad input: clear problems naming the field, nothing stored.
    let mut bad = shirt("TS-BAD", "t-shirts", "basics", -5);
    bad["title"] = json!("x".repeat(500));
    let (st, _, body) = send(a.post(&products), Some(&admin), Some(bad));
    assert_eq!(
        (st, body["code"].as_str()),
        (422, Some("validation_failed")),
        "{body}"
    );
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"price.amount") && fields.contains(&"title"),
        "{fields:?}"
    );
    let mut bad = shirt("TS-BAD", "t-shirts", "basics", 100);
    bad["price"]["currency"] = json!("XYZ");
    let (st, _, body) = send(a.post(&products), Some(&admin), Some(bad));
    assert_eq!(st, 422, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("ISO 4217"),
        "{body}"
    );
    let (_, _, list) = send(a.get(&products), None, None);
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        0,
        "bad input stored nothing"
    );

    // Create: 201 with ETag and Location; duplicate SKU is a conflict.
    let (st, etag, p1) = send(
        a.post(&products),
        Some(&admin),
        Some(shirt("TS-1", "t-shirts", "basics", 8990)),
    );
    assert_eq!(st, 201, "{p1}");
    assert_eq!(etag.as_deref(), Some("\"v1\""));
    let (st, _, body) = send(
        a.post(&products),
        Some(&admin),
        Some(shirt("TS-1", "t-shirts", "basics", 1)),
    );
    assert_eq!((st, body["code"].as_str()), (409, Some("conflict")));
    for (i, (cat, brand)) in [
        ("t-shirts", "acme"),
        ("shoes", "acme"),
        ("shoes", "basics"),
        ("t-shirts", "basics"),
    ]
    .iter()
    .enumerate()
    {
        let (st, _, _) = send(
            a.post(&products),
            Some(&admin),
            Some(shirt(&format!("SKU-{i}"), cat, brand, 1000 + i as i64)),
        );
        assert_eq!(st, 201);
    }

    // Public reads: by id with ETag, lists with filters and a stable cursor.
    let id = p1["id"].as_str().unwrap().to_owned();
    let item = s.url(&format!("/api/v1/products/{id}"));
    let (st, etag, got) = send(a.get(&item), None, None);
    assert_eq!((st, etag.as_deref()), (200, Some("\"v1\"")));
    assert_eq!(got["price"], json!({ "amount": 8990, "currency": "BRL" }));
    assert_eq!(got["attributes"]["size"], json!(["m", "l"]));
    let (_, _, shoes) = send(a.get(&s.url("/api/v1/products?category=shoes")), None, None);
    assert_eq!(shoes["items"].as_array().unwrap().len(), 2);
    let (_, _, acme_shoes) = send(
        a.get(&s.url("/api/v1/products?category=shoes&brand=acme")),
        None,
        None,
    );
    assert_eq!(acme_shoes["items"].as_array().unwrap().len(), 1);
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => s.url(&format!("/api/v1/products?limit=2&cursor={c}")),
            None => s.url("/api/v1/products?limit=2"),
        };
        let (_, _, page) = send(a.get(&url), None, None);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "every product once across pages");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5);
    let (st, _, body) = send(a.get(&s.url("/api/v1/products?limit=0")), None, None);
    assert_eq!(
        (st, body["errors"][0]["field"].as_str()),
        (400, Some("limit"))
    );

    // Update needs If-Match: missing → 428, stale → 412, current → 200 with the next version.
    let patch = json!({ "price": { "amount": 7990, "currency": "BRL" }, "in_stock": false });
    let (st, _, body) = send(a.request("PATCH", &item), Some(&admin), Some(patch.clone()));
    assert_eq!(
        (st, body["code"].as_str()),
        (428, Some("precondition_required"))
    );
    let (st, etag, body) = send(
        a.request("PATCH", &item).set("if-match", "\"v1\""),
        Some(&admin),
        Some(patch.clone()),
    );
    assert_eq!((st, etag.as_deref()), (200, Some("\"v2\"")), "{body}");
    assert_eq!(body["price"]["amount"], 7990);
    let (st, _, body) = send(
        a.request("PATCH", &item).set("if-match", "\"v1\""),
        Some(&admin),
        Some(json!({ "title": "Lost update" })),
    );
    assert_eq!(
        (st, body["code"].as_str()),
        (412, Some("precondition_failed"))
    );
    let (_, _, now) = send(a.get(&item), None, None);
    assert_eq!(
        now["title"], "Basic Cotton T-Shirt TS-1",
        "the stale write changed nothing"
    );
    assert_eq!(
        now["price"]["amount"], 7990,
        "the cached read was dropped by the write: no stale price"
    );
    let (_, etag, _) = send(a.get(&item), None, None);
    assert_eq!(etag.as_deref(), Some("\"v2\""));
    // Repeated reads are served from the cache (a read whose load overlaps an
    // invalidation is answered but not kept, so allow a few tries).
    let hits = |m: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with("flowline_cache_hits_total{cache=\"products\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    wait_until(
        "a product read served from the cache",
        Duration::from_secs(5),
        || {
            let (_, _, got) = send(a.get(&item), None, None);
            assert_eq!(got["price"]["amount"], 7990, "never a stale price");
            hits(&call(a.get(&s.url("/metrics")), None).2) >= 1
        },
    );
    let (_, _, m) = call(a.get(&s.url("/metrics")), None);
    assert!(
        m.contains("flowline_consumer_lag{group=\"cache.catalog.local\",topic=\"catalog.events\"}"),
        "each node follows catalog events"
    );
    let (st, _, _) = send(
        a.request("PATCH", &item).set("if-match", "\"v2\""),
        Some(&admin),
        Some(json!({ "price": { "amount": -1, "currency": "BRL" } })),
    );
    assert_eq!(st, 422);

    // Delete with If-Match; then it is gone.
    let (st, _, _) = send(
        a.delete(&item).set("if-match", "\"v1\""),
        Some(&admin),
        None,
    );
    assert_eq!(st, 412);
    let (st, _, _) = send(
        a.delete(&item).set("if-match", "\"v2\""),
        Some(&admin),
        None,
    );
    assert_eq!(st, 204);
    let (st, _, body) = send(a.get(&item), None, None);
    assert_eq!((st, body["code"].as_str()), (404, Some("not_found")));

    // The event feed: created ×5, updated with the changed fields, deleted.
    let d = data.to_str().unwrap();
    wait_until("catalog events relayed", Duration::from_secs(10), || {
        cli(&["events", "tail", "catalog.events", "--data-dir", d], &[])
            .1
            .contains("product.deleted")
    });
    let (_, out, _) = cli(&["events", "tail", "catalog.events", "--data-dir", d], &[]);
    let events: Vec<Value> = out.lines().map(json).collect();
    let of = |t: &str| {
        events
            .iter()
            .filter(|e| e["type"] == t)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("product.created").len(), 5);
    let updated = of("product.updated");
    assert_eq!(updated.len(), 1);
    assert_eq!(updated[0]["key"], id.as_str());
    assert_eq!(
        updated[0]["payload"]["changes"],
        json!(["price", "in_stock"])
    );
    assert_eq!(updated[0]["payload"]["product"]["price"]["amount"], 7990);
    assert_eq!(
        of("product.deleted")[0]["payload"]["product_id"],
        id.as_str()
    );
    assert!(s.terminate().success());
}

#[test]
fn seed_generates_a_realistic_catalog_once_with_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let (ok, out, err) = cli(
        &[
            "seed",
            "catalog",
            "--products",
            "300",
            "--batch",
            "70",
            "--data-dir",
            d,
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("seeded 300 new products") && out.contains("300 events relayed"),
        "{out}"
    );
    assert!(err.contains("300/300"), "progress shown: {err}");
    let (ok, out, _) = cli(
        &["seed", "catalog", "--products", "300", "--data-dir", d],
        &[],
    );
    assert!(
        ok && out.contains("seeded 0 new products"),
        "a re-run adds nothing: {out}"
    );

    let s = Server::start(&data, &[]);
    let a = agent();
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, _, page) = send(
            a.get(&s.url(&format!("/api/v1/products?limit=100&cursor={cursor}"))),
            None,
            None,
        );
        all.extend(page["items"].as_array().unwrap().clone());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_owned(),
            None => break,
        }
    }
    assert_eq!(all.len(), 300);
    let mut categories: Vec<&str> = all
        .iter()
        .map(|p| p["category"].as_str().unwrap())
        .collect();
    categories.sort();
    categories.dedup();
    assert!(categories.len() >= 8, "{categories:?}");
    for p in &all {
        assert!(
            !p["title"].as_str().unwrap().is_empty()
                && p["description"].as_str().unwrap().len() > 40
        );
        assert!(p["attributes"].as_object().unwrap().len() >= 2);
    }
    let (_, _, shoes) = send(
        a.get(&s.url("/api/v1/products?category=shoes&limit=100")),
        None,
        None,
    );
    assert!(shoes["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["category"] == "shoes"));
    let (_, out, _) = cli(&["events", "topics", "--json", "--data-dir", d], &[]);
    let topics = json(&out);
    let catalog = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "catalog.events")
        .unwrap();
    assert_eq!(catalog["events"], 300, "one product.created per product");
    assert!(s.terminate().success());
}
