SELECT count(*) FROM pairs WHERE dataset = $dataset
