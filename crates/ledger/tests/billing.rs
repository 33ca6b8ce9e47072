//! Billing from payment events, and verify() catching tampering.

mod support;

use flowline_ledger::{Billing, InvoiceKind, Ledger, Posting, Side};
use flowline_store::{Durability, Handler};
use std::sync::Arc;
use support::*;

fn p(account: &str, direction: Side, amount: i64) -> Posting {
    Posting {
        account: account.into(),
        direction,
        amount,
        currency: "BRL".into(),
    }
}

async fn balance(l: &Ledger, account: &str) -> i64 {
    let b = l.balance(account, None).await.unwrap();
    b.balances.iter().map(|b| b.balance).sum()
}

/// Counts that any effect would change.
async fn footprint(l: &Ledger) -> (usize, usize, i64, i64) {
    let entries = l.entries(0, 1000).await.unwrap().len();
    let invoices = l.invoices(None).await.unwrap().len();
    let events = scalar(&l.db, "SELECT count(*) FROM outbox").await;
    let inbox = scalar(&l.db, "SELECT count(*) FROM inbox").await;
    (entries, invoices, events, inbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_and_refunds_issue_gapless_documents_once() {
    for b in backends(Durability::Full) {
        let name = b.name();
        let l = ledger(&b).await;
        let billing = Billing(Arc::clone(&l));
        let c1 = captured("pay-1", 29990, 2990, "BRL");
        let c2 = captured("pay-2", 10000, 0, "BRL");
        let r1 = refunded("pay-1", "ref-1", 10000, 1000, "BRL", 10000);
        for ev in [&c1, &c2, &r1] {
            billing.handle(ev).await.unwrap();
        }
        let before = footprint(&l).await;
        for ev in [&c1, &c2, &r1, &r1, &c1] {
            billing.handle(ev).await.unwrap();
        }
        billing.handle(&failed("pay-3")).await.unwrap();
        assert_eq!(
            footprint(&l).await,
            before,
            "{name}: redelivery changed something"
        );

        let docs = l.invoices(None).await.unwrap();
        let numbers: Vec<&str> = docs.iter().map(|d| d.number.as_str()).collect();
        assert_eq!(numbers, ["INV-000001", "INV-000002", "CN-000001"], "{name}");
        let cn = l.invoice("CN-000001").await.unwrap();
        assert_eq!(cn.kind, InvoiceKind::CreditNote);
        assert_eq!(cn.invoice_number.as_deref(), Some("INV-000001"));
        assert_eq!(cn.refund_id.as_deref(), Some("ref-1"));
        assert_eq!((cn.amount, cn.tax_amount), (10000, 1000));
        assert_eq!(l.invoices(Some("pay-1")).await.unwrap().len(), 2, "{name}");

        let inv1 = l.invoice("INV-000001").await.unwrap();
        let e1 = l.entry("capture:pay-1").await.unwrap();
        assert_eq!(inv1.entry_id, e1.entry_id);
        assert_eq!(e1.occurred_at, "2026-03-01T12:00:00Z");
        assert_eq!(
            e1.postings,
            [
                p("provider_clearing", Side::Debit, 29990),
                p("merchant_revenue", Side::Credit, 27000),
                p("tax_payable", Side::Credit, 2990),
            ],
            "{name}"
        );
        let e2 = l.entry("capture:pay-2").await.unwrap();
        assert_eq!(
            e2.postings,
            [
                p("provider_clearing", Side::Debit, 10000),
                p("merchant_revenue", Side::Credit, 10000)
            ],
            "{name}: no tax posting when the tax is 0"
        );
        let e3 = l.entry("refund:ref-1").await.unwrap();
        assert_eq!(
            e3.postings,
            [
                p("refunds", Side::Debit, 9000),
                p("tax_payable", Side::Debit, 1000),
                p("provider_clearing", Side::Credit, 10000),
            ],
            "{name}"
        );
        assert_eq!(balance(&l, "provider_clearing").await, 29990, "{name}");
        assert_eq!(balance(&l, "merchant_revenue").await, 37000, "{name}");
        assert_eq!(balance(&l, "tax_payable").await, 1990, "{name}");
        assert_eq!(balance(&l, "refunds").await, 9000, "{name}");
        assert_eq!(outbox_count(&l.db, "invoice.issued").await, 2, "{name}");
        assert_eq!(outbox_count(&l.db, "credit_note.issued").await, 1, "{name}");
        assert_eq!(
            outbox_count(&l.db, "ledger.entry_posted").await,
            3,
            "{name}"
        );

        // A refund before its capture is billed: retried, and nothing is kept meanwhile.
        let early = refunded("pay-4", "ref-4", 500, 0, "BRL", 500);
        let err = billing.handle(&early).await.unwrap_err();
        assert!(!err.permanent, "{name}: {}", err.message);
        assert_eq!(footprint(&l).await, before, "{name}");
        billing
            .handle(&captured("pay-4", 500, 0, "BRL"))
            .await
            .unwrap();
        billing.handle(&early).await.unwrap();
        assert_eq!(
            l.invoice("CN-000002")
                .await
                .unwrap()
                .invoice_number
                .as_deref(),
            Some("INV-000003")
        );

        // The same capture under another event id issues nothing new.
        billing
            .handle(&captured("pay-1", 29990, 2990, "BRL"))
            .await
            .unwrap();
        let bad = captured("pay-5", 100, 200, "BRL");
        assert!(billing.handle(&bad).await.unwrap_err().permanent, "{name}");
        assert_eq!(l.invoices(None).await.unwrap().len(), 5, "{name}");
        let report = l.verify().await.unwrap();
        assert!(report.is_ok(), "{name}: {report:?}");
        assert_eq!((report.entries, report.postings), (5, 12), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_tampering() {
    for b in backends(Durability::Full) {
        let name = b.name();
        let l = ledger(&b).await;
        let billing = Billing(Arc::clone(&l));
        billing
            .handle(&captured("pay-1", 5000, 500, "BRL"))
            .await
            .unwrap();
        billing
            .handle(&captured("pay-2", 7000, 0, "USD"))
            .await
            .unwrap();
        billing
            .handle(&refunded("pay-1", "ref-1", 1000, 100, "BRL", 1000))
            .await
            .unwrap();
        let ok = l.verify().await.unwrap();
        assert!(ok.is_ok(), "{name}: {ok:?}");
        assert_eq!(ok.entries, 3);
        assert!(ok.accounts >= 5, "{name}: {ok:?}");

        exec(&l.db, "UPDATE balances SET credits = credits + 1 WHERE account = 'merchant_revenue' AND currency = 'USD'").await;
        let r = l.verify().await.unwrap();
        assert!(!r.is_ok());
        assert_eq!(r.mismatched.len(), 1, "{name}: {r:?}");
        assert_eq!(
            (
                r.mismatched[0].account.as_str(),
                r.mismatched[0].currency.as_str()
            ),
            ("merchant_revenue", "USD")
        );
        assert!(
            r.unbalanced.is_empty() && r.sequence_gaps.is_empty(),
            "{name}: {r:?}"
        );
        exec(&l.db, "UPDATE balances SET credits = credits - 1 WHERE account = 'merchant_revenue' AND currency = 'USD'").await;
        assert!(l.verify().await.unwrap().is_ok(), "{name}");

        // A missing projection row is a mismatch too.
        exec(&l.db, "DELETE FROM balances WHERE account = 'refunds'").await;
        let r = l.verify().await.unwrap();
        assert_eq!(r.mismatched.len(), 1, "{name}: {r:?}");
        assert!(r.mismatched[0].projected.is_none() && r.mismatched[0].replayed.is_some());

        let seq = l.entry("capture:pay-2").await.unwrap().seq;
        exec(
            &l.db,
            &format!("UPDATE postings SET debit = debit + 5 WHERE entry_seq = {seq} AND debit > 0"),
        )
        .await;
        let r = l.verify().await.unwrap();
        assert_eq!(r.unbalanced.len(), 1, "{name}: {r:?}");
        assert_eq!(r.unbalanced[0].seq, seq);
        assert!(
            r.unbalanced[0].problems.iter().any(|p| p.contains("USD")),
            "{name}: {r:?}"
        );

        // The journal itself refuses edits.
        let edit = flowline_store::on_pool!(write & l.db, |p| sqlx::query(
            "UPDATE journal SET description = 'x'"
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()));
        assert!(edit.is_err(), "{name}: the journal must be append-only");

        exec(
            &l.db,
            "UPDATE sequences SET value = value + 1 WHERE name = 'invoice'",
        )
        .await;
        let r = l.verify().await.unwrap();
        assert_eq!(r.sequence_gaps.len(), 1, "{name}: {r:?}");
        assert!(
            r.sequence_gaps[0].detail.contains("INV-000003"),
            "{name}: {r:?}"
        );
    }
}
