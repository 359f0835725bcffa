-- Every label ever written, oldest first, with provenance; $scheme / $source filter when not null.
SELECT l.label_id, l.pair_id, p.dataset, q.text AS query, q.query_id, pr.product_id, pr.title, pr.brand,
       l.scheme, l.label, l.grade, l.probs, l.confidence, l.source, l.author, l.run_id, l.comment,
       l.needs_review, l.created_at, p.raw_rating, p.rating_variance, p.origin AS pair_origin
FROM labels l
JOIN pairs p USING (pair_id)
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
WHERE ($scheme IS NULL OR l.scheme = $scheme) AND ($source IS NULL OR l.source = $source)
ORDER BY l.created_at, l.label_id;
