"""auditor: checks labels against (simulated or real) engagement, LLM-vs-human and retriever evidence;
flags disputed labels, detects drift, writes reports, queues re-annotation, and decides when to retrain.

Modules: ingest (events, incl. OpenSearch UBI), simulate (the click-model simulator), metrics + sql/
(position curve, COEC, intervals, implied grade in DuckDB SQL), flags, drift, queue, report, trigger,
audit (one audit run end to end), settings (thresholds from mnr.toml [auditor]).
"""
