"""The retrain trigger, wired at the app layer: counts from the store, the policy from mnr.toml
`[trigger]`, the decision from `auditor.trigger.decide_retrain`, recorded as a run of kind 'trigger';
when it fires, the configured command (Stage 2 refinement and evaluation) runs in a subprocess.
The auditor never imports the trainer: the command line is the only link.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass

from auditor.trigger import TriggerCounts, TriggerDecision, TriggerPolicy, decide_retrain
from labelstore.config import section
from labelstore.errors import MnrError
from labelstore.store import Store

LAST_TRAINING_SQL = """
SELECT greatest(
    (SELECT max(created_at) FROM models WHERE kind = 'retriever'),
    (SELECT max(finished_at) FROM runs WHERE kind = 'trigger' AND status = 'ok'
        AND json_extract(metrics, '$.fired')::BOOLEAN AND json_extract(metrics, '$.returncode')::INTEGER = 0)
)
"""
LATEST_AUDIT_SQL = """
SELECT run_id, metrics FROM runs WHERE kind = 'audit' AND status = 'ok' ORDER BY finished_at DESC LIMIT 1
"""
NEW_CLEAN_LABELS_SQL = """
SELECT count(*) FROM labels l
WHERE l.source IN ('human', 'llm') AND l.scheme = $scheme
  AND ($since IS NULL OR l.created_at > $since)
  AND l.pair_id NOT IN (SELECT pair_id FROM audit_flags WHERE run_id = $audit_run)
"""


@dataclass
class TriggerOutcome:
    run_id: str
    decision: TriggerDecision
    counts: TriggerCounts
    returncode: int | None


def load_retrain_policy() -> TriggerPolicy:
    """The retrain trigger's policy (when to refine the retriever) from mnr.toml [trigger]."""
    return TriggerPolicy.from_config(section("trigger"))


def gather_counts(store: Store, scheme: str) -> TriggerCounts:
    """What the policy looks at, from the store: labels since the last training and the latest audit."""
    since = store.scalar(LAST_TRAINING_SQL)
    latest = store.fetchall(LATEST_AUDIT_SQL)
    audit_run, metrics = (latest[0][0], json.loads(latest[0][1] or "{}")) if latest else (None, {})
    new_clean = store.scalar(NEW_CLEAN_LABELS_SQL, {"scheme": scheme, "since": since, "audit_run": audit_run or ""})
    return TriggerCounts(
        new_clean_labels=int(new_clean or 0),
        flagged_pairs=int(metrics.get("flagged_pairs", 0)),
        audited_pairs=int(metrics.get("audited_pairs", 0)),
        drift_alarms=int(metrics.get("drift_alarm_total", 0)),
    )


def run_trigger(store: Store, scheme: str, policy: TriggerPolicy | None = None, *, launch: bool = True) -> TriggerOutcome:
    """Decide, record the decision (run kind 'trigger'), and run `policy.command` when it fires.

    A failing command marks the run failed and raises `MnrError` with its exit status.
    """
    policy = policy or load_retrain_policy()
    counts = gather_counts(store, scheme)
    decision = decide_retrain(counts, policy)
    returncode: int | None = None
    with store.run("trigger", {"scheme": scheme, "policy": asdict(policy)}) as run:
        run.metrics.update({"fired": decision.fire, "reasons": decision.reasons, "counts": asdict(counts)})
        if decision.fire and launch:
            if not policy.command.strip():
                raise MnrError("the retrain trigger fired but mnr.toml [trigger] command is empty; "
                               "set it, e.g. command = \"mnr train stage2 && mnr eval-retrieval\"")
            env = {**os.environ, "MNR_STORE": str(store.path), "MNR_TRIGGER_RUN": run.run_id}
            completed = subprocess.run(policy.command, shell=True, env=env, check=False)
            returncode = completed.returncode
            run.metrics["returncode"] = returncode
            if returncode != 0:
                raise MnrError(f"retrain command failed with exit status {returncode}: {policy.command}")
    return TriggerOutcome(run.run_id, decision, counts, returncode)
