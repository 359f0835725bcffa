-- User browsing model: examination depends on the distance d to the last click above (or to the top
-- when there is none): d^-(examination_decay / patience). The walk goes down each session one position at a time.
ubm_walk(session_hash, position, last_click, examination, clicked) AS (
    SELECT session_hash, position, 0, pow(position, -$examination_decay / patience),
           u_click < pow(position, -$examination_decay / patience) * attractiveness
    FROM shown WHERE position = 1
    UNION ALL
    SELECT s.session_hash, s.position,
           CASE WHEN w.clicked THEN w.position ELSE w.last_click END,
           pow(s.position - CASE WHEN w.clicked THEN w.position ELSE w.last_click END, -$examination_decay / s.patience),
           s.u_click < pow(s.position - CASE WHEN w.clicked THEN w.position ELSE w.last_click END,
                           -$examination_decay / s.patience) * s.attractiveness
    FROM ubm_walk w JOIN shown s ON s.session_hash = w.session_hash AND s.position = w.position + 1
),
clicks AS (
    SELECT s.*, w.examination, w.clicked FROM shown s JOIN ubm_walk w USING (session_hash, position)
),
