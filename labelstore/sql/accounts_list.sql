-- Every account with its newest successful and failed login.
SELECT a.name, a.role, a.disabled, a.created_at,
       max(e.created_at) FILTER (WHERE e.action = 'login') AS last_login,
       count(*) FILTER (WHERE e.action = 'login_failed') AS failed_logins
FROM accounts a
LEFT JOIN account_events e ON e.account = a.name
GROUP BY ALL
ORDER BY a.name;
