"""Spelling-noise augmentation and synthetic queries: deterministic, marked synthetic, idempotent."""
from __future__ import annotations

import random

import pytest

from app.synthetic_queries import INSTRUCTION, clean_generated_query, generate_synthetic_queries, prompt_head
from labelstore import Store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.errors import MnrError
from trainer.augment import KEYBOARD_NEIGHBOURS, augment_with_noise, noisy_variants, spelling_noise

QUERIES = ["dewalt 18v cordless drill", "kitchen faucet pull down", "5 gallon interior paint", "led light bulb 60 watt"]


def test_noise_is_deterministic_under_a_seed() -> None:
    first = noisy_variants(QUERIES, rate=0.2, seed=7, copies=3)
    again = noisy_variants(QUERIES, rate=0.2, seed=7, copies=3)
    assert first == again
    # independent of the order the queries come in
    assert noisy_variants(list(reversed(QUERIES)), rate=0.2, seed=7, copies=3) == list(reversed(first))
    assert noisy_variants(QUERIES, rate=0.2, seed=8, copies=3) != first


def test_noise_rate_zero_is_identity_and_rate_controls_edits() -> None:
    assert noisy_variants(QUERIES, rate=0.0, seed=1)[0] == [QUERIES[0]]
    rng = random.Random(0)
    changed_low = sum(spelling_noise(q, 0.02, rng) != q for q in QUERIES * 50)
    changed_high = sum(spelling_noise(q, 0.3, rng) != q for q in QUERIES * 50)
    assert changed_low < changed_high
    assert changed_high == len(QUERIES) * 50  # at 30% per letter every query gets an edit
    with pytest.raises(MnrError, match="rate"):
        spelling_noise("drill", 1.5, rng)


def test_each_edit_kind_is_a_keyboard_typo() -> None:
    outcomes = {spelling_noise("g", 1.0, random.Random(seed)) for seed in range(200)}
    # substitution or insertion uses a keyboard neighbour of 'g'; deletion keeps a 1-letter text
    for text in outcomes:
        assert all(ch in KEYBOARD_NEIGHBOURS["g"] + "g" for ch in text)
    assert any(len(t) == 2 for t in outcomes) and any(len(t) == 1 and t != "g" for t in outcomes)
    swapped = {spelling_noise("ab", 1.0, random.Random(seed)) for seed in range(200)}
    assert "ba" in swapped
    assert spelling_noise("12 3/4", 1.0, random.Random(0)) == "12 3/4"  # only letters are edited


@pytest.fixture()
def catalog_store(tmp_path) -> Store:
    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=3, seed=0))
    return store


def test_augment_writes_synthetic_queries_with_copied_labels(catalog_store: Store) -> None:
    written = augment_with_noise(catalog_store, "synthetic", rate=0.15, seed=3, copies=2)
    assert written["queries"] > 0 and written["labels"] > 0
    synthetic = catalog_store.df("SELECT * FROM queries WHERE synthetic")
    assert len(synthetic) == written["queries"]
    assert set(synthetic["origin"]) == {"synthetic"}
    # a noisy query's pairs carry its source query's labels, origin 'synthetic'
    row = catalog_store.df(
        "SELECT p.origin, c.label, c.author FROM pairs p JOIN current_labels c USING (pair_id) "
        "JOIN queries q USING (query_id) WHERE q.synthetic LIMIT 5")
    assert set(row["origin"]) == {"synthetic"} and row["author"].str.startswith("augment:spelling-noise").all()
    assert augment_with_noise(catalog_store, "synthetic", rate=0.15, seed=3, copies=2) == {"queries": 0, "pairs": 0, "labels": 0}
    assert catalog_store.scalar("SELECT count(*) FROM runs WHERE kind = 'augment' AND status = 'ok'") == 2


def test_augment_rejects_an_unknown_dataset(catalog_store: Store) -> None:
    with pytest.raises(MnrError, match="no labelled"):
        augment_with_noise(catalog_store, "nope")


class TitleEchoGenerator:
    """Deterministic stand-in for an LLM backend (the annotator's backends expose generate())."""

    def generate(self, prompts: list[str]) -> list[str]:
        return [f'Query: "{p.rsplit("Product: ", 1)[1].splitlines()[0].lower()}"\nextra line' for p in prompts]


def test_synthetic_queries_from_a_generator_are_marked_synthetic(catalog_store: Store) -> None:
    totals = generate_synthetic_queries(catalog_store, TitleEchoGenerator(), "synthetic", n_products=5, batch_size=2)
    assert totals["queries"] == 5 and totals["pairs"] == 5 and totals["labels"] == 0
    rows = catalog_store.df("SELECT q.text, q.synthetic, q.origin, p.origin AS pair_origin, pr.title "
                            "FROM queries q JOIN pairs p USING (query_id) JOIN products pr USING (product_id) "
                            "WHERE q.synthetic")
    assert len(rows) == 5 and rows["origin"].eq("synthetic").all() and rows["pair_origin"].eq("synthetic").all()
    assert (rows["text"] == rows["title"].str.lower()).all()
    with pytest.raises(MnrError, match="returned 0 texts"):
        generate_synthetic_queries(catalog_store, lambda prompts: [], "synthetic", n_products=2)


def test_prompt_head_shows_real_top_grade_pairs_of_the_dataset(catalog_store: Store) -> None:
    assert prompt_head(catalog_store, "synthetic", shots=0) == INSTRUCTION
    head = prompt_head(catalog_store, "synthetic", shots=3, seed=1)
    examples = [block.splitlines() for block in head.removeprefix(INSTRUCTION).strip().split("\n\n")]
    assert len(examples) == 3 and head == prompt_head(catalog_store, "synthetic", shots=3, seed=1)
    top = catalog_store.scalar("SELECT max(grade) FROM current_labels")
    for title_line, query_line in examples:
        grade = catalog_store.scalar(
            "SELECT max(l.grade) FROM current_labels l JOIN pairs USING (pair_id) JOIN queries q USING (query_id) "
            "JOIN products pr USING (product_id) WHERE q.text = $q AND pr.title = $t AND NOT q.synthetic",
            {"q": query_line.removeprefix("Query: "), "t": title_line.removeprefix("Product: ")})
        assert grade == top
    assert prompt_head(catalog_store, "no-such-dataset", shots=3) == INSTRUCTION


def test_synth_queries_command_with_a_real_backend_is_idempotent(tiny_llama, tmp_path) -> None:
    from typer.testing import CliRunner

    from app.cli import app

    store = Store(tmp_path / "store.duckdb")
    write_catalog(store, generate_catalog(n_families=3, seed=0))
    args = ["--store", str(store.path), "synth-queries", "--dataset", "synthetic", "--n-products", "6",
            "--backend", "transformers", "--model", str(tiny_llama), "--max-tokens", "6", "--batch-size", "4"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = store.df("SELECT q.origin, p.origin AS pair_origin FROM queries q JOIN pairs p USING (query_id) WHERE q.synthetic")
    generated = store.scalar("SELECT count(*) FROM queries WHERE synthetic")
    assert 0 < generated <= 6 and set(rows["origin"]) == {"synthetic"} and set(rows["pair_origin"]) == {"synthetic"}
    params = store.scalar("SELECT params FROM runs WHERE kind = 'synthetic-queries' AND status = 'ok'")
    assert "Product: " in params and f"synthetic-queries:{tiny_llama.name}+base" in params
    assert store.scalar("SELECT count(*) FROM labels l JOIN pairs p USING (pair_id) WHERE p.origin = 'synthetic'") == 0
    again = CliRunner().invoke(app, args)  # greedy: the same generations, nothing new written
    assert again.exit_code == 0 and store.scalar("SELECT count(*) FROM queries WHERE synthetic") == generated


def test_clean_generated_query() -> None:
    assert clean_generated_query('  Query: "cordless drill 18v".\nmore') == "cordless drill 18v"
    assert clean_generated_query("\n\n- paint roller\n") == "paint roller"
    assert clean_generated_query("   ") == ""
    assert clean_generated_query(" deck st\ufffdain\ufffd") == "deck stain"
