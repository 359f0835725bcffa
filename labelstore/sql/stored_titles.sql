-- The stored title of each of the given products that the store already holds.
-- $product_ids: list of product ids (unnested and joined, so a long list stays a hash join).
SELECT p.product_id, p.title
FROM products AS p
JOIN (SELECT unnest($product_ids) AS product_id) AS given USING (product_id)
