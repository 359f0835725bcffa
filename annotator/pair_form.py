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
SHORT_TEMPLATE = "\nQuery: {{ query }}\n{% for name, value in fields %}{{ name }}: {{ value }}\n{% endfor %}Label:"


def policy_in_form(policy: Policy, form: str) -> Policy:
    """``policy`` rendering its pair part in ``form`` (its version changes with the prompt)."""
    if form == "full":
        return policy
    if form != "short":
        raise MnrError(f"unknown pair form '{form}' (use {', '.join(PAIR_FORMS)})")
    limits = {name: min(policy.limits.get(name, limit), limit) for name, limit in SHORT_LIMITS.items()}
    return _with_fields(policy, form, policy.fields, {**policy.limits, **limits}, SHORT_TEMPLATE)


def form_record(policy: Policy, form: str) -> dict[str, Any]:
    """What ``meta.json`` keeps of the form: enough to rebuild the exact prompt later."""
    record = {"name": form, "fields": list(policy.fields), "limits": dict(policy.limits), "prompt_hash": policy.version}
    if form != "full":
        record["template"] = SHORT_TEMPLATE
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
