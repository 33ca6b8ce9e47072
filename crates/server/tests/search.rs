//! Search over a fixed catalog with known answers: indexing from catalog events,
//! freshness, filters, facets, sorting, pagination, typo tolerance, caching
//! without stale prices, bad input, and rebuilding the index from the log.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

struct Ctx {
    s: Server,
    a: ureq::Agent,
    admin: String,
}

fn start(data: &std::path::Path) -> Ctx {
    let s = Server::start(data, &[]);
    let admin = admin_token(&s, data);
    let a = agent();
    Ctx { s, a, admin }
}

impl Ctx {
    fn search(&self, qs: &str) -> (u16, Value) {
        let (st, _, b) = call(
            self.a.get(&self.s.url(&format!("/api/v1/search?{qs}"))),
            None,
        );
        (st, json(&b))
    }
    fn create(&self, p: Value) -> Value {
        let (st, _, b) = call(
            self.a
                .post(&self.s.url("/api/v1/products"))
                .set("authorization", &format!("Bearer {}", self.admin)),
            Some(&p.to_string()),
        );
        assert_eq!(st, 201, "{b}");
        json(&b)
    }
    fn skus(&self, qs: &str) -> Vec<String> {
        let (st, v) = self.search(qs);
        assert_eq!(st, 200, "{v}");
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["product"]["sku"].as_str().unwrap().to_owned())
            .collect()
    }
}

#[allow(clippy::too_many_arguments)] // one row of the fixed catalog, read as a table
fn product(
    sku: &str,
    title: &str,
    desc: &str,
    cat: &str,
    brand: &str,
    price: i64,
    color: &[&str],
    stock: bool,
    pop: f64,
) -> Value {
    json!({
        "sku": sku, "title": title, "description": desc, "price": { "amount": price, "currency": "BRL" },
        "category": cat, "brand": brand, "attributes": { "color": color }, "in_stock": stock, "popularity_score": pop,
    })
}

fn fixed_catalog(c: &Ctx) {
    c.create(product(
        "TS-BLUE",
        "Basic Cotton T-Shirt",
        "A soft blue shirt for every day",
        "t-shirts",
        "basics",
        8990,
        &["blue"],
        true,
        0.85,
    ));
    c.create(product(
        "TS-RED",
        "Organic Cotton T-Shirt",
        "Red, organic and breathable",
        "t-shirts",
        "northwind",
        12990,
        &["red", "blue"],
        true,
        0.40,
    ));
    c.create(product(
        "SN-RUN",
        "Running Sneakers",
        "Lightweight cotton-lined running shoes",
        "shoes",
        "northwind",
        39990,
        &["black"],
        true,
        0.95,
    ));
    c.create(product(
        "SN-CAN",
        "Canvas Sneakers",
        "Classic canvas sneakers",
        "shoes",
        "basics",
        19990,
        &["white", "blue"],
        false,
        0.60,
    ));
    c.create(product(
        "JK-DOWN",
        "Down Jacket",
        "Warm down jacket, not cotton",
        "jackets",
        "northwind",
        89990,
        &["black"],
        true,
        0.70,
    ));
    c.create(product(
        "MG-1",
        "Coffee Mug",
        "A ceramic mug",
        "kitchen",
        "acme",
        2990,
        &["white"],
        true,
        0.10,
    ));
}

#[test]
fn search_answers_fixed_queries_stays_fresh_and_rebuilds_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = start(&data);
    fixed_catalog(&c);
    let t = Instant::now();
    wait_until("indexed", Duration::from_secs(5), || {
        c.search("per_page=100").1["total"] == 6
    });
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "visible within 1 s: {:?}",
        t.elapsed()
    );

    // Relevance: title weighs more than the description.
    let hits = c.skus("q=cotton");
    assert_eq!(hits.len(), 4, "{hits:?}");
    assert!(
        hits[..2].contains(&"TS-BLUE".to_owned()) && hits[..2].contains(&"TS-RED".to_owned()),
        "title matches first: {hits:?}"
    );
    // All words must match.
    assert_eq!(c.skus("q=cotton+organic"), vec!["TS-RED"]);
    // Typo tolerance for words of 5+ letters, not for short ones.
    assert_eq!(
        c.skus("q=snaekers&sort=price_asc"),
        vec!["SN-CAN", "SN-RUN"],
        "transposition forgiven"
    );
    assert_eq!(
        c.skus("q=sneakrs&sort=price_asc"),
        vec!["SN-CAN", "SN-RUN"],
        "a missing letter forgiven"
    );
    assert!(c.skus("q=mog").is_empty(), "no fuzziness under 5 letters");
    // Highlighting.
    let (_, v) = c.search("q=running");
    assert_eq!(v["hits"][0]["highlight"], "<b>Running</b> Sneakers");

    // Filters.
    assert_eq!(
        c.skus("category=shoes&sort=price_asc"),
        vec!["SN-CAN", "SN-RUN"]
    );
    assert_eq!(
        c.skus("brand=northwind&sort=price_asc"),
        vec!["TS-RED", "SN-RUN", "JK-DOWN"]
    );
    assert_eq!(
        c.skus("price_min=10000&price_max=40000&sort=price_asc"),
        vec!["TS-RED", "SN-CAN", "SN-RUN"]
    );
    assert_eq!(c.skus("category=shoes&in_stock=true"), vec!["SN-RUN"]);
    assert_eq!(
        c.skus("attr.color=blue&sort=price_asc"),
        vec!["TS-BLUE", "TS-RED", "SN-CAN"]
    );
    assert_eq!(c.skus("q=sneakers&attr.color=white"), vec!["SN-CAN"]);

    // Facets count every match, not just the page.
    let (_, v) = c.search("q=cotton&per_page=1");
    assert_eq!(v["total"], 4);
    assert_eq!(v["hits"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["facets"]["category"],
        json!({ "t-shirts": 2, "shoes": 1, "jackets": 1 })
    );
    assert_eq!(v["facets"]["brand"], json!({ "basics": 1, "northwind": 3 }));
    assert_eq!(v["facets"]["attributes"]["color"]["blue"], 2);

    // Sorting.
    assert_eq!(
        c.skus("sort=price_desc&per_page=3"),
        vec!["JK-DOWN", "SN-RUN", "SN-CAN"]
    );
    assert_eq!(
        c.skus("sort=popularity&per_page=3"),
        vec!["SN-RUN", "TS-BLUE", "JK-DOWN"]
    );
    assert_eq!(c.skus("sort=newest&per_page=2"), vec!["MG-1", "JK-DOWN"]);

    // Stable pagination: pages partition the result.
    let all = c.skus("sort=price_asc&per_page=100");
    let mut paged = Vec::new();
    for page in 1..=3 {
        paged.extend(c.skus(&format!("sort=price_asc&per_page=2&page={page}")));
    }
    assert_eq!(paged, all);
    assert!(c.skus("sort=price_asc&per_page=2&page=4").is_empty());

    // Bad input names the parameter; never a 500.
    for (qs, param) in [
        ("sort=cheapest", "sort"),
        ("page=0", "page"),
        ("per_page=101", "per_page"),
        ("page=500&per_page=100", "page"),
        ("price_min=-1", "price_min"),
        ("price_min=abc", "price_min"),
        ("price_min=500&price_max=100", "price_min"),
        ("in_stock=maybe", "in_stock"),
        ("colour=blue", "colour"),
    ] {
        let (st, v) = c.search(qs);
        assert_eq!(st, 400, "{qs}: {v}");
        assert_eq!(v["code"], "malformed_request");
        assert_eq!(v["errors"][0]["field"], param, "{qs}");
    }
    let (st, _) = c.search(&format!("q={}", "x".repeat(300)));
    assert_eq!(st, 400);

    // Update the price: the next search shows it, the cached page does not linger.
    let (_, v) = c.search("q=canvas");
    let id = v["hits"][0]["product"]["id"].as_str().unwrap().to_owned();
    assert_eq!(v["hits"][0]["product"]["price"]["amount"], 19990);
    let patch =
        c.a.request("PATCH", &c.s.url(&format!("/api/v1/products/{id}")))
            .set("authorization", &format!("Bearer {}", c.admin))
            .set("if-match", "\"v1\"");
    assert_eq!(
        call(
            patch,
            Some(r#"{"price": {"amount": 15990, "currency": "BRL"}}"#)
        )
        .0,
        200
    );
    let t = Instant::now();
    wait_until("new price searchable", Duration::from_secs(5), || {
        c.search("q=canvas").1["hits"][0]["product"]["price"]["amount"] == 15990
    });
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "fresh within 1 s: {:?}",
        t.elapsed()
    );
    assert_eq!(
        c.skus("price_max=16000&category=shoes"),
        vec!["SN-CAN"],
        "filters see the new price too"
    );

    // Delete: gone from search.
    let del =
        c.a.delete(&c.s.url(&format!("/api/v1/products/{id}")))
            .set("authorization", &format!("Bearer {}", c.admin))
            .set("if-match", "\"v2\"");
    assert_eq!(call(del, None).0, 204);
    wait_until("deleted from search", Duration::from_secs(5), || {
        c.skus("q=canvas").is_empty()
    });
    let before = c.search("q=cotton&sort=price_asc").1;
    assert!(c.s.terminate().success());

    // Rebuild: delete the index, restart, same answers (replayed from the log).
    std::fs::remove_dir_all(data.join("search")).unwrap();
    let c = start(&data);
    wait_until("rebuilt from the log", Duration::from_secs(10), || {
        c.search("per_page=100").1["total"] == 5
    });
    let after = c.search("q=cotton&sort=price_asc").1;
    assert_eq!(after["hits"], before["hits"]);
    assert_eq!(after["facets"], before["facets"]);
    let (_, _, m) = call(c.a.get(&c.s.url("/metrics")), None);
    assert!(
        m.contains(
            "flowline_consumer_lag{group=\"search.indexer.local\",topic=\"catalog.events\"} 0"
        ),
        "indexing lag exported:\n{m}"
    );
    assert!(c.s.terminate().success());
}

#[test]
fn reindex_rebuilds_from_the_catalog_and_refuses_while_a_server_writes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let (ok, _, err) = cli(
        &["seed", "catalog", "--products", "250", "--data-dir", d],
        &[],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = cli(
        &["search", "reindex", "--chunk", "100", "--data-dir", d],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("reindexed 250 products"), "{out}");
    assert!(err.contains("250 products"), "progress: {err}");

    let s = Server::start(&data, &[]);
    let a = agent();
    let (_, _, b) = call(a.get(&s.url("/api/v1/search?per_page=1")), None);
    assert_eq!(
        json(&b)["total"],
        250,
        "searchable at once: the index was built offline"
    );
    let (ok, _, err) = cli(&["search", "reindex", "--data-dir", d], &[]);
    assert!(!ok && err.contains("stop it first"), "{err}");
    // The log replay after start leaves the same answers (documents replaced by id).
    wait_until("indexer caught up", Duration::from_secs(10), || {
        let (_, _, m) = call(a.get(&s.url("/metrics")), None);
        m.contains(
            "flowline_consumer_lag{group=\"search.indexer.local\",topic=\"catalog.events\"} 0",
        )
    });
    let (_, _, b) = call(a.get(&s.url("/api/v1/search?per_page=1")), None);
    assert_eq!(json(&b)["total"], 250);
    assert!(s.terminate().success());
}
