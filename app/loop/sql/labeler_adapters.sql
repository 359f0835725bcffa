-- Registered labeler adapters trained on the labels of $data_hash, newest first.
SELECT model_id, path FROM models
WHERE kind = $kind AND data_hash = $data_hash
ORDER BY created_at DESC
