"""Label schemes as data: `prompts/schemes/<name>.toml`.

A scheme is an ordered list of labels, each with a grade (higher is more relevant), a short
definition and aliases, plus rules that map numeric ratings (Home Depot means, CrowdFlower
medians) onto the scheme's labels.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from labelstore.config import read_toml
from labelstore.errors import SchemeError
from labelstore.paths import prompts_dir


@dataclass(frozen=True)
class Label:
    name: str
    grade: int
    definition: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class RatingMap:
    """Maps a raw rating onto a label: the first (threshold, label) the rating reaches wins."""

    source: str
    scale: tuple[float, float]
    rule: str
    thresholds: tuple[tuple[float, str], ...]


@dataclass(frozen=True)
class LabelScheme:
    name: str
    description: str
    labels: tuple[Label, ...]
    rating_maps: dict[str, RatingMap] = field(default_factory=dict)

    @property
    def label_names(self) -> list[str]:
        """Label names, most relevant first."""
        return [label.name for label in self.labels]

    @property
    def grades(self) -> dict[str, int]:
        return {label.name: label.grade for label in self.labels}

    @property
    def max_grade(self) -> int:
        return max(label.grade for label in self.labels)

    @property
    def lowest_label(self) -> str:
        """The label of the lowest grade (e.g. 'irrelevant')."""
        return min(self.labels, key=lambda label: label.grade).name

    def grade_of(self, label: str) -> int:
        return self.grades[self.normalize(label)]

    def label_for_grade(self, grade: int) -> str:
        for label in self.labels:
            if label.grade == grade:
                return label.name
        raise SchemeError(f"scheme '{self.name}' has no label with grade {grade}")

    def normalize(self, raw: str) -> str:
        """The canonical label name for `raw` (a name or an alias, case-insensitive)."""
        key = str(raw).strip().lower()
        lookup = self._lookup()
        if key not in lookup:
            raise SchemeError(
                f"unknown label '{raw}' for scheme '{self.name}' (expected one of: {', '.join(self.label_names)})"
            )
        return lookup[key]

    def _lookup(self) -> dict[str, str]:
        table: dict[str, str] = {}
        for label in self.labels:
            table[label.name.lower()] = label.name
            for alias in label.aliases:
                table[alias.lower()] = label.name
        return table

    def map_rating(self, source: str, rating: float) -> str:
        """Map a numeric rating from `source` ('homedepot', 'crowdflower') onto a label."""
        if source not in self.rating_maps:
            raise SchemeError(f"scheme '{self.name}' has no rating map for '{source}'")
        rating_map = self.rating_maps[source]
        low, high = rating_map.scale
        if not low <= rating <= high:
            raise SchemeError(f"rating {rating} is outside the {source} scale {low}..{high}")
        for threshold, label in rating_map.thresholds:
            if rating >= threshold:
                return label
        raise SchemeError(f"rating {rating} reaches no threshold of the {source} map")


_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda rating, bound: rating <= bound, ">=": lambda rating, bound: rating >= bound,
    "<": lambda rating, bound: rating < bound, ">": lambda rating, bound: rating > bound,
    "": lambda rating, bound: rating == bound,
}
RATING_MAP_SYNTAX = (
    "comma-separated RULE=LABEL items, tried in order, the first that holds wins; RULE is a number (the rating "
    "equals it) or <N, <=N, >N, >=N: '1=irrelevant,2=partial,3=relevant' or "
    "'<1.5=irrelevant,<2.5=partial,>=2.5=relevant'"
)


@dataclass(frozen=True)
class RatingRule:
    op: str
    bound: float
    label: str

    def holds(self, rating: float) -> bool:
        return _COMPARISONS[self.op](rating, self.bound)


@dataclass(frozen=True)
class RatingRules:
    """A user's own rating map (`--rating-map`): ordered rules, the first that holds gives the label."""

    text: str
    rules: tuple[RatingRule, ...]

    def label_for(self, rating: float) -> str:
        for rule in self.rules:
            if rule.holds(rating):
                return rule.label
        raise SchemeError(f"rating {rating:g} matches no rule of the rating map '{self.text}'")


def parse_rating_map(text: str, scheme: LabelScheme) -> RatingRules:
    """Parse `RATING_MAP_SYNTAX` into rules whose labels are `scheme`'s (names or aliases)."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise SchemeError(f"empty rating map; expected {RATING_MAP_SYNTAX}")
    rules = tuple(_parse_rule(item, scheme) for item in items)
    exact: dict[float, str] = {}
    for rule in rules:
        if rule.op == "" and exact.setdefault(rule.bound, rule.label) != rule.label:
            raise SchemeError(f"rating map gives {rule.bound:g} two labels: '{exact[rule.bound]}' and '{rule.label}'")
    return RatingRules(", ".join(items), rules)


def _parse_rule(item: str, scheme: LabelScheme) -> RatingRule:
    condition, sep, label = item.rpartition("=")
    condition, label = condition.strip(), label.strip()
    if not sep or not condition or not label or condition in _COMPARISONS:
        raise SchemeError(f"rating map item '{item}' is not RULE=LABEL; expected {RATING_MAP_SYNTAX}")
    op = next(op for op in _COMPARISONS if condition.startswith(op))
    try:
        bound = float(condition[len(op):])
    except ValueError:
        raise SchemeError(f"rating map item '{item}': '{condition}' is not a number or <N, <=N, >N, >=N") from None
    if math.isnan(bound):
        raise SchemeError(f"rating map item '{item}': NaN is not a rating")
    try:
        canonical = scheme.normalize(label)
    except SchemeError as exc:
        raise SchemeError(f"rating map item '{item}': {exc}") from None
    return RatingRule(op, bound, canonical)


def _parse(path: Path) -> LabelScheme:
    data = read_toml(path, SchemeError)
    try:
        labels = tuple(
            Label(str(item["name"]), int(item["grade"]), str(item.get("definition", "")),
                  tuple(str(a) for a in item.get("aliases", ())))
            for item in data["labels"]
        )
        maps = {
            source: RatingMap(source, tuple(spec["scale"]), str(spec.get("rule", "")),
                              tuple((float(t), str(lbl)) for t, lbl in spec["thresholds"]))
            for source, spec in data.get("rating_maps", {}).items()
        }
        scheme = LabelScheme(str(data["name"]), str(data.get("description", "")), labels, maps)
    except (KeyError, TypeError, ValueError) as exc:
        raise SchemeError(f"{path}: malformed scheme ({exc!r})") from exc
    _validate(path, scheme)
    return scheme


def _validate(path: Path, scheme: LabelScheme) -> None:
    names = scheme.label_names
    if len(set(names)) != len(names):
        raise SchemeError(f"{path}: duplicate label names")
    grades = [label.grade for label in scheme.labels]
    if grades != sorted(grades, reverse=True) or len(set(grades)) != len(grades):
        raise SchemeError(f"{path}: labels must be listed with strictly decreasing grades")
    for rating_map in scheme.rating_maps.values():
        for _, label in rating_map.thresholds:
            if label not in names:
                raise SchemeError(f"{path}: rating map '{rating_map.source}' names unknown label '{label}'")


@lru_cache(maxsize=None)
def load_scheme(name: str = "esci") -> LabelScheme:
    """Load `prompts/schemes/<name>.toml`."""
    path = prompts_dir() / "schemes" / f"{name}.toml"
    if not path.is_file():
        raise SchemeError(f"no label scheme '{name}' (looked for {path}; known: {', '.join(list_schemes())})")
    return _parse(path)


def list_schemes() -> list[str]:
    return sorted(p.stem for p in (prompts_dir() / "schemes").glob("*.toml"))
