-- The trace of whatever started the saga, continued by every step.
ALTER TABLE saga_instances ADD COLUMN traceparent TEXT;
