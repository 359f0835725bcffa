"""When to retrain: the decision is a pure function of counts and a policy, so it is easy to test
and to explain. `app/trigger.py` gathers the counts from the store and launches the command."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from labelstore.errors import MnrError


@dataclass(frozen=True)
class TriggerPolicy:
    """The `[trigger]` table of mnr.toml.

    min_new_clean_labels: fire when at least this many new human/LLM labels, not flagged by the
        latest audit, arrived since the last training (0 disables this rule).
    max_flagged_share: fire when the latest audit flagged more than this share of audited pairs
        (the labels are changing under the model; >= 1 disables).
    fire_on_drift: fire when the latest audit raised any drift alarm.
    command: shell command run when the trigger fires (Stage 2 refinement and evaluation).
    """

    min_new_clean_labels: int = 500
    max_flagged_share: float = 0.05
    fire_on_drift: bool = True
    command: str = ""

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> "TriggerPolicy":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MnrError(f"mnr.toml [trigger]: unknown setting(s) {unknown}; known: {sorted(known)}")
        typed: dict[str, Any] = {}
        for name, value in values.items():
            default = getattr(cls, name)
            if isinstance(default, bool) and not isinstance(value, bool):
                raise MnrError(f"mnr.toml [trigger]: {name} must be true or false, not {value!r}")
            try:
                typed[name] = type(default)(value)
            except (TypeError, ValueError) as exc:
                raise MnrError(f"mnr.toml [trigger]: {name} = {value!r} is not a {type(default).__name__}") from exc
        return replace(cls(), **typed)


@dataclass(frozen=True)
class TriggerCounts:
    """What the decision looks at.

    new_clean_labels: human/LLM labels since the last training whose pair the latest audit did not flag.
    flagged_pairs / audited_pairs: from the latest audit (audited: pairs with enough evidence to judge).
    drift_alarms: number of drift alarms the latest audit raised.
    """

    new_clean_labels: int
    flagged_pairs: int
    audited_pairs: int
    drift_alarms: int

    @property
    def flagged_share(self) -> float:
        return self.flagged_pairs / self.audited_pairs if self.audited_pairs else 0.0


@dataclass(frozen=True)
class TriggerDecision:
    fire: bool
    reasons: list[str] = field(default_factory=list)


def decide_retrain(counts: TriggerCounts, policy: TriggerPolicy) -> TriggerDecision:
    """Fire when any rule of `policy` holds; `reasons` says which did, or why none did."""
    fired: list[str] = []
    held: list[str] = []
    if policy.min_new_clean_labels > 0:
        text = f"{counts.new_clean_labels} new clean labels since the last training (threshold {policy.min_new_clean_labels})"
        (fired if counts.new_clean_labels >= policy.min_new_clean_labels else held).append(text)
    if policy.max_flagged_share < 1:
        text = (f"flagged share {counts.flagged_share:.1%} ({counts.flagged_pairs} of {counts.audited_pairs} audited "
                f"pairs; threshold {policy.max_flagged_share:.1%})")
        (fired if counts.flagged_share > policy.max_flagged_share else held).append(text)
    if policy.fire_on_drift:
        text = f"{counts.drift_alarms} drift alarm(s)"
        (fired if counts.drift_alarms > 0 else held).append(text)
    if fired:
        return TriggerDecision(True, [f"fires: {reason}" for reason in fired])
    return TriggerDecision(False, [f"holds: {reason}" for reason in held] or ["holds: every rule is disabled"])
