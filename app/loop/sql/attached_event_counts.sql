-- (events, any simulated) of the events attached in place as `audit_events` (auditor.metrics.attach_events).
SELECT count(*), coalesce(bool_or(simulated), false) FROM audit_events
