"""The one loader for the `.sql` files that packages keep in their `sql/` folder."""
from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def sql(package: str, name: str) -> str:
    """The text of `<package>/sql/<name>.sql`, read through importlib.resources (works from a wheel)."""
    return files(package).joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")
