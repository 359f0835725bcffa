"""The Stage 1 and Stage 2 losses: against naive loops, on hand-made cases, and their gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import GradeSupConLoss, MultiClassCircleLoss
from trainer.losses.base import grade_matrix_from


def naive_circle_loss(similarities: torch.Tensor, grade: torch.Tensor, valid: torch.Tensor,
                      loss: MultiClassCircleLoss) -> float:
    """The formula of trainer/losses/multi_class_circle.py, one loop iteration per term."""
    per_query = []
    for b in range(similarities.shape[0]):
        judged = [n for n in range(similarities.shape[1]) if valid[b, n]]
        grades = sorted({int(grade[b, n]) for n in judged}, reverse=True)
        total, has_pair = 0.0, False
        for g in grades:
            for h in grades:
                if g <= h:
                    continue
                m = loss.margin_for_gap(g - h)
                inner = 0.0
                for i in judged:
                    for j in judged:
                        if int(grade[b, i]) != g or int(grade[b, j]) != h:
                            continue
                        has_pair = True
                        delta = float(similarities[b, j] - similarities[b, i]) + m
                        alpha = max(delta + m, 0.0)
                        inner += math.expm1(loss.gamma * alpha * max(delta, 0.0))
                total += math.log1p(inner)
        if has_pair:
            per_query.append(total)
    return sum(per_query) / len(per_query) if per_query else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("in_batch_grade", [0, None])
def test_circle_loss_matches_naive_loop(seed: int, in_batch_grade: int | None) -> None:
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(4, 16, generator=generator), dim=1)
    products = F.normalize(torch.randn(14, 16, generator=generator), dim=1)
    query_index = torch.randint(0, 4, (14,), generator=generator)
    grades = torch.randint(0, 3, (14,), generator=generator)
    loss = MultiClassCircleLoss(gamma=8.0, margin=0.1, margins={2: 0.3}, in_batch_grade=in_batch_grade)
    fast = loss(queries, products, query_index, grades)
    grade, valid = loss.query_grades(grade_matrix_from(4, query_index, grades))
    slow = naive_circle_loss(queries @ products.T, grade, valid, loss)
    assert fast.item() == pytest.approx(slow, rel=1e-5, abs=1e-6)


def one_query(similarities: list[float], grades: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sims = torch.tensor([similarities], requires_grad=True)
    grade = torch.tensor([grades])
    return sims, grade, torch.ones_like(grade, dtype=torch.bool)


def test_circle_loss_is_zero_when_bands_are_separated_by_the_margins() -> None:
    loss = MultiClassCircleLoss(gamma=32.0, margins={1: 0.1, 2: 0.25})
    # relevant 0.80, 0.75 > partial 0.60, 0.62 (gap >= 0.1) > irrelevant 0.40 (gap >= 0.1; 2-gap >= 0.25)
    sims, grade, valid = one_query([0.80, 0.75, 0.62, 0.60, 0.40], [2, 2, 1, 1, 0])
    value = loss.loss_from_similarities(sims, grade, valid)
    value.backward()
    assert value.item() == 0.0
    assert torch.all(sims.grad == 0)


def test_circle_loss_is_positive_when_a_margin_is_missed() -> None:
    loss = MultiClassCircleLoss(gamma=32.0, margins={1: 0.1, 2: 0.25})
    # partial 0.69 is only 0.06 below relevant 0.75: the (2, 1) margin 0.1 is missed
    sims, grade, valid = one_query([0.80, 0.75, 0.69, 0.60, 0.40], [2, 2, 1, 1, 0])
    assert loss.loss_from_similarities(sims, grade, valid).item() > 0.0


def test_circle_loss_gradient_pushes_bands_apart() -> None:
    loss = MultiClassCircleLoss(gamma=16.0, margin=0.1)
    # inverted: the irrelevant product is most similar, the relevant one least
    sims, grade, valid = one_query([0.2, 0.4, 0.6], [2, 1, 0])
    loss.loss_from_similarities(sims, grade, valid).backward()
    relevant, partial, irrelevant = sims.grad[0].tolist()
    assert relevant < 0  # gradient descent raises the relevant similarity
    assert irrelevant > 0  # and lowers the irrelevant one
    # the worst violation (relevant vs irrelevant, gap 2) gets the largest push
    assert abs(relevant) > abs(partial) and abs(irrelevant) > abs(partial)


def test_circle_loss_descends_to_separated_bands() -> None:
    loss = MultiClassCircleLoss(gamma=16.0, margin=0.1)
    sims = torch.tensor([[0.2, 0.3, 0.5, 0.6]], requires_grad=True)
    grade = torch.tensor([[2, 1, 1, 0]])
    valid = torch.ones_like(grade, dtype=torch.bool)
    optimizer = torch.optim.SGD([sims], lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        value = loss.loss_from_similarities(sims, grade, valid)
        if value.item() == 0.0:
            break
        value.backward()
        optimizer.step()
    final = sims.detach()[0]
    assert value.item() == 0.0
    assert final[0] - max(final[1], final[2]) >= 0.1 - 1e-6
    assert min(final[1], final[2]) - final[3] >= 0.1 - 1e-6


def test_circle_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        MultiClassCircleLoss()(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), torch.tensor([1, 0, 1]))


def test_grade_supcon_masks_follow_grades() -> None:
    loss = GradeSupConLoss(top_grade=2, lowest_grade=0, product_anchors=True)
    # query 0: products 0 (grade 2), 1 (grade 2), 2 (grade 1), 3 (grade 0), 4 (grade 0); query 1: product 5 (grade 2)
    positive, negative = loss.masks(grade_matrix_from(2, torch.tensor([0, 0, 0, 0, 0, 1]), torch.tensor([2, 2, 1, 0, 0, 2])))
    q0, q1, p0, p1, p2, p3, p4, p5 = range(8)
    assert positive[q0, p0] and positive[q0, p1] and positive[p0, p1] and positive[p0, q0]
    assert not positive[q0, p2] and negative[q0, p2]  # other grade repels
    assert not positive[q0, p5] and negative[q0, p5] and negative[q0, q1]  # in-batch repels
    assert positive[q1, p5]
    assert not positive[p3, p4] and not positive[p3].any()  # irrelevant products attract nothing
    assert negative[q0, p3] and negative[p0, p4]  # and repel the rest
    assert not (positive & negative).any()
    assert not positive.diagonal().any() and not negative.diagonal().any()


def test_grade_supcon_default_anchors_only_queries() -> None:
    # query 0: products 0, 1 (grade 2), 2 (grade 1); query 1: product 3 (grade 2)
    matrix = grade_matrix_from(2, torch.tensor([0, 0, 0, 1]), torch.tensor([2, 2, 1, 2]))
    positive, negative = GradeSupConLoss(top_grade=2, lowest_grade=0).masks(matrix)
    q0, q1, p0, p1, p2, p3 = range(6)
    assert positive[q0, p0] and positive[q0, p1] and positive[q1, p3]
    assert negative[q0, p2] and negative[q0, p3] and negative[q0, q1]
    assert not positive[2:].any() and not negative[2:].any()  # products anchor nothing
    full_positive, _ = GradeSupConLoss(top_grade=2, lowest_grade=0, product_anchors=True).masks(matrix)
    assert full_positive[p0, p1] and full_positive[p0, q0]


def test_grade_supcon_product_judged_for_two_queries_joins_both_classes() -> None:
    loss = GradeSupConLoss(top_grade=2, lowest_grade=0, product_anchors=True)
    # product 0 is relevant for both queries, product 1 relevant for query 1 only
    grade_matrix = torch.tensor([[2, -1], [2, 2]])
    positive, negative = loss.masks(grade_matrix)
    q0, q1, p0, p1 = range(4)
    assert positive[q0, p0] and positive[q1, p0] and positive[q1, p1] and positive[p0, p1]
    assert negative[q0, p1] and negative[q0, q1]


def test_grade_supcon_matches_hand_computed_value() -> None:
    loss = GradeSupConLoss(top_grade=1, lowest_grade=0, temperature=0.5, product_anchors=True)
    query = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    products = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=1)
    value = loss(query, products, torch.tensor([0, 0]), torch.tensor([1, 0]))
    # anchors with positives: the query (positive p0) and p0 (positive the query); p1 has none
    s_q_p0, s_q_p1, s_p0_p1 = 2 ** -0.5, 0.0, 2 ** -0.5
    t = 0.5
    anchor_query = -math.log(math.exp(s_q_p0 / t) / (math.exp(s_q_p0 / t) + math.exp(s_q_p1 / t)))
    anchor_p0 = -math.log(math.exp(s_q_p0 / t) / (math.exp(s_q_p0 / t) + math.exp(s_p0_p1 / t)))
    assert value.item() == pytest.approx((anchor_query + anchor_p0) / 2, rel=1e-5)
    # queries only: the one anchor, with two positives (PML returns 0 for a single pair of each kind)
    three = F.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.5]]), dim=1)
    sims = [float(three[i] @ query[0]) for i in range(3)]
    denominator = sum(math.exp(x / t) for x in sims)
    expected = -(math.log(math.exp(sims[0] / t) / denominator) + math.log(math.exp(sims[2] / t) / denominator)) / 2
    queries_only = GradeSupConLoss(top_grade=1, lowest_grade=0, temperature=0.5)
    value = queries_only(query, three, torch.tensor([0, 0, 0]), torch.tensor([1, 0, 1]))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_grade_supcon_gradient_pulls_top_grade_product_towards_query() -> None:
    loss = GradeSupConLoss(top_grade=2, lowest_grade=0, temperature=0.1)
    query = F.normalize(torch.tensor([[1.0, 0.2, 0.0]]), dim=1)
    products = F.normalize(torch.tensor([[0.3, 1.0, 0.0], [0.9, 0.1, 0.3], [0.0, 0.0, 1.0]]), dim=1).requires_grad_()
    loss(query, products, torch.tensor([0, 0, 0]), torch.tensor([2, 0, 0])).backward()
    step = -products.grad  # gradient-descent direction
    assert torch.dot(step[0], query[0]) > 0  # the relevant product moves towards the query
    assert torch.dot(step[1], query[0]) < 0  # the irrelevant one away from it
