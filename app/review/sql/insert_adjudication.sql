-- Append one adjudication. Parameters: $adjudication_id, $pair_id, $scheme, $admin, $label_id, $label,
-- $decisions, $created_at.
INSERT INTO adjudications (adjudication_id, pair_id, scheme, admin, label_id, label, decisions, created_at)
VALUES ($adjudication_id, $pair_id, $scheme, $admin, $label_id, $label, $decisions, $created_at);
