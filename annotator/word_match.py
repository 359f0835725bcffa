"""How many of a query's words a product title holds: the match count the short pair form can show
(``Query words in title: 2 of 3``, `annotator.pair_form`).

Words are runs of lower-case letters and digits, compared by their first ``STEM_CHARS`` characters so
that "drill" finds "drills" and "cordless" finds "cordless". A small model reads relevance poorly from
raw text on queries it never trained on; one count it can read carries over to any query.
"""
from __future__ import annotations

import re
from typing import Any

WORD = re.compile(r"[a-z0-9]+")
STEM_CHARS = 5


def words(text: Any) -> list[str]:
    """The lower-cased words of ``text`` (None: none)."""
    return WORD.findall("" if text is None else str(text).lower())


def query_words_found(query: Any, title: Any) -> tuple[int, int]:
    """(distinct query words whose stem the title holds, distinct query words)."""
    wanted = {word[:STEM_CHARS] for word in words(query)}
    held = {word[:STEM_CHARS] for word in words(title)}
    return len(wanted & held), len(wanted)
