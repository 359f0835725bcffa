-- Append one review event; a retried event (same event_id) adds nothing.
INSERT INTO review_events (event_id, action, pair_id, scheme, annotator, label_id, queue_source,
                           shown_label_id, changed_since_shown, shown_at, created_at)
VALUES ($event_id, $action, $pair_id, $scheme, $annotator, $label_id, $queue_source,
        $shown_label_id, $changed_since_shown, $shown_at, $created_at)
ON CONFLICT (event_id) DO NOTHING;
