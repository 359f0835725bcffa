-- Position-based model: examination depends on the position alone, position^-examination_decay.
clicks AS (
    SELECT *, pow(position, -$examination_decay) AS examination,
           u_click < pow(position, -$examination_decay) * attractiveness AS clicked
    FROM shown
),
