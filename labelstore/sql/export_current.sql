-- Current labels with provenance; $scheme / $source filter when not null.
SELECT c.pair_id, p.dataset, q.text AS query, q.query_id, pr.product_id, pr.title, pr.brand,
       c.scheme, c.label, c.grade, c.probs, c.confidence, c.source, c.author, c.run_id, c.created_at,
       p.raw_rating, p.rating_variance, p.origin AS pair_origin
FROM current_labels c
JOIN pairs p USING (pair_id)
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
WHERE ($scheme IS NULL OR c.scheme = $scheme) AND ($source IS NULL OR c.source = $source)
ORDER BY c.pair_id, c.scheme;
