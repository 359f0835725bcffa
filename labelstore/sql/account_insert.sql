-- A new account. Parameters: $name, $role, $token_hash, $created_at.
INSERT INTO accounts (name, role, token_hash, created_at) VALUES ($name, $role, $token_hash, $created_at);
