import math

import torch

from cirlab.losses import batch_classification_loss, sample_soft_triplets, soft_triplet_loss


def _toy():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([[0.6, 0.8], [-1.0, 0.0]], requires_grad=True)
    # items: 0 = q1, 1 = q2, 2 = p1, 3 = p2
    triplets = torch.tensor([[0, 2, 1], [3, 1, 0]])
    return queries, targets, triplets


def test_soft_triplet_matches_hand_computation():
    queries, targets, triplets = _toy()
    # (q1, p1, q2): d+ = 0.4^2 + 0.8^2 = 0.8, d- = 2 ; (p2, q2, q1): d+ = 2, d- = 4
    expected = (math.log1p(math.exp(0.8 - 2.0)) + math.log1p(math.exp(2.0 - 4.0))) / 2
    loss = soft_triplet_loss(queries, targets, triplets, tirg_half_gradient=False)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.195105, abs_tol=1e-6)


def test_tirg_half_gradient_keeps_value_and_halves_gradient():
    queries, targets, triplets = _toy()
    full = soft_triplet_loss(queries, targets, triplets, tirg_half_gradient=False)
    full_grad = torch.autograd.grad(full, queries)[0]
    half = soft_triplet_loss(queries, targets, triplets, tirg_half_gradient=True)
    half_grad = torch.autograd.grad(half, queries)[0]
    assert math.isclose(half.item(), full.item(), rel_tol=1e-7)
    assert torch.allclose(half_grad, 0.5 * full_grad)
    assert full_grad.abs().sum() > 0


def test_triplet_sampling_follows_tirg():
    batch = 4
    triplets = sample_soft_triplets(batch, negatives_per_anchor=3, generator=torch.Generator().manual_seed(0))
    assert triplets.shape == (2 * batch * 3, 3)
    labels = torch.arange(2 * batch) % batch
    anchor, positive, negative = triplets.T
    assert torch.equal(labels[anchor], labels[positive]) and torch.all(anchor != positive)
    assert torch.all(labels[anchor] != labels[negative])
    for a in range(2 * batch):
        chosen = negative[anchor == a]
        assert len(chosen) == 3 and len(set(chosen.tolist())) == 3


def test_batch_classification_matches_hand_computation():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # logits rows: [1, 0] (right class 0) and [0, 2] (right class 1)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2
    assert math.isclose(batch_classification_loss(queries, targets).item(), expected, rel_tol=1e-6)
