//! Seeing the data flow, on the real binary: a trace that follows an order
//! from the request through the outbox, the log, the saga and every consumer;
//! logs that never carry PII or secrets; the audit chain with its alerts and
//! tamper detection; analytics fed by the same events.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// (status, x-trace-id, body).
fn traced(
    req: ureq::Request,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    send_reading(req, token, body, "x-trace-id")
}

fn admin_get(s: &Server, admin: &str, path: &str) -> (u16, Value) {
    let (st, _, v) = traced(agent().get(&s.url(path)), Some(admin), None);
    (st, v)
}

/// Places one order as a fresh customer; returns (order id, trace id).
fn place_order(s: &Server, admin: &str) -> (String, String) {
    let mug = product(s, admin, "MUG-T", 1250, "BRL");
    set_stock(s, admin, &mug, 10);
    let user = register(s, "carla@example.com");
    let address = json!({ "name": "Carla Dias", "line1": "Rua das Flores, 100", "city": "São Paulo",
        "postal_code": "01310-100", "country": "BR", "latitude": -23.561, "longitude": -46.656 });
    let (st, _, a) = send(
        agent().post(&s.url("/api/v1/users/me/addresses")),
        &user,
        Some(address),
    );
    assert_eq!(st, 201, "{a}");
    let card = tokenize(s, &user, "4242 4242 4242 4242");
    let (st, _, cart) = send(agent().post(&s.url("/api/v1/carts")), &user, None);
    assert_eq!(st, 201, "{cart}");
    let cart = cart["id"].as_str().unwrap().to_owned();
    let (st, _, b) = send(
        agent().post(&s.url(&format!("/api/v1/carts/{cart}/items"))),
        &user,
        Some(json!({ "product_id": mug, "quantity": 2 })),
    );
    assert_eq!(st, 200, "{b}");
    let body = json!({ "cart_id": cart, "shipping_address_id": a["id"],
        "payment": { "method": "credit_card", "card_token": card } });
    let (st, trace, placed) = traced(
        agent()
            .post(&s.url("/api/v1/orders"))
            .set("idempotency-key", "trace-1"),
        Some(&user),
        Some(body),
    );
    assert_eq!(st, 202, "{placed}");
    let id = placed["id"].as_str().unwrap().to_owned();
    let trace = trace.expect("x-trace-id on the response");
    wait_until("the order confirmed", Duration::from_secs(30), || {
        let (_, _, o) = send(
            agent().get(&s.url(&format!("/api/v1/orders/{id}"))),
            &user,
            None,
        );
        o["status"] == "CONFIRMED"
    });
    (id, trace)
}

fn names(spans: &[Value], name: &str) -> Vec<Value> {
    spans
        .iter()
        .filter(|s| s["name"] == name)
        .cloned()
        .collect()
}

#[test]
fn an_order_is_one_trace_from_the_request_through_the_log_the_saga_and_every_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let admin = admin_token(&s, &data);
    let (order, trace) = place_order(&s, &admin);

    // Everything the order caused lands in the trace: wait for the saga's
    // last step and the notification consumer.
    let mut detail = Value::Null;
    wait_until(
        "the whole flow in the trace store",
        Duration::from_secs(30),
        || {
            let (st, d) = admin_get(&s, &admin, &format!("/api/v1/admin/traces/{trace}"));
            detail = d;
            st == 200 && {
                let spans = detail["spans"].as_array().unwrap();
                let steps: HashSet<&str> = spans
                    .iter()
                    .filter(|s| s["name"] == "saga.step")
                    .filter_map(|s| s["attrs"]["step"].as_str())
                    .collect();
                steps.contains("confirm_stock")
                    && spans
                        .iter()
                        .any(|s| s["name"] == "event" && s["attrs"]["group"] == "notifications")
            }
        },
    );
    let spans = detail["spans"].as_array().unwrap().clone();
    assert!(spans.iter().all(|s| s["trace_id"] == trace.as_str()));
    let ids: HashSet<&str> = spans
        .iter()
        .map(|s| s["span_id"].as_str().unwrap())
        .collect();
    // One root, the request; every other span hangs off a span of the trace.
    let roots: Vec<&Value> = spans.iter().filter(|s| s["parent_id"].is_null()).collect();
    assert_eq!(roots.len(), 1, "{spans:#?}");
    assert_eq!(roots[0]["name"], "request");
    assert_eq!(roots[0]["attrs"]["route"], "/api/v1/orders");
    for sp in &spans {
        if let Some(p) = sp["parent_id"].as_str() {
            assert!(ids.contains(p), "orphan span {sp:#}");
        }
    }
    // Continuity across the bus: every handled event's parent is the publish
    // span of that event, and that publish belongs to the same trace.
    let publishes = names(&spans, "publish");
    let events = names(&spans, "event");
    assert!(events.len() >= 3, "{events:#?}");
    for ev in &events {
        let parent = ev["parent_id"].as_str().unwrap();
        let publ = publishes
            .iter()
            .find(|p| p["span_id"] == parent)
            .unwrap_or_else(|| panic!("event span without its publish: {ev:#}"));
        assert_eq!(publ["attrs"]["event_type"], ev["attrs"]["event_type"]);
        assert_eq!(publ["attrs"]["topic"], ev["attrs"]["topic"]);
    }
    let topics: HashSet<&str> = publishes
        .iter()
        .filter_map(|p| p["attrs"]["topic"].as_str())
        .collect();
    for t in ["orders.events", "inventory.events", "commerce.payments"] {
        assert!(topics.contains(t), "no publish to {t}: {topics:?}");
    }
    let steps: Vec<String> = names(&spans, "saga.step")
        .iter()
        .filter(|s| s["attrs"]["phase"] == "do" && s["attrs"]["status"] == "ok")
        .filter_map(|s| s["attrs"]["step"].as_str().map(str::to_owned))
        .collect();
    for want in ["reserve_stock", "charge_payment", "confirm_stock"] {
        assert!(steps.iter().any(|s| s == want), "{want} not in {steps:?}");
    }
    // The saga lists its trace, so an admin gets from one to the other.
    let (_, saga) = admin_get(&s, &admin, &format!("/api/v1/admin/sagas/{order}"));
    assert_eq!(saga["trace_id"], trace.as_str(), "{saga:#}");

    // The diagram names the contexts, the topics and the stores touched.
    let participants: Vec<&str> = detail["diagram"]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for p in [
        "client",
        "gateway",
        "orders",
        "orders.events",
        "saga order.place",
        "inventory",
        "payments",
        "notifications",
    ] {
        assert!(participants.contains(&p), "{p} not in {participants:?}");
    }
    let mermaid = detail["mermaid"].as_str().unwrap();
    assert!(mermaid.starts_with("sequenceDiagram\n"), "{mermaid}");
    assert!(
        mermaid.contains("saga_order_place->>inventory: "),
        "{mermaid}"
    );

    // The CLI prints the same diagram, beside the running server.
    let dd = data.to_str().unwrap();
    let (ok, out, err) = cli(&["flows", &trace, "--data-dir", dd], &[]);
    assert!(ok, "{err}");
    assert!(out.starts_with("sequenceDiagram\n"), "{out}");
    for p in &participants {
        assert!(out.contains(&format!(" as {p}\n")), "{p} missing in\n{out}");
    }
    let (ok, out, err) = cli(&["flows", "--summary", "--data-dir", dd], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("%% POST /api/v1/orders (1 traces)"), "{out}");
    assert!(
        out.contains("orders[orders] -->|\"order.created ×1 p50 "),
        "{out}"
    );
    let (ok, _, err) = cli(&["flows", "not-a-trace", "--data-dir", dd], &[]);
    assert!(!ok && err.contains("is not a trace id"), "{err}");

    // A caller's own traceparent is continued, not replaced.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let res = agent()
        .get(&s.url("/api/v1/products"))
        .set("traceparent", tp)
        .call()
        .unwrap();
    assert_eq!(
        res.header("x-trace-id"),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    let mut root = Value::Null;
    wait_until("the continued trace", Duration::from_secs(10), || {
        let (st, d) = admin_get(
            &s,
            &admin,
            "/api/v1/admin/traces/0af7651916cd43dd8448eb211c80319c",
        );
        root = d;
        st == 200
    });
    assert_eq!(root["spans"][0]["parent_id"], "b7ad6b7169203331");

    // The endpoint graph, and bad ids as problems.
    let (st, sum) = admin_get(&s, &admin, "/api/v1/admin/flows/summary");
    assert_eq!(st, 200);
    let orders = sum["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == "POST /api/v1/orders")
        .expect("the orders endpoint");
    assert!(orders["hops"].as_array().unwrap().iter().any(|h| {
        h["from"] == "orders.events"
            && h["p99_ms"].as_f64().unwrap() >= h["p50_ms"].as_f64().unwrap()
    }));
    let (st, p) = admin_get(&s, &admin, "/api/v1/admin/traces/xyz");
    assert_eq!(
        (st, p["code"].as_str()),
        (400, Some("malformed_request")),
        "{p}"
    );
    let (st, p) = admin_get(
        &s,
        &admin,
        &format!("/api/v1/admin/traces/{}", "1".repeat(32)),
    );
    assert_eq!((st, p["code"].as_str()), (404, Some("not_found")), "{p}");

    // Analytics saw the same order and the requests' latencies.
    wait_until("orders per minute", Duration::from_secs(20), || {
        let (_, w) = admin_get(&s, &admin, "/api/v1/admin/analytics/orders_per_minute");
        w["items"].as_array().is_some_and(|ws| {
            ws.iter()
                .map(|w| w["count"].as_i64().unwrap_or(0))
                .sum::<i64>()
                == 1
        })
    });
    wait_until("endpoint latency", Duration::from_secs(20), || {
        let (_, w) = admin_get(
            &s,
            &admin,
            "/api/v1/admin/analytics/endpoint_latency?key=POST%20/api/v1/orders",
        );
        w["items"].as_array().is_some_and(|ws| !ws.is_empty())
    });
}

#[test]
fn logs_never_carry_emails_passwords_tokens_or_card_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Debug level: the most a log ever says.
    let s = Server::start(&data, &[("FLOWLINE__LOG__LEVEL", "debug")]);
    let email = "maria.silva@example.org";
    let password = "hunter2 correct horse staple";
    let card = "4111 1111 1111 1111";
    let ua = format!("pii-test/1.0 ({email}; card {card})");
    let body = json!({ "email": email, "password": password, "display_name": "Maria" });
    let (st, _, reg) = traced(
        agent()
            .post(&s.url("/api/v1/auth/register"))
            .set("user-agent", &ua),
        None,
        Some(body),
    );
    assert_eq!(st, 201, "{reg}");
    let access = reg["access_token"].as_str().unwrap().to_owned();
    let refresh = reg["refresh_token"].as_str().unwrap_or_default().to_owned();
    let bad = json!({ "email": email, "password": "wrong password here" });
    let (st, _, _) = traced(
        agent()
            .post(&s.url("/api/v1/auth/login"))
            .set("user-agent", &ua),
        None,
        Some(bad),
    );
    assert_eq!(st, 401);
    let good = json!({ "email": email, "password": password });
    let (st, _, _) = traced(
        agent()
            .post(&s.url("/api/v1/auth/login"))
            .set("user-agent", &ua),
        None,
        Some(good),
    );
    assert_eq!(st, 200);
    let token = tokenize(&s, &access, card);
    // A malformed card number is echoed nowhere either.
    let (st, _, _) = traced(
        agent()
            .post(&s.url("/api/v1/payments/tokens"))
            .set("user-agent", &ua),
        Some(&access),
        Some(
            json!({ "number": "4111 1111 1111 1112", "exp_month": 12, "exp_year": 2040, "cvc": "123" }),
        ),
    );
    assert_eq!(st, 422);
    s.terminate();

    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        log.lines().count() > 20,
        "too little logged to judge:\n{log}"
    );
    let digits: String = card.chars().filter(char::is_ascii_digit).collect();
    for secret in [
        email,
        password,
        card,
        digits.as_str(),
        "4111 1111 1111 1112",
        access.as_str(),
        token.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "`{secret}` is in the logs:\n{}",
            log.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if !refresh.is_empty() {
        assert!(!log.contains(&refresh), "a refresh token is in the logs");
    }
    // Redacted, not silenced: the masked forms are there.
    assert!(
        log.contains("m***@example.org"),
        "no masked email in the logs"
    );
    assert!(
        log.contains("[REDACTED-PAN]"),
        "the user agent's card number was not logged redacted"
    );
    for line in log.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
}

fn audit_db_url(data: &Path) -> String {
    format!("sqlite://{}?mode=rw", data.join("audit.db").display())
}

#[test]
fn the_audit_chain_records_security_events_alerts_once_and_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Identity's own throttle would answer 429 before the sixth failure.
    let s = Server::start(&data, &[("FLOWLINE__AUTH__LOCKOUT_THRESHOLD", "100")]);
    let admin = admin_token(&s, &data);
    register(&s, "victim@example.com");
    for _ in 0..6 {
        let bad = json!({ "email": "victim@example.com", "password": "not the password" });
        let (st, _, _) = traced(agent().post(&s.url("/api/v1/auth/login")), None, Some(bad));
        assert_eq!(st, 401);
    }
    wait_until(
        "six failures in the audit log",
        Duration::from_secs(20),
        || {
            let (_, page) = admin_get(&s, &admin, "/api/v1/admin/audit?action=auth.login_failed");
            page["items"].as_array().is_some_and(|i| i.len() == 6)
        },
    );
    // Five within the window raise one alert; the sixth does not raise another.
    let (_, alerts) = admin_get(&s, &admin, "/api/v1/admin/audit/alerts");
    let alerts = alerts["items"].as_array().unwrap().clone();
    let account: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["rule"] == "failed_logins_account")
        .collect();
    assert_eq!(account.len(), 1, "{alerts:#?}");
    let (_, ev) = admin_get(&s, &admin, "/api/v1/admin/events?topic=audit.alerts");
    assert!(ev.to_string().contains("audit.alert_raised"), "{ev}");
    let (st, p) = admin_get(&s, &admin, "/api/v1/admin/audit?limit=0");
    assert_eq!((st, p["code"].as_str()), (400, Some("malformed_request")));

    // Login failures per minute, from the same events.
    wait_until("login failures counted", Duration::from_secs(20), || {
        let (_, w) = admin_get(
            &s,
            &admin,
            "/api/v1/admin/analytics/login_failures_per_minute",
        );
        w["items"].as_array().is_some_and(|ws| {
            ws.iter()
                .map(|w| w["count"].as_i64().unwrap_or(0))
                .sum::<i64>()
                == 6
        })
    });

    // Intact: verify passes, beside the running server.
    let dd = data.to_str().unwrap();
    let (ok, out, err) = cli(&["audit", "verify", "--data-dir", dd], &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("chain intact"), "{out}");
    let (_, report) = admin_get(&s, &admin, "/api/v1/admin/audit/verify");
    assert_eq!(report["ok"], true, "{report}");
    s.terminate();

    // Someone edits a record behind the platform's back.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut c = audit_db_url(&data)
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .unwrap()
            .connect()
            .await
            .unwrap();
        let n = sqlx::query("UPDATE audit_records SET ip = '10.0.0.99' WHERE seq = 3")
            .execute(&mut c)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(n, 1);
    });
    let (ok, out, _) = cli(&["audit", "verify", "--json", "--data-dir", dd], &[]);
    assert!(!ok, "a tampered chain verified:\n{out}");
    let report = json(&out);
    assert_eq!(report["ok"], false);
    assert_eq!(report["findings"][0]["seq"], 3, "{report:#}");
    assert_eq!(report["findings"][0]["kind"], "edited", "{report:#}");
}

#[test]
fn an_otlp_endpoint_needs_the_feature_and_an_http_url() {
    let (ok, _, err) = cli(
        &["config", "show"],
        &[("FLOWLINE__TELEMETRY__OTLP_ENDPOINT", "collector:4318")],
    );
    assert!(
        !ok && err.contains("`telemetry.otlp_endpoint`: must be an http(s) URL"),
        "{err}"
    );
    let (ok, out, err) = cli(
        &["config", "show"],
        &[(
            "FLOWLINE__TELEMETRY__OTLP_ENDPOINT",
            "http://127.0.0.1:4318/v1/traces",
        )],
    );
    if cfg!(feature = "otlp") {
        assert!(
            ok && out.contains("otlp_endpoint = \"http://127.0.0.1:4318/v1/traces\""),
            "{err}"
        );
    } else {
        assert!(!ok && err.contains("built without OTLP export"), "{err}");
    }
}
