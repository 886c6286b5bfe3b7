"""Grad-CAM for CIR models and MMGrad, the text-conditioned gradient attention of Udhayanan,
Karanam and Srinivasan (arXiv 2308.16649), as reconstructed in the project's MMGrad notes (section
3.3): the paper's exact scalar is not public, so each choice below is a named switch.

All maps are taken w.r.t. a backbone feature map A (B x C x h x w) that is fed back through the
model: every registered model accepts a precomputed map wherever it accepts pixels (see
`ImageEncoder.feature_map`), so no hooks are needed. Call the model in eval mode for explanations:
in train mode BatchNorm couples the items of a batch, so an item's map then depends on the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cirlab.models.base import CIRModel

SIDES: tuple[str, ...] = ("reference", "target")
# Names follow the notes' `mmgrad.scalar` switch.
MMGRAD_SCALARS: tuple[str, ...] = ("diff_thresh", "diff_l2", "sim", "retrieval_score")
# What users pick: MMGrad with its default scalar, or Grad-CAM of the retrieval score itself.
METHOD_SCALARS: dict[str, str] = {"mmgrad": "diff_thresh", "gradcam": "retrieval_score"}


def method_scalar(method: str) -> str:
    if method not in METHOD_SCALARS:
        raise ValueError(f"unknown explanation method {method!r} (known: {', '.join(METHOD_SCALARS)})")
    return METHOD_SCALARS[method]


def gradcam(score_fn: Callable[[Tensor], Tensor], feature_map: Tensor, create_graph: bool = False) -> Tensor:
    """Grad-CAM of one scalar per item w.r.t. ``feature_map`` (B x C x h x w, requires grad).

    alpha_c = spatial mean of dScore/dA_c, map = ReLU(sum_c alpha_c A_c): B x h x w, unnormalised.
    Items are explained together by differentiating the batch sum, which is exact as long as items
    do not interact (eval mode). ``create_graph=True`` keeps the graph of the gradient itself, so a
    loss on the map can be backpropagated (second order, as a trainable attention loss needs).
    A score that does not depend on the map (e.g. a text-only model) gives an all-zero map.
    """
    if not feature_map.requires_grad:
        raise ValueError("feature_map must require grad (call .requires_grad_() on it)")
    scores = score_fn(feature_map)
    if scores.shape != feature_map.shape[:1]:
        raise ValueError(f"score_fn must return one score per item {tuple(feature_map.shape[:1])}, "
                         f"got shape {tuple(scores.shape)}")
    grads = None
    if scores.requires_grad:
        (grads,) = torch.autograd.grad(scores.sum(), feature_map, create_graph=create_graph, allow_unused=True)
    if grads is None:
        grads = torch.zeros_like(feature_map)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * feature_map).sum(dim=1))


def _explained_map(model: CIRModel, images: Tensor) -> Tensor:
    """The backbone map of ``images`` (pixels or a cached map) as a tensor that gradients reach.

    A map that already carries a graph (trainable backbone) keeps it, so a training loss on the
    attention map also reaches the backbone; otherwise (frozen backbone, cached map) it becomes a
    fresh leaf, leaving the caller's tensor untouched.
    """
    fmap = model.image_encoder.feature_map(images)
    return fmap if fmap.requires_grad else fmap.detach().requires_grad_()


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; known: {', '.join(SIDES)}")


def query_target_gradcam(model: CIRModel, reference: Tensor, texts: list[str], target: Tensor,
                         side: str = "reference", create_graph: bool = False) -> Tensor:
    """Grad-CAM (B x h x w) of each query's score with its own target,
    ``model.score(model.encode_queries(reference, texts), model.encode_targets(target))[i, i]``,
    w.r.t. the backbone map of the reference image (``side="reference"``) or of the target image.

    ``reference``/``target`` are pixel batches or cached backbone maps. Works under ``torch.no_grad``.
    """
    _check_side(side)
    with torch.enable_grad():
        if side == "reference":
            targets = model.encode_targets(target)

            def score_fn(fmap: Tensor) -> Tensor:
                return model.score(model.encode_queries(fmap, texts), targets).diagonal()

            return gradcam(score_fn, _explained_map(model, reference), create_graph)
        queries = model.encode_queries(reference, texts)

        def target_score_fn(fmap: Tensor) -> Tensor:
            return model.score(queries, model.encode_targets(fmap)).diagonal()

        return gradcam(target_score_fn, _explained_map(model, target), create_graph)


def mmgrad_scalar(z_reference: Tensor, z_target: Tensor, scalar: str = "diff_thresh",
                  top_fraction: float = 0.1) -> Tensor:
    """One scalar per item (B,) from the text-image features z_r = F(I_r, t), z_g = F(I_g, t) (B x D),
    both L2-normalised first so the scalar does not depend on feature scale:

    - ``diff_thresh``: d = |z_r - z_g|; s = sum of the k largest d_j, k = max(1, ceil(top_fraction * D)).
      The notes leave the threshold open ("top-k" or "mean + c * std"); top-k always keeps at least
      one component, so s never vanishes by construction.
    - ``diff_l2``: s = ||z_r - z_g||^2, the smooth variant without a threshold.
    - ``sim``: s = <z_r, z_g>, highlighting what the two sides share (an ablation).
    All three are symmetric in (z_r, z_g).
    """
    z_reference, z_target = F.normalize(z_reference, dim=-1), F.normalize(z_target, dim=-1)
    if scalar == "diff_thresh":
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        difference = (z_reference - z_target).abs()
        k = max(1, math.ceil(top_fraction * difference.shape[-1]))
        return difference.topk(k, dim=-1).values.sum(dim=-1)
    if scalar == "diff_l2":
        return (z_reference - z_target).pow(2).sum(dim=-1)
    if scalar == "sim":
        return (z_reference * z_target).sum(dim=-1)
    raise ValueError(f"unknown feature scalar {scalar!r}; known: diff_thresh, diff_l2, sim")


def mmgrad(model: CIRModel, reference: Tensor, texts: list[str], target: Tensor, scalar: str = "diff_thresh",
           side: str = "reference", top_fraction: float = 0.1, create_graph: bool = False) -> Tensor:
    """MMGrad map (B x h x w, unnormalised): Grad-CAM of a scalar built from the text-image features
    of the reference and of the target image under the same modification text.

    F(I, t) := ``model.encode_queries(I, t)``, the model's composition of an image with a text (the
    notes' option C, late fusion): both images are composed with the same text t, which is how the
    text conditions the map. Models that ignore one input stay faithful to that: ``image_only``
    gives a text-independent map, ``text_only`` an all-zero one.

    ``scalar`` (default ``"diff_thresh"``, the notes' default): ``diff_thresh``, ``diff_l2`` or
    ``sim`` from z_r = F(I_r, t) and z_g = F(I_g, t) (see `mmgrad_scalar`), or ``retrieval_score``,
    the plain CIR score baseline, which is `query_target_gradcam`.
    ``side``: whose backbone map the gradient is taken w.r.t.: ``reference`` (the default, "where
    in my image the text asks for a change") or ``target`` ("where the change appears").

    The two images' passes draw the same random numbers (the generator is rewound before each), so in train
    mode, as the MMGrad training loss runs it, both see one dropout mask: |z_r - z_g| measures the images'
    difference, not dropout noise, and two identical images give a zero scalar. (Two independent masks, as a
    plain second call draws, made the scalar of two identical images nearly as large as that of two different
    ones.)
    """
    _check_side(side)
    if scalar not in MMGRAD_SCALARS:
        raise ValueError(f"unknown MMGrad scalar {scalar!r}; known: {', '.join(MMGRAD_SCALARS)}")
    if scalar == "retrieval_score":
        return query_target_gradcam(model, reference, texts, target, side, create_graph)
    explained, other = (reference, target) if side == "reference" else (target, reference)
    replay = RandomReplay(explained.device)
    with torch.enable_grad():
        other_map = model.image_encoder.feature_map(other)
        replay.rewind()
        explained_map = _explained_map(model, explained)
        replay.rewind()
        z_other = model.encode_queries(other_map, texts)

        def score_fn(fmap: Tensor) -> Tensor:
            replay.rewind()
            return mmgrad_scalar(model.encode_queries(fmap, texts), z_other, scalar, top_fraction)

        return gradcam(score_fn, explained_map, create_graph)


class RandomReplay:
    """Rewinds torch's CPU generator (and that of a CUDA `device`) to where they stood when this was made, so
    that two passes draw the same random numbers: the same dropout masks and stochastic-depth choices."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def upsample_map(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """B x h x w -> B x H x W: bilinear upsampling, then per-item min-max to [0, 1].

    A constant map (no location preferred) becomes all zeros. Differentiable, for use in a loss.
    """
    if cam.dim() != 3:
        raise ValueError(f"expected a B x h x w map, got shape {tuple(cam.shape)}")
    upsampled = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    low = upsampled.amin(dim=(1, 2), keepdim=True)
    spread = upsampled.amax(dim=(1, 2), keepdim=True) - low
    # Clamping (not adding eps) keeps non-constant maps exactly in [0, 1] and constant ones at 0.
    return (upsampled - low) / spread.clamp_min(1e-12)
