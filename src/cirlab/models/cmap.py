"""CMAP: Cross-Modal Attention Preservation with self-contrastive learning (Li et al., ACM TOMM 2024).

Follows the authors' code (an ARTEMIS fork; the paper's equations were not available to us), as the
project's notes read it. Where code and paper (figure, README) differ, the code is the default and the
other reading an option (`model.options`, names in brackets).

Image side (`cirlab.encoders.multilevel`): L = 3 levels of a frozen trunk [levels], default ResNet
layer2/3/4 or EfficientNet-Lite0 stage3/stage5/head; the code's cross-level interaction (the lower map
bilinearly shrunk onto the higher map's grid plus a 1x1 projection of the higher map, then a 3x3 conv),
GeM (p = 3) [gem_p], Linear, L2 normalisation: r_k, t_k, top level (k = 1) first. No fusion gate (the
README names one; the released code has none).

Text side: m = L2N(text feature), the BiGRU's two final states in the code (`model.text_encoder=bigru`,
GloVe from `model.text_weights`, frozen; learned embeddings without it). From m, shared by all levels:
A_m = softmax(MLP_m(m)) (modification attention), A_p = softmax(MLP_p(m)) (preservation attention), each
MLP Linear-ReLU-Linear over d = embed_dim dims, and E_m = L2N(Linear(m)) (the transformed text).

Score of query i (reference r, text m) and target j, exact for every pair (ARTEMIS's EM + IS per level,
summed over levels; the norm ||A * t|| is computed as sqrt(A^2 . t^2), so a B x N score is a few matrix
products, never one vector per query):

    s(i, j) = sum_k <E_m,i, L2N(A_m,i * t_j,k)> + <L2N(A_p,i * r_i,k), L2N(A_p,i * t_j,k)>

[scores]: "both" (the default: the code's full model), "em" or "is", one of the two terms alone: the code's
EM-only and IS-only ablations (`model_version`), which train and rank with that term only.

`encode_queries` returns the query state B x (4 + L) x d: rows m, E_m, A_m, A_p, then L2N(A_p * r_k) for
each level; `encode_targets` returns B x L x d (`score` also takes it flattened to B x L*d, as an index
keeps it). Search is two-stage (`cirlab.index.search`): `index_vectors` and `query_vectors` give a vector
index a shortlist by an estimate of the score, and `score` ranks the shortlist exactly.

Objective (`training_loss`; `train.loss` is not used): L = L_match + sc_weight * sum_k w_k L_SC,k with
- L_match = sum_k CE(exp(theta) S_k, diagonal): in-batch classification on each level's B x B scores,
  one learnable temperature theta (initial 2.65926) [logit_scale] shared by the levels;
- L_SC,k = sum_i max(0, delta_k + <a_i, L2N(A_p,i * t_i,k)> - <a_i, L2N(rev(A_p,i) * t_i,k)>), the
  self-contrastive hinge on each query's own target, with the reversed attention rev(A) = 2 mean(A) - A
  (sums to 1, may be negative): the text must lie closer to the target regions that preservation ignores
  than to those it keeps. Summed over the batch (the code's reduction, so it grows with the batch; under
  DDP the global batch). Margins delta = 0.6, 0.4, 0.3 [margins], level weights w = 1, 1, 0.5
  [sc_level_weights], sc_weight = 1 (0: the ablation without it) [sc_weight].
- anchor a = m + sc_transformed_weight * E_m: the code passes E_m as a second anchor with weight 0
  (a = m, the default); the figure draws E_s and E_m both as anchors (sc_transformed_weight > 0)
  [sc_transformed_weight].

Recipe choices elsewhere (configs/*/cmap*.yaml): AdamW (`train.optimizer=adamw`), lr 5e-4, weight decay
0.01, lr halved every quarter of training (the code: every 4 of 16 epochs). Images are resized and
centre-cropped as everywhere in cirlab (the code pads to a white square first, and trains on random
flips and crops, which cached maps cannot follow); the frozen backbone stays in eval mode (the code
leaves its BatchNorm updating statistics). Words are cirlab's tokens (TIRG's tokenizer, punctuation
deleted), not the code's NLTK vocabulary with <start>/<end>/<and>.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.multilevel import MultiLevelBackbone, MultiLevelImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.models.base import CIRModel
from cirlab.models.options import parse_options
from cirlab.models.registration import register_model

QUERY_ROWS = 4  # m, E_m, A_m, A_p: the rows of a query state before its per-level reference views
NORM_EPS = 1e-12  # F.normalize's floor on a norm
SCORES = ("both", "em", "is")  # which of the two per-level terms a CMAP scores with


@dataclass
class CMAPOptions:
    """`model.options` of CMAP (see the module docstring for what each one chooses)."""

    levels: list[str] | None = None   # trunk taps, lowest first (None: the backbone's strides 8/16/32)
    gem_p: float = 3.0
    margins: list[float] = field(default_factory=lambda: [0.6, 0.4, 0.3])          # top level first
    sc_level_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.5])  # top level first
    sc_weight: float = 1.0
    sc_transformed_weight: float = 0.0
    logit_scale: float = 2.65926
    scores: str = "both"                # "em" or "is": one term alone (the code's EM-only, IS-only)

    @classmethod
    def from_dict(cls, options: dict) -> CMAPOptions:
        return parse_options(cls, options, "CMAP")


def reversed_attention(attention: Tensor) -> Tensor:
    """2 * mean(A) - A over the last dim: the attention turned inside out, still summing to sum(A)."""
    return 2 * attention.mean(dim=-1, keepdim=True) - attention


def self_contrastive_loss(anchor: Tensor, attention: Tensor, targets: Tensor, margin: float) -> Tensor:
    """sum_i max(0, margin + <anchor_i, L2N(A_i * t_i)> - <anchor_i, L2N(rev(A_i) * t_i)>), all B x d."""
    kept = F.normalize(attention * targets, dim=-1)
    ignored = F.normalize(reversed_attention(attention) * targets, dim=-1)
    return F.relu(margin + (anchor * kept).sum(dim=-1) - (anchor * ignored).sum(dim=-1)).sum()


def _attention_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Softmax(dim=-1))


def _normalized_products(queries: Tensor, weights: Tensor, targets: Tensor) -> Tensor:
    """<q_i, L2N(w_i * t_j)> for every pair: (q * w) @ t^T / sqrt(w^2 @ (t^2)^T), B x N."""
    norms = (weights.square() @ targets.square().T).sqrt().clamp_min(NORM_EPS)
    return (queries * weights) @ targets.T / norms


class CMAP(CIRModel):
    """Per-level modification (EM) and preservation (IS) scores, summed; see the module docstring."""

    image_encoder: MultiLevelImageEncoder

    def __init__(self, image_encoder: MultiLevelImageEncoder, text_encoder: TextEncoder, embed_dim: int,
                 options: CMAPOptions) -> None:
        super().__init__(image_encoder, text_encoder)  # type: ignore[arg-type]  # a multi-level encoder
        self.levels = len(image_encoder.levels)
        for name in ("margins", "sc_level_weights"):
            if len(getattr(options, name)) != self.levels:
                raise ValueError(f"CMAP option {name} needs one value per level ({self.levels}: "
                                 f"{', '.join(image_encoder.levels)}), got {getattr(options, name)}")
        if text_encoder.out_dim != embed_dim:
            raise ValueError(f"CMAP needs a text feature of embed_dim {embed_dim}, got {text_encoder.out_dim}")
        if options.scores not in SCORES:
            raise ValueError(f"CMAP option scores must be one of {', '.join(SCORES)}, got {options.scores!r}")
        self.options = options
        self.modification_attention = _attention_mlp(embed_dim)
        self.preservation_attention = _attention_mlp(embed_dim)
        self.text_transform = nn.Linear(embed_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(options.logit_scale)))

    def encode_queries(self, images: Tensor, texts: list[str]) -> Tensor:
        sentence = F.normalize(self.text_encoder(texts), dim=-1)
        preservation = self.preservation_attention(sentence)
        text_rows = [sentence, F.normalize(self.text_transform(sentence), dim=-1),
                     self.modification_attention(sentence), preservation]
        preserved = F.normalize(preservation[:, None] * self.image_encoder(images), dim=-1)
        return torch.cat([torch.stack(text_rows, dim=1), preserved], dim=1)

    @property
    def _with_modification(self) -> bool:  # the EM term ([scores]: both or em)
        return self.options.scores in ("both", "em")

    @property
    def _with_preservation(self) -> bool:  # the IS term ([scores]: both or is)
        return self.options.scores in ("both", "is")

    def _checked_state(self, state: Tensor) -> Tensor:
        if state.dim() != 3 or state.shape[1] != QUERY_ROWS + self.levels:
            raise ValueError(f"a CMAP query state is B x {QUERY_ROWS + self.levels} x d, got {tuple(state.shape)}")
        return state

    def _per_level(self, state: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """The state checked, and the targets as N x L x d (they may come flattened, as an index stores them)."""
        return self._checked_state(state), targets.reshape(len(targets), self.levels, state.shape[-1])

    def level_scores(self, state: Tensor, targets: Tensor) -> list[Tensor]:
        """Each level's exact B x N score (EM + IS), top level first."""
        state, targets = self._per_level(state, targets)
        _, transformed, modification, preservation = state[:, :QUERY_ROWS].unbind(dim=1)
        return [(_normalized_products(transformed, modification, targets[:, k]) if self._with_modification else 0)
                + (_normalized_products(state[:, QUERY_ROWS + k], preservation, targets[:, k])
                   if self._with_preservation else 0)
                for k in range(self.levels)]

    def score(self, queries: Tensor, targets: Tensor) -> Tensor:
        return torch.stack(self.level_scores(queries, targets)).sum(dim=0)

    # The normalisation ||A * t_k|| couples each query with each target, so no pair of vectors scores
    # exactly: an index shortlists by `index_vectors` and `score` ranks the shortlist.
    vectors_score_exactly = False

    def index_vectors(self, targets: Tensor) -> Tensor:
        """The unit level features t_k side by side (N x L*d), for the shortlist of a two-stage search."""
        return F.normalize(targets.reshape(len(targets), self.levels, -1), dim=-1).flatten(1)

    def query_vectors(self, queries: Tensor) -> Tensor:
        """Per level, a_k = E_m * A_m / ||A_m|| + L2N(A_p * r_k) * A_p / ||A_p|| (B x L*d), so that
        <a_k, t_k> is a level's score with ||A * t_k|| replaced by ||A|| ||t_k|| / sqrt(d), the value it
        has when t_k spreads evenly over the d dims (the sqrt(d), common to every term, is left out).
        Derived from the trained weights, not trained itself: a shortlist ranks by it, `score` then exactly."""
        state = self._checked_state(queries)
        _, transformed, modification, preservation = state[:, :QUERY_ROWS].unbind(dim=1)
        modification = modification / modification.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        preservation = preservation / preservation.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return torch.cat([(transformed * modification if self._with_modification else 0)
                          + (state[:, QUERY_ROWS + k] * preservation if self._with_preservation else 0)
                          for k in range(self.levels)], dim=1)

    def loss_features(self, queries: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        return queries, candidates  # per-pair scores: the states are scored in `training_loss`

    def self_contrastive(self, state: Tensor, targets: Tensor) -> Tensor:
        """sum_k w_k L_SC,k over the batch, each query against its own target."""
        state, targets = self._per_level(state, targets)
        sentence, transformed, _, preservation = state[:, :QUERY_ROWS].unbind(dim=1)
        anchor = sentence + self.options.sc_transformed_weight * transformed
        return sum(weight * self_contrastive_loss(anchor, preservation, targets[:, k], margin)
                   for k, (weight, margin) in enumerate(zip(self.options.sc_level_weights, self.options.margins,
                                                            strict=True)))

    def training_loss(self, queries: Tensor, candidates: Tensor,
                      retrieval_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        labels = torch.arange(len(queries), device=queries.device)
        scale = self.logit_scale.exp()
        loss = sum(F.cross_entropy(scale * scores, labels) for scores in self.level_scores(queries, candidates))
        if self.options.sc_weight:
            loss = loss + self.options.sc_weight * self.self_contrastive(queries, candidates)
        return loss


@register_model("cmap")
def _cmap(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> CMAP:
    options = CMAPOptions.from_dict(config.options)
    backbone = MultiLevelBackbone(config.image_backbone, image_encoder.backbone, options.levels)
    encoder = MultiLevelImageEncoder(backbone, config.embed_dim, config.freeze_backbone, options.gem_p)
    return CMAP(encoder, text_encoder, config.embed_dim, options)
