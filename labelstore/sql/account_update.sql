-- Disable an account or give it a new token hash (null keeps the old value). Parameters: $name, $disabled, $token_hash.
UPDATE accounts SET disabled = coalesce($disabled, disabled), token_hash = coalesce($token_hash, token_hash)
WHERE name = $name;
