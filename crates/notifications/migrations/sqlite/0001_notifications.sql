-- The recipients directory: a read model of `user.events`, the only way this
-- context learns an address (it never reads identity's tables).
CREATE TABLE recipients (
    user_id      TEXT    PRIMARY KEY,
    email        TEXT    NOT NULL,
    display_name TEXT    NOT NULL,
    locale       TEXT    NOT NULL,
    active       INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- What a user chose: opt-outs (channel or '*', type or '*') and a locale.
CREATE TABLE opt_outs (
    user_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    kind    TEXT NOT NULL,
    PRIMARY KEY (user_id, channel, kind)
) WITHOUT ROWID;
CREATE TABLE user_settings (
    user_id    TEXT    PRIMARY KEY,
    locale     TEXT,
    updated_at INTEGER NOT NULL
);

-- Versioned templates: a change is a new version, the latest wins.
CREATE TABLE templates (
    template_key TEXT    NOT NULL,
    locale       TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    subject      TEXT    NOT NULL,
    text_body    TEXT    NOT NULL,
    html_body    TEXT,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (template_key, locale, version)
);

-- One row per notification per channel; the delivery log and the work queue.
CREATE TABLE deliveries (
    id               TEXT    PRIMARY KEY,
    event_id         TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    correlation_id   TEXT    NOT NULL,
    user_id          TEXT    NOT NULL,
    channel          TEXT    NOT NULL,
    template_key     TEXT    NOT NULL,
    locale           TEXT    NOT NULL,
    template_locale  TEXT,
    template_version INTEGER,
    address          TEXT,
    vars             TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    last_error       TEXT,
    next_attempt_at  INTEGER NOT NULL,
    locked_until     INTEGER,
    version          INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    sent_at          INTEGER,
    UNIQUE (event_id, channel)
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_user ON deliveries (user_id, id);

-- Emails the local mailbox transport wrote (one .eml file each).
CREATE TABLE mailbox (
    id         TEXT    PRIMARY KEY,
    to_address TEXT    NOT NULL,
    subject    TEXT    NOT NULL,
    text_body  TEXT    NOT NULL,
    html_body  TEXT,
    message_id TEXT    NOT NULL,
    path       TEXT    NOT NULL,
    sent_at    INTEGER NOT NULL
);
CREATE INDEX mailbox_to ON mailbox (to_address, sent_at);
CREATE INDEX mailbox_sent ON mailbox (sent_at);

CREATE TABLE in_app_notifications (
    id         TEXT    PRIMARY KEY,
    user_id    TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    title      TEXT    NOT NULL,
    body       TEXT    NOT NULL,
    data       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    read_at    INTEGER
);
CREATE INDEX in_app_user ON in_app_notifications (user_id, id);

CREATE TABLE push_log (
    id       TEXT    PRIMARY KEY,
    user_id  TEXT    NOT NULL,
    provider TEXT    NOT NULL,
    title    TEXT    NOT NULL,
    body     TEXT    NOT NULL,
    sent_at  INTEGER NOT NULL
);
