"""The calibrated stack (annotator.stack) on synthetic pairs, no model: fitting, its dev report, saving.

The rule: a pair's label is decided by how many query words occur in the title (all: exact, some:
substitute... none: irrelevant), which the lexical match features see and an uninformative "LLM"
does not.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from annotator import stack as st
from annotator.evaluation import evaluate_labels

LABELS = ["exact", "substitute", "complement", "irrelevant"]
WORDS = ("drill", "saw", "paint", "lamp", "hose", "grill", "mower", "ladder", "faucet", "tile", "brush", "glue")


def rule_pairs(n_queries: int, seed: int) -> pd.DataFrame:
    """Pairs whose label is the number of the query's 3 words missing from the title (0 -> exact .. 3 -> irrelevant)."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        query_words = list(rng.choice(WORDS, 3, replace=False))
        others = [w for w in WORDS if w not in query_words]
        for j in range(6):
            missing = int(rng.integers(0, 4))
            title_words = query_words[missing:] + list(rng.choice(others, 2 + missing, replace=False))
            rng.shuffle(title_words)
            rows.append({"pair_id": f"{seed}-{q}-{j}", "query_id": f"{seed}-q{q}", "query": " ".join(query_words),
                         "title": " ".join(title_words) + " kit", "target": missing})
    return pd.DataFrame(rows)


def noise_logprobs(n: int, seed: int) -> np.ndarray:
    return np.log(np.random.default_rng(seed).dirichlet(np.ones(len(LABELS)), size=n))


@pytest.fixture(scope="module")
def fitted() -> tuple[st.Stack, dict, pd.DataFrame]:
    train, dev = rule_pairs(60, seed=0), rule_pairs(30, seed=1)
    lexical = st.fit_lexical(train, train["target"].to_numpy())
    targets = dev["target"].to_numpy()
    grades = [3, 2, 1, 0]
    logprobs = noise_logprobs(len(dev), 2)
    stack, report = st.fit_with_report(
        labels=LABELS, grades=grades, lexical=lexical, lexical_dev=st.lexical_inputs(lexical, dev, len(LABELS)),
        llm_logprobs=logprobs, targets=targets, groups=dev["query_id"],
        evaluate=lambda p: evaluate_labels(targets, p, grades, label_names=LABELS),
        adapter_probs=np.exp(logprobs))
    return stack, report, dev


def test_the_stack_follows_the_lexical_rule_against_a_confident_wrong_llm(fitted) -> None:
    stack, report, _ = fitted
    test = rule_pairs(20, seed=3)
    truth = test["target"].to_numpy()
    # the "LLM" is sure of the opposite of the truth, with the same confidence everywhere
    llm = np.log(np.full((len(test), 4), 0.02))
    llm[np.arange(len(test)), 3 - truth] = np.log(0.94)
    bare = np.exp(llm).argmax(1)
    stacked = stack.predict_proba(test[["query", "title"]], llm).argmax(1)
    assert np.mean(bare == truth) < 0.3
    assert np.mean(stacked == truth) > 0.8
    # no query word in the title: the stack moves such pairs to irrelevant, whatever the LLM said
    none_in_title = truth == 3
    assert none_in_title.sum() > 5 and np.mean(stacked[none_in_title] == 3) > 0.8


def test_the_report_says_an_uninformative_llm_adds_nothing(fitted) -> None:
    _, report, dev = fitted
    assert report["n_dev"] == len(dev)
    assert report["full"]["accuracy"] > 0.8 and report["lexical_only"]["accuracy"] > 0.8
    assert report["adapter"]["accuracy"] < 0.45  # the noise "LLM" alone is near chance
    assert report["llm_adds"] is False and "nothing measurable" in report["verdict"]


def test_an_informative_llm_is_measurable() -> None:
    """Labels that depend on something only the LLM sees: the full stack beats the lexical one."""
    train, dev = rule_pairs(60, seed=0), rule_pairs(30, seed=1)
    rng = np.random.default_rng(5)
    hidden = rng.integers(0, 2, size=len(dev))  # a second factor the words do not show
    targets = np.where(hidden == 1, 3, dev["target"].to_numpy())
    llm = np.log(np.where(hidden[:, None] == 1, [0.1, 0.1, 0.1, 0.7], [0.3, 0.3, 0.3, 0.1]))
    lexical = st.fit_lexical(train, train["target"].to_numpy())
    _, report = st.fit_with_report(
        labels=LABELS, grades=[3, 2, 1, 0], lexical=lexical, lexical_dev=st.lexical_inputs(lexical, dev, 4), llm_logprobs=llm,
        targets=targets, groups=dev["query_id"], adapter_probs=np.exp(llm),
        evaluate=lambda p: evaluate_labels(targets, p, [3, 2, 1, 0], label_names=LABELS))
    assert report["llm_adds"] is True and "measurable" in report["verdict"]
    assert report["full"]["accuracy"] > report["lexical_only"]["accuracy"] + 0.1


def test_saved_and_reloaded_the_stack_gives_the_same_probabilities(fitted, tmp_path: Path) -> None:
    stack, _, dev = fitted
    record = stack.save(tmp_path)
    assert record["version"] == stack.version and record["inputs"] == ["llm", "lexical"]
    assert st.stack_version(tmp_path) == stack.version
    params = json.loads((tmp_path / st.STACK_FILE).read_text())
    assert params["features"][:4] == [f"llm_logprob_{label}" for label in LABELS] and "char_cosine" in params["features"]
    loaded = st.load_stack(tmp_path)
    assert loaded is not None and loaded.version == stack.version
    logprobs = noise_logprobs(len(dev), 7)
    np.testing.assert_array_equal(loaded.predict_proba(dev, logprobs), stack.predict_proba(dev, logprobs))
    assert st.load_stack(tmp_path / "none") is None


def test_a_tampered_stack_is_refused(fitted, tmp_path: Path) -> None:
    stack, _, _ = fitted
    stack.save(tmp_path)
    params = json.loads((tmp_path / st.STACK_FILE).read_text())
    params["linear"]["C"] = 99.0
    (tmp_path / st.STACK_FILE).write_text(json.dumps(params))
    with pytest.raises(st.StackError, match="does not match its version"):
        st.load_stack(tmp_path)


def test_a_stack_fitted_with_the_retriever_cosine_needs_that_retriever(fitted, tmp_path: Path) -> None:
    stack, _, dev = fitted
    lexical = st.lexical_inputs(stack.lexical, dev, 4)
    # a "retriever" that knows the rule: the share of the query's words in the title
    def share(frame: pd.DataFrame) -> np.ndarray:
        return np.array([len(set(q.split()) & set(t.split())) / 3 for q, t in zip(frame["query"], frame["title"])])
    retriever = st.RetrieverCosine("toy-retriever", share)
    matrix = st.design(("llm", "lexical", "cosine"), llm=st.llm_inputs(noise_logprobs(len(dev), 1)), lexical=lexical,
                       cosine=retriever(dev))
    with pytest.raises(st.StackError, match="told the retriever's name"):
        st.fit_stack(LABELS, ("llm", "lexical", "cosine"), stack.lexical, matrix, dev["target"].to_numpy())
    with_cosine = st.fit_stack(LABELS, ("llm", "lexical", "cosine"), stack.lexical, matrix, dev["target"].to_numpy(),
                               retriever.name)
    assert with_cosine.feature_names[-1] == "retriever_cosine" and with_cosine.uses_cosine
    probs = with_cosine.predict_proba(dev, noise_logprobs(len(dev), 1), retriever)
    assert probs.shape == (len(dev), 4)
    with pytest.raises(st.StackError, match="toy-retriever's cosine: pass that retriever"):
        with_cosine.predict_proba(dev, noise_logprobs(len(dev), 1))
    with pytest.raises(st.StackError, match="not other's"):
        with_cosine.predict_proba(dev, noise_logprobs(len(dev), 1), st.RetrieverCosine("other", share))
    with pytest.raises(st.StackError, match="2 cosines for"):
        st.RetrieverCosine("short", lambda frame: np.zeros(2))(dev)
    # saved and reloaded, it names its retriever and gives the same probabilities; a stack without keeps no name
    record = with_cosine.save(tmp_path / "with")
    assert record["retriever"] == "toy-retriever" and st.stack_retriever(tmp_path / "with") == "toy-retriever"
    loaded = st.load_stack(tmp_path / "with")
    np.testing.assert_array_equal(loaded.predict_proba(dev, noise_logprobs(len(dev), 1), retriever), probs)
    stack.save(tmp_path / "without")
    assert st.stack_retriever(tmp_path / "without") is None and st.stack_retriever(tmp_path / "none") is None
    assert "retriever" not in json.loads((tmp_path / "without" / st.STACK_FILE).read_text())


# -- policy flags -----------------------------------------------------------------------------------
FLAG_WORD = "poison"


def marked(frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """``frame`` with the flag's marker word in about a third of the titles, and whether each has it."""
    flagged = np.random.default_rng(seed).random(len(frame)) < 0.35
    titles = [f"{title} {FLAG_WORD}" if f else title for title, f in zip(frame["title"], flagged)]
    return frame.assign(title=titles), flagged


def test_flags_follow_a_title_word_rule_and_survive_save_and_load(fitted, tmp_path: Path) -> None:
    """A flag decided by a word in the title: the stack learns it from the title-words model fitted on train,
    whatever an uninformative LLM says, reports it with and without the LLM, and reloads identically."""
    import dataclasses

    stack, _, _ = fitted
    train, train_flag = marked(rule_pairs(60, seed=0), 10)
    dev, dev_flag = marked(rule_pairs(30, seed=1), 11)
    test, test_flag = marked(rule_pairs(20, seed=3), 12)
    words = st.fit_flag_words(train["title"], train_flag)
    noise = lambda n, seed: np.log(np.random.default_rng(seed).dirichlet([1, 1], size=n))  # noqa: E731
    no_decisions = st.FlagDev("fragile", np.full((len(dev), 2), np.nan), np.full(len(dev), -1), None, 2.0)
    flags, report = st.fit_flags_with_report(
        labels=LABELS, flags=[st.FlagDev("poison", noise(len(dev), 4), dev_flag.astype(int), words, 1.0), no_decisions],
        dev_texts=dev, lexical_dev=st.lexical_inputs(stack.lexical, dev, len(LABELS)), groups=dev["query_id"])
    with_flags = dataclasses.replace(stack, flags=flags)
    assert with_flags.flag_names == ["poison", "fragile"] and stack.flag_names == []
    assert report["poison"]["fitted"] and report["poison"]["full"]["f1"] >= 0.9
    assert report["poison"]["lexical_only"]["f1"] >= 0.9 and report["poison"]["llm_alone"]["f1"] < 0.7
    assert report["poison"]["llm_adds"] is False and report["poison"]["features"][0] == "llm_flag_logodds"
    assert report["poison"]["features"][-1] == "title_words_logodds"
    assert not report["fragile"]["fitted"] and "T = 2" in report["fragile"]["reason"]
    flag_logprobs = np.stack([noise(len(test), 5), noise(len(test), 6)], axis=1)  # (n, 2 flags, 2)
    probs = with_flags.predict_flags(test[["query", "title"]], flag_logprobs)
    assert probs.shape == (len(test), 2)
    assert float(np.mean((probs[:, 0] >= 0.5) == test_flag)) >= 0.95
    log_odds = flag_logprobs[:, 1, 0] - flag_logprobs[:, 1, 1]
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-log_odds / 2.0)))  # the undecided flag: its temperature
    # whether the labeler must ask the LLM for flag log-probabilities depends on the flags, not the grade's inputs
    assert with_flags.flags_use_llm and not stack.flags_use_llm
    lexical_flag = dataclasses.replace(flags[0], inputs=("lexical",))
    assert not dataclasses.replace(stack, inputs=("lexical",), flags=[lexical_flag]).flags_use_llm
    assert dataclasses.replace(stack, inputs=("lexical",), flags=[lexical_flag, flags[1]]).flags_use_llm
    with pytest.raises(st.StackError, match=r"need \(120, 2, 2\)"):
        with_flags.predict_flags(test[["query", "title"]], flag_logprobs[:, :1])
    # saved with the stack (JSON + npz), reloaded, the same probabilities; flags are part of the version
    record = with_flags.save(tmp_path)
    assert record["flags"] == ["poison", "fragile"] and with_flags.version != stack.version
    loaded = st.load_stack(tmp_path)
    assert loaded.version == with_flags.version and loaded.flag_names == ["poison", "fragile"]
    np.testing.assert_array_equal(loaded.predict_flags(test[["query", "title"]], flag_logprobs), probs)
    np.testing.assert_array_equal(loaded.predict_proba(test, flag_logprobs[:, :, 0].repeat(2, axis=1)),
                                  stack.predict_proba(test, flag_logprobs[:, :, 0].repeat(2, axis=1)))
