"""A simulated engagement log, made from true grades, for the demo and the benchmarks.

No real click logs exist here, so every figure derived from this log must say "simulated"; every
event carries `simulated = true`. The whole simulation is one DuckDB query
(`auditor/sql/simulate_events.sql`); its randomness is a hash of (seed, keys), so the same seed
gives the same log on any number of threads, and 100M events stream straight into Parquet.

The model
---------
- **Query popularity** is long-tailed: the query at popularity rank r gets a share
  r^-zipf_exponent / sum(...) of `n_sessions` sessions (ranks are a seeded shuffle of the queries).
- **Time**: each session starts uniformly within `[start, start + days)`.
- **Ranking**: each session shows the query's judged products ordered by
  grade + rank_noise * N(0, 1) (a decent but imperfect ranker that knows the true grade), the first
  `page_size` of them per page viewed. A session views 1 + Geometric(page_continue) pages (at most
  `max_pages`): a share page_continue of sessions go on to page 2, page_continue^2 to page 3, ...
  A share `explore_rate` of sessions are exploration traffic (as search teams run to collect
  unbiased data): they show the products in a random order.
  With `ranker = "fixed"` the order is instead a production ranker's: one score per pair,
  grade + rank_noise * N(0, 1) drawn once, plus ranker_jitter * N(0, 1) per session, so a product
  sits at nearly the same position in every session (set explore_rate = 0 for no exploration).
- **Clicks**: P(click) = examination * attractiveness, with
  attractiveness = sigmoid(logit(a[grade]) + pair_noise * N(0, 1)), where the N(0, 1) is drawn once
  per pair (products of one grade differ in appeal: price, image), and
  a[grade] = attractiveness_min + (attractiveness_max - attractiveness_min) * (grade / max_grade)^attractiveness_power.
  Examination follows `click_model` (one SQL file each, `auditor/sql/simulate_click_<model>.sql`):
  - `pbm`, position-based: examination = position^-examination_decay;
  - `cascade`: the shopper scans top-down and stops at the first click;
  - `dbn`, dynamic Bayesian network: scans top-down; a click satisfies with probability
    s[grade] = satisfaction_min + (satisfaction_max - satisfaction_min) * grade / max_grade, and a
    satisfied shopper stops; otherwise they go on with probability `continue_prob`;
  - `ubm`, user browsing model: examination = d^-examination_decay, d the distance to the last click
    above (or to the top);
  - `trust`, trust bias: examination as `pbm`, and an examined product is clicked with probability
    attractiveness + trust_noise * examination * (1 - attractiveness): shoppers who trust the ranking click
    what sits near the top even when it does not appeal to them, so a click means less there.
  With `query_patience_spread` > 0 the shoppers of each query share a patience
  p = exp(query_patience_spread * N(0, 1)), drawn once per query (some queries are browsed deep, others
  barely past the top): examination_decay becomes examination_decay / p and continue_prob becomes
  continue_prob^(1 / p). The audit fits one position curve for all queries.
  With `query_appeal_spread` > 0 each query's products share a logit shift of query_appeal_spread * N(0, 1)
  on their attractiveness: some queries' shoppers click more of what they see (browsing against buying).
  Every impression records `true_examination`, the probability that it was examined given the
  session's ranking (for `ubm`, given the clicks above it), so benchmarks can compute an oracle bound.
  The audit never reads it, and the store does not keep it.
- **Conversion**: a click leads to an add-to-cart with probability
  add_to_cart_min + (add_to_cart_max - add_to_cart_min) * (grade / max_grade)^2, and an add-to-cart to a
  purchase with probability purchase_min + (purchase_max - purchase_min) * grade / max_grade.
- **Drift** (optional): from `drift_at` on, a[grade] becomes
  (1 - drift_strength) * a[grade] + drift_strength * a[max_grade - grade]: the grade -> click relation
  flattens (and inverts at drift_strength 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from auditor.macros import install_macros
from labelstore.errors import MnrError
from labelstore.ids import stable_hash
from labelstore.sqlfiles import sql
from labelstore.store import Store

TRUTH_COLUMNS = ["pair_id", "query_id", "query_text", "product_id", "dataset", "grade"]
EVENT_COLUMNS = ["dataset", "session_id", "query_id", "query_text", "product_id", "pair_id", "position",
                 "event_type", "ts", "simulated", "batch_id"]
ORACLE_COLUMN = "true_examination"
CLICK_MODELS = ("pbm", "cascade", "dbn", "ubm", "trust")
RANKERS = ("noisy", "fixed")


@dataclass(frozen=True)
class SimulationParams:
    """Every knob of the simulated log (see the module docstring for the model)."""

    n_sessions: int = 20_000
    seed: int = 0
    start: datetime = datetime(2026, 1, 1)
    days: int = 28
    zipf_exponent: float = 1.0
    page_size: int = 10
    page_continue: float = 0.25
    max_pages: int = 5
    explore_rate: float = 0.02
    rank_noise: float = 1.0
    examination_decay: float = 1.0
    attractiveness_min: float = 0.03
    attractiveness_max: float = 0.6
    attractiveness_power: float = 1.0
    pair_noise: float = 0.25
    add_to_cart_min: float = 0.02
    add_to_cart_max: float = 0.35
    purchase_min: float = 0.2
    purchase_max: float = 0.6
    drift_at: datetime | None = None
    drift_strength: float = 0.8
    click_model: str = "pbm"
    ranker: str = "noisy"
    ranker_jitter: float = 0.1
    continue_prob: float = 0.9
    satisfaction_min: float = 0.1
    satisfaction_max: float = 0.7
    trust_noise: float = 0.15
    query_patience_spread: float = 0.0
    query_appeal_spread: float = 0.0

    def validate(self) -> None:
        if self.n_sessions < 0 or self.days <= 0 or self.page_size <= 0:
            raise MnrError("simulation: n_sessions must be >= 0, days and page_size > 0")
        if not 0 < self.attractiveness_min < self.attractiveness_max < 1:
            raise MnrError("simulation: need 0 < attractiveness_min < attractiveness_max < 1")
        if not (0 <= self.page_continue < 1 and 0 <= self.explore_rate <= 1 and self.max_pages >= 1):
            raise MnrError("simulation: need 0 <= page_continue < 1, 0 <= explore_rate <= 1, max_pages >= 1")
        if not 0 <= self.drift_strength <= 1:
            raise MnrError("simulation: drift_strength must be within [0, 1]")
        if self.click_model not in CLICK_MODELS:
            raise MnrError(f"simulation: click_model must be one of {', '.join(CLICK_MODELS)}, not '{self.click_model}'")
        if self.ranker not in RANKERS:
            raise MnrError(f"simulation: ranker must be one of {', '.join(RANKERS)}, not '{self.ranker}'")
        if not 0 < self.continue_prob <= 1 or not 0 <= self.satisfaction_min <= self.satisfaction_max <= 1:
            raise MnrError("simulation: need 0 < continue_prob <= 1 and 0 <= satisfaction_min <= satisfaction_max <= 1")
        if not 0 <= self.trust_noise <= 1:
            raise MnrError("simulation: trust_noise must be within [0, 1]")
        if self.query_patience_spread < 0 or self.query_appeal_spread < 0:
            raise MnrError("simulation: query_patience_spread and query_appeal_spread must be >= 0")
        if self.ranker_jitter < 0 or self.rank_noise < 0 or self.pair_noise < 0:
            raise MnrError("simulation: ranker_jitter, rank_noise and pair_noise must be >= 0")


def grade_table(params: SimulationParams, max_grade: int) -> pd.DataFrame:
    """Per grade 0..max_grade: attractiveness, drifted_attractiveness, add_to_cart_rate, purchase_rate,
    satisfaction."""
    rows = []
    span = max(max_grade, 1)
    for grade in range(max_grade + 1):
        rows.append({"grade": grade, **_grade_rates(params, grade / span, (max_grade - grade) / span)})
    return pd.DataFrame(rows)


def _grade_rates(params: SimulationParams, level: float, mirrored: float) -> dict[str, float]:
    def attractiveness(x: float) -> float:
        return params.attractiveness_min + (params.attractiveness_max - params.attractiveness_min) * x ** params.attractiveness_power

    a = attractiveness(level)
    return {
        "attractiveness": a,
        "drifted_attractiveness": (1 - params.drift_strength) * a + params.drift_strength * attractiveness(mirrored),
        "add_to_cart_rate": params.add_to_cart_min + (params.add_to_cart_max - params.add_to_cart_min) * level ** 2,
        "purchase_rate": params.purchase_min + (params.purchase_max - params.purchase_min) * level,
        "satisfaction": params.satisfaction_min + (params.satisfaction_max - params.satisfaction_min) * level,
    }


def truth_from_store(store: Store, scheme: str) -> pd.DataFrame:
    """The store's current labels of `scheme` as simulation truth (TRUTH_COLUMNS)."""
    frame = store.df(
        "SELECT c.pair_id, p.query_id, q.text AS query_text, p.product_id, p.dataset, c.grade "
        "FROM current_labels c JOIN pairs p USING (pair_id) JOIN queries q USING (query_id) WHERE c.scheme = ? "
        "ORDER BY c.pair_id",
        [scheme],
    )
    if frame.empty:
        raise MnrError(f"no current labels of scheme '{scheme}' in {store.path}: nothing to simulate from")
    return frame


def truth_from_frame(judgments: pd.DataFrame, queries: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Simulation truth (TRUTH_COLUMNS) from judgments (query_id, product_id, grade) and queries
    (query_id, text), e.g. a `labelstore.catalog.Catalog`'s frames."""
    from labelstore.ids import pair_id

    frame = judgments.merge(queries[["query_id", "text"]], on="query_id").rename(columns={"text": "query_text"})
    frame["pair_id"] = [pair_id(q, p) for q, p in zip(frame["query_id"], frame["product_id"])]
    frame["dataset"] = dataset
    return frame[TRUTH_COLUMNS]


def _prepare(con: duckdb.DuckDBPyConnection, truth: pd.DataFrame, params: SimulationParams,
             max_grade: int) -> tuple[str, dict]:
    params.validate()
    missing = [c for c in TRUTH_COLUMNS if c not in truth.columns]
    if missing:
        raise MnrError(f"simulation truth lacks column(s) {missing}; expected {TRUTH_COLUMNS}")
    install_macros(con)
    con.register("sim_pairs", truth[TRUTH_COLUMNS])
    con.register("sim_grades", grade_table(params, max_grade))
    # knobs added later leave the ids of logs made without them unchanged
    knobs = {k: v for k, v in asdict(params).items() if k not in ("query_patience_spread", "query_appeal_spread") or v}
    batch_id = "sim-" + stable_hash(sorted(knobs.items()), len(truth), max_grade)
    values = {
        "seed": params.seed, "zipf_exponent": params.zipf_exponent, "n_sessions": params.n_sessions,
        "start": params.start, "window_seconds": params.days * 86400, "rank_noise": params.rank_noise,
        "examination_decay": params.examination_decay, "pair_noise": params.pair_noise,
        "drift_at": params.drift_at, "page_size": params.page_size, "batch_id": batch_id,
        "page_continue": params.page_continue, "max_pages": params.max_pages, "explore_rate": params.explore_rate,
        "fixed_ranker": params.ranker == "fixed", "ranker_jitter": params.ranker_jitter,
        "query_patience_spread": params.query_patience_spread, "query_appeal_spread": params.query_appeal_spread,
    }
    click_file = "simulate_click_sequential" if params.click_model in ("cascade", "dbn") else f"simulate_click_{params.click_model}"
    if click_file == "simulate_click_sequential":
        del values["examination_decay"]  # a sequential shopper's examination comes from what they saw
        values["cascade"] = params.click_model == "cascade"
        values["continue_prob"] = 1.0 if params.click_model == "cascade" else params.continue_prob
    if params.click_model == "trust":
        values["trust_noise"] = params.trust_noise
    query = sql("auditor", "simulate_events").replace("/*CLICK_MODEL*/", sql("auditor", click_file))
    return query, values


def _columns(with_truth: bool) -> str:
    return ", ".join(EVENT_COLUMNS + ([ORACLE_COLUMN] if with_truth else []))


def simulate_events(truth: pd.DataFrame, params: SimulationParams, max_grade: int, *,
                    with_truth: bool = False) -> pd.DataFrame:
    """The simulated log as a DataFrame (EVENT_COLUMNS, plus ORACLE_COLUMN when `with_truth`), for
    small logs and tests.

    truth: one row per pair with TRUTH_COLUMNS; `grade` is the true grade, 0..max_grade.
    """
    with duckdb.connect() as con:
        query, values = _prepare(con, truth, params, max_grade)
        return con.execute(f"SELECT {_columns(with_truth)} FROM ({query}) ORDER BY ts, session_id, position, event_type",
                           values).df()


def simulate_to_parquet(truth: pd.DataFrame, params: SimulationParams, max_grade: int, out: str | Path,
                        threads: int | None = None, *, with_truth: bool = False) -> int:
    """Stream the simulated log into Parquet; returns the number of events.

    `out` ending in .parquet is one file; anything else is a folder of Parquet files (one per thread).
    `with_truth` adds ORACLE_COLUMN (for benchmarks; the audit ignores it).
    """
    out = Path(out)
    with duckdb.connect() as con:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        query, values = _prepare(con, truth, params, max_grade)
        options = "(FORMAT parquet)" if out.suffix == ".parquet" else "(FORMAT parquet, PER_THREAD_OUTPUT true, OVERWRITE_OR_IGNORE true)"
        if out.suffix == ".parquet":
            out.parent.mkdir(parents=True, exist_ok=True)
        # `options` is one of two fixed strings; the path and every value are bound.
        rows = con.execute(f"COPY (SELECT {_columns(with_truth)} FROM ({query})) TO $out {options}",
                           {**values, "out": str(out)}).fetchall()
        return int(rows[0][0]) if rows else 0


def simulate_into_store(store: Store, truth: pd.DataFrame, params: SimulationParams, max_grade: int) -> int:
    """Append the simulated log to `engagement_events`; the same parameters and truth add nothing twice."""
    with store.transaction() as con:
        query, values = _prepare(con, truth, params, max_grade)
        if con.execute("SELECT count(*) FROM engagement_events WHERE batch_id = ?", [values["batch_id"]]).fetchone()[0]:
            return 0
        columns = ", ".join(EVENT_COLUMNS)
        con.execute(f"INSERT INTO engagement_events ({columns}) SELECT {columns} FROM ({query})", values)
        return int(con.execute("SELECT count(*) FROM engagement_events WHERE batch_id = ?", [values["batch_id"]]).fetchone()[0])


def corrupt_grades(grades: np.ndarray, max_grade: int, rate: float = 0.1, neighbour_share: float = 0.75,
                   seed: int = 0) -> np.ndarray:
    """Structured label noise: a copy of `grades` (shape (n,), ints 0..max_grade) with round(rate * n)
    entries changed; a changed grade moves to a neighbouring grade with probability `neighbour_share`,
    else to a grade at least two away (when one exists). Used to plant errors for tests and benchmarks.
    """
    rng = np.random.default_rng(seed)
    grades = np.asarray(grades, dtype=int)
    corrupted = grades.copy()
    chosen = rng.choice(len(grades), size=int(round(rate * len(grades))), replace=False)
    for index in chosen:
        grade = grades[index]
        neighbours = [g for g in (grade - 1, grade + 1) if 0 <= g <= max_grade]
        far = [g for g in range(max_grade + 1) if abs(g - grade) >= 2]
        pool = neighbours if (rng.random() < neighbour_share or not far) else far
        corrupted[index] = rng.choice(pool)
    return corrupted
