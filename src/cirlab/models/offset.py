"""OFFSET: Segmentation-based Focus Shift Revision for CIR (Chen et al., ACM MM 2025), after the public
code (HEAD 408bece) as the project's notes describe it (cmap_offset.md, section 2), on any towers.

Inputs: every image comes with a soft mask of its dominant portion (`cirlab.masks`; option `masks`),
fed to the image tower as a grey image, as OFFSET feeds CLIPSeg's masks to CLIP. From the towers'
interfaces: a photo's tokens X (N x C, C = the backbone's channels): the tower's own patch tokens where
it has them (a CLIP ViT's, after ln_post, as the code takes them), else its map's h x w positions; its
global feature g = the image encoder's pooled feature (D = embed_dim); the same for the mask (X̌, ǧ);
the text's global feature t_g (D) and tokens T (token_dim, with a padding mask).

- Visual focus mapping (VFM), for references and targets: bidirectional cross-attention between the
  photo's and the mask's tokens (GroupNorm on each, heads [heads=4] with logits scaled by 1/sqrt(C),
  the full width, as the code), mask positions querying the photo (+ normalised photo) and photo
  positions querying the mask (+ normalised mask), fused per position by Linear(2C -> C) into X̃'.
  Global set [readout(X̃') + g, g, ǧ]; local set Linear(X̃') over the N tokens. The readout
  [fused_global]: `first_token` is the code's, X̃'_0 @ visual.proj, the fused map's first position
  through the CLIP tower's own output projection (no second ln_post: X̃' is built from ln_post tokens),
  so it adds no parameter and trains with the tower (frozen with it); `mean` is Linear(mean of X̃') of
  its own. See bug 3 below for why `mean` is the default.
- Textual focus mapping (TFM), queries only: the code's 1-D "cross-attention" between t_g and the
  reference mask's ǧ runs over sequences of length one, so each softmax is 1 and it reduces exactly
  to u = t_g + Out(V t_g), v = ǧ + Out(V ǧ); that reduced form is built (the code's query and key
  weights never receive a gradient). s = Linear([u; v]); global set [s + t_g, t_g, ǧ]; local set
  Linear(T). Which positions T holds [text_tokens]: `all` is the code's, every position of the CLIP
  text tower's fixed context (77 for ViT-H/14), padding after the end token included, unmasked in the
  focus projection; `valid` (the default) keeps only the text's own tokens, start to end, and is the
  only choice for encoders that pad to the batch's longest text (LSTM, BiGRU, MiniLM), where pooling the
  padding would make a text's features depend on its batch.
- Multi-grained focus projection (MG-FP) [focus_channels = P = 4]: W = softmax over tokens of
  W_b tanh(W_a S) (bias-free, D -> D/2 -> P), output W S: P focus channels per set, so 2P tokens per
  branch (global then local). Visual and textual branches have their own weights; within a branch the
  global and the local set share them.
- Textually guided focus revision [revision=true]: H = sigmoid(W2 LeakyReLU(W1 [F_r; F_m])) per token
  (2D -> D -> 2D), gamma, beta from H, F_c = gamma * F_r + beta * F_m. Without it (the ablation,
  revision=false) F_c = F_r + F_m.
- Query = mean of F_c's 2P tokens; target features = the target's 2P VFM tokens (B x 2P x D); score =
  cosine of the query with the mean of the target's tokens, exact and batched. An index stores only that
  unit mean (`index_vectors`), so any vector index ranks OFFSET as exactly as its factory allows.
- Loss (`train.loss` is not used; OFFSET has its own): batch-based classification
  CE(s * cos(q_i, t_j), diagonal) with a learnable s [logit_scale=10] (no exp, no clamp), plus kappa
  [kappa=0.5] x the focus-regularisation KL: z_i = L2N(flatten_k(w_k L2N(F_t,i,k))) with learnable
  per-token weights w (init 1), p_i = softmax_j(<z_i, z_j> / tau), q_i = softmax_j(cos(q_i, t_j) / tau)
  [tau=0.1], KL(p_i || q_i) averaged over the batch. The target side is not detached (as the code).

The code's bugs (notes 2.11), each decided here:
1. P vs Q: the code sizes the focus weights w with P + Q but has 2P target tokens, so it fails to
   broadcast unless P = Q. w has 2P entries here; where the code runs (P = Q) that is the same thing,
   so there is no option for it.
2. gamma/beta: the intended per-token split (gamma_k = H_k[:D], beta_k = H_k[D:]) is the default
   [revision_split=per_token]; `code` reproduces the code's reshape of the 2P x 2D gates to 4P x D,
   whose first 2P rows are gamma and last 2P rows beta (so gamma_k is the (k mod 2)-th half of H's
   token floor(k/2) of the first P tokens, beta likewise from the last P).
3. The first patch token (top-left) stands where the code probably meant the fused CLS token (CLS is
   dropped before the cross-attention, in the code as here). So the default readout of X̃' is its mean
   over positions [fused_global=mean], which also runs on towers without an output projection (CNNs);
   `first_token` is the code's behaviour and needs a CLIP tower (a ViT's `proj`, or a ModifiedResNet's
   attention-pool value and output maps, the same map its pooled feature ends with): on any other tower
   it is refused rather than replaced by a new Linear, which would be a different readout under the
   code's name.
Unlike the code, masks are pixel-aligned with their photos here (the same resize and crop; the code
crops them independently, notes 2.11-5).

Cost: the text tower runs once per query where the encoder gives its pooled feature and its tokens from
one pass (`pooled_and_tokens`: LSTM, CLIP), twice otherwise (BiGRU, MiniLM).

[masks] chooses the mask source: saliency (offline default), oracle (the synthetic garments' ground
truth), clipseg (masks built beforehand with `cirlab data masks --source clipseg`), or none: the
ablation without segmentation, every mask all white, with the architecture unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.text import TextEncoder
from cirlab.masks.batches import MaskedBatch, mask_images
from cirlab.masks.sources import MASK_SOURCES, create_mask_source
from cirlab.models.base import CIRModel
from cirlab.models.options import parse_options
from cirlab.models.registration import register_model

REVISION_SPLITS: tuple[str, ...] = ("per_token", "code")
FUSED_GLOBALS: tuple[str, ...] = ("mean", "first_token")
TEXT_TOKENS: tuple[str, ...] = ("valid", "all")
_GROUP_NORM_GROUPS = 16  # the code's GroupNorm(16, C); fewer where C is not a multiple of 16


@dataclass
class OffsetOptions:
    """`model.options` of OFFSET (see the module docstring for what each one chooses).

    Three options choose between the public code's behaviour and another reading of the method (the paper's
    text was not available to check; its figure is named where it speaks):
    - revision_split: `code`, the code's reshape | `per_token` (default), the split the figure draws;
    - fused_global: `first_token`, the code's X̃'_0 @ CLIP's visual.proj (CLIP image towers only) | `mean`
      (default, any tower), a Linear of the fused map's mean, for the fused CLS the code probably meant;
    - text_tokens: `all`, the code's every position of the CLIP text context, padding included (CLIP text
      towers only) | `valid` (default, any encoder), the text's own tokens from start to end.
    The defaults run on any towers (the garments recipes use them); a recipe reproducing the code on CLIP
    names the code's values.
    """

    masks: str = "saliency"
    focus_channels: int = 4          # P
    heads: int = 4
    revision: bool = True
    revision_split: str = "per_token"
    fused_global: str = "mean"
    text_tokens: str = "valid"
    kappa: float = 0.5
    tau: float = 0.1
    logit_scale: float = 10.0

    @classmethod
    def from_dict(cls, options: dict) -> OffsetOptions:
        parsed = parse_options(cls, options, "OFFSET", {"masks": MASK_SOURCES, "revision_split": REVISION_SPLITS,
                                                        "fused_global": FUSED_GLOBALS,
                                                        "text_tokens": TEXT_TOKENS})
        if parsed.focus_channels < 1 or parsed.tau <= 0:
            raise ValueError(f"OFFSET needs focus_channels >= 1 and tau > 0, got {parsed.focus_channels} "
                             f"and {parsed.tau}")
        return parsed


class MapCrossAttention(nn.Module):
    """VFM's bidirectional cross-attention of a photo's and its mask's tokens (one grid), fused per position."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"the image map's {channels} channels do not split into {heads} heads")
        self.heads = heads
        groups = math.gcd(_GROUP_NORM_GROUPS, channels)
        self.photo_norm, self.mask_norm = nn.GroupNorm(groups, channels), nn.GroupNorm(groups, channels)
        self.photo_qkv = nn.Linear(channels, 3 * channels, bias=False)   # the code's bias-free 1x1 convs
        self.mask_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.photo_out, self.mask_out = nn.Linear(channels, channels), nn.Linear(channels, channels)
        self.fuse = nn.Linear(2 * channels, channels)

    def _attend(self, queries: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        batch, length, channels = queries.shape

        def split(x: Tensor) -> Tensor:
            return x.reshape(batch, -1, self.heads, channels // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(queries), split(keys), split(values),
                                                  scale=1 / math.sqrt(channels))
        return attended.transpose(1, 2).reshape(batch, length, channels)

    def forward(self, photo_tokens: Tensor, mask_tokens: Tensor) -> Tensor:
        """Fused tokens X̃' (B x N x C) of the photo's and the mask's tokens (B x N x C each, one grid)."""
        if photo_tokens.shape != mask_tokens.shape:
            raise ValueError(f"photo and mask tokens differ in shape: {tuple(photo_tokens.shape)} vs "
                             f"{tuple(mask_tokens.shape)}")
        photo = self.photo_norm(photo_tokens.transpose(1, 2)).transpose(1, 2)
        mask = self.mask_norm(mask_tokens.transpose(1, 2)).transpose(1, 2)
        photo_q, photo_k, photo_v = self.photo_qkv(photo).chunk(3, dim=-1)
        mask_q, mask_k, mask_v = self.mask_qkv(mask).chunk(3, dim=-1)
        from_photo = self.photo_out(self._attend(mask_q, photo_k, photo_v)) + photo  # mask positions ask the photo
        from_mask = self.mask_out(self._attend(photo_q, mask_k, mask_v)) + mask      # photo positions ask the mask
        return self.fuse(torch.cat([from_photo, from_mask], dim=-1))


class FocusProjection(nn.Module):
    """MG-FP: P softmax-weighted pools of a token set (B x N x D -> B x P x D)."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.weights = nn.Sequential(nn.Linear(dim, dim // 2, bias=False), nn.Tanh(),
                                     nn.Linear(dim // 2, channels, bias=False))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        logits = self.weights(tokens).transpose(1, 2)  # B x P x N
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        return logits.softmax(dim=-1) @ tokens


class VisualFocusMapping(nn.Module):
    """VFM. `tower_projection` (C -> D), when given, is the image tower's own output projection, through which
    the fused map's first token is read out (the code's); without it the readout is a Linear of the mean."""

    def __init__(self, channels: int, dim: int, focus_channels: int, heads: int,
                 tower_projection: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.attention = MapCrossAttention(channels, heads)
        # A plain attribute, not a submodule: the tower's parameters stay registered once, under the tower.
        self.tower_projection = tower_projection
        if tower_projection is None:
            self.global_projection = nn.Linear(channels, dim)
        self.local_projection = nn.Linear(channels, dim)
        self.focus = FocusProjection(dim, focus_channels)

    def readout(self, fused: Tensor) -> Tensor:
        """B x D global readout of the fused tokens X̃' (B x N x C)."""
        if self.tower_projection is None:
            return self.global_projection(fused.mean(dim=1))
        return self.tower_projection(fused[:, 0])

    def global_set(self, fused: Tensor, photo_global: Tensor, mask_global: Tensor) -> Tensor:
        """[readout(X̃') + g, g, ǧ], B x 3 x D."""
        return torch.stack([self.readout(fused) + photo_global, photo_global, mask_global], dim=1)

    def forward(self, photo_tokens: Tensor, mask_tokens: Tensor, photo_global: Tensor, mask_global: Tensor) -> Tensor:
        """The 2P focus tokens (B x 2P x D): P of the global set, then P of the local set."""
        fused = self.attention(photo_tokens, mask_tokens)
        global_set = self.global_set(fused, photo_global, mask_global)
        return torch.cat([self.focus(global_set), self.focus(self.local_projection(fused))], dim=1)


class TextualFocusMapping(nn.Module):
    def __init__(self, token_dim: int, dim: int, focus_channels: int) -> None:
        super().__init__()
        self.text_value, self.text_out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.mask_value, self.mask_out = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim)
        self.mix = nn.Linear(2 * dim, dim)
        self.local_projection = nn.Linear(token_dim, dim)
        self.focus = FocusProjection(dim, focus_channels)

    def forward(self, text_global: Tensor, tokens: Tensor, token_mask: Tensor | None, mask_global: Tensor) -> Tensor:
        """The text's 2P focus tokens (B x 2P x D), mixed with the reference mask's global feature; the local set
        pools the positions `token_mask` marks (None: all of them)."""
        text = text_global + self.text_out(self.text_value(text_global))
        mask = mask_global + self.mask_out(self.mask_value(mask_global))
        mixed = self.mix(torch.cat([text, mask], dim=-1))
        global_set = torch.stack([mixed + text_global, text_global, mask_global], dim=1)
        return torch.cat([self.focus(global_set), self.focus(self.local_projection(tokens), token_mask)], dim=1)


class FocusRevision(nn.Module):
    """F_c = gamma * F_r + beta * F_m with gamma, beta from a per-token MLP of [F_r; F_m]."""

    def __init__(self, dim: int, split: str) -> None:
        super().__init__()
        self.split = split
        self.gates = nn.Sequential(nn.Linear(2 * dim, dim), nn.LeakyReLU(0.01), nn.Linear(dim, 2 * dim), nn.Sigmoid())

    def gamma_beta(self, visual: Tensor, textual: Tensor) -> tuple[Tensor, Tensor]:
        gates = self.gates(torch.cat([visual, textual], dim=-1))  # B x 2P x 2D
        if self.split == "per_token":
            gamma, beta = gates.chunk(2, dim=-1)
            return gamma, beta
        batch, tokens, width = gates.shape
        rows = gates.reshape(batch, 2 * tokens, width // 2)  # the code's reshape (see the module docstring)
        return rows[:, :tokens], rows[:, tokens:]

    def forward(self, visual: Tensor, textual: Tensor) -> Tensor:
        gamma, beta = self.gamma_beta(visual, textual)
        return gamma * visual + beta * textual


def image_tower_projection(backbone: nn.Module, embed_dim: int) -> Callable[[Tensor], Tensor]:
    """The image tower's own token projection (C -> embed_dim), which fused_global=first_token reads through."""
    project = getattr(backbone, "project_tokens", None)
    if project is None:
        raise ValueError("OFFSET fused_global=first_token reads the fused first token through the image tower's own "
                         "output projection, which only CLIP towers have (model.image_backbone=clip:NAME); this "
                         "backbone has none: use fused_global=mean")
    if backbone.embed_dim != embed_dim:
        raise ValueError(f"OFFSET fused_global=first_token: the image tower projects to {backbone.embed_dim}, not "
                         f"model.embed_dim={embed_dim} (use model.pooling=tower and its embed_dim)")
    return project


def focus_regularisation(queries: Tensor, targets: Tensor, focus_codes: Tensor, tau: float) -> Tensor:
    """(1/B) sum_i KL(p_i || q_i), p_i = softmax_j(<z_i, z_j> / tau) over the targets' focus codes z (B x F),
    q_i = softmax_j(<q_i, t_j> / tau) over unit queries and targets (B x D)."""
    soft_labels = (focus_codes @ focus_codes.T / tau).softmax(dim=1)
    return F.kl_div((queries @ targets.T / tau).log_softmax(dim=1), soft_labels, reduction="batchmean")


class OFFSET(CIRModel):
    """Dual focus mapping, multi-grained focus projection and textually guided focus revision."""

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, embed_dim: int,
                 options: OffsetOptions) -> None:
        super().__init__(image_encoder, text_encoder)
        if image_encoder.out_dim != embed_dim or text_encoder.out_dim != embed_dim:
            raise ValueError(f"OFFSET mixes image and text features of one size: image {image_encoder.out_dim}, "
                             f"text {text_encoder.out_dim}, embed_dim {embed_dim}")
        self.options = options
        self.embed_dim = embed_dim
        self.mask_source = create_mask_source(options.masks)
        if options.text_tokens == "all" and getattr(text_encoder, "context_length", None) is None:
            raise ValueError(f"OFFSET text_tokens=all pools every position of a fixed text context (a CLIP text "
                             f"tower's); {type(text_encoder).__name__} pads to the batch's longest text, so its "
                             "features would depend on the batch: use text_tokens=valid")
        points = options.focus_channels
        backbone = image_encoder.backbone
        projection = image_tower_projection(backbone, embed_dim) if options.fused_global == "first_token" else None
        self.visual = VisualFocusMapping(backbone.out_channels, embed_dim, points, options.heads, projection)
        self.textual = TextualFocusMapping(text_encoder.token_dim, embed_dim, points)
        self.revision = FocusRevision(embed_dim, options.revision_split) if options.revision else None
        self.logit_scale = nn.Parameter(torch.tensor(float(options.logit_scale)))
        self.focus_weights = nn.Parameter(torch.ones(2 * points))

    def _maps(self, images: Tensor | MaskedBatch) -> tuple[Tensor, Tensor]:
        """The photos' and the masks' backbone maps of a masked batch, or of bare pixels whose masks the
        mask source computes."""
        if isinstance(images, MaskedBatch):
            photos, masks = images.images, images.masks
        elif images.dim() == 4 and images.shape[1] == 3:
            photos, masks = images, mask_images(self.mask_source.from_pixels(images))
        else:
            raise ValueError(f"OFFSET needs every image's mask: a batch of backbone maps (shape {tuple(images.shape)}) "
                             "must come with its masks (see cirlab.masks.batches.attach_masks)")
        return self.image_encoder.feature_map(photos), self.image_encoder.feature_map(masks)

    def _tokens(self, fmap: Tensor) -> Tensor:
        """A backbone map's tokens (B x N x C): the tower's own patch tokens where it has them (a CLIP ViT's,
        after ln_post, as OFFSET takes them), else the map's positions in raster order."""
        patch_tokens = getattr(self.image_encoder.backbone, "patch_tokens", None)
        return fmap.flatten(2).transpose(1, 2) if patch_tokens is None else patch_tokens(fmap)

    def _visual(self, images: Tensor | MaskedBatch) -> tuple[Tensor, Tensor]:
        """VFM tokens (B x 2P x D) and the masks' global features (B x D)."""
        photo_map, mask_map = self._maps(images)
        photo_global, mask_global = self.image_encoder.pool(photo_map), self.image_encoder.pool(mask_map)
        visual = self.visual(self._tokens(photo_map), self._tokens(mask_map), photo_global, mask_global)
        return visual, mask_global

    def _textual(self, texts: list[str], mask_global: Tensor) -> Tensor:
        """TFM tokens (B x 2P x D) of the texts, with the reference masks' global features (B x D)."""
        sentence, tokens, token_mask = self.text_encoder.pooled_and_tokens(texts)
        pooled_positions = token_mask if self.options.text_tokens == "valid" else None  # None: all, as the code
        return self.textual(sentence, tokens, pooled_positions, mask_global)

    def encode_queries(self, images: Tensor | MaskedBatch, texts: list[str]) -> Tensor:
        visual, mask_global = self._visual(images)
        textual = self._textual(texts, mask_global)
        composed = visual + textual if self.revision is None else self.revision(visual, textual)
        return composed.mean(dim=1)

    def encode_targets(self, images: Tensor | MaskedBatch) -> Tensor:
        return self._visual(images)[0]

    def index_vectors(self, targets: Tensor) -> Tensor:
        """The unit mean of each target's focus tokens (N x D); targets are N x 2P x D, or flattened to
        N x 2P*D. `score` is the inherited cosine with the query, so an index of these ranks exactly."""
        tokens = targets.reshape(len(targets), -1, self.embed_dim)
        return F.normalize(tokens.mean(dim=1), dim=-1)

    def loss_features(self, queries: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """What the loss needs, computed inside the training forward so that DDP sees every parameter the loss
        uses: [s * q^, q^] per query (B x 2D) and [t^, z] per target (B x (D + 2P*D)), ^ = unit length."""
        unit_queries = F.normalize(queries, dim=-1)
        unit_targets = F.normalize(candidates.mean(dim=1), dim=-1)
        weighted = self.focus_weights[None, :, None] * F.normalize(candidates, dim=-1)
        codes = F.normalize(weighted.flatten(1), dim=-1)
        return (torch.cat([self.logit_scale * unit_queries, unit_queries], dim=-1),
                torch.cat([unit_targets, codes], dim=-1))

    def training_loss(self, queries: Tensor, candidates: Tensor,
                      retrieval_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Batch-based classification + kappa x focus regularisation, over `loss_features`' outputs."""
        dim = self.embed_dim
        scaled, unit_queries = queries[:, :dim], queries[:, dim:]
        unit_targets, codes = candidates[:, :dim], candidates[:, dim:]
        labels = torch.arange(len(queries), device=queries.device)
        classification = F.cross_entropy(scaled @ unit_targets.T, labels)
        return classification + self.options.kappa * focus_regularisation(unit_queries, unit_targets, codes,
                                                                          self.options.tau)


@register_model("offset")
def _offset(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> OFFSET:
    return OFFSET(image_encoder, text_encoder, config.embed_dim, OffsetOptions.from_dict(config.options))
