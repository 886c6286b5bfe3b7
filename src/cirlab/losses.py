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


# ---------------------------------------------------------------------------------------------
# Attention losses (MMGrad): a saliency map (B x H x W, per-item min-max normalised to [0, 1])
# against a ground-truth edit mask (B x H x W, bool). Forms from the project's MMGrad notes 3.4.
# ---------------------------------------------------------------------------------------------

ATTENTION_LOSSES = ("amc_margin", "energy", "mse")


def _inside_outside(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inside, outside = masks.float(), (~masks).float()
    mean_in = (maps * inside).sum(dim=(1, 2)) / inside.sum(dim=(1, 2)).clamp_min(1)
    mean_out = (maps * outside).sum(dim=(1, 2)) / outside.sum(dim=(1, 2)).clamp_min(1)
    return mean_in, mean_out


def amc_margin_loss(maps: torch.Tensor, masks: torch.Tensor, mean_margin: float = 0.1,
                    max_margin: float = 0.5) -> torch.Tensor:
    """AMC's grounding loss (Yang et al., CVPR 2023): 0.2 * L1 + 0.8 * L2 with
    L1 = mean of max(0, mean(M outside) - mean(M inside) + 0.1) and
    L2 = mean of max(0, max(M outside) - max(M inside) + 0.5)."""
    mean_in, mean_out = _inside_outside(maps, masks)
    max_in = maps.masked_fill(~masks, float("-inf")).amax(dim=(1, 2))
    max_out = maps.masked_fill(masks, float("-inf")).amax(dim=(1, 2))
    l1 = F.relu(mean_out - mean_in + mean_margin).mean()
    l2 = F.relu(max_out - max_in + max_margin).mean()
    return 0.2 * l1 + 0.8 * l2


def energy_loss(maps: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - share of the map's mass inside the mask (a differentiable energy-in-mask)."""
    inside = (maps * masks.float()).sum(dim=(1, 2))
    return (1 - inside / (maps.sum(dim=(1, 2)) + eps)).mean()


def attention_loss(maps: torch.Tensor, masks: torch.Tensor, form: str = "amc_margin") -> torch.Tensor:
    """The attention loss of the items whose mask is neither empty nor full (AMC gates the same
    way); zero, still attached to the graph, when no item qualifies."""
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have one shape")
    if form not in ATTENTION_LOSSES:
        raise ValueError(f"unknown attention loss {form!r} (known: {', '.join(ATTENTION_LOSSES)})")
    area = masks.sum(dim=(1, 2))
    usable = (area > 0) & (area < masks[0].numel())
    if not usable.any():
        return maps.sum() * 0.0
    maps, masks = maps[usable], masks[usable]
    if form == "amc_margin":
        return amc_margin_loss(maps, masks)
    if form == "energy":
        return energy_loss(maps, masks)
    return (maps - masks.float()).pow(2).mean()
