"""Test data for the review UI tests: a small real store with one item per queue source.

No tests here; the `test_review_*` modules import `build_review_store`, or the fixtures `template` (built
once per module) and `fixture` (a fresh copy of it per test).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from labelstore import LabelRecord, Store
from labelstore.catalog import generate_catalog, write_catalog
from labelstore.schemes import load_scheme
from labelstore.store import utcnow

ESCI = load_scheme("esci")
GRADED3 = load_scheme("graded3")
T0 = datetime(2026, 1, 1)


@dataclass(frozen=True)
class ReviewFixture:
    """`expected_order`: the pair ids the queue must list first, in order (with overlap 0)."""

    store: Store
    audit_high: str
    audit_low: str
    uncertain_low: str
    uncertain_mid: str
    confident: str
    disputed: str
    mined: str

    @property
    def expected_order(self) -> list[str]:
        return [self.audit_high, self.audit_low, self.uncertain_low, self.uncertain_mid, self.disputed, self.mined]


def llm_label(pair_id: str, label: str, confidence: float, at: datetime = T0, author: str = "llm:test") -> LabelRecord:
    rest = (1.0 - confidence) / (len(ESCI.label_names) - 1)
    probs = {name: (confidence if name == label else rest) for name in ESCI.label_names}
    return LabelRecord(pair_id=pair_id, scheme="esci", label=label, grade=ESCI.grade_of(label), source="llm",
                       author=author, probs=probs, confidence=confidence, created_at=at)


def human_label(pair_id: str, label: str, author: str, at: datetime = T0) -> LabelRecord:
    return LabelRecord(pair_id=pair_id, scheme="esci", label=label, grade=ESCI.grade_of(label), source="human",
                       author=author, created_at=at, dedup_key=f"fixture:{pair_id}:{author}")


def flagged_llm_label(pair_id: str, flags: dict[str, float], confidence: float = 0.95) -> LabelRecord:
    """A graded3 'relevant' LLM label written under the marketplace policy, with these flag probabilities."""
    from annotator.prompts import load_prompt_policy

    probs = {name: (confidence if name == "relevant" else (1 - confidence) / 2) for name in GRADED3.label_names}
    return LabelRecord(pair_id=pair_id, scheme="graded3", label="relevant", grade=GRADED3.grade_of("relevant"),
                       source="llm", author=f"tiny+none@marketplace:{load_prompt_policy('marketplace').version}",
                       probs=probs, confidence=confidence, flags=flags)


def build_review_store(path: Path) -> ReviewFixture:
    """A generated 2-family catalog (import labels) plus one pair for each queue source."""
    store = Store(path)
    write_catalog(store, generate_catalog(n_families=2, seed=0))
    pairs = [row[0] for row in store.fetchall("SELECT pair_id FROM pairs ORDER BY pair_id LIMIT 7")]
    fixture = ReviewFixture(store, *pairs)
    store.add_labels([
        llm_label(fixture.uncertain_low, "substitute", 0.30),
        llm_label(fixture.uncertain_mid, "complement", 0.50),
        llm_label(fixture.confident, "exact", 0.95),
        llm_label(fixture.disputed, "irrelevant", 0.90),
        human_label(fixture.disputed, "exact", "carol", T0 + timedelta(hours=1)),
    ])
    now = utcnow()
    store.execute("INSERT INTO runs (run_id, kind, status) VALUES ('audit-fixture', 'audit', 'ok')")
    store.execute(
        "INSERT INTO review_queue (pair_id, run_id, reason, priority, created_at) VALUES (?, 'audit-fixture', ?, ?, ?), "
        "(?, 'audit-fixture', ?, ?, ?)",
        [fixture.audit_high, "engagement contradicts label", 0.9, now,
         fixture.audit_low, "engagement contradicts label", 0.5, now],
    )
    store.execute(
        "INSERT INTO audit_flags (run_id, pair_id, kind, reason, score) VALUES ('audit-fixture', ?, 'engagement', "
        "'clicked far more than its label predicts', 3.2)",
        [fixture.audit_high],
    )
    store.execute(
        "INSERT INTO mining_candidates (run_id, pair_id, model_id, score, rank, reason) "
        "VALUES ('mine-fixture', ?, 'retriever-test', 0.8, 1, 'hard negative')",
        [fixture.mined],
    )
    add_simulated_engagement(store, fixture.uncertain_mid)
    return fixture


def add_simulated_engagement(store: Store, pair_id: str) -> None:
    """A few simulated impressions (positions 3-4), clicks and one add-to-cart for `pair_id`."""
    query_id, product_id, dataset = store.fetchall(
        "SELECT query_id, product_id, dataset FROM pairs WHERE pair_id = ?", [pair_id])[0]
    events = [("impression", 3)] * 6 + [("impression", 4)] * 4 + [("click", 3)] * 3 + [("add_to_cart", 3)]
    store.execute(
        "INSERT INTO engagement_events (dataset, session_id, query_id, query_text, product_id, pair_id, position, "
        "event_type, ts, simulated, batch_id) "
        "SELECT ?, 'fixture-' || e.i, ?, 'fixture', ?, ?, e.position, e.kind, TIMESTAMP '2026-01-01', true, 'fixture' "
        "FROM (SELECT unnest(?) AS kind, unnest(?) AS position, unnest(range(?)) AS i) e",
        [dataset, query_id, product_id, pair_id, [kind for kind, _ in events], [pos for _, pos in events], len(events)],
    )


def copy_review_store(template: ReviewFixture, path: Path) -> ReviewFixture:
    """The same fixture in a fresh copy of the store file (building one costs seconds, copying milliseconds)."""
    shutil.copyfile(template.store.path, path)
    return replace(template, store=Store(path))


def write_config(path: Path, overlap: float = 0.0, allow: list[str] | None = None, **review: object) -> Path:
    """mnr.toml with a [review] section: `overlap`, `allow` and any other `[review]` key given."""
    lines = ["[review]", f"overlap = {overlap}"]
    if allow is not None:
        lines.append("allow = [" + ", ".join(f'"{name}"' for name in allow) + "]")
    lines += [f"{key} = {json.dumps(value)}" for key, value in review.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> ReviewFixture:
    return build_review_store(tmp_path_factory.mktemp("review-template") / "review.duckdb")


@pytest.fixture
def fixture(template: ReviewFixture, tmp_path: Path) -> ReviewFixture:
    return copy_review_store(template, tmp_path / "review.duckdb")
