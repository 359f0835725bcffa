-- Trust bias (Agarwal et al., WSDM 2019): examination is position-based, position^-(examination_decay / patience), and a
-- shopper who trusts the ranking also clicks an examined product that does not appeal to them, with probability
-- trust_noise * position^-examination_decay (most often near the top):
--   P(click) = examination * (attractiveness + trust_noise * examination * (1 - attractiveness)).
-- Position then changes what a click says about the product, not only whether it was seen.
clicks AS (
    SELECT *, pow(position, -$examination_decay / patience) AS examination,
           u_click < pow(position, -$examination_decay / patience)
                     * (attractiveness + $trust_noise * pow(position, -$examination_decay / patience) * (1 - attractiveness)) AS clicked
    FROM shown
),
