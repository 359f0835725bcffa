-- One pair as the review page shows it. Parameters: $pair_id.
SELECT p.pair_id, p.dataset, p.origin, p.raw_rating, p.query_id, p.product_id,
       q.text AS query, pr.title, pr.description, pr.brand, pr.attributes
FROM pairs p
JOIN queries q ON q.query_id = p.query_id
JOIN products pr ON pr.product_id = p.product_id
WHERE p.pair_id = $pair_id;
