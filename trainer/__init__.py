"""trainer: the two-tower retriever that the labels train, and the hard pairs it mines for relabelling.

Modules: data (labelled pairs and products from the store), model (MiniLM two-tower encoder),
losses/ (Stage 1 label-aware SupCon, Stage 2 multi-class circle loss), train (`mnr train`),
augment (spelling noise, synthetic queries), mining (faiss hard-pair mining), evaluation (graded NDCG, recall,
MRR against BM25 and zero-shot), bands (per-grade similarity thresholds, calibrated P(grade | score)),
hybrid (stemmed BM25 and its blends with the neural score), registry (models, metrics, bands and promotion in the store).
"""
