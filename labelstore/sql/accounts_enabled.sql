-- How many accounts may log in.
SELECT count(*) FROM accounts WHERE NOT disabled;
