"""`[review]` in mnr.toml: who may write, how the queue is built.

    [review]
    allow = ["alice", "bob"]   # optional: only these ids may record decisions
    overlap = 0.1              # share of single-annotator items routed to a second annotator
    min_confidence = 0.6       # LLM labels below this confidence are queued as uncertain
    scheme = "esci"            # scheme for pairs that have no label yet
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from labelstore.config import config_path, section
from labelstore.errors import MnrError

ANNOTATOR_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class IdentityError(MnrError):
    """No annotator id, a malformed one, or one the allow-list does not contain."""


@dataclass(frozen=True)
class ReviewSettings:
    allow: tuple[str, ...] = ()
    overlap: float = 0.1
    min_confidence: float = 0.6
    default_scheme: str = "esci"

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None) -> "ReviewSettings":
        """Read `[review]` (from `config`, else mnr.toml); a bad value names the field."""
        values = section("review", config)
        where = f"{config_path()}: review."
        allow = values.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(name, str) and name.strip() for name in allow):
            raise MnrError(f"{where}allow must be a list of non-empty annotator ids, not {allow!r}")
        overlap = _fraction(values.get("overlap", cls.overlap), f"{where}overlap")
        min_confidence = _fraction(values.get("min_confidence", cls.min_confidence), f"{where}min_confidence")
        scheme = values.get("scheme", cls.default_scheme)
        if not isinstance(scheme, str):
            raise MnrError(f"{where}scheme must be a scheme name, not {scheme!r}")
        return cls(tuple(name.strip() for name in allow), overlap, min_confidence, scheme)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise MnrError(f"{where} must be a number between 0 and 1, not {value!r}")
    return float(value)


def check_identity(annotator: str | None, allow: tuple[str, ...] = ()) -> str:
    """The annotator id, stripped; raises `IdentityError` when it is missing, malformed or not allowed."""
    name = (annotator or "").strip()
    if not name:
        raise IdentityError("enter your name or annotator id before reviewing: no decision is written without one")
    if not ANNOTATOR_ID.match(name):
        raise IdentityError(
            f"annotator id '{name}' is not valid: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        )
    if allow and name not in allow:
        raise IdentityError(f"'{name}' is not on the review allow-list (review.allow in {config_path()})")
    return name
