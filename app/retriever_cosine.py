"""The retriever's query-title cosine as an input of the labeler's calibrated stack.

`annotator.stack.RetrieverCosine` is the interface; annotator never imports trainer, so the app builds it from
a registered two-tower model (`retriever_cosine`) for `mnr finetune --retriever` and, from the name a stack
records, for every labeler that applies that stack (`adapter_retriever`).
"""
from __future__ import annotations

from pathlib import Path

from annotator.stack import RetrieverCosine, stack_retriever
from labelstore.errors import MnrError
from labelstore.store import Store


def retriever_cosine(store: Store, model: str) -> RetrieverCosine:
    """The cosine of ``model`` (a registry model id, zero-shot, latest-stage1 / latest-stage2, or a folder) between
    each pair's query and product title, named by its registry id (or its folder's absolute path)."""
    from trainer.model import ZERO_SHOT_MODEL_ID
    from trainer.registry import resolve_model

    model_id, folder = resolve_model(store, "zero-shot" if model == ZERO_SHOT_MODEL_ID else model)
    return cosine_of(model_id or str(Path(folder).resolve()), folder)


def zero_shot_cosine() -> RetrieverCosine:
    """all-MiniLM-L6-v2 as shipped, named as `mnr` registers it (`trainer.registry.ensure_zero_shot`); no store."""
    from trainer.model import ZERO_SHOT_MODEL_ID, base_model_path

    return cosine_of(ZERO_SHOT_MODEL_ID, base_model_path())


def cosine_of(name: str, folder: Path) -> RetrieverCosine:
    """The query-title cosine of the two-tower model in ``folder``, named ``name``."""
    from trainer.model import TwoTowerModel

    two_tower = TwoTowerModel.from_pretrained(folder)

    def score(frame):
        return two_tower.pair_cosines(frame["query"].tolist(), frame["title"].tolist())

    return RetrieverCosine(name, score)


def adapter_retriever(store: Store, adapter: str | Path | None, *, use_stack: bool = True) -> RetrieverCosine | None:
    """The retriever whose cosine ``adapter``'s stack reads, loaded; None when no stack applied reads one."""
    name = stack_retriever(adapter) if adapter is not None and use_stack else None
    if name is None:
        return None
    try:
        return retriever_cosine(store, name)
    except MnrError as exc:
        raise MnrError(f"adapter {adapter}: its stack reads retriever {name}'s cosine, which cannot be loaded here "
                       f"({exc}); label in the store that registered it, or with --no-stack") from exc
