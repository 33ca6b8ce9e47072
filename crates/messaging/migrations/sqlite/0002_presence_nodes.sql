-- Each node with a gateway renews its row; a node that stops (killed, lost
-- its network) lapses, and a live node takes its users offline.
CREATE TABLE presence_nodes (
    node_id    TEXT   PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
