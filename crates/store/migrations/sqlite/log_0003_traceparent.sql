-- The W3C trace context of the span that published the event, so the
-- consumer's handling continues its trace.
ALTER TABLE log_events ADD COLUMN traceparent TEXT;
