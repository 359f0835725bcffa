"""The auditor's SQL files (`auditor/sql/*.sql`) and the per-connection macros they use."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).parent / "sql"


@lru_cache(maxsize=None)
def auditor_sql(name: str) -> str:
    """The text of `auditor/sql/<name>.sql`."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the TEMP macros (u01, std_normal, wilson_*, poisson_*) on `con`."""
    con.execute(auditor_sql("macros"))
