-- Whether one (pair, scheme) is a blind-overlap item. Parameters: $pair_id, $scheme, $overlap.
SELECT in_overlap($pair_id, $scheme, $overlap);
