-- How many accounts the store has, disabled ones included: with any, the review UI asks for a token
-- (disabling every account locks the UI; it does not fall back to single-user mode).
SELECT count(*) FROM accounts;
