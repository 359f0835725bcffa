"""`[review]` in mnr.toml: who may write, how the queue is built.

    [review]
    allow = ["alice", "bob"]   # optional: only these ids may record decisions
    overlap = 0.1              # share of items reviewed blind by several annotators (for agreement)
    overlap_k = 2              # how many annotators decide each overlap item
    blind_llm = false          # true: overlap items hide the LLM's label too until decided
    trusted_header = "X-Forwarded-User"   # optional: an SSO proxy (oauth2-proxy) names the user in this header
    min_confidence = 0.6       # LLM labels below this confidence are queued as uncertain
    flag_priority = 0.5        # optional: LLM labels with a policy flag this likely or more are queued first
    scheme = "esci"            # scheme for pairs that have no label yet
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from labelstore.accounts import check_name
from labelstore.config import config_path, section
from labelstore.errors import MnrError

HEADER_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")
ADDRESS_ENV = "MNR_REVIEW_ADDRESS"  # `mnr review` tells the UI the address it serves on


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class IdentityError(MnrError):
    """No annotator id, a malformed one, or one the allow-list does not contain."""


@dataclass(frozen=True)
class ReviewSettings:
    allow: tuple[str, ...] = ()
    overlap: float = 0.1
    min_confidence: float = 0.6
    default_scheme: str = "esci"
    overlap_k: int = 2
    blind_llm: bool = False
    trusted_header: str | None = None
    flag_priority: float | None = None

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
        overlap_k = values.get("overlap_k", cls.overlap_k)
        if isinstance(overlap_k, bool) or not isinstance(overlap_k, int) or overlap_k < 2:
            raise MnrError(f"{where}overlap_k must be a whole number of annotators, 2 or more, not {overlap_k!r}")
        blind_llm = values.get("blind_llm", cls.blind_llm)
        if not isinstance(blind_llm, bool):
            raise MnrError(f"{where}blind_llm must be true or false, not {blind_llm!r}")
        header = values.get("trusted_header")
        if header is not None and (not isinstance(header, str) or not HEADER_NAME.match(header)):
            raise MnrError(f"{where}trusted_header must be an HTTP header name such as \"X-Forwarded-User\", not {header!r}")
        flag_priority = values.get("flag_priority")
        if flag_priority is not None:
            flag_priority = _fraction(flag_priority, f"{where}flag_priority")
        return cls(tuple(name.strip() for name in allow), overlap, min_confidence, scheme, overlap_k, blind_llm, header,
                   flag_priority)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise MnrError(f"{where} must be a number between 0 and 1, not {value!r}")
    return float(value)


def check_identity(annotator: str | None, allow: tuple[str, ...] = ()) -> str:
    """The annotator id, stripped; raises `IdentityError` when it is missing, malformed or not allowed."""
    name = (annotator or "").strip()
    if not name:
        raise IdentityError("enter your name or annotator id before reviewing: no decision is written without one")
    check_name(name, IdentityError)
    if allow and name not in allow:
        raise IdentityError(f"'{name}' is not on the review allow-list (review.allow in {config_path()})")
    return name
