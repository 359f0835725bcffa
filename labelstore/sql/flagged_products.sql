-- Products flagged in any scheme: a flag is about the product, not the query. Per (product, flag) the
-- newest human decision on any of its pairs decides; with none, the flag is set when a pair's probability
-- reaches $threshold. `n_pairs`: the product's pairs whose own state is flagged.
-- Parameters: $threshold, $dataset (NULL: every dataset).
WITH rows AS (
    SELECT p.product_id, f.pair_id, f.flag, f.decision, f.created_at, f.label_id,
           coalesce(f.decision, f.probability >= $threshold) AS pair_flagged
    FROM current_flags f
    JOIN pairs p ON p.pair_id = f.pair_id
    WHERE ($dataset::VARCHAR IS NULL OR p.dataset = $dataset)
),
per_flag AS (
    SELECT product_id, flag,
           coalesce(arg_max(decision, (created_at, label_id)) FILTER (WHERE decision IS NOT NULL),
                    bool_or(pair_flagged)) AS flagged,
           list(DISTINCT pair_id) FILTER (WHERE pair_flagged) AS flagging_pairs
    FROM rows
    GROUP BY product_id, flag
)
SELECT product_id, string_agg(flag, ',' ORDER BY flag) AS flags,
       len(list_distinct(flatten(list(flagging_pairs)))) AS n_pairs
FROM per_flag
WHERE flagged
GROUP BY product_id
ORDER BY product_id;
