-- Schemes with at least one live human decision.
SELECT DISTINCT scheme FROM live_labels WHERE source = 'human' ORDER BY 1
