"""Domain and storage for mine-refine: label schemes, records, the DuckDB store, ingest and export.

Everything else (annotator, auditor, trainer, app) meets here.
"""
from labelstore.errors import MnrError, SchemeError, StoreError, StoreLockedError, IngestError
from labelstore.schemes import Label, LabelScheme, load_scheme, list_schemes
from labelstore.store import Store, LabelRecord, new_run_id

__all__ = [
    "MnrError", "SchemeError", "StoreError", "StoreLockedError", "IngestError",
    "Label", "LabelScheme", "load_scheme", "list_schemes",
    "Store", "LabelRecord", "new_run_id",
]
