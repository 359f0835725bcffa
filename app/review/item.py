"""Everything the review page shows about one (pair, scheme): content, labels, engagement."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from labelstore.errors import MnrError
from labelstore.flags import flags_of_labels
from labelstore.sqlfiles import sql
from labelstore.store import Store


@dataclass(frozen=True)
class Engagement:
    """Raw engagement counts for one pair. `coec` = clicks / expected clicks at the positions shown."""

    impressions: int = 0
    clicks: int = 0
    add_to_cart: int = 0
    purchases: int = 0
    expected_clicks: float | None = None
    simulated: bool = False

    @property
    def ctr(self) -> float | None:
        return self.clicks / self.impressions if self.impressions else None

    @property
    def coec(self) -> float | None:
        return self.clicks / self.expected_clicks if self.expected_clicks else None


@dataclass(frozen=True)
class ReviewItem:
    """One pair in one scheme. `history` is its label history, oldest first (columns of item_labels.sql);
    `flags` the policy flags its labels carry: {label_id: {flag: (probability, decision)}}."""

    pair_id: str
    scheme: str
    dataset: str
    query: str
    title: str
    description: str | None
    brand: str | None
    origin: str
    history: pd.DataFrame = field(repr=False)
    engagement: Engagement = Engagement()
    flags: dict[int, dict[str, tuple[float | None, bool | None]]] = field(default_factory=dict, repr=False)

    @property
    def latest_label_id(self) -> int | None:
        """The newest label row of this pair and scheme, whatever its source: 'changed since shown' compares to it."""
        return int(self.history["label_id"].max()) if len(self.history) else None

    @property
    def live_history(self) -> pd.DataFrame:
        return self.history[~self.history["undone"]]

    @property
    def llm_label(self) -> pd.Series | None:
        """The newest LLM label (label, confidence, probs, author, ...), or None."""
        llm = self.live_history[self.live_history["source"] == "llm"]
        return llm.iloc[-1] if len(llm) else None

    @property
    def llm_probs(self) -> dict[str, float]:
        llm = self.llm_label
        if llm is None or not isinstance(llm["probs"], str):
            return {}
        return {str(label): float(p) for label, p in json.loads(llm["probs"]).items()}

    @property
    def llm_flag_probabilities(self) -> dict[str, float]:
        """{flag: probability} of the newest LLM label (empty when it scored no flags)."""
        llm = self.llm_label
        if llm is None:
            return {}
        own = self.flags.get(int(llm["label_id"]), {})
        return {flag: float(probability) for flag, (probability, _) in own.items() if probability is not None}

    def flag_decisions(self, label_id: int) -> dict[str, bool]:
        """{flag: set (True) or cleared (False)} a human decided with label `label_id`."""
        return {flag: bool(decision) for flag, (_, decision) in self.flags.get(int(label_id), {}).items()
                if decision is not None}

    def standing_flag_decisions(self, visible: Callable[[pd.Series], bool] = lambda _: True,
                                ) -> dict[str, tuple[bool, str]]:
        """{flag: (set or cleared, author)}: per flag the newest live human or import label that decided it, among
        the labels ``visible`` lets through. This is the pair's state in `current_flags`, whatever LLM label
        came later."""
        standing: dict[str, tuple[bool, str]] = {}
        decided = self.live_history[self.live_history["source"].isin(["human", "import"])]
        for _, label in decided.iloc[::-1].iterrows():
            if not visible(label):
                continue
            for flag, decision in self.flag_decisions(int(label["label_id"])).items():
                standing.setdefault(flag, (decision, str(label["author"])))
        return standing

    @property
    def human_labels(self) -> pd.DataFrame:
        """Every human label of this pair, undone ones included (their `undone` is true), newest first."""
        return self.history[self.history["source"] == "human"].iloc[::-1]

    @property
    def reference_label(self) -> pd.Series | None:
        """The newest import or audit label (the dataset's own judgment), or None."""
        other = self.live_history[self.live_history["source"].isin(["import", "audit"])]
        return other.iloc[-1] if len(other) else None


def load_item(store: Store, pair_id: str, scheme: str) -> ReviewItem:
    """Read one pair for review; raises `MnrError` when the store has no such pair."""
    with store.connect() as con:
        pair = con.execute(sql("app.review", "item"), {"pair_id": pair_id}).df()
        if pair.empty:
            raise MnrError(f"{store.path}: no pair '{pair_id}'")
        history = con.execute(sql("app.review", "item_labels"), {"pair_id": pair_id, "scheme": scheme}).df()
        row = pair.iloc[0]
        counts = con.execute(sql("app.review", "engagement"), {
            "pair_id": pair_id, "query_id": row["query_id"], "product_id": row["product_id"],
        }).fetchone()
    flags = flags_of_labels(store, history["label_id"].tolist()) if len(history) else {}
    engagement = Engagement(int(counts[0]), int(counts[1]), int(counts[2]), int(counts[3]),
                            float(counts[4]) if counts[4] is not None else None, bool(counts[5]))
    return ReviewItem(
        pair_id=pair_id, scheme=scheme, dataset=row["dataset"], query=row["query"], title=row["title"],
        description=_text_or_none(row["description"]), brand=_text_or_none(row["brand"]), origin=row["origin"],
        history=history, engagement=engagement, flags=flags,
    )


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def scheme_of_pair(store: Store, pair_id: str, default: str) -> str:
    """The scheme of the pair's current label (the newest if several), else `default`."""
    scheme = store.scalar(
        "SELECT scheme FROM current_labels WHERE pair_id = ? ORDER BY created_at DESC, label_id DESC LIMIT 1",
        [pair_id],
    )
    return scheme or default
