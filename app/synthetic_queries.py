"""Synthetic queries generated from product titles by an LLM backend, written to the store as synthetic.

Lives at `app` level so that `trainer` never imports `annotator`: any object with a
`generate(prompts: list[str]) -> list[str]` method (the annotator's backends), or any callable
with that signature, can be the generator. Each generated query is paired with its source
product, unlabelled (origin 'synthetic'), for the annotator to label; `queries.synthetic` is true.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from labelstore.errors import MnrError
from labelstore.store import Store
from trainer.augment import SyntheticQuery, write_synthetic_queries

PROMPT_TEMPLATE = (
    "Write one short search query (2 to 6 words) that a shopper would type to find this product.\n"
    "Product: {title}\nQuery:"
)
PRODUCTS_FOR_QUERIES_SQL = """
SELECT product_id, title FROM products WHERE dataset = $dataset ORDER BY hash(product_id || $seed) LIMIT $limit
"""
_QUOTES = re.compile(r"^[\s\"'`*-]+|[\s\"'`*.]+$")


class TextGenerator(Protocol):
    def generate(self, prompts: list[str]) -> list[str]: ...


def clean_generated_query(text: str, max_words: int = 12) -> str:
    """The first non-empty line of a generation, without quotes or a 'Query:' prefix, at most `max_words` words."""
    for line in text.splitlines():
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


def generate_synthetic_queries(store: Store, generator: TextGenerator | Callable[[list[str]], list[str]],
                               dataset: str, n_products: int = 100, seed: int = 0,
                               prompt_template: str = PROMPT_TEMPLATE,
                               batch_size: int = 32) -> dict[str, int]:
    """Generate one query per sampled product of `dataset` and write query + (query, product) pair."""
    products = store.df(PRODUCTS_FOR_QUERIES_SQL, {"dataset": dataset, "seed": str(seed), "limit": n_products})
    if products.empty:
        raise MnrError(f"{store.path}: no products in dataset '{dataset}' to generate queries from")
    author = f"synthetic-queries:{type(generator).__name__}"
    params = {"dataset": dataset, "n_products": n_products, "seed": seed, "generator": author,
              "prompt_template": prompt_template}
    totals = {"queries": 0, "pairs": 0, "labels": 0, "empty_generations": 0}
    with store.run("synthetic-queries", params) as run:
        for start in range(0, len(products), batch_size):
            chunk = products.iloc[start:start + batch_size]
            prompts = [prompt_template.format(title=title) for title in chunk["title"]]
            texts = [clean_generated_query(t) for t in _generate(generator, prompts)]
            queries = [SyntheticQuery(text, dataset, [(pid, None, None, None)])
                       for text, pid in zip(texts, chunk["product_id"]) if text]
            totals["empty_generations"] += len(texts) - len(queries)
            written = write_synthetic_queries(store, queries, author, run.run_id)  # per chunk: resumable
            for key, value in written.items():
                totals[key] += value
        run.metrics.update(totals)
    return totals

