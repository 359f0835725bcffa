"""mkdocs hook: the site's home page is README.md and its results page is bench/RESULTS.md.

Both files live outside docs/, where GitHub readers find them; this hook serves them as docs/index.md and
docs/results.md, rewriting their repository-relative links so that `mkdocs build --strict` can check them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

INCLUDED = {"index.md": "README.md", "results.md": "bench/RESULTS.md"}
# Repository paths as README.md writes them -> their place in the site.
LINKS = {"docs/": "", "bench/RESULTS.md": "results.md"}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    source = INCLUDED.get(page.file.src_uri)
    if source is None:
        return markdown
    root = Path(config.config_file_path).parent
    return rewrite_links((root / source).read_text(encoding="utf-8"))


def rewrite_links(markdown: str) -> str:
    """`](docs/store.md)` -> `](store.md)`, `](bench/RESULTS.md)` -> `](results.md)`."""
    for old, new in LINKS.items():
        markdown = re.sub(r"\]\(" + re.escape(old), "](" + new, markdown)
    return markdown
