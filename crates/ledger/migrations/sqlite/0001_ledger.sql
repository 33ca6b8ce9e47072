-- The journal is the source of truth; postings and balances are derived from it.
CREATE TABLE journal (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id    TEXT    NOT NULL UNIQUE,
    reference   TEXT    NOT NULL UNIQUE,
    description TEXT    NOT NULL,
    occurred_at INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    postings    TEXT    NOT NULL
);

-- Append-only: a correction is a new entry, never an edit.
CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;

CREATE TABLE postings (
    entry_seq   INTEGER NOT NULL REFERENCES journal (seq),
    line        INTEGER NOT NULL,
    account     TEXT    NOT NULL,
    currency    TEXT    NOT NULL,
    debit       INTEGER NOT NULL CHECK (debit >= 0),
    credit      INTEGER NOT NULL CHECK (credit >= 0),
    occurred_at INTEGER NOT NULL,
    PRIMARY KEY (entry_seq, line)
);
CREATE INDEX postings_account_time ON postings (account, occurred_at);

CREATE TABLE balances (
    account  TEXT    NOT NULL,
    currency TEXT    NOT NULL,
    debits   INTEGER NOT NULL,
    credits  INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (account, currency)
);

CREATE TABLE invoices (
    number         TEXT    PRIMARY KEY,
    kind           TEXT    NOT NULL CHECK (kind IN ('invoice', 'credit_note')),
    payment_id     TEXT    NOT NULL,
    refund_id      TEXT,
    invoice_number TEXT    REFERENCES invoices (number),
    amount         INTEGER NOT NULL CHECK (amount > 0),
    tax_amount     INTEGER NOT NULL CHECK (tax_amount >= 0),
    currency       TEXT    NOT NULL,
    entry_id       TEXT    NOT NULL REFERENCES journal (entry_id),
    issued_at      INTEGER NOT NULL
);
-- One invoice per payment and one credit note per refund: redelivery cannot double-issue.
CREATE UNIQUE INDEX invoices_payment ON invoices (payment_id) WHERE kind = 'invoice';
CREATE UNIQUE INDEX invoices_refund ON invoices (refund_id) WHERE refund_id IS NOT NULL;
CREATE INDEX invoices_by_payment ON invoices (payment_id, number);

CREATE TABLE sequences (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO sequences (name, value) VALUES ('invoice', 0), ('credit_note', 0);
