"""Errors a user can act on. The CLI prints their message and exits non-zero."""
from __future__ import annotations


class MnrError(Exception):
    """Base class: the message says what went wrong and what to do."""


class SchemeError(MnrError):
    """A label scheme file is missing or malformed, or a label is not in the scheme."""


class StoreError(MnrError):
    """The store cannot be opened or its schema does not fit this version."""


class StoreLockedError(StoreError):
    """Another process held the store's write lock for longer than the timeout."""


class IngestError(MnrError):
    """An input file was rejected whole. `problems` lists (row, field, message) tuples."""

    def __init__(self, path: str, problems: list[tuple[int | None, str | None, str]]):
        self.path = path
        self.problems = problems
        shown = problems[:20]
        lines = [f"{path}: rejected, nothing was written ({len(problems)} problem(s))"]
        for row, field, message in shown:
            where = []
            if row is not None:
                where.append(f"row {row}")
            if field is not None:
                where.append(f"field '{field}'")
            lines.append(f"  {path}: {', '.join(where) or 'file'}: {message}")
        if len(problems) > len(shown):
            lines.append(f"  ... and {len(problems) - len(shown)} more")
        super().__init__("\n".join(lines))
