"""Relabelled mined pairs for Stage 2: `mnr mine` -> `mnr label` -> `mnr train stage2 --relabelled`.

The mined pairs whose current label is the LLM's enter Stage 2 with the LLM's grade and its confidence
as their weight (`trainer.train.Relabels`). Those below the confidence floor go to the review queue
(reason 'relabel: low confidence') and are kept out of training. Wired here, in the app, because the
trainer never imports the annotator or the auditor.
"""
from __future__ import annotations

import pandas as pd

from auditor.queue import queue_issues
from labelstore.schemes import load_scheme
from labelstore.sqlfiles import sql
from labelstore.store import Store
from trainer.train import Relabels


def relabelled_mined_pairs(store: Store, scheme: str, dataset: str | None, *, floor: float) -> tuple[Relabels, int]:
    """(the relabels to train on, how many were queued for review instead)."""
    frame = store.df(sql("app.loop", "relabelled_mined"), {"scheme": load_scheme(scheme).name, "dataset": dataset})
    low = frame[frame["confidence"] < floor]
    if not low.empty:
        issues = pd.DataFrame({"pair_id": low["pair_id"], "kind": "relabel",
                               "reason": [f"low confidence {c:.2f} < floor {floor:.2f}" for c in low["confidence"]],
                               "priority": 1.0 - low["confidence"]})
        with store.run("relabel-floor", {"scheme": scheme, "dataset": dataset, "floor": floor}) as run:
            with store.transaction() as con:
                queue_issues(con, run.run_id, issues, len(issues))
            run.metrics.update({"queued": len(low), "kept": len(frame) - len(low)})
    kept = frame[frame["confidence"] >= floor]
    return Relabels(kept["pair_id"].tolist(), kept["grade"].to_numpy(), kept["confidence"].to_numpy(),
                    exclude=low["pair_id"].tolist()), len(low)
