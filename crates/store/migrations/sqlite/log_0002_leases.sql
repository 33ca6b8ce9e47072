-- Several instances share one consumer group: each (group, topic, partition)
-- is handled by one owner at a time, which renews its lease while alive.
CREATE TABLE log_leases (
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    owner        TEXT    NOT NULL,
    expires_at   BIGINT  NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no)
);

-- Live members of each group, so partitions are shared out evenly.
CREATE TABLE log_members (
    group_name TEXT   NOT NULL,
    owner      TEXT   NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (group_name, owner)
);

-- On the NATS bus the event is not in log_events: the dead letter keeps it.
ALTER TABLE log_dead_letters ADD COLUMN event_json TEXT;
