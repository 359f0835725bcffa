-- Append one account event (append-only). Parameters: $action, $account, $method, $detail, $created_at.
INSERT INTO account_events (action, account, method, detail, created_at)
VALUES ($action, $account, $method, $detail, $created_at);
