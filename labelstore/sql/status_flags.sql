-- Policy flags on the current labels, per scheme and flag: how many labels carry the flag, how many
-- are flagged (the human decision, else probability >= 0.5), and the human decisions set / cleared.
SELECT scheme, flag,
       count(*) AS labels,
       count(*) FILTER (WHERE flagged) AS flagged,
       count(*) FILTER (WHERE decision) AS decided_set,
       count(*) FILTER (WHERE NOT decision) AS decided_cleared
FROM current_flags
GROUP BY scheme, flag
ORDER BY scheme, flag;
