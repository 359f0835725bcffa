-- One alternating step of the position-based click model fit on aggregated counts
-- (clicks[pair, pos] ~ Poisson(impressions[pair, pos] * examination[pos] * attractiveness[pair])):
-- attractiveness given examination, then examination given attractiveness, normalised to 1 at position 1.
-- A pair's products move between positions from session to session, which separates the two factors.
-- The previous examination is kept in audit_examination_previous for the convergence check.
CREATE OR REPLACE TEMP TABLE audit_examination_previous AS SELECT * FROM audit_examination;
CREATE OR REPLACE TEMP TABLE audit_attractiveness AS
SELECT pp.pair_key, sum(pp.clicks) / greatest(sum(pp.impressions * e.examination), 1e-9) AS attractiveness
FROM audit_pair_position pp JOIN audit_examination e USING (position)
GROUP BY pp.pair_key;
CREATE OR REPLACE TEMP TABLE audit_examination AS
WITH raw AS (
    SELECT pp.position, sum(pp.clicks) / greatest(sum(pp.impressions * a.attractiveness), 1e-9) AS examination
    FROM audit_pair_position pp JOIN audit_attractiveness a USING (pair_key)
    GROUP BY pp.position
)
SELECT position, examination / (SELECT examination FROM raw WHERE position = 1) AS examination FROM raw;
