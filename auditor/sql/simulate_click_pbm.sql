-- Position-based model: examination depends on the position alone, position^-(examination_decay / patience)
-- (patience: the query's, 1 by default).
clicks AS (
    SELECT *, pow(position, -$examination_decay / patience) AS examination,
           u_click < pow(position, -$examination_decay / patience) * attractiveness AS clicked
    FROM shown
),
