//! Billing: invoices for captures and credit notes for refunds.
//!
//! Each effect (number, document, journal entry, event) commits in one
//! transaction together with the inbox claim of the payment event, so a
//! redelivered event changes nothing. Numbers come from a counter row bumped in
//! that same transaction: a rollback returns the number, so they stay gapless.

use crate::{accounts, Invoice, InvoiceKind, Ledger, NewEntry, NewPosting, Side};
use flowline_core::{Currency, Envelope, EventDraft, RecordedEvent, Timestamp};
use flowline_http::ApiError;
use flowline_store::{inbox, outbox, Handler, HandlerError, StoreError, Tx};
use serde::Deserialize;
use std::sync::Arc;

pub const PAYMENTS_TOPIC: &str = "commerce.payments";
pub const BILLING_GROUP: &str = "ledger.billing";

/// The billing consumer of `commerce.payments` (group [`BILLING_GROUP`]).
pub struct Billing(pub Arc<Ledger>);

#[derive(Debug, Deserialize)]
struct Captured {
    payment_id: String,
    #[serde(default)]
    order_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    amount: i64,
    currency: String,
    #[serde(default)]
    tax_amount: i64,
    #[serde(default)]
    captured_at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Refunded {
    payment_id: String,
    refund_id: String,
    #[serde(default)]
    order_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    amount: i64,
    currency: String,
    #[serde(default)]
    tax_amount: i64,
    #[serde(default)]
    refunded_at: Option<String>,
}

impl Handler for Billing {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        if e.topic != PAYMENTS_TOPIC {
            return Ok(());
        }
        match e.event_type.as_str() {
            "payment.captured" => self.captured(e, parse(e)?).await,
            "payment.refunded" => self.refunded(e, parse(e)?).await,
            _ => Ok(()),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(e: &Envelope) -> Result<T, HandlerError> {
    serde_json::from_value(e.payload.clone()).map_err(|err| {
        HandlerError::permanent(format!("{} {}: bad payload: {err}", e.event_type, e.id))
    })
}

/// Checks amounts a payment event carries: gross > 0, 0 <= tax <= gross.
fn check_amounts(e: &Envelope, amount: i64, tax: i64, currency: &str) -> Result<(), HandlerError> {
    if amount <= 0 || tax < 0 || tax > amount || Currency::parse(currency).is_err() {
        return Err(HandlerError::permanent(format!(
            "{} {}: amount {amount}, tax {tax}, currency `{currency}` cannot be billed",
            e.event_type, e.id
        )));
    }
    Ok(())
}

/// The event's own time when it is a valid RFC 3339 time, else the envelope's.
fn occurred(e: &Envelope, at: Option<&str>) -> String {
    at.and_then(|s| Timestamp::parse_rfc3339(s).ok())
        .unwrap_or(e.occurred_at)
        .to_rfc3339()
}

fn posting(account: &str, direction: Side, amount: i64, currency: &str) -> NewPosting {
    NewPosting {
        account: account.into(),
        direction,
        amount,
        currency: currency.into(),
    }
}

/// 4xx problems will not go away on retry; anything else might.
fn from_api(e: ApiError) -> HandlerError {
    let p = &e.0;
    let msg = format!("{}: {}", p.code, p.detail.as_deref().unwrap_or(p.title));
    if p.status >= 500 {
        HandlerError::transient(msg)
    } else {
        HandlerError::permanent(msg)
    }
}

/// Takes the next number of `kind` within `tx`.
async fn next_number(tx: &mut Tx, kind: InvoiceKind) -> Result<String, StoreError> {
    let n: i64 = flowline_store::on_tx!(&mut *tx, |c| sqlx::query_scalar(
        "UPDATE sequences SET value = value + 1 WHERE name = $1 RETURNING value"
    )
    .bind(kind.as_str())
    .fetch_one(c)
    .await)?;
    Ok(format!("{}{n:06}", kind.prefix()))
}

async fn find_invoice(
    tx: &mut Tx,
    column: &str,
    kind: InvoiceKind,
    id: &str,
) -> Result<Option<Invoice>, StoreError> {
    let sql = format!(
        "SELECT {} FROM invoices WHERE {column} = $1 AND kind = $2",
        crate::INVOICE_COLUMNS
    );
    let row: Option<crate::InvoiceRow> =
        flowline_store::on_tx!(&mut *tx, |c| sqlx::query_as(&sql)
            .bind(id)
            .bind(kind.as_str())
            .fetch_optional(c)
            .await)?;
    row.map(crate::invoice).transpose()
}

async fn insert_invoice(tx: &mut Tx, i: &Invoice, issued_at: Timestamp) -> Result<(), StoreError> {
    flowline_store::on_tx!(&mut *tx, |c| sqlx::query(
        "INSERT INTO invoices (number, kind, payment_id, refund_id, invoice_number, amount,
            tax_amount, currency, entry_id, issued_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    )
    .bind(&i.number)
    .bind(i.kind.as_str())
    .bind(&i.payment_id)
    .bind(i.refund_id.as_deref())
    .bind(i.invoice_number.as_deref())
    .bind(i.amount)
    .bind(i.tax_amount)
    .bind(&i.currency)
    .bind(&i.entry_id)
    .bind(issued_at.as_micros())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

impl Billing {
    async fn captured(&self, e: &Envelope, p: Captured) -> Result<(), HandlerError> {
        check_amounts(e, p.amount, p.tax_amount, &p.currency)?;
        let ledger = &self.0;
        let mut tx = ledger.db.begin().await?;
        if !inbox::claim(&mut tx, BILLING_GROUP, e.id).await?
            || find_invoice(&mut tx, "payment_id", InvoiceKind::Invoice, &p.payment_id)
                .await?
                .is_some()
        {
            // Already handled, or the same capture sent again under another
            // event id: keep the claim, issue nothing.
            tx.commit().await?;
            return Ok(());
        }
        let number = next_number(&mut tx, InvoiceKind::Invoice).await?;
        let net = p.amount - p.tax_amount;
        let mut postings = vec![posting(
            accounts::PROVIDER_CLEARING,
            Side::Debit,
            p.amount,
            &p.currency,
        )];
        if net > 0 {
            postings.push(posting(
                accounts::MERCHANT_REVENUE,
                Side::Credit,
                net,
                &p.currency,
            ));
        }
        if p.tax_amount > 0 {
            postings.push(posting(
                accounts::TAX_PAYABLE,
                Side::Credit,
                p.tax_amount,
                &p.currency,
            ));
        }
        let entry = NewEntry {
            reference: format!("capture:{}", p.payment_id),
            description: format!("Invoice {number} for payment {}", p.payment_id),
            occurred_at: Some(occurred(e, p.captured_at.as_deref())),
            postings,
        };
        let cause = e.id.to_string();
        let posted = ledger
            .post_in(&mut tx, entry, &e.correlation_id, Some(&cause))
            .await
            .map_err(from_api)?;
        let invoice = Invoice {
            number,
            kind: InvoiceKind::Invoice,
            payment_id: p.payment_id,
            refund_id: None,
            invoice_number: None,
            amount: p.amount,
            tax_amount: p.tax_amount,
            currency: p.currency,
            entry_id: posted.entry.entry_id,
            issued_at: String::new(),
        };
        self.issue(tx, e, invoice, p.order_id, p.user_id).await
    }

    async fn refunded(&self, e: &Envelope, p: Refunded) -> Result<(), HandlerError> {
        check_amounts(e, p.amount, p.tax_amount, &p.currency)?;
        let ledger = &self.0;
        let mut tx = ledger.db.begin().await?;
        if !inbox::claim(&mut tx, BILLING_GROUP, e.id).await?
            || find_invoice(&mut tx, "refund_id", InvoiceKind::CreditNote, &p.refund_id)
                .await?
                .is_some()
        {
            tx.commit().await?;
            return Ok(());
        }
        let Some(inv) =
            find_invoice(&mut tx, "payment_id", InvoiceKind::Invoice, &p.payment_id).await?
        else {
            // The capture has not been billed yet (delivered out of order):
            // roll the claim back so the retry finds the event unclaimed.
            tx.rollback().await?;
            return Err(HandlerError::transient(format!(
                "no invoice yet for payment {}; refund {} waits for it",
                p.payment_id, p.refund_id
            )));
        };
        if inv.currency != p.currency {
            return Err(HandlerError::permanent(format!(
                "refund {} is in {}, its invoice {} in {}",
                p.refund_id, p.currency, inv.number, inv.currency
            )));
        }
        let credited: i64 = flowline_store::on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM invoices
             WHERE payment_id = $1 AND kind = 'credit_note'"
        )
        .bind(&p.payment_id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        if credited + p.amount > inv.amount {
            return Err(HandlerError::permanent(format!(
                "refund {} of {} would credit more than invoice {} ({} already credited of {})",
                p.refund_id, p.amount, inv.number, credited, inv.amount
            )));
        }
        let number = next_number(&mut tx, InvoiceKind::CreditNote).await?;
        let net = p.amount - p.tax_amount;
        let mut postings = Vec::new();
        if net > 0 {
            postings.push(posting(accounts::REFUNDS, Side::Debit, net, &p.currency));
        }
        if p.tax_amount > 0 {
            postings.push(posting(
                accounts::TAX_PAYABLE,
                Side::Debit,
                p.tax_amount,
                &p.currency,
            ));
        }
        postings.push(posting(
            accounts::PROVIDER_CLEARING,
            Side::Credit,
            p.amount,
            &p.currency,
        ));
        let entry = NewEntry {
            reference: format!("refund:{}", p.refund_id),
            description: format!(
                "Credit note {number} for refund {} of invoice {}",
                p.refund_id, inv.number
            ),
            occurred_at: Some(occurred(e, p.refunded_at.as_deref())),
            postings,
        };
        let cause = e.id.to_string();
        let posted = ledger
            .post_in(&mut tx, entry, &e.correlation_id, Some(&cause))
            .await
            .map_err(from_api)?;
        let note = Invoice {
            number,
            kind: InvoiceKind::CreditNote,
            payment_id: p.payment_id,
            refund_id: Some(p.refund_id),
            invoice_number: Some(inv.number),
            amount: p.amount,
            tax_amount: p.tax_amount,
            currency: p.currency,
            entry_id: posted.entry.entry_id,
            issued_at: String::new(),
        };
        self.issue(tx, e, note, p.order_id, p.user_id).await
    }

    /// Stores the document, announces it and commits.
    async fn issue(
        &self,
        mut tx: Tx,
        cause: &Envelope,
        mut doc: Invoice,
        order_id: Option<String>,
        user_id: Option<String>,
    ) -> Result<(), HandlerError> {
        let now = Timestamp::now();
        doc.issued_at = now.to_rfc3339();
        insert_invoice(&mut tx, &doc, now).await?;
        let event_type = match doc.kind {
            InvoiceKind::Invoice => "invoice.issued",
            InvoiceKind::CreditNote => "credit_note.issued",
        };
        let mut payload = serde_json::to_value(&doc)?;
        payload["order_id"] = order_id.into();
        payload["user_id"] = user_id.into();
        // Keyed by payment, so a payment's invoice precedes its credit notes.
        let ev = Envelope::caused_by(
            EventDraft::new(crate::TOPIC, event_type, &doc.payment_id, payload),
            cause,
        );
        outbox::enqueue(&mut tx, &ev).await?;
        tx.commit().await?;
        self.0.notify();
        Ok(())
    }
}
