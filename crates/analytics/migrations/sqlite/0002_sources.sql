-- Per job, the progress of each input source (a topic partition of the log).
-- The job's watermark is the smallest max_event_time over the sources that
-- are not idle (last_seen within the idle timeout), minus out_of_orderness;
-- the largest over all of them when every source is idle. Written in the
-- transaction of every event, with the inbox claim and the job's row.
CREATE TABLE analytics_sources (
    job             TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    topic_partition INTEGER NOT NULL,
    -- Largest event time (µs) of the source's elements, each counted at most
    -- the clock skew past the wall clock of its arrival.
    max_event_time  INTEGER NOT NULL,
    -- Wall-clock time (µs) the source's last element was applied.
    last_seen       INTEGER NOT NULL,
    PRIMARY KEY (job, topic, topic_partition)
);
