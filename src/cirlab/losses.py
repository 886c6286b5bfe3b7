"""Training losses on scaled, normalised query and target features (TIRG's `compute_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_soft_triplets(batch_size: int, negatives_per_anchor: int = 3,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """TIRG's triplet sampling over the 2B items [q_1..q_B, p_1..p_B] (label of item i is i mod B).

    Every item is an anchor; its positive is the other item with its label; its negatives are
    `negatives_per_anchor` items drawn without replacement from the 2B - 2 items of other labels
    (queries and targets mixed). Returns a (2B * n) x 3 tensor of (anchor, positive, negative) indices.
    """
    total = 2 * batch_size
    labels = torch.arange(total) % batch_size
    # Random keys, with same-label items pushed past every valid key, then the n smallest per row:
    # a uniform draw without replacement among the other labels, as the code's shuffle-and-take-3.
    keys = torch.rand(total, total, generator=generator)
    keys[labels[:, None] == labels[None, :]] = 2.0
    negatives = keys.argsort(dim=1)[:, :negatives_per_anchor]
    anchors = torch.arange(total)[:, None].expand_as(negatives)
    positives = (anchors + batch_size) % total
    return torch.stack([anchors, positives, negatives], dim=-1).reshape(-1, 3)


def soft_triplet_loss(queries: torch.Tensor, targets: torch.Tensor, triplets: torch.Tensor,
                      tirg_half_gradient: bool = True) -> torch.Tensor:
    """Mean of log(1 + exp(d(a, p) - d(a, n))) with squared Euclidean distances.

    The original TIRG backward (a numpy autograd.Function) drops the factor 2 of the squared
    distance, so every gradient is exactly half the true one. With `tirg_half_gradient` (the
    default, as the code) the returned value is the true loss but its gradient is halved:
    `0.5 * loss + 0.5 * loss.detach()` has the value of `loss` and half its gradient.
    """
    features = torch.cat([queries, targets], dim=0)
    anchor, positive, negative = features[triplets[:, 0]], features[triplets[:, 1]], features[triplets[:, 2]]
    d_pos = (anchor - positive).pow(2).sum(dim=1).clamp_min(0)
    d_neg = (anchor - negative).pow(2).sum(dim=1).clamp_min(0)
    loss = F.softplus(d_pos - d_neg).mean()
    if tirg_half_gradient:
        return 0.5 * loss + 0.5 * loss.detach()
    return loss


def batch_classification_loss(queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of query i over the in-batch targets, target i being the right class (one direction)."""
    logits = queries @ targets.T
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))
