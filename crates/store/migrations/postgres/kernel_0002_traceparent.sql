-- The W3C trace context of the span that published the event.
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
