"""The match hint (annotator.word_match): how many query words a title holds, shown in the short pair part."""
from __future__ import annotations

import pytest

from annotator.judged import Judged
from annotator.pair_form import form_record, policy_for_adapter, policy_in_form
from annotator.prompts import PairText, load_prompt_policy
from annotator.word_match import query_words_found
from labelstore.errors import MnrError


def test_query_words_found_counts_distinct_words_by_their_stem() -> None:
    assert query_words_found("Cordless Drills", "DeWalt 20V cordless drill kit") == (2, 2)
    assert query_words_found("drill drill bit", "Bosch drill-bit set") == (2, 2)  # distinct words, split at '-'
    assert query_words_found("garden hose 50ft", "Garden hose, 100 ft.") == (2, 3)
    assert query_words_found("paint", None) == (0, 1)
    assert query_words_found("", "anything") == (0, 0)


def test_the_short_form_shows_the_count_before_the_judged_examples_and_round_trips_through_meta() -> None:
    policy = load_prompt_policy("graded4")
    hinted = policy_in_form(policy, "short", judged=True, match=True)
    assert hinted.version not in {policy_in_form(policy, "short", judged=True).version,
                                  policy_in_form(policy, "short").version}
    judged = Judged(counts=(("perfect", 2), ("good", 0), ("fair", 0), ("irrelevant", 1)), nearest=("perfect",))
    pair = PairText("cordless drills", "DeWalt 20V cordless drill", judged=judged)
    assert hinted.pair_part(pair).endswith(
        "title: DeWalt 20V cordless drill\nQuery words in title: 2 of 2\n"
        "Judged for this query: perfect 2, good 0, fair 0, irrelevant 1\nMost alike judged: perfect\nLabel:")
    assert policy_in_form(policy, "short", match=True).pair_part(PairText("garden hose", "Hose reel")).endswith(
        "Query words in title: 1 of 2\nLabel:")
    rebuilt = policy_for_adapter(policy, {"pair_form": form_record(hinted, "short", judged=True, match=True)})
    assert rebuilt.version == hinted.version and rebuilt.pair_part(pair) == hinted.pair_part(pair)
    with pytest.raises(MnrError, match="short pair form"):
        policy_in_form(policy, "full", match=True)
