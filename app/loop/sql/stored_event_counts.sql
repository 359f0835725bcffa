-- (events, any simulated) of a dataset's engagement events in the store.
SELECT count(*), coalesce(bool_or(simulated), false) FROM engagement_events WHERE dataset = $dataset
