//! Posting, idempotency, validation, balances now and as of past times, HTTP.

mod support;

use flowline_ledger::accounts::*;
use flowline_ledger::{Ledger, NewEntry, NewPosting, Side};
use flowline_store::Durability;
use support::*;

fn entry(reference: &str, at: Option<&str>, postings: &[(&str, Side, i64, &str)]) -> NewEntry {
    NewEntry {
        reference: reference.into(),
        description: format!("test {reference}"),
        occurred_at: at.map(str::to_owned),
        postings: postings
            .iter()
            .map(|(a, d, n, c)| NewPosting {
                account: (*a).into(),
                direction: *d,
                amount: *n,
                currency: (*c).into(),
            })
            .collect(),
    }
}

/// (currency, debits, credits, balance) of an account now.
async fn bal(l: &Ledger, account: &str) -> Vec<(String, i64, i64, i64)> {
    l.balance(account, None)
        .await
        .unwrap()
        .balances
        .into_iter()
        .map(|b| (b.currency, b.debits, b.credits, b.balance))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_entries_post_and_bad_ones_store_nothing() {
    for b in backends(Durability::Full) {
        let name = b.name();
        let l = ledger(&b).await;
        let ctx = ctx();
        let sale = entry(
            "sale-1",
            None,
            &[
                (CUSTOMER_RECEIVABLE, Side::Debit, 1100, "USD"),
                (MERCHANT_REVENUE, Side::Credit, 1000, "USD"),
                (TAX_PAYABLE, Side::Credit, 100, "USD"),
            ],
        );
        let e = l.post(&ctx, sale.clone()).await.unwrap();
        assert_eq!(e.postings.len(), 3, "{name}");
        assert_eq!(
            bal(&l, CUSTOMER_RECEIVABLE).await,
            [("USD".into(), 1100, 0, 1100)]
        );
        assert_eq!(
            bal(&l, MERCHANT_REVENUE).await,
            [("USD".into(), 0, 1000, 1000)]
        );
        assert_eq!(bal(&l, TAX_PAYABLE).await, [("USD".into(), 0, 100, 100)]);
        let settle = entry(
            "settle-1",
            None,
            &[
                (CASH, Side::Debit, 1100, "USD"),
                (CUSTOMER_RECEIVABLE, Side::Credit, 1100, "USD"),
            ],
        );
        l.post(&ctx, settle).await.unwrap();
        assert_eq!(
            bal(&l, CUSTOMER_RECEIVABLE).await,
            [("USD".into(), 1100, 1100, 0)]
        );
        assert_eq!(bal(&l, CASH).await, [("USD".into(), 1100, 0, 1100)]);
        assert_eq!(
            outbox_count(&l.db, "ledger.entry_posted").await,
            2,
            "{name}"
        );

        // The same reference and postings (in any order) is the same entry.
        let mut again = sale.clone();
        again.postings.reverse();
        let replay = l.submit(&ctx, again).await.unwrap();
        assert!(!replay.created, "{name}");
        assert_eq!(replay.entry, e, "{name}");
        let mut other = sale.clone();
        other.postings[0].amount = 1200;
        other.postings[1].amount = 1100;
        let err = l.post(&ctx, other).await.unwrap_err();
        assert_eq!(err.0.status, 409, "{name}");

        let journal_before = l.entries(0, 1000).await.unwrap();
        let balances_before = trial_balance(&l.db).await;
        // Balanced in total (100 = 100) but not per currency.
        let err = l
            .post(
                &ctx,
                entry(
                    "mixed",
                    None,
                    &[
                        (CASH, Side::Debit, 100, "USD"),
                        (MERCHANT_REVENUE, Side::Credit, 100, "BRL"),
                    ],
                ),
            )
            .await
            .unwrap_err();
        assert_eq!(err.0.code, "unbalanced_entry", "{name}");
        assert_eq!(err.0.status, 422);
        let detail = err.0.detail.clone().unwrap();
        assert!(
            detail.contains("USD") && detail.contains("BRL") && detail.contains("100"),
            "{detail}"
        );

        let refused = [
            (
                entry(
                    "bad-account",
                    None,
                    &[
                        ("petty_cash", Side::Debit, 5, "USD"),
                        (CASH, Side::Credit, 5, "USD"),
                    ],
                ),
                "postings[0].account",
            ),
            (
                entry(
                    "zero",
                    None,
                    &[
                        (CASH, Side::Debit, 0, "USD"),
                        (MERCHANT_REVENUE, Side::Credit, 0, "USD"),
                    ],
                ),
                "postings[0].amount",
            ),
            (
                entry("single", None, &[(CASH, Side::Debit, 5, "USD")]),
                "postings",
            ),
            (
                entry(
                    "money",
                    None,
                    &[
                        (CASH, Side::Debit, 5, "ZZZ"),
                        (MERCHANT_REVENUE, Side::Credit, 5, "ZZZ"),
                    ],
                ),
                "postings[0].currency",
            ),
            (
                entry(
                    "when",
                    Some("yesterday"),
                    &[
                        (CASH, Side::Debit, 5, "USD"),
                        (MERCHANT_REVENUE, Side::Credit, 5, "USD"),
                    ],
                ),
                "occurred_at",
            ),
            (
                entry(
                    "",
                    None,
                    &[
                        (CASH, Side::Debit, 5, "USD"),
                        (MERCHANT_REVENUE, Side::Credit, 5, "USD"),
                    ],
                ),
                "reference",
            ),
        ];
        for (bad, field) in refused {
            let err = l.post(&ctx, bad).await.unwrap_err();
            assert_eq!(err.0.code, "validation_failed", "{name} {field}");
            assert!(
                err.0.errors.iter().any(|f| f.field == field),
                "{name}: {field} not named in {:?}",
                err.0.errors
            );
        }
        assert_eq!(l.entries(0, 1000).await.unwrap(), journal_before, "{name}");
        assert_eq!(trial_balance(&l.db).await, balances_before, "{name}");
        assert_eq!(
            outbox_count(&l.db, "ledger.entry_posted").await,
            2,
            "{name}"
        );
        assert!(l.verify().await.unwrap().is_ok(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_as_of_replays_the_past() {
    let ts = |s: &str| flowline_core::Timestamp::parse_rfc3339(s).unwrap();
    for b in backends(Durability::Full) {
        let name = b.name();
        let l = ledger(&b).await;
        let ctx = ctx();
        for (i, (at, n)) in [
            ("2026-01-01T00:00:00Z", 10),
            ("2026-02-01T00:00:00Z", 20),
            ("2026-03-01T00:00:00Z", 40),
        ]
        .into_iter()
        .enumerate()
        {
            let e = entry(
                &format!("e{i}"),
                Some(at),
                &[
                    (CASH, Side::Debit, n, "EUR"),
                    (MERCHANT_REVENUE, Side::Credit, n, "EUR"),
                ],
            );
            l.post(&ctx, e).await.unwrap();
        }
        // Posted late, occurred early: the replay orders by occurrence, not seq.
        l.post(
            &ctx,
            entry(
                "late",
                Some("2025-12-15T00:00:00Z"),
                &[
                    (CASH, Side::Credit, 3, "EUR"),
                    (REFUNDS, Side::Debit, 3, "EUR"),
                ],
            ),
        )
        .await
        .unwrap();
        for (as_of, cash, revenue) in [
            ("2025-12-01T00:00:00Z", None, None),
            ("2025-12-31T00:00:00Z", Some(-3), None),
            ("2026-01-15T00:00:00Z", Some(7), Some(10)),
            ("2026-02-01T00:00:00Z", Some(27), Some(30)),
            ("2026-02-15T00:00:00Z", Some(27), Some(30)),
            ("2026-04-01T00:00:00Z", Some(67), Some(70)),
        ] {
            let c = l.balance(CASH, Some(ts(as_of))).await.unwrap();
            assert_eq!(c.as_of.as_deref(), Some(as_of), "{name}");
            assert_eq!(
                c.balances.first().map(|b| b.balance),
                cash,
                "{name} cash {as_of}"
            );
            let r = l.balance(MERCHANT_REVENUE, Some(ts(as_of))).await.unwrap();
            assert_eq!(
                r.balances.first().map(|b| b.balance),
                revenue,
                "{name} revenue {as_of}"
            );
        }
        let now = l.balance(CASH, None).await.unwrap();
        assert_eq!(now.as_of, None);
        assert_eq!(now.balances[0].balance, 67, "{name}");
        assert_eq!(l.balance("nope", None).await.unwrap_err().0.status, 404);
        let page = l.entries(1, 2).await.unwrap();
        assert_eq!(
            page.iter()
                .map(|e| e.reference.as_str())
                .collect::<Vec<_>>(),
            ["e1", "e2"],
            "{name}"
        );
    }
}

mod http {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;
    use utoipa::OpenApi;

    async fn call(
        app: &axum::Router,
        method: &str,
        uri: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn routes_answer_and_name_bad_input() {
        let b = backends(Durability::Full).remove(0);
        let app: axum::Router =
            flowline_ledger::routes::routes(ledger(&b).await).layer(axum::Extension(ctx()));
        let body = serde_json::json!({
            "reference": "r1", "description": "manual", "occurred_at": "2026-01-01T00:00:00Z",
            "postings": [
                {"account": "cash", "direction": "debit", "amount": 500, "currency": "USD"},
                {"account": "merchant_revenue", "direction": "credit", "amount": 500, "currency": "USD"}]
        });
        let (s, e) = call(&app, "POST", "/ledger/entries", Some(body.clone())).await;
        assert_eq!(s, StatusCode::CREATED, "{e}");
        assert_eq!(e["postings"][0]["direction"], "debit");
        let (s, _) = call(&app, "POST", "/ledger/entries", Some(body)).await;
        assert_eq!(s, StatusCode::OK);
        let (s, p) = call(&app, "GET", "/ledger/entries?after=0&limit=10", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(p["items"].as_array().unwrap().len(), 1);
        let (s, p) = call(&app, "GET", "/ledger/entries?cursor=1", None).await;
        assert_eq!(
            (s, p["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("malformed_request"))
        );
        let (s, p) = call(&app, "GET", "/ledger/accounts", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(p["items"].as_array().unwrap().len(), 6);
        let (s, p) = call(
            &app,
            "GET",
            "/ledger/accounts/cash/balance?as_of=2026-01-02T00:00:00Z",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(p["balances"][0]["balance"], 500);
        assert_eq!(p["normal_side"], "debit");
        let (s, p) = call(
            &app,
            "GET",
            "/ledger/accounts/cash/balance?as_of=soon",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(p["errors"][0]["field"], "as_of");
        let (s, _) = call(&app, "GET", "/ledger/accounts/petty/balance", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = call(&app, "GET", "/ledger/invoices/INV-000001", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, p) = call(&app, "GET", "/ledger/invoices?payment_id=x", None).await;
        assert_eq!(
            (s, p["items"].as_array().map(Vec::len)),
            (StatusCode::OK, Some(0))
        );
        let bad = serde_json::json!({"reference": "r2", "postings": [], "extra": 1});
        let (s, _) = call(&app, "POST", "/ledger/entries", Some(bad)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

        let doc = serde_json::to_value(flowline_ledger::routes::LedgerApi::openapi()).unwrap();
        for path in [
            "/api/v1/ledger/entries",
            "/api/v1/ledger/accounts/{id}/balance",
            "/api/v1/ledger/invoices/{number}",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} not documented");
        }
    }
}
