-- The journal is the source of truth; postings and balances are derived from it.
CREATE TABLE journal (
    seq         BIGSERIAL PRIMARY KEY,
    entry_id    TEXT   NOT NULL UNIQUE,
    reference   TEXT   NOT NULL UNIQUE,
    description TEXT   NOT NULL,
    occurred_at BIGINT NOT NULL,
    recorded_at BIGINT NOT NULL,
    postings    TEXT   NOT NULL
);

-- Append-only: a correction is a new entry, never an edit.
CREATE FUNCTION journal_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only';
END
$$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_append_only();

CREATE TABLE postings (
    entry_seq   BIGINT NOT NULL REFERENCES journal (seq),
    line        BIGINT NOT NULL,
    account     TEXT   NOT NULL,
    currency    TEXT   NOT NULL,
    debit       BIGINT NOT NULL CHECK (debit >= 0),
    credit      BIGINT NOT NULL CHECK (credit >= 0),
    occurred_at BIGINT NOT NULL,
    PRIMARY KEY (entry_seq, line)
);
CREATE INDEX postings_account_time ON postings (account, occurred_at);

CREATE TABLE balances (
    account  TEXT   NOT NULL,
    currency TEXT   NOT NULL,
    debits   BIGINT NOT NULL,
    credits  BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (account, currency)
);

CREATE TABLE invoices (
    number         TEXT   PRIMARY KEY,
    kind           TEXT   NOT NULL CHECK (kind IN ('invoice', 'credit_note')),
    payment_id     TEXT   NOT NULL,
    refund_id      TEXT,
    invoice_number TEXT   REFERENCES invoices (number),
    amount         BIGINT NOT NULL CHECK (amount > 0),
    tax_amount     BIGINT NOT NULL CHECK (tax_amount >= 0),
    currency       TEXT   NOT NULL,
    entry_id       TEXT   NOT NULL REFERENCES journal (entry_id),
    issued_at      BIGINT NOT NULL
);
-- One invoice per payment and one credit note per refund: redelivery cannot double-issue.
CREATE UNIQUE INDEX invoices_payment ON invoices (payment_id) WHERE kind = 'invoice';
CREATE UNIQUE INDEX invoices_refund ON invoices (refund_id) WHERE refund_id IS NOT NULL;
CREATE INDEX invoices_by_payment ON invoices (payment_id, number);

CREATE TABLE sequences (
    name  TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO sequences (name, value) VALUES ('invoice', 0), ('credit_note', 0);
