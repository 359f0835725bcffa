-- Failed logins under one name since a time. Parameters: $name, $since.
SELECT count(*) FROM account_events WHERE action = 'login_failed' AND account = $name AND created_at >= $since;
