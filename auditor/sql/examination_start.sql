-- Starting point of the position-curve fit: the observed CTR per position.
CREATE OR REPLACE TEMP TABLE audit_examination AS
SELECT position, sum(clicks) / greatest(sum(impressions), 1) AS examination
FROM audit_pair_position GROUP BY position
