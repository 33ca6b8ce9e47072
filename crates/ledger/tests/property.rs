//! State-machine property: any sequence of captures, refunds, failures and
//! redeliveries keeps the ledger balanced and equal to a reference model.

mod support;

use flowline_core::RecordedEvent;
use flowline_ledger::{Billing, Ledger};
use flowline_store::{Durability, Handler};
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::BTreeMap;
use std::sync::Arc;
use support::*;

const CURRENCIES: [&str; 3] = ["BRL", "USD", "EUR"];

#[derive(Debug, Clone)]
enum Op {
    Capture {
        amount: i64,
        tax_pct: i64,
        currency: usize,
    },
    Refund {
        capture: Index,
        amount: i64,
    },
    Fail,
    Redeliver {
        event: Index,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1i64..100_000, 0i64..=30, 0..CURRENCIES.len())
            .prop_map(|(amount, tax_pct, currency)| Op::Capture { amount, tax_pct, currency }),
        3 => (any::<Index>(), 1i64..100_000).prop_map(|(capture, amount)| Op::Refund { capture, amount }),
        1 => Just(Op::Fail),
        2 => any::<Index>().prop_map(|event| Op::Redeliver { event }),
    ]
}

struct Capture {
    payment_id: String,
    currency: &'static str,
    amount: i64,
    tax: i64,
    refunded: i64,
}

/// Expected balances: (account, currency) → (debits, credits).
#[derive(Default)]
struct Model {
    captures: Vec<Capture>,
    refunds: usize,
    books: BTreeMap<(String, String), (i64, i64)>,
}

impl Model {
    fn book(&mut self, account: &str, currency: &str, debit: i64, credit: i64) {
        if debit == 0 && credit == 0 {
            return;
        }
        let t = self
            .books
            .entry((account.into(), currency.into()))
            .or_default();
        t.0 += debit;
        t.1 += credit;
    }
}

async fn stored_books(l: &Ledger) -> BTreeMap<(String, String), (i64, i64)> {
    let rows: Vec<(String, String, i64, i64)> =
        flowline_store::on_pool!(write & l.db, |p| sqlx::query_as(
            "SELECT account, currency, debits, credits FROM balances"
        )
        .fetch_all(p)
        .await)
        .unwrap();
    rows.into_iter()
        .map(|(a, c, d, k)| ((a, c), (d, k)))
        .collect()
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let b = backends(Durability::Relaxed).remove(0);
    let l = ledger(&b).await;
    let billing = Billing(Arc::clone(&l));
    let mut model = Model::default();
    let mut delivered: Vec<RecordedEvent> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let ev = match op {
            Op::Capture {
                amount,
                tax_pct,
                currency,
            } => {
                let tax = amount * tax_pct / 100;
                let c = Capture {
                    payment_id: format!("pay-{step}"),
                    currency: CURRENCIES[currency],
                    amount,
                    tax,
                    refunded: 0,
                };
                model.book("provider_clearing", c.currency, amount, 0);
                model.book("merchant_revenue", c.currency, 0, amount - tax);
                model.book("tax_payable", c.currency, 0, tax);
                let ev = captured(&c.payment_id, amount, tax, c.currency);
                model.captures.push(c);
                ev
            }
            Op::Refund { capture, amount } => {
                if model.captures.is_empty() {
                    continue;
                }
                let i = capture.index(model.captures.len());
                let c = &mut model.captures[i];
                let amount = amount.min(c.amount - c.refunded);
                if amount == 0 {
                    continue;
                }
                let tax = amount * c.tax / c.amount;
                c.refunded += amount;
                let (pid, cur, total) = (c.payment_id.clone(), c.currency, c.refunded);
                model.refunds += 1;
                model.book("refunds", cur, amount - tax, 0);
                model.book("tax_payable", cur, tax, 0);
                model.book("provider_clearing", cur, 0, amount);
                refunded(&pid, &format!("ref-{step}"), amount, tax, cur, total)
            }
            Op::Fail => failed(&format!("pay-{step}")),
            Op::Redeliver { event } => {
                if delivered.is_empty() {
                    continue;
                }
                delivered[event.index(delivered.len())].clone()
            }
        };
        billing
            .handle(&ev)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {step}: {}", e.message)))?;
        delivered.push(ev);
        for (currency, debits, credits) in trial_balance(&l.db).await {
            prop_assert_eq!(
                debits,
                credits,
                "step {}: {} out of balance",
                step,
                currency
            );
        }
        prop_assert_eq!(&stored_books(&l).await, &model.books, "step {}", step);
    }
    let report = l.verify().await.unwrap();
    prop_assert!(report.is_ok(), "{:?}", report);
    let docs = l.invoices(None).await.unwrap();
    let invoices = docs.iter().filter(|d| d.number.starts_with("INV-")).count();
    prop_assert_eq!(invoices, model.captures.len());
    prop_assert_eq!(docs.len() - invoices, model.refunds);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn billing_keeps_the_books_balanced(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
