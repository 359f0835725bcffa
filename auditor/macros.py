"""The TEMP macros the auditor's SQL files (`auditor/sql/*.sql`) call."""
from __future__ import annotations

import duckdb

from labelstore.sqlfiles import sql


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    """Create the TEMP macros (u01, std_normal, wilson_*, poisson_*) on `con`."""
    con.execute(sql("auditor", "macros"))
