"""Stable identifiers: the same query, product or pair always gets the same id."""
from __future__ import annotations

import hashlib
import re

_SPACES = re.compile(r"\s+")


def stable_hash(*parts: object, length: int = 16) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return digest[:length]


def normalize_query(text: str) -> str:
    return _SPACES.sub(" ", text.strip().lower())


def query_id(dataset: str, text: str) -> str:
    return f"{dataset}:q{stable_hash(normalize_query(text))}"


def product_id(dataset: str, source_id: str) -> str:
    return f"{dataset}:{source_id}"


def pair_id(query_id_: str, product_id_: str) -> str:
    return f"p{stable_hash(query_id_, product_id_)}"


def file_hash(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()
