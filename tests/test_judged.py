"""Judged examples (annotator.judged): what people decided for the same query, in the labeler's prompt."""
from __future__ import annotations

import pandas as pd
import pytest

from annotator.judged import Judged, JudgedSettings, judged_examples, skipped
from annotator.pair_form import form_record, policy_for_adapter, policy_in_form
from annotator.prompts import PairText, load_prompt_policy
from labelstore.errors import MnrError

LABELS = ["perfect", "good", "fair", "irrelevant"]
POOL = pd.DataFrame([
    ("a1", "Cordless Drill ", "DeWalt 20V cordless drill kit", "perfect"),
    ("a2", "cordless  drill", "Bosch drill bit set", "fair"),
    ("a3", "cordless drill", "DeWalt 20V cordless drill, bare tool", "good"),
    ("a4", "cordless drill", "Garden hose", "irrelevant"),
    ("b1", "garden hose", "Garden hose 50 ft", "perfect"),
], columns=["pair_id", "query", "title", "label"])


def test_examples_come_from_the_same_query_nearest_first_never_the_pair_itself() -> None:
    pairs = pd.DataFrame([("a1", "cordless drill", "DeWalt 20V cordless drill kit"),
                          ("new", "CORDLESS DRILL", "DeWalt 20V cordless drill combo"),
                          ("b1", "garden hose", "Garden hose 50 ft"),
                          ("c", "ladder", "Step ladder")], columns=["pair_id", "query", "title"])
    first, new, alone, unseen = judged_examples(pairs, POOL, LABELS, k=2)
    # a1 sees the three other pairs of its query (not its own label), the DeWalt drill first
    assert first == Judged(counts=(("perfect", 0), ("good", 1), ("fair", 1), ("irrelevant", 1)), nearest=("good", "fair"))
    # a new pair of the query (text matched lower-cased, spaces collapsed) sees all four; two DeWalt titles lead
    assert new.counts == (("perfect", 1), ("good", 1), ("fair", 1), ("irrelevant", 1))
    assert new.nearest == ("perfect", "good")  # word Jaccard: the "kit" title 4/6, the "bare tool" one 4/7
    assert alone is None and unseen is None  # the only judged pair of its query is itself; a query nobody judged


def test_ties_go_to_the_smaller_pair_id_and_k_caps_the_nearest() -> None:
    pool = pd.DataFrame([("z", "q", "same words", "good"), ("m", "q", "same words", "fair"),
                         ("a", "q", "same words", "perfect")], columns=["pair_id", "query", "title", "label"])
    (judged,) = judged_examples(pd.DataFrame([("x", "q", "same words")], columns=["pair_id", "query", "title"]),
                                pool, LABELS, k=2)
    assert judged.nearest == ("perfect", "fair")


def test_skip_share_is_a_stable_draw_by_pair_id() -> None:
    ids = [f"p{i}" for i in range(2000)]
    drawn = [skipped(pair_id, 0.2) for pair_id in ids]
    assert 0.17 < sum(drawn) / len(ids) < 0.23
    assert drawn == [skipped(pair_id, 0.2) for pair_id in ids]
    assert not any(skipped(pair_id, 0.0) for pair_id in ids)


def test_a_pool_label_outside_the_scheme_is_refused() -> None:
    pool = POOL.assign(label=["perfect", "good", "fair", "meh", "good"])
    with pytest.raises(ValueError, match="meh"):
        judged_examples(POOL.drop(columns="label"), pool, LABELS, k=2)


def test_the_short_form_shows_counts_and_nearest_labels_and_round_trips_through_meta() -> None:
    policy = load_prompt_policy("graded4")
    judged_form = policy_in_form(policy, "short", judged=True)
    assert judged_form.version != policy_in_form(policy, "short").version
    judged = Judged(counts=(("perfect", 12), ("good", 5), ("fair", 1), ("irrelevant", 0)), nearest=("good", "perfect"))
    part = judged_form.pair_part(PairText("cordless drill", "DeWalt 20V drill", judged=judged))
    assert part.endswith("Judged for this query: perfect 12, good 5, fair 1, irrelevant 0\n"
                         "Most alike judged: good, perfect\nLabel:")
    # a pair of a query nobody judged: the plain short form's text
    assert (judged_form.pair_part(PairText("cordless drill", "DeWalt 20V drill"))
            == policy_in_form(policy, "short").pair_part(PairText("cordless drill", "DeWalt 20V drill")))
    rebuilt = policy_for_adapter(policy, {"pair_form": form_record(judged_form, "short", judged=True)})
    assert rebuilt.version == judged_form.version
    assert rebuilt.pair_part(PairText("q", "t", judged=judged)) == judged_form.pair_part(PairText("q", "t", judged=judged))
    with pytest.raises(MnrError, match="short pair form"):
        policy_in_form(policy, "full", judged=True)


def test_settings_round_trip_through_meta() -> None:
    settings = JudgedSettings(k=3, skip_share=0.1, sources=("human",))
    assert JudgedSettings.from_meta({"judged": settings.record()}) == settings
    assert JudgedSettings.from_meta({}) is None and JudgedSettings.from_meta({"judged": None}) is None


def test_counts_beyond_k_drop_the_counts_line_only_where_the_nearest_line_lists_every_judged_pair() -> None:
    """`JudgedSettings.counts` "beyond_k": a query with at most K other judged pairs shows no counts line (the
    nearest line already lists them all); one with more shows it. The "always" form of earlier adapters keeps
    its template, so their prompts and versions are unchanged."""
    pairs = pd.DataFrame([("a1", "cordless drill", "DeWalt 20V cordless drill kit")],
                         columns=["pair_id", "query", "title"])
    (within,) = judged_examples(pairs, POOL, LABELS, k=3, counts="beyond_k")  # a1 sees 3 others: all listed
    (beyond,) = judged_examples(pairs, POOL, LABELS, k=2, counts="beyond_k")
    (always,) = judged_examples(pairs, POOL, LABELS, k=3)
    assert within == Judged(counts=(), nearest=("good", "fair", "irrelevant"))
    assert beyond.counts == always.counts == (("perfect", 0), ("good", 1), ("fair", 1), ("irrelevant", 1))
    policy = load_prompt_policy("graded4")
    lean = policy_in_form(policy, "short", judged=True, judged_counts="beyond_k")
    plain = policy_in_form(policy, "short", judged=True)
    assert lean.version != plain.version
    assert lean.pair_part(PairText("cordless drill", "DeWalt drill", judged=within)).endswith(
        "title: DeWalt drill\nMost alike judged: good, fair, irrelevant\nLabel:")
    assert (lean.pair_part(PairText("q", "t", judged=beyond)) == plain.pair_part(PairText("q", "t", judged=beyond)))
    rebuilt = policy_for_adapter(policy, {"pair_form": form_record(lean, "short", judged=True, judged_counts="beyond_k")})
    assert rebuilt.version == lean.version
    settings = JudgedSettings(k=3, counts="beyond_k")
    assert JudgedSettings.from_meta({"judged": settings.record()}) == settings
    assert JudgedSettings.from_meta({"judged": {"k": 5}}).counts == "always"  # adapters made before the setting
    with pytest.raises(ValueError, match="unknown judged counts 'never'"):
        judged_examples(pairs, POOL, LABELS, k=3, counts="never")
    with pytest.raises(MnrError, match="unknown judged counts 'never'"):
        policy_in_form(policy, "short", judged=True, judged_counts="never")
