r"""Multi-class circle loss (Stage 2): sharpen the boundaries between relevance grades.

For one query q let s_i = cos(q, p_i) be its similarity to product i and y_i the grade of i for q
(products judged for other queries of the batch count as grade `in_batch_grade` for q). For every
pair of grades g > h present, with margin m_gh = margins[g - h] (default `margin * (g - h)`):

.. math::

    \delta_{ij} = s_j - s_i + m_{gh}, \qquad i \in S_g,\ j \in S_h

    \alpha_{ij} = [\delta_{ij} + m_{gh}]_+ \quad \text{(detached)}

    L_q = \sum_{g > h} \log\Big(1 + \sum_{i \in S_g} \sum_{j \in S_h}
          \big(e^{\gamma\, \alpha_{ij} [\delta_{ij}]_+} - 1\big)\Big)

    L = \frac{1}{|Q'|} \sum_{q \in Q'} L_q \quad (Q' = \text{queries with at least one grade pair})

delta_ij > 0 means the pair (i, j) violates its margin: grade g should beat grade h by m_gh.
As in circle loss (Sun et al., 2020), each violation is weighted by its distance to its optimum:
the decision boundary is delta = 0 (separation m), the optimum is delta = -m (separation 2m), so
alpha = [delta + m]_+; far-off pairs get large weights and nearly-fixed pairs small ones. gamma is
the scale. Each grade pair (g, h) is one log(1 + sum(...)) term, a soft maximum over its
violations, so a grade pair with many products does not drown the others. The hinge [delta]_+
inside the exponent (with e^x - 1) makes the loss exactly zero when every band is separated from
every lower band by its margin, and its gradient then vanishes too.

With pair weights w (e.g. the labeler's confidence in an LLM relabel), each violation term is
multiplied by w_i w_j, so a pair of weight 0 adds nothing and one of weight 1 counts in full.

The inner sum is computed in float64: gamma * alpha * delta reaches ~170 for gamma = 32, beyond
float32's exp range.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from trainer.losses.base import UNJUDGED, GradedBatchLoss


class MultiClassCircleLoss(GradedBatchLoss):
    """Multi-class circle loss over graded query-product similarities (formula in the module docstring).

    Args:
        gamma: scale of the exponent (circle loss's gamma).
        margin: margin per unit of grade gap, used for gaps not in `margins`.
        margins: margin for a given grade gap g - h, e.g. {1: 0.1, 2: 0.25}.
        in_batch_grade: grade that products judged for *other* queries of the batch get for this
            query (they are unjudged but almost always irrelevant); None ignores them.
    """

    supports_weights = True

    def __init__(self, gamma: float = 32.0, margin: float = 0.1, margins: Mapping[int, float] | None = None,
                 in_batch_grade: int | None = 0):
        super().__init__()
        if gamma <= 0:
            raise ValueError("gamma must be positive")
        self.gamma = float(gamma)
        self.margin = float(margin)
        self.margins = {int(gap): float(value) for gap, value in (margins or {}).items()}
        self.in_batch_grade = in_batch_grade

    def margin_for_gap(self, gap: int) -> float:
        """The margin m_gh for grade gap g - h > 0."""
        return self.margins.get(int(gap), self.margin * int(gap))

    def query_grades(self, grade_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(grade, valid), both (B, N): unjudged entries take `in_batch_grade`, or are invalid when it is None."""
        judged = grade_matrix != UNJUDGED
        if self.in_batch_grade is None:
            return torch.where(judged, grade_matrix, torch.zeros_like(grade_matrix)), judged
        filled = torch.where(judged, grade_matrix, torch.full_like(grade_matrix, int(self.in_batch_grade)))
        return filled, torch.ones_like(judged)

    def compute_loss(self, query_emb: torch.Tensor, product_emb: torch.Tensor, grade_matrix: torch.Tensor,
                     weight_matrix: torch.Tensor | None = None) -> torch.Tensor:
        similarities = query_emb @ product_emb.T  # (B, N)
        grade, valid = self.query_grades(grade_matrix)
        return self.loss_from_similarities(similarities, grade, valid, weight_matrix)

    def loss_from_similarities(self, similarities: torch.Tensor, grade: torch.Tensor, valid: torch.Tensor,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
        """The loss from (B, N) similarities, (B, N) long grades, a (B, N) bool mask of judged entries and
        optional (B, N) entry weights."""
        n_queries, n_products = similarities.shape
        if n_products == 0 or not bool(valid.any()):
            return similarities.sum() * 0.0
        low = int(grade[valid].min())
        n_grades = int(grade[valid].max()) - low + 1
        gap = grade.unsqueeze(2) - grade.unsqueeze(1)  # (B, i, j): y_i - y_j
        pair_mask = valid.unsqueeze(2) & valid.unsqueeze(1) & (gap > 0)
        if not bool(pair_mask.any()):
            return similarities.sum() * 0.0
        gap_margins = torch.tensor([0.0] + [self.margin_for_gap(g) for g in range(1, n_grades)],
                                   dtype=similarities.dtype, device=similarities.device)
        margin = gap_margins[gap.clamp(min=0)]
        delta = similarities.unsqueeze(1) - similarities.unsqueeze(2) + margin  # s_j - s_i + m
        alpha = torch.relu(delta + margin).detach()
        exponent = (self.gamma * alpha * torch.relu(delta)).double()
        terms = torch.where(pair_mask, torch.expm1(exponent), torch.zeros_like(exponent))
        if weights is not None:
            terms = terms * (weights.unsqueeze(2) * weights.unsqueeze(1)).double()
        grade_pair = (grade.unsqueeze(2) - low) * n_grades + (grade.unsqueeze(1) - low)
        grade_pair = grade_pair.clamp(min=0).reshape(n_queries, -1)
        per_grade_pair = torch.zeros(n_queries, n_grades * n_grades, dtype=terms.dtype, device=terms.device)
        per_grade_pair.scatter_add_(1, grade_pair, terms.reshape(n_queries, -1))
        per_query = torch.log1p(per_grade_pair).sum(dim=1)
        has_pairs = pair_mask.reshape(n_queries, -1).any(dim=1)
        return (per_query[has_pairs].mean()).to(similarities.dtype)
