"""The policy flags of a review item: which flags, their definitions, the LLM's probabilities, and the
reviewer's pending set / clear decisions.

The flags come from the policy the item's newest LLM label was written under: a labeler's author is
`<model tag>@<policy>:<policy version>` (`annotator.labeler.labeler_author`). When that policy can no
longer be loaded, the flags the label carries are still shown, by name only. An item no LLM labelled
under a policy has no flags to review.

A decision on a flag is set (True) or cleared (False). A flag the reviewer leaves untouched is *not* a
decision: the human label carries the LLM's probability for it (the one the reviewer was shown), so the
flag stays as the LLM scored it in `current_flags`, and only touched flags get a decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from annotator.prompts import PolicyError, PolicyFlag, load_prompt_policy
from app.review.item import ReviewItem

# Keys that set flag 1, 2, ...; Shift + the key clears it. Digits are the labels, S skip, U undo,
# and Streamlit reserves C and R.
FLAG_KEYS = ("F", "G", "H", "J", "K", "L")


@dataclass(frozen=True)
class ItemFlag:
    """One flag of an item: `probability` is the LLM's (None when it gave none), `key` its shortcut (or None)."""

    name: str
    definition: str | None
    probability: float | None
    key: str | None

    @property
    def llm_flagged(self) -> bool | None:
        return None if self.probability is None else self.probability >= 0.5


@dataclass(frozen=True)
class ItemFlags:
    """`policy`: 'name:version' the flags come from (None: no LLM label names one)."""

    policy: str | None
    flags: tuple[ItemFlag, ...] = ()
    note: str | None = None

    @property
    def probabilities(self) -> dict[str, float]:
        return {flag.name: flag.probability for flag in self.flags if flag.probability is not None}


def policy_of_author(author: str | None) -> tuple[str, str] | None:
    """(policy name, version) from a labeler's author `<model tag>@<policy>:<version>`, or None."""
    if not isinstance(author, str) or "@" not in author:
        return None
    name, _, version = author.rpartition("@")[2].partition(":")
    return (name, version) if name and version else None


@lru_cache(maxsize=32)
def _declared_flags(policy: str) -> tuple[tuple[PolicyFlag, ...], str] | None:
    """(flags, version) of the policy file named `policy` as it is now; None when it cannot be loaded."""
    try:
        loaded = load_prompt_policy(policy)
    except (PolicyError, OSError, ValueError):
        return None
    return loaded.flags, loaded.version


@lru_cache(maxsize=32)
def _versions_today(policy: str) -> frozenset[str]:
    """The versions a label of `policy` as it is now can carry: the policy's own and each pair form's
    (an adapter labels under its pair form's version)."""
    from annotator.pair_form import form_versions

    return form_versions(load_prompt_policy(policy))


def item_flags(item: ReviewItem) -> ItemFlags:
    """The flags to review on `item`, in the policy's order, with the newest LLM label's probabilities."""
    llm = item.llm_label
    named = policy_of_author(None if llm is None else llm["author"])
    if named is None:
        return ItemFlags(None)
    name, version = named
    probabilities = item.llm_flag_probabilities
    declared = _declared_flags(name)
    note = None
    if declared is None:
        flags, note = [], f"policy '{name}' cannot be loaded here: flags shown by name only"
    else:
        flags = list(declared[0])
        if version not in _versions_today(name):
            note = f"policy '{name}' has changed since this label ({version}); definitions are today's"
    names = [flag.name for flag in flags] + sorted(set(probabilities) - {flag.name for flag in flags})
    definitions = {flag.name: flag.definition for flag in flags}
    keys = dict(zip(names, FLAG_KEYS))
    return ItemFlags(f"{name}:{version}", tuple(
        ItemFlag(flag, definitions.get(flag), probabilities.get(flag), keys.get(flag)) for flag in names), note)


def toggle(pending: dict[str, bool], flag: str, value: bool) -> dict[str, bool]:
    """The pending decisions after the reviewer pressed set (`value` True) or clear on `flag`: pressing the
    decision already pending takes it back (untouched again)."""
    updated = dict(pending)
    if updated.get(flag) is value:
        del updated[flag]
    else:
        updated[flag] = value
    return updated
