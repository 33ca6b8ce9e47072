//! flowline-ledger: an event-sourced double-entry ledger.
//!
//! The journal is the source of truth and is append-only; `postings` and the
//! `balances` projection are written from it in the same transaction, so a
//! full replay of the postings must always reproduce the projection
//! ([`Ledger::verify`] checks exactly that). Every entry commits with a
//! `ledger.entry_posted` event on `ledger.events` through the outbox.
//!
//! [`Billing`] follows `commerce.payments`: a capture issues an invoice and a
//! refund a credit note, each with its journal entry, numbered gaplessly.

pub mod billing;
pub mod routes;

pub use billing::{Billing, BILLING_GROUP, PAYMENTS_TOPIC};

use flowline_core::{Currency, Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const TOPIC: &str = "ledger.events";

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "ledger",
    version: 1,
    name: "ledger",
    sqlite: include_str!("../migrations/sqlite/0001_ledger.sql"),
    postgres: include_str!("../migrations/postgres/0001_ledger.sql"),
}];

/// Account ids of the chart.
pub mod accounts {
    pub const CUSTOMER_RECEIVABLE: &str = "customer_receivable";
    pub const PROVIDER_CLEARING: &str = "provider_clearing";
    pub const MERCHANT_REVENUE: &str = "merchant_revenue";
    pub const TAX_PAYABLE: &str = "tax_payable";
    pub const REFUNDS: &str = "refunds";
    pub const CASH: &str = "cash";
}

/// A side of a posting, and the side an account normally carries its balance on.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Debit,
    Credit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    Asset,
    Liability,
    Revenue,
    ContraRevenue,
}

/// An account of the fixed chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Account {
    #[schema(value_type = String)]
    pub id: &'static str,
    pub kind: AccountKind,
    pub normal_side: Side,
    #[schema(value_type = String)]
    pub description: &'static str,
}

/// The chart of accounts.
pub const CHART: &[Account] = &[
    Account {
        id: accounts::CUSTOMER_RECEIVABLE,
        kind: AccountKind::Asset,
        normal_side: Side::Debit,
        description: "Amounts customers owe",
    },
    Account {
        id: accounts::PROVIDER_CLEARING,
        kind: AccountKind::Asset,
        normal_side: Side::Debit,
        description: "Captured funds held by payment providers until settlement",
    },
    Account {
        id: accounts::MERCHANT_REVENUE,
        kind: AccountKind::Revenue,
        normal_side: Side::Credit,
        description: "Sales, net of tax",
    },
    Account {
        id: accounts::TAX_PAYABLE,
        kind: AccountKind::Liability,
        normal_side: Side::Credit,
        description: "Tax collected, owed to authorities",
    },
    Account {
        id: accounts::REFUNDS,
        kind: AccountKind::ContraRevenue,
        normal_side: Side::Debit,
        description: "Sales returned to customers, net of tax",
    },
    Account {
        id: accounts::CASH,
        kind: AccountKind::Asset,
        normal_side: Side::Debit,
        description: "Settled funds",
    },
];

/// The chart's account `id`, if there is one.
pub fn account(id: &str) -> Option<&'static Account> {
    CHART.iter().find(|a| a.id == id)
}

/// An entry to post.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEntry {
    /// Idempotency key, 1 to 200 characters: posting it again with the same
    /// postings returns the existing entry; with other postings it is a 409.
    pub reference: String,
    #[serde(default)]
    pub description: String,
    /// RFC 3339; defaults to now.
    #[serde(default)]
    pub occurred_at: Option<String>,
    /// At least two; debits equal credits in every currency.
    pub postings: Vec<NewPosting>,
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPosting {
    /// An account of the chart.
    pub account: String,
    pub direction: Side,
    /// Minor units, greater than zero.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
}

/// One line of a journal entry.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Posting {
    pub account: String,
    pub direction: Side,
    pub amount: i64,
    pub currency: String,
}

/// A journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// Journal position (ascending, not gapless).
    pub seq: i64,
    pub entry_id: String,
    pub reference: String,
    pub description: String,
    pub occurred_at: String,
    pub recorded_at: String,
    pub postings: Vec<Posting>,
}

/// The result of a post: the entry, and whether this call created it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub entry: Entry,
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CurrencyBalance {
    pub currency: String,
    pub debits: i64,
    pub credits: i64,
    /// Signed by the account's normal side (debit-normal: debits - credits).
    pub balance: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AccountBalance {
    pub account: String,
    pub kind: AccountKind,
    pub normal_side: Side,
    /// The point in time replayed to, or null for the current projection.
    pub as_of: Option<String>,
    pub balances: Vec<CurrencyBalance>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InvoiceKind {
    Invoice,
    CreditNote,
}

impl InvoiceKind {
    fn as_str(self) -> &'static str {
        match self {
            InvoiceKind::Invoice => "invoice",
            InvoiceKind::CreditNote => "credit_note",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            InvoiceKind::Invoice => "INV-",
            InvoiceKind::CreditNote => "CN-",
        }
    }

    fn parse(s: &str) -> Option<InvoiceKind> {
        match s {
            "invoice" => Some(InvoiceKind::Invoice),
            "credit_note" => Some(InvoiceKind::CreditNote),
            _ => None,
        }
    }
}

/// An invoice (`INV-000001`) or a credit note (`CN-000001`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invoice {
    pub number: String,
    pub kind: InvoiceKind,
    pub payment_id: String,
    /// Credit notes: the refund they document.
    pub refund_id: Option<String>,
    /// Credit notes: the invoice they correct.
    pub invoice_number: Option<String>,
    /// Gross, tax included, minor units.
    pub amount: i64,
    pub tax_amount: i64,
    pub currency: String,
    pub entry_id: String,
    pub issued_at: String,
}

/// What [`Ledger::verify`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub entries: i64,
    pub postings: i64,
    /// (account, currency) pairs compared between projection and replay.
    pub accounts: i64,
    pub unbalanced: Vec<EntryProblem>,
    pub mismatched: Vec<BalanceMismatch>,
    pub sequence_gaps: Vec<SequenceGap>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.unbalanced.is_empty() && self.mismatched.is_empty() && self.sequence_gaps.is_empty()
    }
}

/// A journal entry whose posting rows do not balance or do not match its JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryProblem {
    pub seq: i64,
    pub entry_id: String,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub debits: i64,
    pub credits: i64,
}

/// A projection row that differs from the replay (`None`: the row is missing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalanceMismatch {
    pub account: String,
    pub currency: String,
    pub projected: Option<Totals>,
    pub replayed: Option<Totals>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceGap {
    /// `invoice` or `credit_note`.
    pub sequence: String,
    pub detail: String,
}

/// An entry that passed validation.
#[derive(Debug)]
struct ValidEntry {
    reference: String,
    description: String,
    occurred_at: Timestamp,
    postings: Vec<Posting>,
}

const MAX_POSTINGS: usize = 100;

fn validate(mut e: NewEntry) -> Result<ValidEntry, ApiError> {
    // Stored and summed in canonical form, so " usd" is not a currency of its own.
    for p in &mut e.postings {
        if let Ok(c) = Currency::parse(&p.currency) {
            p.currency = c.as_str().to_owned();
        }
    }
    let mut errors: Vec<(String, &str)> = Vec::new();
    let mut err = |field: String, msg: &'static str| errors.push((field, msg));
    let n = e.reference.chars().count();
    if !(1..=200).contains(&n) || e.reference.chars().any(char::is_control) {
        err(
            "reference".into(),
            "1 to 200 characters, no control characters",
        );
    }
    if e.description.chars().count() > 1000 {
        err("description".into(), "at most 1000 characters");
    }
    let occurred_at = match e.occurred_at.as_deref() {
        None => Timestamp::now(),
        Some(s) => Timestamp::parse_rfc3339(s).unwrap_or_else(|_| {
            err("occurred_at".into(), "an RFC 3339 time");
            Timestamp::now()
        }),
    };
    if e.postings.len() < 2 {
        err("postings".into(), "at least two postings");
    }
    if e.postings.len() > MAX_POSTINGS {
        err("postings".into(), "at most 100 postings");
    }
    for (i, p) in e.postings.iter().enumerate() {
        if account(&p.account).is_none() {
            err(
                format!("postings[{i}].account"),
                "not an account of the chart",
            );
        }
        if p.amount <= 0 {
            err(format!("postings[{i}].amount"), "greater than zero");
        }
        if Currency::parse(&p.currency).is_err() {
            err(
                format!("postings[{i}].currency"),
                "a supported ISO 4217 code",
            );
        }
    }
    if !errors.is_empty() {
        let mut problem =
            Problem::new(ErrorCode::ValidationFailed).with_detail("the entry is not valid");
        for (field, msg) in errors {
            problem = problem.with_field(field, msg);
        }
        return Err(problem.into());
    }
    // Per currency, so an entry balanced only in total is refused.
    let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for p in &e.postings {
        let s = sums.entry(p.currency.as_str()).or_default();
        let slot = match p.direction {
            Side::Debit => &mut s.0,
            Side::Credit => &mut s.1,
        };
        *slot = slot.checked_add(p.amount).ok_or_else(|| {
            ApiError::from(
                Problem::new(ErrorCode::ValidationFailed)
                    .with_detail("the amounts are too large")
                    .with_field("postings", "amounts too large to sum"),
            )
        })?;
    }
    let off: Vec<String> = sums
        .iter()
        .filter(|(_, (d, c))| d != c)
        .map(|(cur, (d, c))| format!("{cur}: debits {d} != credits {c}"))
        .collect();
    if !off.is_empty() {
        return Err(Problem::new(ErrorCode::UnbalancedEntry)
            .with_detail(format!(
                "debits must equal credits in every currency ({})",
                off.join("; ")
            ))
            .with_field("postings", "debits and credits differ")
            .into());
    }
    let postings = e
        .postings
        .into_iter()
        .map(|p| Posting {
            account: p.account,
            direction: p.direction,
            amount: p.amount,
            currency: p.currency,
        })
        .collect();
    Ok(ValidEntry {
        reference: e.reference,
        description: e.description,
        occurred_at,
        postings,
    })
}

fn same_postings(a: &[Posting], b: &[Posting]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

type JournalRow = (i64, String, String, String, i64, i64, String);
const JOURNAL_COLUMNS: &str =
    "seq, entry_id, reference, description, occurred_at, recorded_at, postings";

fn entry_from_row(r: JournalRow) -> Result<Entry, StoreError> {
    let postings = serde_json::from_str(&r.6)
        .map_err(|_| StoreError::CorruptEvent(format!("journal entry {}", r.1)))?;
    Ok(Entry {
        seq: r.0,
        entry_id: r.1,
        reference: r.2,
        description: r.3,
        occurred_at: Timestamp::from_micros(r.4).to_rfc3339(),
        recorded_at: Timestamp::from_micros(r.5).to_rfc3339(),
        postings,
    })
}

type InvoiceRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    i64,
    String,
    String,
    i64,
);
const INVOICE_COLUMNS: &str = "number, kind, payment_id, refund_id, invoice_number, amount, \
    tax_amount, currency, entry_id, issued_at";

fn invoice(r: InvoiceRow) -> Result<Invoice, StoreError> {
    let kind = InvoiceKind::parse(&r.1)
        .ok_or_else(|| StoreError::CorruptEvent(format!("invoice {}", r.0)))?;
    Ok(Invoice {
        number: r.0,
        kind,
        payment_id: r.2,
        refund_id: r.3,
        invoice_number: r.4,
        amount: r.5,
        tax_amount: r.6,
        currency: r.7,
        entry_id: r.8,
        issued_at: Timestamp::from_micros(r.9).to_rfc3339(),
    })
}

fn not_found(what: &str) -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail(format!("no such {what}"))
        .into()
}

pub struct Ledger {
    pub db: Db,
    relay: Relay,
}

impl Ledger {
    pub async fn open(db: Db, relay: Relay) -> Result<Ledger, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        Ok(Ledger { db, relay })
    }

    /// Posts an entry in its own transaction (see [`Ledger::post_in`]).
    pub async fn post(&self, ctx: &RequestContext, entry: NewEntry) -> Result<Entry, ApiError> {
        Ok(self.submit(ctx, entry).await?.entry)
    }

    /// Like [`Ledger::post`], telling whether the entry is new or a replay.
    pub async fn submit(&self, ctx: &RequestContext, entry: NewEntry) -> Result<Posted, ApiError> {
        let mut tx = self.db.begin().await?;
        let posted = self
            .post_in(&mut tx, entry, &ctx.correlation_id, Some(&ctx.request_id))
            .await?;
        if posted.created {
            tx.commit().await?;
            self.relay.notify();
        } else {
            tx.rollback().await?;
        }
        Ok(posted)
    }

    /// Validates and writes an entry within `tx`: journal row, posting rows,
    /// projection and `ledger.entry_posted`. The caller commits (and then calls
    /// [`Ledger::notify`]), so other rows (an invoice) can commit with it. A
    /// known reference with the same postings writes nothing and returns the
    /// existing entry (`created: false`).
    pub async fn post_in(
        &self,
        tx: &mut Tx,
        entry: NewEntry,
        correlation_id: &str,
        causation_id: Option<&str>,
    ) -> Result<Posted, ApiError> {
        let v = validate(entry)?;
        let entry_id = flowline_core::id::new_id().to_string();
        let recorded_at = Timestamp::now();
        let json = serde_json::to_string(&v.postings).map_err(StoreError::from)?;
        // One appender at a time on PostgreSQL (SQLite has one writer anyway):
        // seqs then commit in order, so a reader paging by seq skips none.
        if let Tx::Postgres(t) = &mut *tx {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('flowline.ledger.journal'))")
                .execute(&mut **t)
                .await
                .map_err(StoreError::from)?;
        }
        // DO NOTHING rather than failing: on PostgreSQL a unique violation would
        // abort the caller's transaction, and a concurrent twin waits here.
        let seq: Option<i64> = flowline_store::on_tx!(&mut *tx, |c| sqlx::query_scalar(
            "INSERT INTO journal (entry_id, reference, description, occurred_at, recorded_at, postings)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (reference) DO NOTHING RETURNING seq"
        )
        .bind(&entry_id)
        .bind(&v.reference)
        .bind(&v.description)
        .bind(v.occurred_at.as_micros())
        .bind(recorded_at.as_micros())
        .bind(&json)
        .fetch_optional(c)
        .await)
        .map_err(StoreError::from)?;
        let Some(seq) = seq else {
            let sql = format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE reference = $1");
            let row: JournalRow = flowline_store::on_tx!(&mut *tx, |c| sqlx::query_as(&sql)
                .bind(&v.reference)
                .fetch_one(c)
                .await)
            .map_err(StoreError::from)?;
            let existing = entry_from_row(row)?;
            if same_postings(&existing.postings, &v.postings) {
                return Ok(Posted {
                    entry: existing,
                    created: false,
                });
            }
            return Err(Problem::new(ErrorCode::Conflict)
                .with_detail("an entry with this reference exists with other postings")
                .with_field("reference", "already used")
                .into());
        };
        let mut totals: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        for (line, p) in v.postings.iter().enumerate() {
            let (debit, credit) = match p.direction {
                Side::Debit => (p.amount, 0),
                Side::Credit => (0, p.amount),
            };
            let t = totals
                .entry((p.account.as_str(), p.currency.as_str()))
                .or_default();
            t.0 += debit;
            t.1 += credit;
            flowline_store::on_tx!(&mut *tx, |c| sqlx::query(
                "INSERT INTO postings (entry_seq, line, account, currency, debit, credit, occurred_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            )
            .bind(seq)
            .bind(line as i64)
            .bind(&p.account)
            .bind(&p.currency)
            .bind(debit)
            .bind(credit)
            .bind(v.occurred_at.as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
        }
        for ((account, currency), (debits, credits)) in totals {
            // PostgreSQL may commit seqs out of order, so last_seq only grows.
            flowline_store::on_tx!(&mut *tx, |c| sqlx::query(
                "INSERT INTO balances (account, currency, debits, credits, last_seq)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (account, currency) DO UPDATE SET
                    debits = balances.debits + excluded.debits,
                    credits = balances.credits + excluded.credits,
                    last_seq = CASE WHEN excluded.last_seq > balances.last_seq
                               THEN excluded.last_seq ELSE balances.last_seq END"
            )
            .bind(account)
            .bind(currency)
            .bind(debits)
            .bind(credits)
            .bind(seq)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
        }
        let e = Entry {
            seq,
            entry_id,
            reference: v.reference,
            description: v.description,
            occurred_at: v.occurred_at.to_rfc3339(),
            recorded_at: recorded_at.to_rfc3339(),
            postings: v.postings,
        };
        let ev = Envelope::stamp(
            EventDraft::new(
                TOPIC,
                "ledger.entry_posted",
                &e.entry_id,
                serde_json::to_value(&e).map_err(StoreError::from)?,
            ),
            correlation_id,
            causation_id,
        );
        outbox::enqueue(tx, &ev).await?;
        Ok(Posted {
            entry: e,
            created: true,
        })
    }

    /// Wakes the outbox relay; call after committing a transaction that used
    /// [`Ledger::post_in`].
    pub fn notify(&self) {
        self.relay.notify();
    }

    /// An account's balance per currency: now (from the projection) or, with
    /// `as_of`, replayed from the postings that occurred at or before it.
    pub async fn balance(
        &self,
        account_id: &str,
        as_of: Option<Timestamp>,
    ) -> Result<AccountBalance, ApiError> {
        let acc = account(account_id).ok_or_else(|| not_found("account"))?;
        let rows: Vec<(String, i64, i64)> = match as_of {
            None => flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
                "SELECT currency, debits, credits FROM balances WHERE account = $1 ORDER BY currency"
            )
            .bind(acc.id)
            .fetch_all(p)
            .await),
            Some(t) => flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
                "SELECT currency, CAST(SUM(debit) AS BIGINT), CAST(SUM(credit) AS BIGINT)
                 FROM postings WHERE account = $1 AND occurred_at <= $2
                 GROUP BY currency ORDER BY currency"
            )
            .bind(acc.id)
            .bind(t.as_micros())
            .fetch_all(p)
            .await),
        }
        .map_err(StoreError::from)?;
        let balances = rows
            .into_iter()
            .map(|(currency, debits, credits)| CurrencyBalance {
                balance: match acc.normal_side {
                    Side::Debit => debits - credits,
                    Side::Credit => credits - debits,
                },
                currency,
                debits,
                credits,
            })
            .collect();
        Ok(AccountBalance {
            account: acc.id.to_owned(),
            kind: acc.kind,
            normal_side: acc.normal_side,
            as_of: as_of.map(Timestamp::to_rfc3339),
            balances,
        })
    }

    /// Entries after journal position `after_seq`, oldest first (`limit` 1..=1000).
    pub async fn entries(&self, after_seq: i64, limit: i64) -> Result<Vec<Entry>, ApiError> {
        let sql =
            format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE seq > $1 ORDER BY seq LIMIT $2");
        let rows: Vec<JournalRow> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(after_seq)
            .bind(limit.clamp(1, 1000))
            .fetch_all(p)
            .await)
        .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .map(entry_from_row)
            .collect::<Result<_, _>>()?)
    }

    /// The entry with `reference`.
    pub async fn entry(&self, reference: &str) -> Result<Entry, ApiError> {
        let sql = format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE reference = $1");
        let row: Option<JournalRow> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(reference)
            .fetch_optional(p)
            .await)
        .map_err(StoreError::from)?;
        Ok(entry_from_row(row.ok_or_else(|| not_found("entry"))?)?)
    }

    /// Invoices and credit notes, of one payment or all, invoices first, in number order.
    pub async fn invoices(&self, payment_id: Option<&str>) -> Result<Vec<Invoice>, ApiError> {
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE ($1 = '' OR payment_id = $1)
             ORDER BY kind DESC, length(number), number"
        );
        let rows: Vec<InvoiceRow> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(payment_id.unwrap_or(""))
            .fetch_all(p)
            .await)
        .map_err(StoreError::from)?;
        Ok(rows.into_iter().map(invoice).collect::<Result<_, _>>()?)
    }

    pub async fn invoice(&self, number: &str) -> Result<Invoice, ApiError> {
        let sql = format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE number = $1");
        let row: Option<InvoiceRow> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(number)
            .fetch_optional(p)
            .await)
        .map_err(StoreError::from)?;
        Ok(invoice(row.ok_or_else(|| not_found("invoice"))?)?)
    }

    /// Checks the ledger against itself: every entry balances per currency
    /// and its posting rows match its journal JSON; the projection equals a
    /// full replay; invoice and credit-note numbers run 1..=n without gaps.
    pub async fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // One read transaction, so every check sees the same moment of a live
        // ledger (on SQLite a WAL snapshot that does not block the writer).
        let mut tx = match &self.db {
            Db::Sqlite { read, .. } => Tx::Sqlite(read.begin().await?),
            Db::Postgres { pool, .. } => Tx::Postgres(pool.begin().await?),
        };
        if let Tx::Postgres(t) = &mut tx {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut **t)
                .await?;
        }
        self.verify_entries(&mut tx, &mut report).await?;
        self.verify_projection(&mut tx, &mut report).await?;
        self.verify_sequences(&mut tx, &mut report).await?;
        tx.rollback().await?;
        Ok(report)
    }

    async fn verify_entries(
        &self,
        tx: &mut Tx,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        const PAGE: i64 = 500;
        let sql =
            format!("SELECT {JOURNAL_COLUMNS} FROM journal WHERE seq > $1 ORDER BY seq LIMIT $2");
        let mut after = 0i64;
        loop {
            let rows: Vec<JournalRow> = flowline_store::on_tx!(&mut *tx, |p| sqlx::query_as(&sql)
                .bind(after)
                .bind(PAGE)
                .fetch_all(p)
                .await)?;
            let Some(last) = rows.last().map(|r| r.0) else {
                break;
            };
            let lines: Vec<(i64, String, String, i64, i64, i64)> =
                flowline_store::on_tx!(&mut *tx, |p| sqlx::query_as(
                    "SELECT entry_seq, account, currency, debit, credit, occurred_at FROM postings
                     WHERE entry_seq > $1 AND entry_seq <= $2 ORDER BY entry_seq, line"
                )
                .bind(after)
                .bind(last)
                .fetch_all(p)
                .await)?;
            report.postings += lines.len() as i64;
            let mut by_seq: BTreeMap<i64, Vec<PostingRow>> = BTreeMap::new();
            for (seq, account, currency, debit, credit, at) in lines {
                by_seq
                    .entry(seq)
                    .or_default()
                    .push((account, currency, debit, credit, at));
            }
            for (seq, entry_id, _, _, occurred_at, _, json) in rows {
                report.entries += 1;
                let rows = by_seq.remove(&seq).unwrap_or_default();
                let problems = check_entry(occurred_at, &json, &rows);
                if !problems.is_empty() {
                    report.unbalanced.push(EntryProblem {
                        seq,
                        entry_id,
                        problems,
                    });
                }
            }
            for (seq, _) in by_seq {
                report.unbalanced.push(EntryProblem {
                    seq,
                    entry_id: String::new(),
                    problems: vec!["posting rows without a journal entry".into()],
                });
            }
            after = last;
        }
        Ok(())
    }

    async fn verify_projection(
        &self,
        tx: &mut Tx,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        let replayed: Vec<(String, String, i64, i64)> =
            flowline_store::on_tx!(&mut *tx, |p| sqlx::query_as(
                "SELECT account, currency, CAST(SUM(debit) AS BIGINT), CAST(SUM(credit) AS BIGINT)
             FROM postings GROUP BY account, currency"
            )
            .fetch_all(p)
            .await)?;
        let projected: Vec<(String, String, i64, i64)> =
            flowline_store::on_tx!(&mut *tx, |p| sqlx::query_as(
                "SELECT account, currency, debits, credits FROM balances"
            )
            .fetch_all(p)
            .await)?;
        let totals = |v: Vec<(String, String, i64, i64)>| -> BTreeMap<(String, String), Totals> {
            v.into_iter()
                .map(|(a, c, debits, credits)| ((a, c), Totals { debits, credits }))
                .collect()
        };
        let replayed = totals(replayed);
        let projected = totals(projected);
        let keys: BTreeSet<&(String, String)> = replayed.keys().chain(projected.keys()).collect();
        report.accounts = keys.len() as i64;
        for key in keys {
            let (r, p) = (replayed.get(key).copied(), projected.get(key).copied());
            if r != p {
                report.mismatched.push(BalanceMismatch {
                    account: key.0.clone(),
                    currency: key.1.clone(),
                    projected: p,
                    replayed: r,
                });
            }
        }
        Ok(())
    }

    async fn verify_sequences(
        &self,
        tx: &mut Tx,
        report: &mut VerifyReport,
    ) -> Result<(), StoreError> {
        for kind in [InvoiceKind::Invoice, InvoiceKind::CreditNote] {
            let numbers: Vec<String> = flowline_store::on_tx!(&mut *tx, |p| sqlx::query_scalar(
                "SELECT number FROM invoices WHERE kind = $1"
            )
            .bind(kind.as_str())
            .fetch_all(p)
            .await)?;
            let counter: Option<i64> = flowline_store::on_tx!(&mut *tx, |p| sqlx::query_scalar(
                "SELECT value FROM sequences WHERE name = $1"
            )
            .bind(kind.as_str())
            .fetch_optional(p)
            .await)?;
            let mut gap = |detail: String| {
                report.sequence_gaps.push(SequenceGap {
                    sequence: kind.as_str().into(),
                    detail,
                })
            };
            let mut issued = BTreeSet::new();
            for n in &numbers {
                match n
                    .strip_prefix(kind.prefix())
                    .and_then(|d| d.parse::<i64>().ok())
                {
                    Some(v) if v > 0 => {
                        issued.insert(v);
                    }
                    _ => gap(format!("`{n}` is not a {} number", kind.as_str())),
                }
            }
            let Some(counter) = counter else {
                gap("the sequence counter is missing".into());
                continue;
            };
            let top = issued.last().copied().unwrap_or(0).max(counter);
            let missing: Vec<String> = (1..=top)
                .filter(|v| !issued.contains(v))
                .take(100)
                .map(|v| format!("{}{v:06}", kind.prefix()))
                .collect();
            if !missing.is_empty() {
                gap(format!("numbers never issued: {}", missing.join(", ")));
            }
            if counter < top {
                gap(format!(
                    "the counter ({counter}) is behind the highest number ({top})"
                ));
            }
        }
        Ok(())
    }
}

/// A posting row as verify reads it: (account, currency, debit, credit, occurred_at).
type PostingRow = (String, String, i64, i64, i64);

/// What is wrong with one entry, given its journal JSON and posting rows in line order.
fn check_entry(occurred_at: i64, json: &str, rows: &[PostingRow]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (_, currency, debit, credit, _) in rows {
        let s = sums.entry(currency.as_str()).or_default();
        s.0 = s.0.saturating_add(*debit);
        s.1 = s.1.saturating_add(*credit);
    }
    for (cur, (d, c)) in &sums {
        if d != c {
            problems.push(format!("{cur}: debits {d} != credits {c}"));
        }
    }
    if rows.len() < 2 {
        problems.push(format!(
            "{} posting rows, expected at least two",
            rows.len()
        ));
    }
    if rows.iter().any(|r| r.4 != occurred_at) {
        problems.push("posting rows carry another occurred_at than the entry".into());
    }
    match serde_json::from_str::<Vec<Posting>>(json) {
        Err(_) => problems.push("the journal postings are not valid JSON".into()),
        Ok(postings) => {
            let expected: Vec<(&str, &str, i64, i64)> = postings
                .iter()
                .map(|p| match p.direction {
                    Side::Debit => (p.account.as_str(), p.currency.as_str(), p.amount, 0),
                    Side::Credit => (p.account.as_str(), p.currency.as_str(), 0, p.amount),
                })
                .collect();
            let actual: Vec<(&str, &str, i64, i64)> = rows
                .iter()
                .map(|r| (r.0.as_str(), r.1.as_str(), r.2, r.3))
                .collect();
            if expected != actual {
                problems.push("posting rows differ from the journal".into());
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_entry(postings: &[(&str, Side, i64, &str)]) -> NewEntry {
        NewEntry {
            reference: "r-1".into(),
            description: String::new(),
            occurred_at: None,
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

    #[test]
    fn validation_names_fields_and_checks_each_currency() {
        use accounts::*;
        let ok = new_entry(&[
            (CASH, Side::Debit, 5, "USD"),
            (MERCHANT_REVENUE, Side::Credit, 5, "USD"),
        ]);
        assert!(validate(ok).is_ok());
        let e = validate(new_entry(&[
            ("nope", Side::Debit, 0, "XYZ"),
            (CASH, Side::Credit, 5, "USD"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = e.0.errors.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "postings[0].account",
                "postings[0].amount",
                "postings[0].currency"
            ]
        );
        let e = validate(new_entry(&[
            (CASH, Side::Debit, 5, "USD"),
            (MERCHANT_REVENUE, Side::Credit, 5, "BRL"),
        ]))
        .unwrap_err();
        assert_eq!(e.0.code, "unbalanced_entry");
        let detail = e.0.detail.clone().unwrap();
        assert!(detail.contains("USD: debits 5 != credits 0"), "{detail}");
        assert!(detail.contains("BRL: debits 0 != credits 5"), "{detail}");
    }

    #[test]
    fn entry_check_spots_tampered_rows() {
        let json = r#"[{"account":"cash","direction":"debit","amount":5,"currency":"USD"},
                       {"account":"merchant_revenue","direction":"credit","amount":5,"currency":"USD"}]"#;
        let rows = |d: i64| {
            vec![
                ("cash".to_string(), "USD".to_string(), d, 0, 7),
                ("merchant_revenue".to_string(), "USD".to_string(), 0, 5, 7),
            ]
        };
        assert!(check_entry(7, json, &rows(5)).is_empty());
        assert_eq!(check_entry(7, json, &rows(6)).len(), 2);
    }
}
