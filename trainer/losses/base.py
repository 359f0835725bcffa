"""The small base class the retriever losses share: a batch of queries and their graded products."""
from __future__ import annotations

import torch
from torch import nn


class GradedBatchLoss(nn.Module):
    """A loss over one graded batch.

    A batch holds B queries and N products. Product n was judged for query `query_index[n]`
    with grade `grades[n]` (higher is more relevant). Every product of the batch is also an
    in-batch candidate for the other B - 1 queries.

    forward(query_emb, product_emb, query_index, grades, grade_matrix=None, weight_matrix=None) -> scalar loss
        query_emb:    (B, d) float, L2-normalised (cosine similarity = dot product)
        product_emb:  (N, d) float, L2-normalised
        query_index:  (N,) long in [0, B), the query each product was sampled for
        grades:       (N,) long, the judged grade of each product for that query
        grade_matrix: optional (B, N) long, the judged grade of every product for every query of
                      the batch, -1 where unjudged. Pass it when a product is judged for several
                      queries of the batch (then it must appear once); default: built from
                      query_index and grades.
        weight_matrix: optional (B, N) float, the weight of each judged entry (e.g. the labeler's
                      confidence in an LLM relabel; 1 for human labels). Only losses that support
                      weights take it (`supports_weights`); default: all 1.
    """

    supports_weights = False

    def forward(self, query_emb: torch.Tensor, product_emb: torch.Tensor, query_index: torch.Tensor,
                grades: torch.Tensor, grade_matrix: torch.Tensor | None = None,
                weight_matrix: torch.Tensor | None = None) -> torch.Tensor:
        check_batch(query_emb, product_emb, query_index, grades)
        if grade_matrix is None:
            grade_matrix = grade_matrix_from(query_emb.shape[0], query_index.long(), grades.long())
        elif grade_matrix.shape != (query_emb.shape[0], product_emb.shape[0]):
            raise ValueError(f"grade_matrix must have shape {(query_emb.shape[0], product_emb.shape[0])}, "
                             f"got {tuple(grade_matrix.shape)}")
        if weight_matrix is None:
            return self.compute_loss(query_emb, product_emb, grade_matrix.long())
        if not self.supports_weights:
            raise ValueError(f"{type(self).__name__} does not take pair weights")
        if weight_matrix.shape != grade_matrix.shape:
            raise ValueError(f"weight_matrix must have shape {tuple(grade_matrix.shape)}, got {tuple(weight_matrix.shape)}")
        return self.compute_loss(query_emb, product_emb, grade_matrix.long(), weight_matrix)

    def compute_loss(self, query_emb: torch.Tensor, product_emb: torch.Tensor, grade_matrix: torch.Tensor) -> torch.Tensor:
        """The loss from embeddings and the (B, N) grade matrix (-1 = unjudged)."""
        raise NotImplementedError


UNJUDGED = -1


def grade_matrix_from(n_queries: int, query_index: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """(B, N) long: grades[n] at (query_index[n], n), UNJUDGED elsewhere."""
    matrix = torch.full((n_queries, grades.shape[0]), UNJUDGED, dtype=torch.long, device=grades.device)
    matrix[query_index, torch.arange(grades.shape[0], device=grades.device)] = grades
    return matrix


def check_batch(query_emb: torch.Tensor, product_emb: torch.Tensor, query_index: torch.Tensor,
                grades: torch.Tensor) -> None:
    """Raise ValueError when the batch tensors do not fit together."""
    if query_emb.ndim != 2 or product_emb.ndim != 2 or query_emb.shape[1] != product_emb.shape[1]:
        raise ValueError(f"expected (B, d) and (N, d) embeddings, got {tuple(query_emb.shape)} and {tuple(product_emb.shape)}")
    n = product_emb.shape[0]
    if query_index.shape != (n,) or grades.shape != (n,):
        raise ValueError(f"query_index and grades must have shape ({n},), got {tuple(query_index.shape)} and {tuple(grades.shape)}")
    if n and (int(query_index.min()) < 0 or int(query_index.max()) >= query_emb.shape[0]):
        raise ValueError(f"query_index must lie in [0, {query_emb.shape[0]})")
