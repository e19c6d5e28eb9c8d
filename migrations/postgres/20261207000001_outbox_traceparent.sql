-- The W3C traceparent of the span that recorded each event (NULL when it was not traced), so
-- that its deliveries, made later by the outbox workers, join the event's trace.
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
