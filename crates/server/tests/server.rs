//! End-to-end: the real binary on 127.0.0.1:0, driven over HTTP and its CLI.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn edge_health_problems_correlation_metrics_and_graceful_stop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A small body limit, so the oversized body below fits in the socket
    // buffers and the 413 is read rather than racing a closed connection.
    let s = Server::start(&data, &[("FLOWLINE__SERVER__BODY_LIMIT_BYTES", "8192")]);
    let a = agent();

    let (st, _, body) = call(a.get(&s.url("/healthz")), None);
    assert_eq!((st, json(&body)["status"].as_str()), (200, Some("ok")));
    let (st, _, body) = call(a.get(&s.url("/readyz")), None);
    assert_eq!((st, json(&body)["status"].as_str()), (200, Some("ready")));

    // Every failure is problem+json with a stable code.
    let cases: Vec<(ureq::Request, Option<String>, u16, &str)> = vec![
        (
            a.get(&s.url("/api/v1/nothing-here")),
            None,
            404,
            "route_not_found",
        ),
        (
            a.delete(&s.url("/healthz")),
            None,
            405,
            "method_not_allowed",
        ),
        (
            a.post(&s.url("/api/v1/probe/writes")),
            Some("{\"key\":".into()),
            400,
            "malformed_request",
        ),
        (
            a.post(&s.url("/api/v1/probe/writes")),
            Some("{\"key\": 5}".into()),
            422,
            "validation_failed",
        ),
        (
            a.post(&s.url("/api/v1/probe/writes")),
            Some("{\"key\": \"\"}".into()),
            422,
            "validation_failed",
        ),
        (
            a.post(&s.url("/api/v1/probe/writes")),
            Some("{\"key\": \"k\", \"bogus\": 1}".into()),
            422,
            "validation_failed",
        ),
        (
            a.post(&s.url("/api/v1/probe/writes")),
            Some(format!(
                "{{\"key\": \"big\", \"value\": \"{}\"}}",
                "x".repeat(16 * 1024)
            )),
            413,
            "payload_too_large",
        ),
        (
            a.get(&s.url("/api/v1/probe/writes/never-written")),
            None,
            404,
            "not_found",
        ),
    ];
    for (req, body, status, code) in cases {
        let (st, ct, body) = call(req, body.as_deref());
        assert_eq!(st, status, "{body}");
        assert_eq!(ct, "application/problem+json", "{body}");
        let p = json(&body);
        assert_eq!(p["code"], code, "{body}");
        assert_eq!(p["status"], status);
        assert!(p["type"].as_str().unwrap().ends_with(code));
    }
    let (_, _, body) = call(
        a.post(&s.url("/api/v1/probe/writes")),
        Some("{\"key\": \"\"}"),
    );
    assert_eq!(
        json(&body)["errors"][0]["field"],
        "key",
        "the offending field is named"
    );
    let (st, _, _) = call(
        a.post(&s.url("/api/v1/probe/writes"))
            .set("content-type", "text/plain"),
        None,
    );
    assert_eq!(st, 415);
    // Bad input changed nothing.
    for key in ["", "big", "k"] {
        let (st, _, _) = call(a.get(&s.url(&format!("/api/v1/probe/writes/{key}x"))), None);
        assert_eq!(st, 404);
    }

    // A caller's request id is echoed and reaches the event the request causes.
    let res = a
        .post(&s.url("/api/v1/probe/writes"))
        .set("x-request-id", "corr-e2e-42")
        .send_json(serde_json::json!({ "key": "order-1", "value": "v1" }))
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.header("x-request-id"), Some("corr-e2e-42"));
    let created = json(&res.into_string().unwrap());
    assert_eq!(created["seq"], 1);
    // A W3C traceparent becomes the correlation id.
    let res = a
        .post(&s.url("/api/v1/probe/writes"))
        .set(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send_json(serde_json::json!({ "key": "order-1", "value": "v2" }))
        .unwrap();
    assert_eq!(
        res.header("x-request-id"),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    // Without either, one is generated.
    let (_, _, _) = call(a.get(&s.url("/healthz")), None);
    let res = a.get(&s.url("/healthz")).call().unwrap();
    assert_eq!(res.header("x-request-id").map(str::len), Some(32));

    wait_until(
        "both groups applied both writes",
        Duration::from_secs(10),
        || {
            let (_, _, b) = call(a.get(&s.url("/api/v1/probe/writes/order-1")), None);
            let v = json(&b);
            v["applied"]["probe.applier"] == 2 && v["applied"]["probe.auditor"] == 2
        },
    );
    let (ok, out, err) = cli(
        &[
            "events",
            "tail",
            "probe.events",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let events: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["correlation_id"], "corr-e2e-42");
    assert_eq!(events[0]["id"], created["event_id"]);
    assert!(events[0]["causation_id"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(
        events[1]["correlation_id"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(events[0]["type"], "probe.written");
    assert_eq!(events[0]["payload"]["seq"], 1);
    assert_eq!(events[1]["payload"]["seq"], 2);

    let (st, ct, metrics) = call(a.get(&s.url("/metrics")), None);
    assert_eq!(st, 200);
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    for needle in [
        "flowline_http_requests_total{method=\"POST\",route=\"/api/v1/probe/writes\",status=\"201\"} 2",
        "flowline_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "flowline_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/probe/writes\"}",
        "flowline_events_appended_total{topic=\"probe.events\"} 2",
        "flowline_events_delivered_total{group=\"probe.applier\",topic=\"probe.events\"} 2",
        "flowline_consumer_lag{group=\"probe.auditor\",topic=\"probe.events\"} 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }

    let log = s.log();
    let status = s.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let corr_lines: Vec<&str> = log.lines().filter(|l| l.contains("corr-e2e-42")).collect();
    assert!(
        corr_lines
            .iter()
            .any(|l| l.contains("probe write committed")),
        "handler log lines carry the correlation id"
    );
    assert!(corr_lines.iter().any(|l| l.contains("request handled")));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        log.contains("outbox relay flushed"),
        "relay flushed on shutdown:\n{log}"
    );
    assert!(log.contains("\"stopped\""));
}

#[test]
fn failing_consumer_dead_letters_then_retry_replay_and_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let s = Server::start(&data, &[]);
    let a = agent();
    // max_attempts is 2 in tests: two injected failures dead-letter the event;
    // the third attempt (the retry) succeeds.
    let (st, _, _) = call(
        a.post(&s.url("/api/v1/probe/writes")),
        Some(r#"{"key": "poison", "fail_times": 2}"#),
    );
    assert_eq!(st, 201);
    let mut dead = serde_json::Value::Null;
    wait_until("dead letter", Duration::from_secs(10), || {
        let (ok, out, _) = cli(&["events", "dlq", "list", "--json", "--data-dir", d], &[]);
        dead = if ok {
            json(&out)
        } else {
            serde_json::Value::Null
        };
        dead.as_array().is_some_and(|a| !a.is_empty())
    });
    assert_eq!(dead[0]["group"], "probe.applier");
    assert_eq!(dead[0]["status"], "dead");
    assert_eq!(dead[0]["attempts"], 2);
    assert!(dead[0]["error"]
        .as_str()
        .unwrap()
        .contains("injected failure 2 of 2"));
    let (_, _, b) = call(a.get(&s.url("/api/v1/probe/writes/poison")), None);
    assert_eq!(json(&b)["applied"]["probe.applier"], 0);
    assert_eq!(
        json(&b)["applied"]["probe.auditor"],
        1,
        "other groups are not held up"
    );
    let (ok, out, _) = cli(
        &["events", "tail", "dlq.probe.applier", "--data-dir", d],
        &[],
    );
    assert!(ok && out.contains("event.dead_lettered"), "{out}");

    let (ok, _, err) = cli(&["events", "dlq", "retry", "--data-dir", d], &[]);
    assert!(!ok && err.contains("--id N, or --all"), "{err}");
    let (ok, out, err) = cli(&["events", "dlq", "retry", "--all", "--data-dir", d], &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("1 dead letter"), "{out}");
    wait_until("retried event applied", Duration::from_secs(10), || {
        let (_, _, b) = call(a.get(&s.url("/api/v1/probe/writes/poison")), None);
        json(&b)["applied"]["probe.applier"] == 1
    });
    let (_, out, _) = cli(
        &["events", "dlq", "list", "--all", "--json", "--data-dir", d],
        &[],
    );
    assert_eq!(json(&out)[0]["status"], "resolved");

    // Replay the auditor from the start: the inbox turns redelivery into a no-op.
    for i in 0..3 {
        call(
            a.post(&s.url("/api/v1/probe/writes")),
            Some(&format!(r#"{{"key": "r{i}"}}"#)),
        );
    }
    wait_until("lag drained", Duration::from_secs(10), || {
        let (_, out, _) = cli(&["events", "groups", "--json", "--data-dir", d], &[]);
        json(&out).as_array().unwrap().iter().all(|g| g["lag"] == 0)
    });
    let (ok, out, err) = cli(
        &[
            "--data-dir",
            d,
            "events",
            "replay",
            "--group",
            "probe.auditor",
            "--from",
            "earliest",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("4 partition(s) repositioned"), "{out}");
    let (ok, _, err) = cli(
        &[
            "--data-dir",
            d,
            "events",
            "replay",
            "--group",
            "nobody",
            "--from",
            "0",
        ],
        &[],
    );
    assert!(!ok && err.contains("unknown consumer group"), "{err}");
    let (ok, _, err) = cli(
        &[
            "--data-dir",
            d,
            "events",
            "replay",
            "--group",
            "probe.auditor",
            "--from",
            "soon",
        ],
        &[],
    );
    assert!(!ok && err.contains("neither an offset"), "{err}");
    wait_until("replayed", Duration::from_secs(10), || {
        let (_, out, _) = cli(&["events", "groups", "--json", "--data-dir", d], &[]);
        json(&out).as_array().unwrap().iter().all(|g| g["lag"] == 0)
    });
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, metrics) = call(a.get(&s.url("/metrics")), None);
    assert!(
        metrics.contains(
            "flowline_events_delivered_total{group=\"probe.auditor\",topic=\"probe.events\"} 8"
        ),
        "replay redelivered the 4 events:\n{metrics}"
    );
    for key in ["poison", "r0", "r1", "r2"] {
        let (_, _, b) = call(a.get(&s.url(&format!("/api/v1/probe/writes/{key}"))), None);
        assert_eq!(
            json(&b)["applied"]["probe.auditor"],
            1,
            "no second effect for {key}"
        );
    }
    // Tail pages by per-partition offsets: a limit below one append batch works.
    let (ok, out, _) = cli(
        &[
            "events",
            "tail",
            "probe.events",
            "--limit",
            "2",
            "--data-dir",
            d,
        ],
        &[],
    );
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (_, out, _) = cli(
        &[
            "events",
            "tail",
            "probe.events",
            "--from",
            "latest",
            "--data-dir",
            d,
        ],
        &[],
    );
    assert_eq!(out.lines().count(), 0, "{out}");
    let (ok, out, _) = cli(&["events", "topics", "--data-dir", d], &[]);
    assert!(
        ok && out.contains("probe.events") && out.contains("dlq.probe.applier"),
        "{out}"
    );
    assert!(s.terminate().success());
}

/// The same server on PostgreSQL (one schema per service), when configured.
#[test]
fn serves_on_postgresql_when_configured() {
    let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") else {
        eprintln!("FLOWLINE_TEST_POSTGRES_URL not set: SQLite-only run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let prefix = format!("e2e{}_", uuid::Uuid::now_v7().simple());
    let env = [
        ("FLOWLINE__DATABASE__URL", url.as_str()),
        ("FLOWLINE__DATABASE__SCHEMA_PREFIX", prefix.as_str()),
    ];
    let s = Server::start(&data, &env);
    let a = agent();
    for i in 0..20 {
        let (st, _, body) = call(
            a.post(&s.url("/api/v1/probe/writes")),
            Some(&format!(r#"{{"key": "pg-{}"}}"#, i % 3)),
        );
        assert_eq!(st, 201, "{body}");
    }
    wait_until("applied on postgres", Duration::from_secs(15), || {
        (0..3).all(|k| {
            let (_, _, b) = call(a.get(&s.url(&format!("/api/v1/probe/writes/pg-{k}"))), None);
            let v = json(&b);
            v["writes"] == v["applied"]["probe.applier"]
                && v["writes"] == v["applied"]["probe.auditor"]
        })
    });
    // Identity on PostgreSQL: register, login, me, refresh, logout.
    let reg = serde_json::json!({ "email": "pg@example.com", "password": "correct horse battery", "display_name": "Pg" });
    let (st, _, body) = call(
        a.post(&s.url("/api/v1/auth/register")),
        Some(&reg.to_string()),
    );
    assert_eq!(st, 201, "{body}");
    let (st, _, body) = call(
        a.post(&s.url("/api/v1/auth/register")),
        Some(&reg.to_string()),
    );
    assert_eq!(
        (st, json(&body)["code"].as_str()),
        (409, Some("email_taken"))
    );
    let login =
        serde_json::json!({ "email": "pg@example.com", "password": "correct horse battery" });
    let (st, _, body) = call(
        a.post(&s.url("/api/v1/auth/login")),
        Some(&login.to_string()),
    );
    assert_eq!(st, 200, "{body}");
    let tokens = json(&body);
    let bearer = format!("Bearer {}", tokens["access_token"].as_str().unwrap());
    let (st, _, body) = call(
        a.get(&s.url("/api/v1/users/me"))
            .set("authorization", &bearer),
        None,
    );
    assert_eq!(
        (st, json(&body)["email"].as_str()),
        (200, Some("pg@example.com"))
    );
    let refresh = serde_json::json!({ "refresh_token": tokens["refresh_token"] });
    let (st, _, _) = call(
        a.post(&s.url("/api/v1/auth/refresh")),
        Some(&refresh.to_string()),
    );
    assert_eq!(st, 200);
    let (st, _, body) = call(
        a.post(&s.url("/api/v1/auth/refresh")),
        Some(&refresh.to_string()),
    );
    assert_eq!(
        (st, json(&body)["code"].as_str()),
        (401, Some("refresh_token_reused"))
    );
    let (st, _, _) = call(
        a.get(&s.url("/api/v1/users/me"))
            .set("authorization", &bearer),
        None,
    );
    assert_eq!(st, 401, "reuse revoked the session");

    // Catalog on PostgreSQL: an admin creates and updates a product.
    let (ok, _, err) = cli(
        &[
            "users",
            "create",
            "--email",
            "root@example.com",
            "--password",
            "admin passphrase 42",
            "--admin",
        ],
        &env,
    );
    assert!(ok, "{err}");
    let login =
        serde_json::json!({ "email": "root@example.com", "password": "admin passphrase 42" });
    let (_, _, body) = call(
        a.post(&s.url("/api/v1/auth/login")),
        Some(&login.to_string()),
    );
    let admin = format!("Bearer {}", json(&body)["access_token"].as_str().unwrap());
    let product = serde_json::json!({
        "sku": "PG-1", "title": "Postgres mug", "price": { "amount": 2500, "currency": "USD" },
        "category": "mugs", "brand": "elephant", "attributes": { "color": ["blue"] }, "popularity_score": 0.5,
    });
    let (st, _, body) = call(
        a.post(&s.url("/api/v1/products"))
            .set("authorization", &admin),
        Some(&product.to_string()),
    );
    assert_eq!(st, 201, "{body}");
    let id = json(&body)["id"].as_str().unwrap().to_owned();
    let patch = a
        .request("PATCH", &s.url(&format!("/api/v1/products/{id}")))
        .set("authorization", &admin)
        .set("if-match", "\"v1\"");
    let (st, _, body) = call(
        patch,
        Some(r#"{"popularity_score": 0.75, "in_stock": false}"#),
    );
    assert_eq!(st, 200, "{body}");
    let p = json(&body);
    assert_eq!(
        (
            p["version"].as_i64(),
            p["popularity_score"].as_f64(),
            p["in_stock"].as_bool()
        ),
        (Some(2), Some(0.75), Some(false))
    );

    let (ok, out, err) = cli(&["events", "groups", "--json"], &env);
    assert!(ok, "{err}");
    let groups = json(&out);
    assert_eq!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["topic"] == "probe.events")
            .map(|g| g["next_offset"].as_i64().unwrap())
            .sum::<i64>(),
        40
    );
    assert!(
        !data.join("eventlog.db").exists(),
        "nothing written to SQLite"
    );
    assert!(s.terminate().success());
}

/// Every route is in the OpenAPI 3.1 document with its errors, and the
/// interactive page is served from assets inside the binary.
#[test]
fn openapi_document_covers_every_route_and_the_docs_page_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    let a = agent();
    let (st, ct, body) = call(a.get(&s.url("/api/v1/openapi.json")), None);
    assert_eq!(st, 200);
    assert!(ct.starts_with("application/json"), "{ct}");
    let doc = json(&body);
    assert_eq!(doc["openapi"], "3.1.0");
    let routes = [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/.well-known/jwks.json"),
        ("post", "/api/v1/auth/register"),
        ("post", "/api/v1/auth/login"),
        ("post", "/api/v1/auth/refresh"),
        ("post", "/api/v1/auth/logout"),
        ("post", "/api/v1/auth/logout-all"),
        ("get", "/api/v1/auth/sessions"),
        ("delete", "/api/v1/auth/sessions/{id}"),
        ("get", "/api/v1/users/me"),
        ("patch", "/api/v1/users/me"),
        ("post", "/api/v1/users/me/password"),
        ("post", "/api/v1/admin/users/{id}/ban"),
        ("post", "/api/v1/probe/writes"),
        ("get", "/api/v1/probe/writes/{key}"),
        ("get", "/api/v1/products"),
        ("post", "/api/v1/products"),
        ("get", "/api/v1/products/{id}"),
        ("patch", "/api/v1/products/{id}"),
        ("delete", "/api/v1/products/{id}"),
        ("get", "/api/v1/search"),
        ("get", "/api/v1/inventory/{product_id}"),
        ("put", "/api/v1/inventory/{product_id}"),
        ("get", "/api/v1/inventory/{product_id}/movements"),
        ("post", "/api/v1/inventory/reservations"),
        ("get", "/api/v1/inventory/reservations/{order_id}"),
        ("post", "/api/v1/inventory/reservations/{order_id}/confirm"),
        ("post", "/api/v1/inventory/reservations/{order_id}/release"),
        ("post", "/api/v1/payments/tokens"),
        ("post", "/api/v1/payments"),
        ("get", "/api/v1/payments/{id}"),
        ("post", "/api/v1/payments/{id}/capture"),
        ("post", "/api/v1/payments/{id}/refund"),
        ("post", "/api/v1/carts"),
        ("get", "/api/v1/carts/{id}"),
        ("post", "/api/v1/carts/{id}/items"),
        ("patch", "/api/v1/carts/{id}/items/{product_id}"),
        ("delete", "/api/v1/carts/{id}/items/{product_id}"),
        ("post", "/api/v1/users/me/addresses"),
        ("get", "/api/v1/users/me/addresses"),
        ("delete", "/api/v1/users/me/addresses/{id}"),
        ("post", "/api/v1/ledger/entries"),
        ("get", "/api/v1/ledger/entries"),
        ("get", "/api/v1/ledger/accounts"),
        ("get", "/api/v1/ledger/accounts/{id}/balance"),
        ("get", "/api/v1/ledger/invoices"),
        ("get", "/api/v1/ledger/invoices/{number}"),
        ("post", "/api/v1/orders"),
        ("get", "/api/v1/orders"),
        ("get", "/api/v1/orders/{id}"),
        ("get", "/api/v1/orders/{id}/history"),
        ("get", "/api/v1/orders/{id}/events"),
        ("post", "/api/v1/orders/{id}/cancel"),
        ("get", "/api/v1/admin/orders"),
        ("post", "/api/v1/admin/orders/rebuild"),
        ("get", "/api/v1/admin/sagas"),
        ("get", "/api/v1/admin/sagas/{id}"),
        ("get", "/api/v1/admin/events"),
        ("get", "/api/v1/admin/consumer-groups"),
        ("get", "/api/v1/admin/traces"),
        ("get", "/api/v1/admin/traces/{id}"),
        ("get", "/api/v1/admin/flows/summary"),
        ("get", "/api/v1/admin/audit"),
        ("get", "/api/v1/admin/audit/alerts"),
        ("get", "/api/v1/admin/audit/verify"),
        ("get", "/api/v1/admin/analytics"),
        ("get", "/api/v1/admin/analytics/{job}"),
        ("get", "/api/v1/shipments/{id}"),
        ("get", "/api/v1/admin/shipments"),
        ("get", "/api/v1/admin/shipments/{id}"),
        ("post", "/api/v1/admin/shipments/{id}/status"),
        ("post", "/api/v1/admin/shipping/routes"),
        ("get", "/api/v1/notifications"),
        ("post", "/api/v1/notifications/{id}/read"),
        ("get", "/api/v1/notifications/preferences"),
        ("put", "/api/v1/notifications/preferences"),
        ("get", "/api/v1/admin/mailbox"),
        ("get", "/api/v1/admin/notifications/deliveries"),
        ("post", "/api/v1/admin/notifications/deliveries/{id}/retry"),
        ("get", "/api/v1/admin/notification-templates"),
        ("put", "/api/v1/admin/notification-templates/{key}/{locale}"),
        ("post", "/api/v1/workspaces"),
        ("get", "/api/v1/workspaces"),
        ("get", "/api/v1/workspaces/{id}"),
        ("get", "/api/v1/workspaces/{id}/members"),
        ("put", "/api/v1/workspaces/{id}/members/{user_id}"),
        ("get", "/api/v1/workspaces/{id}/presence"),
        ("get", "/api/v1/workspaces/{id}/channels"),
        ("post", "/api/v1/workspaces/{id}/channels"),
        ("post", "/api/v1/workspaces/{id}/direct"),
        ("get", "/api/v1/channels/{id}"),
        ("post", "/api/v1/channels/{id}/join"),
        ("post", "/api/v1/channels/{id}/leave"),
        ("post", "/api/v1/channels/{id}/members"),
        ("post", "/api/v1/channels/{id}/read"),
        ("get", "/api/v1/channels/{id}/typing"),
        ("post", "/api/v1/channels/{id}/typing"),
        ("get", "/api/v1/channels/{id}/messages"),
        ("post", "/api/v1/channels/{id}/messages"),
        ("get", "/api/v1/messages/{id}"),
        ("patch", "/api/v1/messages/{id}"),
        ("delete", "/api/v1/messages/{id}"),
        ("put", "/api/v1/messages/{id}/reactions/{emoji}"),
        ("delete", "/api/v1/messages/{id}/reactions/{emoji}"),
        ("get", "/api/v1/events"),
        ("get", "/api/v1/ws"),
    ];
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        routes.len(),
        "no undocumented or stale operations"
    );
    for (method, path) in routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let responses = op["responses"].as_object().unwrap();
        // The WebSocket upgrade succeeds with 101 Switching Protocols.
        assert!(
            responses
                .keys()
                .any(|c| c.starts_with('2') || (path == "/api/v1/ws" && c == "101")),
            "{method} {path}: no success response"
        );
        if !["/healthz", "/metrics", "/.well-known/jwks.json"].contains(&path) {
            let problem = responses
                .iter()
                .filter(|(c, _)| c.starts_with('4') || c.starts_with('5'))
                .any(|(_, r)| r["content"]["application/problem+json"].is_object());
            assert!(problem, "{method} {path}: no problem+json error documented");
        }
        if method == "post" || method == "patch" || method == "put" {
            let has_body = op["requestBody"]["content"]["application/json"]["schema"].is_object();
            let bodyless = [
                "/api/v1/auth/logout",
                "/api/v1/auth/logout-all",
                "/api/v1/admin/users/{id}/ban",
                "/api/v1/inventory/reservations/{order_id}/confirm",
                "/api/v1/inventory/reservations/{order_id}/release",
                "/api/v1/payments/{id}/capture",
                "/api/v1/carts",
                "/api/v1/orders/{id}/cancel",
                "/api/v1/admin/orders/rebuild",
                "/api/v1/notifications/{id}/read",
                "/api/v1/admin/notifications/deliveries/{id}/retry",
                "/api/v1/channels/{id}/join",
                "/api/v1/channels/{id}/leave",
                "/api/v1/channels/{id}/typing",
                "/api/v1/messages/{id}/reactions/{emoji}",
            ];
            assert!(
                has_body || bodyless.contains(&path),
                "{method} {path}: request schema missing"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(doc["components"]["schemas"]["RegisterRequest"]["properties"]["password"].is_object());

    let (st, ct, html) = call(a.get(&s.url("/api/v1/docs/")), None);
    assert_eq!(st, 200);
    assert!(
        ct.starts_with("text/html") && html.contains("swagger-ui"),
        "{ct}"
    );
    let (st, _, js) = call(a.get(&s.url("/api/v1/docs/swagger-ui-bundle.js")), None);
    assert_eq!(st, 200);
    assert!(
        js.len() > 100_000,
        "the UI's script is served from the binary"
    );
    assert!(s.terminate().success());
}
