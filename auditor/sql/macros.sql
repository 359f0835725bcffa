-- Helper macros for the auditor's SQL, created per connection (TEMP).
-- u01: a uniform number in [0, 1) from a 64-bit hash, so randomness is a pure function of
-- (seed, keys): reproducible and independent of thread scheduling.
-- DuckDB combines a multi-argument hash(a, b, c) by a mix that keeps its last argument nearly linear:
-- hash(s, 'click', session, product A) and (..., product B) came out correlated at -0.99 across
-- sessions. Hashing the combined value once more mixes it fully (measured correlation 0.00).
CREATE OR REPLACE TEMP MACRO u01(h) AS (CAST(hash(h) >> 11 AS DOUBLE) / 9007199254740992.0);
-- std_normal: Box-Muller from two hashes.
CREATE OR REPLACE TEMP MACRO std_normal(h1, h2) AS (
    sqrt(-2.0 * ln(greatest(u01(h1), 1e-12))) * cos(2.0 * pi() * u01(h2))
);
-- Wilson score interval of a binomial proportion k / n at normal quantile z.
CREATE OR REPLACE TEMP MACRO wilson_low(k, n, z) AS (
    CASE WHEN n > 0 THEN
        greatest(((k / n) + z * z / (2 * n) - z * sqrt((k / n) * (1 - k / n) / n + z * z / (4 * n * n))) / (1 + z * z / n), 0)
    END
);
CREATE OR REPLACE TEMP MACRO wilson_high(k, n, z) AS (
    CASE WHEN n > 0 THEN
        least(((k / n) + z * z / (2 * n) + z * sqrt((k / n) * (1 - k / n) / n + z * z / (4 * n * n))) / (1 + z * z / n), 1)
    END
);
-- Score interval of a Poisson rate: k events over exposure e (expected clicks), at quantile z.
CREATE OR REPLACE TEMP MACRO poisson_low(k, e, z) AS (
    CASE WHEN e > 0 THEN greatest(k + z * z / 2 - z * sqrt(k + z * z / 4), 0) / e END
);
CREATE OR REPLACE TEMP MACRO poisson_high(k, e, z) AS (
    CASE WHEN e > 0 THEN (k + z * z / 2 + z * sqrt(k + z * z / 4)) / e END
);
-- The store's stable ids (labelstore/ids.py), in SQL, so large event files never pass through Python.
CREATE OR REPLACE TEMP MACRO mnr_query_id(dataset, text) AS (
    dataset || ':q' || sha256(trim(regexp_replace(lower(text), '\s+', ' ', 'g')))[1:16]
);
CREATE OR REPLACE TEMP MACRO mnr_product_id(dataset, source_id) AS (
    CASE WHEN starts_with(source_id, dataset || ':') THEN source_id ELSE dataset || ':' || source_id END
);
CREATE OR REPLACE TEMP MACRO mnr_pair_id(query_id, product_id) AS (
    'p' || sha256(query_id || chr(31) || product_id)[1:16]
);
-- The reference curve is one list of CTRs, two entries per position: no click above it in the
-- session, then below the session's first click. curve_key gives the 1-based index into it.
CREATE OR REPLACE TEMP MACRO curve_key(position, after_click) AS (
    CASE WHEN position >= 1 THEN 2 * position - 1 + CAST(after_click AS INTEGER) ELSE 0 END
);
-- The CTR an average pair gets at curve index `key` (curve_key) of the fitted curve `reference`
-- (DOUBLE[]); keys past the curve, or below 1, add nothing.
CREATE OR REPLACE TEMP MACRO reference_ctr(reference, key) AS (
    CASE WHEN key >= 1 THEN coalesce(list_extract(reference, key), 0) ELSE 0 END
);
-- The same with the examination (reference / attractiveness, the curve's mean attractiveness) raised to
-- `exponent`: what an average pair gets there from shoppers who look deeper (exponent < 1) or less deep.
CREATE OR REPLACE TEMP MACRO patient_ctr(reference, key, attractiveness, exponent) AS (
    CASE WHEN key >= 1 AND attractiveness > 0
         THEN attractiveness * pow(coalesce(list_extract(reference, key), 0) / attractiveness, exponent) ELSE 0 END
);
