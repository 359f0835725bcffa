"""Labels from probabilities (annotator.decision): cut-points on the expected grade against argmax.

The data: a calibrated model of an ordinal 4-grade scale whose middle grades are never the single most
probable label, the case cut-points exist for. Labels are in scheme order with grades 3..0 (exact first),
so the tests also check that the grade order, not the column order, decides.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from annotator import stack as st
from annotator.decision import (
    DecisionError,
    choose_labels,
    cross_fitted_qwk,
    decide_by_cutoffs,
    decision_record,
    expected_grade,
    fit_grade_cutoffs,
    grade_kappa,
    read_decision,
)

GRADES = [3, 2, 1, 0]  # exact, substitute, complement, irrelevant


def ordinal_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, 4), targets (n,)): a latent score s, mostly high (as relevance ratings are), grade = the band
    of s + noise; probs are the true posterior of the grade given s, so they are calibrated, and wide enough
    that the middle grades rarely win."""
    rng = np.random.default_rng(seed)
    score = 4 * rng.beta(3, 1, n)
    edges = np.array([1.5, 2.5, 3.2])
    sigma = 1.0
    from scipy.stats import norm
    cdf = norm.cdf((edges[None, :] - score[:, None]) / sigma)  # P(latent < edge)
    grade_probs = np.diff(np.column_stack([np.zeros(n), cdf, np.ones(n)]), axis=1)  # grade 0..3
    grade = np.array([rng.choice(4, p=row) for row in grade_probs])
    probs = grade_probs[:, ::-1]  # columns in label order: grade 3 first
    return probs, 3 - grade


def test_cutoffs_beat_argmax_on_new_pairs() -> None:
    fit_probs, fit_targets = ordinal_sample(1500, seed=0)
    test_probs, test_targets = ordinal_sample(3000, seed=1)
    truth = np.asarray(GRADES)[test_targets]
    cutoffs = fit_grade_cutoffs(fit_probs, fit_targets, GRADES)
    assert cutoffs.shape == (3,) and np.all(np.diff(cutoffs) > 0)
    by_cutoffs = choose_labels(test_probs, GRADES, cutoffs)
    by_argmax = choose_labels(test_probs, GRADES)
    assert grade_kappa(truth, np.asarray(GRADES)[by_cutoffs]) > grade_kappa(truth, np.asarray(GRADES)[by_argmax]) + 0.01
    # the written labels follow the truth's spread: every grade is used, middle ones included
    assert set(by_cutoffs) == {0, 1, 2, 3} and 1 not in set(by_argmax)
    # the probabilities are untouched: only the label moves
    np.testing.assert_array_equal(by_argmax, test_probs.argmax(axis=1))


def test_labels_follow_the_grade_order_not_the_column_order() -> None:
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.02, 0.03, 0.05, 0.9], [0.1, 0.4, 0.4, 0.1]])
    cutoffs = [0.5, 1.5, 2.5]  # plain rounding of the expected grade
    assert expected_grade(probs, GRADES).round(2).tolist() == [2.83, 0.17, 1.5]
    chosen = choose_labels(probs, GRADES, cutoffs)
    assert chosen.tolist() == [0, 3, 2]  # exact, irrelevant, and E[g] = 1.5 (not above 1.5): complement
    with pytest.raises(DecisionError, match="ascending"):
        choose_labels(probs, GRADES, [1.5, 0.5, 2.5])
    with pytest.raises(DecisionError, match="distinct grades"):
        choose_labels(probs, [1, 1, 0, 0], cutoffs)


def test_too_few_pairs_fit_no_cutoffs() -> None:
    probs, targets = ordinal_sample(20, seed=2)
    with pytest.raises(DecisionError, match="20 held-out pairs"):
        fit_grade_cutoffs(probs, targets, GRADES)


def test_cross_fitting_reports_both_decisions_on_unseen_folds() -> None:
    probs, targets = ordinal_sample(800, seed=3)
    groups = np.arange(800) // 4
    report = cross_fitted_qwk(probs, targets, GRADES, groups)
    assert report["cutoffs_better"] is True and report["cutoffs_qwk"] > report["argmax_qwk"]
    # an uninformative model: cut-points cannot invent agreement, whatever they do on their own folds
    noise = np.random.default_rng(4).dirichlet(np.ones(4), size=800)
    assert abs(cross_fitted_qwk(noise, targets, GRADES, groups)["cutoffs_qwk"]) < 0.1


def test_a_stack_keeps_its_cutoffs_through_save_and_load(tmp_path: Path) -> None:
    """A stack with cut-points writes them into stack.json (and its version); a stack without them loads as before."""
    from tests.test_stack import LABELS, rule_pairs

    train, dev = rule_pairs(40, seed=0), rule_pairs(20, seed=1)
    lexical = st.fit_lexical(train, train["target"].to_numpy())
    matrix = st.design(("lexical",), lexical=st.lexical_inputs(lexical, dev, 4))
    plain = st.fit_stack(LABELS, ("lexical",), lexical, matrix, dev["target"].to_numpy())
    plain.save(tmp_path / "plain")
    assert "decision" not in json.loads((tmp_path / "plain" / st.STACK_FILE).read_text())
    with_cutoffs = st.fit_stack(LABELS, ("lexical",), lexical, matrix, dev["target"].to_numpy())
    with_cutoffs.grades, with_cutoffs.cutoffs = GRADES, [0.4, 1.6, 2.2]
    assert with_cutoffs.version != plain.version
    with_cutoffs.save(tmp_path / "cut")
    loaded = st.load_stack(tmp_path / "cut")
    assert loaded is not None and loaded.cutoffs == [0.4, 1.6, 2.2] and loaded.version == with_cutoffs.version
    probs = loaded.predict_proba(dev)
    np.testing.assert_array_equal(loaded.choose_labels(probs), choose_labels(probs, GRADES, [0.4, 1.6, 2.2]))
    np.testing.assert_array_equal(st.load_stack(tmp_path / "plain").choose_labels(probs), probs.argmax(axis=1))
    params = json.loads((tmp_path / "cut" / st.STACK_FILE).read_text())
    for damage, message in ((lambda d: d.update(rule="median"), "decision rule 'median'"),
                             (lambda d: d.update(cutoffs=[0.4, 1.6]), r"4 grades need 3 ascending cut-points"),
                             (lambda d: d.update(cutoffs=[1.6, 0.4, 2.2]), r"ascending cut-points"),
                             (lambda d: d.pop("grades"), "'grades'"),
                             (lambda d: d.update(grades=[3, 2, 1]), "3 grades for 4 labels")):
        broken = json.loads(json.dumps(params))
        damage(broken["decision"])
        (tmp_path / "cut" / st.STACK_FILE).write_text(json.dumps(broken))
        with pytest.raises(st.StackError, match=r"stack\.json, field 'decision': .*" + message):
            st.load_stack(tmp_path / "cut")


def test_cutoffs_are_kept_only_where_they_beat_argmax_and_their_record_reads_back() -> None:
    """`decide_by_cutoffs` (a stack's and an adapter's decision): cut-points for an ordinal model whose middle
    grades never win, argmax for an uninformative one and for too few pairs; `read_decision` round-trips."""
    probs, targets = ordinal_sample(800, seed=5)
    groups = np.arange(800) // 4
    grades, cutoffs, report = decide_by_cutoffs(probs, targets, GRADES, groups)
    assert report["rule"] == "expected_grade_cutoffs" and report["cutoffs_qwk"] > report["argmax_qwk"]
    assert read_decision(decision_record(grades, cutoffs), 4) == (GRADES, cutoffs)
    # a model whose argmax is already right on every pair: cut-points cannot beat it, so argmax is kept
    sure = np.full((800, 4), 0.02)
    sure[np.arange(800), targets] = 0.94
    assert decide_by_cutoffs(sure, targets, GRADES, groups)[:2] == (None, None)
    assert decide_by_cutoffs(probs[:30], targets[:30], GRADES, groups[:30])[:2] == (None, None)
    assert read_decision(None, 4) is None and read_decision({"rule": "argmax"}, 4) is None
    with pytest.raises(DecisionError, match="3 grades for 4 labels"):
        read_decision(decision_record([3, 2, 1], [0.5, 1.5]), 4)
