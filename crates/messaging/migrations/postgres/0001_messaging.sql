-- Who can be named in messaging: a read model of `user.events` (this context
-- never reads identity's tables).
CREATE TABLE users (
    user_id      TEXT    PRIMARY KEY,
    display_name TEXT    NOT NULL,
    active       BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);

-- Written by the create-workspace saga: CREATING until its critical steps
-- are done, FAILED when they were compensated.
CREATE TABLE workspaces (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    created_by TEXT    NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('CREATING', 'ACTIVE', 'FAILED')),
    failure    TEXT,
    created_at BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);
CREATE TABLE workspace_members (
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    user_id      TEXT    NOT NULL,
    role         TEXT    NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_at    BIGINT  NOT NULL,
    PRIMARY KEY (workspace_id, user_id)
);
CREATE INDEX workspace_members_user ON workspace_members (user_id);

-- `last_seq` is the channel's sequence: every message, edit, delete and
-- reaction takes the next number, under the row's write lock.
CREATE TABLE channels (
    id           TEXT    PRIMARY KEY,
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    name         TEXT    NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('public', 'private', 'direct')),
    topic        TEXT,
    created_by   TEXT    NOT NULL,
    last_seq     BIGINT  NOT NULL,
    created_at   BIGINT  NOT NULL,
    UNIQUE (workspace_id, name)
);
CREATE TABLE channel_members (
    channel_id TEXT    NOT NULL REFERENCES channels (id),
    user_id    TEXT    NOT NULL,
    joined_at  BIGINT  NOT NULL,
    read_seq   BIGINT  NOT NULL,
    PRIMARY KEY (channel_id, user_id)
);
CREATE INDEX channel_members_user ON channel_members (user_id);

-- A deleted message keeps its row as a tombstone (body NULL, deleted_at set).
CREATE TABLE messages (
    id         TEXT    PRIMARY KEY,
    channel_id TEXT    NOT NULL REFERENCES channels (id),
    seq        BIGINT  NOT NULL,
    author_id  TEXT    NOT NULL,
    parent_id  TEXT,
    body       TEXT,
    client_id  TEXT,
    created_at BIGINT  NOT NULL,
    edited_at  BIGINT,
    deleted_at BIGINT,
    UNIQUE (channel_id, seq)
);
-- A client's retried send (same client_id) is the same message.
CREATE UNIQUE INDEX messages_client ON messages (channel_id, author_id, client_id)
    WHERE client_id IS NOT NULL;
CREATE INDEX messages_parent ON messages (parent_id) WHERE parent_id IS NOT NULL;
CREATE TABLE reactions (
    message_id TEXT    NOT NULL REFERENCES messages (id),
    user_id    TEXT    NOT NULL,
    emoji      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (message_id, user_id, emoji)
);

-- Every sequenced change of a channel, for gap-free resume: a client that
-- saw seq N is sent exactly the rows after N.
CREATE TABLE channel_events (
    channel_id TEXT    NOT NULL,
    seq        BIGINT  NOT NULL,
    kind       TEXT    NOT NULL,
    message_id TEXT,
    payload    TEXT    NOT NULL,
    at         BIGINT  NOT NULL,
    PRIMARY KEY (channel_id, seq)
);

CREATE INDEX channel_events_message ON channel_events (message_id) WHERE message_id IS NOT NULL;

-- Live connections per node and user: a user is online while any row exists.
CREATE TABLE presence_connections (
    node_id     TEXT    NOT NULL,
    user_id     TEXT    NOT NULL,
    connections BIGINT  NOT NULL,
    since       BIGINT  NOT NULL,
    PRIMARY KEY (node_id, user_id)
);
CREATE INDEX presence_connections_user ON presence_connections (user_id);
-- One row per user who ever connected; its row lock serialises the user's
-- presence changes across nodes. `at`: when the last connection closed.
CREATE TABLE last_seen (
    user_id TEXT    PRIMARY KEY,
    at      BIGINT
);

-- The user's own event feed behind GET /api/v1/events (id = Last-Event-ID).
CREATE TABLE feed (
    id       BIGSERIAL PRIMARY KEY,
    user_id  TEXT    NOT NULL,
    event_id TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    -- The message a mention or direct_message entry quotes (scrubbed on delete).
    message_id TEXT,
    payload  TEXT    NOT NULL,
    at       BIGINT  NOT NULL,
    UNIQUE (user_id, event_id)
);
CREATE INDEX feed_user ON feed (user_id, id);
CREATE INDEX feed_message ON feed (message_id) WHERE message_id IS NOT NULL;
