-- Identity: one SQL for SQLite and PostgreSQL (TEXT and BIGINT mean the same in both).
CREATE TABLE users (
    id            TEXT   PRIMARY KEY,
    email         TEXT   NOT NULL UNIQUE,
    display_name  TEXT   NOT NULL,
    password_hash TEXT   NOT NULL,
    role          TEXT   NOT NULL CHECK (role IN ('user', 'admin')),
    status        TEXT   NOT NULL CHECK (status IN ('active', 'banned')),
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE sessions (
    id            TEXT   PRIMARY KEY,
    user_id       TEXT   NOT NULL,
    user_agent    TEXT   NOT NULL,
    ip            TEXT   NOT NULL,
    created_at    BIGINT NOT NULL,
    last_seen     BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT
);
CREATE INDEX sessions_user ON sessions (user_id);

-- Only hashes: a database leak does not leak usable refresh tokens.
CREATE TABLE refresh_tokens (
    token_hash TEXT   PRIMARY KEY,
    session_id TEXT   NOT NULL,
    issued_at  BIGINT NOT NULL,
    rotated_at BIGINT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE signing_keys (
    kid        TEXT   PRIMARY KEY,
    pkcs8      TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);
