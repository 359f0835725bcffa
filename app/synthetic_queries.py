"""Synthetic queries generated from product titles by an LLM backend, written to the store as synthetic.

Lives at `app` level so that `trainer` never imports `annotator`: any object with a
`generate(prompts: list[str]) -> list[str]` method (the annotator's backends), or any callable
with that signature, can be the generator. Each generated query is paired with its source
product, unlabelled (origin 'synthetic'), for the annotator to label; `queries.synthetic` is true.

The prompt shows `shots` real (query, title) pairs of the dataset first: human or imported labels
of the top grade on real queries, so generations take the dataset's query style (a small model
told only "write a query" mostly copies the title). That head is the same for every product, so
vLLM caches it as a shared prefix.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from labelstore.errors import MnrError
from labelstore.store import Store
from trainer.augment import SyntheticQuery, write_synthetic_queries

INSTRUCTION = "Search queries that shoppers typed to find products.\n\n"
EXAMPLE_TEMPLATE = "Product: {title}\nQuery: {query}\n\n"
PROMPT_TEMPLATE = "Product: {title}\nQuery:"
PRODUCTS_FOR_QUERIES_SQL = """
SELECT product_id, title FROM products WHERE dataset = $dataset ORDER BY hash(product_id || $seed) LIMIT $limit
"""
# Real queries with a top-grade human or imported label in the dataset: the prompt's examples.
EXAMPLE_PAIRS_SQL = """
WITH judged AS (
    SELECT l.pair_id, l.grade, max(l.grade) OVER (PARTITION BY l.scheme) AS top_grade
    FROM current_labels l JOIN pairs p USING (pair_id)
    WHERE p.dataset = $dataset AND l.source IN ('human', 'import')
)
SELECT q.text AS query, pr.title
FROM judged j JOIN pairs p USING (pair_id) JOIN queries q USING (query_id) JOIN products pr USING (product_id)
WHERE j.grade = j.top_grade AND NOT q.synthetic
ORDER BY hash(p.pair_id || $seed)
LIMIT $shots
"""
_QUOTES = re.compile(r"^[\s\"'`*-]+|[\s\"'`*.]+$")


class TextGenerator(Protocol):
    def generate(self, prompts: list[str]) -> list[str]: ...


def clean_generated_query(text: str, max_words: int = 12) -> str:
    """The first non-empty line of a generation, without quotes, a 'Query:' prefix or undecodable bytes
    (U+FFFD), at most `max_words` words."""
    for line in text.replace("\ufffd", "").splitlines():
        line = re.sub(r"^\s*(query|search)\s*:\s*", "", line, flags=re.IGNORECASE)
        line = _QUOTES.sub("", line)
        if line:
            return " ".join(line.split()[:max_words])
    return ""


def _generate(generator: TextGenerator | Callable[[list[str]], list[str]], prompts: list[str]) -> list[str]:
    outputs = generator.generate(prompts) if hasattr(generator, "generate") else generator(prompts)
    outputs = list(outputs)
    if len(outputs) != len(prompts):
        raise MnrError(f"the query generator returned {len(outputs)} texts for {len(prompts)} prompts")
    return [str(o) for o in outputs]


def prompt_head(store: Store, dataset: str, shots: int, seed: int = 0) -> str:
    """The instruction and up to `shots` example (title, query) pairs of `dataset`, the prompt's shared prefix."""
    if shots <= 0:
        return INSTRUCTION
    examples = store.df(EXAMPLE_PAIRS_SQL, {"dataset": dataset, "seed": str(seed), "shots": shots})
    return INSTRUCTION + "".join(EXAMPLE_TEMPLATE.format(title=" ".join(str(title).split()), query=query)
                                 for query, title in zip(examples["query"], examples["title"]))


def generate_synthetic_queries(store: Store, generator: TextGenerator | Callable[[list[str]], list[str]],
                               dataset: str, n_products: int = 100, seed: int = 0, shots: int = 4,
                               prompt_template: str = PROMPT_TEMPLATE,
                               batch_size: int = 32, generator_name: str | None = None) -> dict[str, int]:
    """Generate one query per sampled product of `dataset` and write query + (query, product) pair.

    The author of the written pairs is `synthetic-queries:<generator_name>` (default: the
    generator's type name). Each chunk of `batch_size` is written in its own transaction.
    Returns counts: queries, pairs, labels (always 0) and empty_generations (dropped).
    """
    products = store.df(PRODUCTS_FOR_QUERIES_SQL, {"dataset": dataset, "seed": str(seed), "limit": n_products})
    if products.empty:
        raise MnrError(f"{store.path}: no products in dataset '{dataset}' to generate queries from")
    author = f"synthetic-queries:{generator_name or type(generator).__name__}"
    head = prompt_head(store, dataset, shots, seed)
    params = {"dataset": dataset, "n_products": n_products, "seed": seed, "generator": author,
              "prompt_head": head, "prompt_template": prompt_template}
    totals = {"queries": 0, "pairs": 0, "labels": 0, "empty_generations": 0}
    with store.run("synthetic-queries", params) as run:
        for start in range(0, len(products), batch_size):
            chunk = products.iloc[start:start + batch_size]
            prompts = [head + prompt_template.format(title=title) for title in chunk["title"]]
            texts = [clean_generated_query(t) for t in _generate(generator, prompts)]
            queries = [SyntheticQuery(text, dataset, [(pid, None, None, None)])
                       for text, pid in zip(texts, chunk["product_id"]) if text]
            totals["empty_generations"] += len(texts) - len(queries)
            written = write_synthetic_queries(store, queries, author, run.run_id)  # per chunk: resumable
            for key, value in written.items():
                totals[key] += value
        run.metrics.update(totals)
    return totals

