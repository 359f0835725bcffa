-- One account by name. Parameters: $name.
SELECT name, role, token_hash, disabled FROM accounts WHERE name = $name;
