-- Label distribution over time: labels written per time window, segment (source) and label.
SELECT time_bucket(to_days(CAST($window_days AS INTEGER)), created_at, CAST($origin AS TIMESTAMP)) AS window_start,
       source AS segment, label, count(*) AS n
FROM labels
WHERE scheme = $scheme
GROUP BY ALL
ORDER BY window_start, segment, label
