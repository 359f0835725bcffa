"""Label schemes as data: `prompts/schemes/<name>.toml`.

A scheme is an ordered list of labels, each with a grade (higher is more relevant), a short
definition and aliases, plus rules that map numeric ratings (Home Depot means, CrowdFlower
medians) onto the scheme's labels.
"""
from __future__ import annotations

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
