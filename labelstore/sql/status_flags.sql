-- Policy flags of the pairs (view current_flags), per scheme and flag: how many pairs have the flag scored
-- or decided, how many are flagged (the human decision, else probability >= 0.5), and the human decisions
-- standing, set / cleared.
SELECT scheme, flag,
       count(*) AS pairs,
       count(*) FILTER (WHERE flagged) AS flagged,
       count(*) FILTER (WHERE decision) AS decided_set,
       count(*) FILTER (WHERE NOT decision) AS decided_cleared
FROM current_flags
GROUP BY scheme, flag
ORDER BY scheme, flag;
