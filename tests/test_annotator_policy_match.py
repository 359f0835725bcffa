"""Policies per scale (graded4) and the policy deciding: an adapter labels only under the policy it learnt.

Also the way in for unlabelled pairs: `mnr ingest` of a file without labels, then `mnr label --select unlabeled`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from annotator.labeler import Labeler, PolicyMismatchError, PolicyMismatchWarning
from annotator.prompts import PairText, list_policies, load_prompt_policy
from annotator.scoring import label_token_ids
from annotator.tiny import build_tiny_adapter, build_tokenizer
from labelstore import Store
from test_store_ingest import write_csv

REPO = Path(__file__).resolve().parents[1]
PAIR = PairText("red running shoes", "Nike Pegasus running shoe, red", pair_id="p1")


@pytest.fixture(scope="module")
def esci_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adapter whose meta.json says it was fine-tuned under the esci policy."""
    esci = load_prompt_policy("esci")
    meta = {"policy": esci.name, "policy_hash": esci.version, "scheme": "esci", "temperature": 1.0}
    return build_tiny_adapter(tiny_llama, tmp_path_factory.mktemp("adapter") / "esci-lora", meta=meta)


# -- policies -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_policies())
def test_every_policy_loads_with_single_token_distinct_labels(name: str) -> None:
    policy = load_prompt_policy(name)
    tokenizer = build_tokenizer()
    ids = label_token_ids(tokenizer, policy.answer_options())
    assert len(set(ids)) == len(ids)
    assert all(len(tokenizer.encode(option, add_special_tokens=False)) == 1 for option in policy.answer_options())


def test_graded4_policy_teaches_the_crowdflower_scale() -> None:
    policy = load_prompt_policy("graded4")
    assert policy.scheme.name == "graded4"
    assert policy.answer_options() == [" perfect", " good", " fair", " irrelevant"]
    prefix = policy.prefix()
    for name in policy.scheme.label_names:
        assert f"- {name}:" in prefix, "every grade has its definition"
    assert "Example:" in prefix and "complement" not in prefix and "substitute" not in prefix
    assert prefix.rstrip().endswith("Answer with one word: perfect, good, fair or irrelevant.")
    assert policy.render(PAIR).endswith("</product>\nLabel:")
    assert [policy.scheme.map_rating("crowdflower", r) for r in (4, 3, 2, 1)] == ["perfect", "good", "fair", "irrelevant"]


# -- the policy decides -----------------------------------------------------------------------------------
def test_adapter_under_another_policy_is_an_error_naming_both(tiny_llama: Path, esci_adapter: Path) -> None:
    esci, graded4 = load_prompt_policy("esci"), load_prompt_policy("graded4")
    with pytest.raises(PolicyMismatchError) as caught:
        Labeler(str(tiny_llama), "graded4", backend="transformers", adapter=str(esci_adapter))
    message = str(caught.value)
    assert f"policy 'esci' (hash {esci.version})" in message and f"policy 'graded4' (hash {graded4.version})" in message
    assert "--allow-policy-mismatch" in message and str(esci_adapter) in message


def test_allow_policy_mismatch_warns_and_labels(tiny_llama: Path, esci_adapter: Path) -> None:
    with pytest.warns(PolicyMismatchWarning, match="fine-tuned under policy 'esci'"):
        labeler = Labeler(str(tiny_llama), "graded4", backend="transformers", adapter=str(esci_adapter),
                          allow_policy_mismatch=True)
    assert labeler.policy_mismatch and "graded4" in labeler.policy_mismatch
    probs = labeler.score([PAIR])
    assert probs.shape == (1, 4) and np.isclose(probs.sum(), 1.0)
    with pytest.warns(PolicyMismatchWarning):
        assert labeler.with_policy("home-improvement").policy_mismatch


def test_adapter_under_its_own_policy_is_fine_and_with_policy_checks_too(tiny_llama: Path, esci_adapter: Path,
                                                                         recwarn: pytest.WarningsRecorder) -> None:
    labeler = Labeler(str(tiny_llama), "esci", backend="transformers", adapter=str(esci_adapter))
    assert labeler.policy_mismatch is None and not [w for w in recwarn if w.category is PolicyMismatchWarning]
    with pytest.raises(PolicyMismatchError, match="'graded4'"):
        labeler.with_policy("graded4")


def test_edited_policy_text_is_a_mismatch_too(tiny_llama: Path, esci_adapter: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from labelstore.paths import prompts_dir

    shutil.copytree(prompts_dir(), tmp_path / "prompts")
    monkeypatch.setenv("MNR_PROMPTS_DIR", str(tmp_path / "prompts"))
    template = tmp_path / "prompts" / "policies" / "esci.j2"
    template.write_text(template.read_text() + "\nAccessories are irrelevant.\n")
    with pytest.raises(PolicyMismatchError, match="policy text changed after fine-tuning"):
        Labeler(str(tiny_llama), "esci", backend="transformers", adapter=str(esci_adapter))


# -- the command line: unlabelled pairs in, labelled under graded4; the mismatch flag ----------------------
def _mnr(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "MNR_CONFIG": str(store.parent / "none.toml")}
    return subprocess.run([sys.executable, "-m", "app.cli", "--store", str(store), *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600)


def test_unlabelled_ingest_then_label_unlabeled_and_the_mismatch_flag(tiny_llama: Path, esci_adapter: Path,
                                                                      tmp_path: Path) -> None:
    store_path = tmp_path / "store.duckdb"
    rated = write_csv(tmp_path / "cf.csv", ["id", "query", "product_title", "product_description",
                                            "median_relevance", "relevance_variance"],
                      [[1, "red running shoes", "Nike Pegasus red", "", 4, 0], [2, "red running shoes", "Blender", "", 1, 0]])
    fresh = write_csv(tmp_path / "fresh.csv", ["query", "title", "description"],
                      [["red running shoes", "Adidas running shoe, red", "Light."], ["red running shoes", "Shoe laces", ""],
                       ["yoga mat", "Cork yoga mat 6 mm", ""]])
    assert _mnr(store_path, "ingest", str(rated), "--preset", "crowdflower").returncode == 0
    ingested = _mnr(store_path, "ingest", str(fresh))
    assert ingested.returncode == 0, ingested.stderr
    assert "0 labels" in ingested.stdout and "--select unlabeled" in " ".join(ingested.stdout.split())
    store = Store(store_path)
    fresh_pairs = set(store.df("SELECT pair_id FROM pairs WHERE dataset = 'fresh'")["pair_id"])
    assert len(fresh_pairs) == 3

    label = ["label", "--backend", "transformers", "--model", str(tiny_llama), "--policy", "graded4", "--quiet"]
    refused = _mnr(store_path, *label, "--select", "unlabeled", "--adapter", str(esci_adapter))
    stderr = " ".join(refused.stderr.split())
    assert refused.returncode == 2, refused.stderr
    assert f"(hash {load_prompt_policy('esci').version})" in stderr and f"(hash {load_prompt_policy('graded4').version})" in stderr
    assert store.scalar("SELECT count(*) FROM labels WHERE source = 'llm'") == 0
    assert store.scalar("SELECT count(*) FROM label_runs") == 0

    done = _mnr(store_path, *label, "--select", "unlabeled")
    assert done.returncode == 0, done.stderr
    llm = store.df("SELECT pair_id, scheme, label FROM labels WHERE source = 'llm'")
    assert set(llm["pair_id"]) == fresh_pairs and len(llm) == 3, "exactly the unlabelled pairs"
    assert set(llm["scheme"]) == {"graded4"} and set(llm["label"]) <= {"perfect", "good", "fair", "irrelevant"}

    overridden = _mnr(store_path, *label, "--adapter", str(esci_adapter), "--allow-policy-mismatch",
                      "--select", "query-file", "--query-file", str(_queries(tmp_path)), "--dataset", "fresh")
    assert overridden.returncode == 0, overridden.stderr
    assert "warning:" in overridden.stderr and "fine-tuned under policy 'esci'" in " ".join(overridden.stderr.split())
    tuned = store.df("SELECT author FROM labels WHERE source = 'llm' AND author LIKE '%esci-lora-%'")
    assert len(tuned) == 2 and all(a.endswith(f"@graded4:{load_prompt_policy('graded4').version}") for a in tuned["author"])


def _queries(tmp_path: Path) -> Path:
    path = tmp_path / "queries.txt"
    path.write_text("red running shoes\n", encoding="utf-8")
    return path
