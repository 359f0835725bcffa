"""The pair part an adapter is trained and served with: ``full`` (the policy's fields and limits) or ``short``.

Cost per pair is its pair-part tokens, so the short form shows query, title and brand with the
description cut hard, in a compact template without the XML-like delimiters (they cost 14 of a Home
Depot pair's 52 tokens; the text is cleaned of angle brackets and steering either way). An adapter
learns one form; ``meta.json`` records it (fields and limits)
under ``"pair_form"`` and `policy_for_adapter` rebuilds that form at labelling time, so every
backend sees the prompt the adapter was trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jinja2

from annotator.prompts import Policy
from labelstore import ids
from labelstore.errors import MnrError

PAIR_FORMS = ("full", "short")
# characters per field in the short form; a field the policy does not show stays hidden
SHORT_LIMITS = {"query": 80, "title": 100, "brand": 30, "description": 60}
_SHORT_HEAD = "\nQuery: {{ query }}\n{% for name, value in fields %}{{ name }}: {{ value }}\n{% endfor %}"
# how many query words the title holds (annotator.word_match), for a run with the match hint
_MATCH_LINE = "Query words in title: {{ match.found }} of {{ match.total }}\n"
# the query's judged examples (annotator.judged), when the pair has any
_JUDGED_BLOCK = ("{% if judged %}Judged for this query:{% for label, n in judged.counts %} {{ label }} {{ n }}"
                 "{{ ',' if not loop.last }}{% endfor %}\nMost alike judged: {{ judged.nearest | join(', ') }}\n"
                 "{% endif %}")
# the same, with the counts line only where there are counts: `JudgedSettings.counts` "beyond_k" gives none
# where the nearest line already lists every judged pair of the query
_JUDGED_BLOCK_COUNTS_IF_ANY = ("{% if judged %}{% if judged.counts %}Judged for this query:{% for label, n in "
                               "judged.counts %} {{ label }} {{ n }}{{ ',' if not loop.last }}{% endfor %}\n"
                               "{% endif %}Most alike judged: {{ judged.nearest | join(', ') }}\n{% endif %}")
_JUDGED_BLOCKS = {"always": _JUDGED_BLOCK, "beyond_k": _JUDGED_BLOCK_COUNTS_IF_ANY}
SHORT_TEMPLATE = _SHORT_HEAD + "Label:"


def policy_in_form(policy: Policy, form: str, *, judged: bool = False, match: bool = False,
                   judged_counts: str = "always") -> Policy:
    """``policy`` rendering its pair part in ``form`` (its version changes with the prompt); ``judged``: with
    the query's judged examples (`annotator.judged`; ``judged_counts``: `JudgedSettings.counts`); ``match``:
    with the count of query words the title holds (`annotator.word_match`). Both are shown in the short form
    only."""
    if form == "full":
        if judged or match:
            raise MnrError("judged examples and the match hint are shown in the short pair form only "
                           "(use pair form 'short')")
        return policy
    if form != "short":
        raise MnrError(f"unknown pair form '{form}' (use {', '.join(PAIR_FORMS)})")
    limits = {name: min(policy.limits.get(name, limit), limit) for name, limit in SHORT_LIMITS.items()}
    return _with_fields(policy, form, policy.fields, {**policy.limits, **limits},
                        template_of(form, judged=judged, match=match, judged_counts=judged_counts))


def template_of(form: str, *, judged: bool = False, match: bool = False, judged_counts: str = "always") -> str | None:
    """The pair template of a form other than ``full`` (which keeps the policy's own)."""
    if form == "full":
        return None
    if judged_counts not in _JUDGED_BLOCKS:
        raise MnrError(f"unknown judged counts '{judged_counts}' (use {', '.join(_JUDGED_BLOCKS)})")
    return _SHORT_HEAD + (_MATCH_LINE if match else "") + (_JUDGED_BLOCKS[judged_counts] if judged else "") + "Label:"


def form_versions(policy: Policy) -> frozenset[str]:
    """Every version a label made under ``policy`` can carry: the policy's own and each form's, with and
    without judged examples and the match hint (an adapter labels under its pair form's version)."""
    short = {policy_in_form(policy, "short", judged=judged, match=match, judged_counts=counts).version
             for judged in (False, True) for match in (False, True) for counts in _JUDGED_BLOCKS}
    return frozenset({policy.version, *short})


def form_record(policy: Policy, form: str, *, judged: bool = False, match: bool = False,
                judged_counts: str = "always") -> dict[str, Any]:
    """What ``meta.json`` keeps of the form: enough to rebuild the exact prompt later."""
    record = {"name": form, "fields": list(policy.fields), "limits": dict(policy.limits), "prompt_hash": policy.version}
    template = template_of(form, judged=judged, match=match, judged_counts=judged_counts)
    if template is not None:
        record["template"] = template
    return record


def policy_for_adapter(policy: Policy, meta: dict[str, Any]) -> Policy:
    """``policy`` in the pair form recorded in an adapter's ``meta.json`` (unchanged when none is)."""
    record = meta.get("pair_form")
    if not record or record.get("name", "full") == "full":
        return policy
    limits = {str(k): int(v) for k, v in record["limits"].items()}
    return _with_fields(policy, str(record["name"]), tuple(record["fields"]), {**policy.limits, **limits},
                        str(record.get("template", SHORT_TEMPLATE)))


def _with_fields(policy: Policy, form: str, fields: tuple[str, ...], limits: dict[str, int], template: str) -> Policy:
    version = ids.stable_hash(policy.version, form, repr(fields), repr(sorted(limits.items())), template, length=12)
    compiled = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                  autoescape=False).from_string(template)
    return dataclasses.replace(policy, fields=tuple(fields), limits=limits, version=version, pair_template=compiled)
