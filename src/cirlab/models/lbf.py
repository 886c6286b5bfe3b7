"""LBF: Composed Query Image Retrieval Using Locally Bounded Features (Hosseinzadeh & Wang, CVPR 2020).

What is known (from a talk's slides on the paper; no code was released and the method section's
details were not available to us):
- the image is a set of K regions ("entities"; K = 36 "big", K = 18 "small"), each a visual feature e
  from a pretrained Faster R-CNN, plus a positional feature p = Linear([N(x), N(y), N(w), N(h)]);
- c = Linear(avg(e, p)); C_1 = {c^1..c^K} goes through VEP, a self-attention stack, giving V (K x d);
- each word w of the text is Emb(w) + P(w) (a word and a position embedding); TEP, a self-attention
  stack "similar to the visual one", gives W (n x d);
- fusion by cross-modal attention: linguistically attended visual features and visually attended
  linguistic features, jointly f(I, M); the target is g(I_t); soft triplet or batch classification.

Reconstructed here (option name in brackets where it is a switch; the default first):
- region source [regions]: `proposals` computed here (the whole image, then graph-segmentation
  boxes, largest first [proposal_scales, proposal_sigma, proposal_min_size, proposal_overlap];
  RoI-aligned backbone features) | `detector` (the paper's: boxes and features from bottom-up-attention
  files [region_dir, region_dim]) | `boxes` (file boxes, features RoI-aligned here) | `grid` (a fixed
  grid of K cells). See cirlab.encoders.regions.
- N(.) [anchor]: x, y = the box's top-left corner, divided by the image width and height, w and h
  likewise | `center` (the box centre).
- avg(e, p) is the element-wise mean, so p = Linear(4 -> dim(e)), then Linear(dim(e) -> d) and a
  LayerNorm; the alternative (project e first, then add p, as LXMERT) is not built.
- VEP and TEP are post-norm Transformer encoder layers [visual_layers=2, text_layers=2, width=512,
  heads=8, dropout=0.1] with padding masks; the paper's depths and widths are unknown. TEP's position
  embedding is learned over [max_words=32] positions; longer texts are truncated, as transformer text
  encoders do. TEP embeds the training vocabulary (the configured `lstm` encoder's; the LSTM itself is
  dropped); an LSTM/GRU under the self-attention is the other reading, not built.
- cross-modal fusion, per layer [cross_layers=1]: regions attend to words (linguistically attended
  visual features V' = LN(V + Attn(V, W)), then a feed-forward block) and words attend to regions
  (visually attended linguistic features W' likewise), both from the previous layer's V and W (LXMERT's
  co-attention). The word-to-region weights of the last layer, averaged over heads, are what
  `attention()` returns.
- f(I, M) [combine]: `sum`: Linear(mean(V') + mean(W')), the Linear shared with the target side, so a
  text that changes nothing leaves f near g(I) | `concat`: its own Linear([mean(V'); mean(W')]).
  Means are over real regions and words only.
- g(I_t) = Linear(mean(V)) with the same region extractor, VEP and Linear (siamese), no text branch.
- K [num_regions=36]: "big" vs "small" differ in K only; RoI features are [roi_size=2] x 2 cells of
  the backbone map, flattened (C * 4 values per region).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cirlab.config import ModelConfig
from cirlab.encoders.image import ImageEncoder
from cirlab.encoders.regions import (
    RegionBatch,
    RegionSource,
    create_region_source,
    position_features,
)
from cirlab.encoders.text import TextEncoder, Vocabulary, tokenize
from cirlab.models.base import CIRModel
from cirlab.models.options import parse_options
from cirlab.models.registration import register_model

COMBINES: tuple[str, ...] = ("sum", "concat")


@dataclass
class LBFOptions:
    """`model.options` of LBF (see the module docstring for what each one chooses)."""

    regions: str = "proposals"
    num_regions: int = 36
    region_dir: str | None = None
    region_dim: int = 2048          # feature size in detector files (regions=detector only)
    roi_size: int = 2
    anchor: str = "corner"
    width: int = 512
    heads: int = 8
    visual_layers: int = 2
    text_layers: int = 2
    cross_layers: int = 1
    max_words: int = 32
    dropout: float = 0.1
    combine: str = "sum"
    proposal_scales: list[float] = field(default_factory=lambda: [100.0])
    proposal_sigma: float = 0.8
    proposal_min_size: int = 20
    proposal_overlap: float = 0.9

    @classmethod
    def from_dict(cls, options: dict) -> LBFOptions:
        return parse_options(cls, options, "LBF", {"combine": COMBINES})


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of the rows where `mask` (B x n) is True."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


class SelfAttentionStack(nn.Module):
    """Post-norm Transformer encoder layers over a padded set or sequence (zero layers = identity)."""

    def __init__(self, width: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout, batch_first=True)
            for _ in range(layers))

    def forward(self, values: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            values = layer(values, src_key_padding_mask=~mask)
        return values


class CrossAttention(nn.Module):
    """`queries` attend to `context` (padding masked), then a residual feed-forward block."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Dropout(dropout),
                                          nn.Linear(4 * width, width), nn.Dropout(dropout))
        self.output_norm = nn.LayerNorm(width)

    def forward(self, queries: Tensor, context: Tensor, context_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Updated queries and the attention weights (B x n_queries x n_context, mean over heads)."""
        attended, weights = self.attention(queries, context, context, key_padding_mask=~context_mask,
                                           need_weights=True, average_attn_weights=True)
        queries = self.norm(queries + self.dropout(attended))
        return self.output_norm(queries + self.feed_forward(queries)), weights


class WordTransformer(TextEncoder):
    """TEP: Emb(w) + P(position) -> LayerNorm -> dropout -> self-attention stack, one feature per word."""

    def __init__(self, vocab: Vocabulary, width: int, heads: int, layers: int, max_words: int,
                 dropout: float) -> None:
        super().__init__()
        self.vocab = vocab
        self.max_words = max_words
        self.out_dim = self.token_dim = width
        self.embedding = nn.Embedding(len(vocab), width)
        self.position = nn.Embedding(max_words, width)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.stack = SelfAttentionStack(width, heads, layers, dropout)

    def words(self, text: str) -> list[str]:
        """The tokens TEP sees for `text` (an empty text is one padding token, marked real)."""
        return tokenize(text)[: self.max_words] or [Vocabulary.UNK]

    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        encoded = [self.vocab.encode(text)[: self.max_words] or [0] for text in texts]
        length = max(len(ids) for ids in encoded)
        ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in encoded], device=self.device)
        mask = torch.tensor([[i < len(row) for i in range(length)] for row in encoded], device=self.device)
        positions = self.position(torch.arange(length, device=self.device))
        tokens = self.dropout(self.norm(self.embedding(ids) + positions))
        return self.stack(tokens, mask), mask

    def forward(self, texts: list[str]) -> Tensor:
        tokens, mask = self.forward_tokens(texts)
        return masked_mean(tokens, mask)


@dataclass
class WordRegionAttention:
    """Which region each word chose: `weights[b, i, k]` is word i's attention on region k of query b."""

    words: list[list[str]]       # the tokens of each text, as the model saw them
    weights: Tensor              # B x n x K (rows of padded words are meaningless; padded regions get 0)
    boxes: Tensor                # B x K x 4 normalised [x0, y0, x1, y1]
    region_mask: Tensor          # B x K, True = a real region


class LBF(CIRModel):
    """Region self-attention (VEP), word self-attention (TEP), cross-modal co-attention, pooled."""

    text_encoder: WordTransformer

    def __init__(self, image_encoder: ImageEncoder, text_encoder: WordTransformer, region_source: RegionSource,
                 embed_dim: int, options: LBFOptions) -> None:
        super().__init__(image_encoder, text_encoder)
        self.region_source = region_source
        self.options = options
        image_encoder.head = nn.Identity()  # regions are pooled here, not by the encoder's head
        if region_source.name == "detector":  # features come from files: the backbone is never run
            image_encoder.backbone.requires_grad_(False)
        width = options.width
        region_dim = (options.region_dim if region_source.name == "detector"
                      else image_encoder.backbone.out_channels * options.roi_size ** 2)
        self.position = nn.Linear(4, region_dim)
        self.region_projection = nn.Sequential(nn.Linear(region_dim, width), nn.LayerNorm(width))
        self.visual = SelfAttentionStack(width, options.heads, options.visual_layers, options.dropout)
        self.regions_to_words = nn.ModuleList(CrossAttention(width, options.heads, options.dropout)
                                              for _ in range(options.cross_layers))
        self.words_to_regions = nn.ModuleList(CrossAttention(width, options.heads, options.dropout)
                                              for _ in range(options.cross_layers))
        self.output = nn.Linear(width, embed_dim)
        self.query_output = nn.Linear(2 * width, embed_dim) if options.combine == "concat" else None

    def region_features(self, images: Tensor | RegionBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Visual features e (B x K x D), boxes (B x K x 4) and mask (B x K) of a batch; K is trimmed to
        the most regions any image of the batch has."""
        if not isinstance(images, RegionBatch):
            images = RegionBatch(images, *self.region_source.boxes_of(images))
        batch = images.trimmed()
        detector = self.region_source.name == "detector"
        if (batch.features is not None) != detector:
            raise ValueError(f'this LBF model takes regions from "{self.region_source.name}", but the batch '
                             f"{'lacks' if detector else 'carries'} detector features")
        if batch.features is not None:
            return batch.features, batch.boxes, batch.mask
        feature_map = self.image_encoder.feature_map(batch.images)
        return self.region_source.features(feature_map, batch.boxes, self.options.roi_size), batch.boxes, batch.mask

    def double_backward_blocker(self) -> str | None:
        if self.region_source.name == "grid":  # a fixed matrix (GridRegions.features), which has one
            return None
        if self.region_source.name == "detector":
            return "LBF with detector regions reads its features from files: there is no backbone map to explain"
        return (f'LBF with regions "{self.region_source.name}" pools with torchvision\'s roi_align, which has no '
                "double backward: MMGrad training of LBF needs model.options.regions=grid")

    def visual_features(self, images: Tensor | RegionBatch) -> tuple[Tensor, Tensor, Tensor]:
        """VEP output V (B x K x width), boxes and region mask."""
        regions, boxes, mask = self.region_features(images)
        positions = self.position(position_features(boxes, self.options.anchor).to(regions.dtype))
        return self.visual(self.region_projection((regions + positions) / 2), mask), boxes, mask

    def _compose(self, images: Tensor | RegionBatch, texts: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        visual, boxes, region_mask = self.visual_features(images)
        words, word_mask = self.text_encoder.forward_tokens(texts)
        weights = visual.new_zeros(0)
        for to_words, to_regions in zip(self.regions_to_words, self.words_to_regions, strict=True):
            attended_visual, _ = to_words(visual, words, word_mask)
            words, weights = to_regions(words, visual, region_mask)
            visual = attended_visual
        pooled_visual, pooled_words = masked_mean(visual, region_mask), masked_mean(words, word_mask)
        if self.query_output is not None:
            composed = self.query_output(torch.cat([pooled_visual, pooled_words], dim=-1))
        else:
            composed = self.output(pooled_visual + pooled_words)
        return composed, weights, boxes, region_mask

    def encode_queries(self, images: Tensor | RegionBatch, texts: list[str]) -> Tensor:
        return self._compose(images, texts)[0]

    def encode_targets(self, images: Tensor | RegionBatch) -> Tensor:
        visual, _, mask = self.visual_features(images)
        return self.output(masked_mean(visual, mask))

    def attention(self, images: Tensor | RegionBatch, texts: list[str]) -> WordRegionAttention:
        """The word-to-region attention of the last cross-modal layer (call in eval mode)."""
        if not self.regions_to_words:
            raise ValueError("this LBF model has no cross-modal layer (cross_layers=0), so no word attends a region")
        _, weights, boxes, mask = self._compose(images, texts)
        return WordRegionAttention([self.text_encoder.words(text) for text in texts], weights, boxes, mask)


@register_model("lbf")
def _lbf(image_encoder: ImageEncoder, text_encoder: TextEncoder, config: ModelConfig) -> LBF:
    options = LBFOptions.from_dict(config.options)
    vocab = getattr(text_encoder, "vocab", None)
    if vocab is None:
        raise ValueError("LBF embeds the words of the training vocabulary: use text_encoder=lstm (its vocabulary "
                         "is used, the LSTM itself is not)")
    source = create_region_source(options.regions, options.num_regions, options.region_dir, options.proposal_scales,
                                  options.proposal_sigma, options.proposal_min_size, options.proposal_overlap)
    words = WordTransformer(vocab, options.width, options.heads, options.text_layers, options.max_words,
                            options.dropout)
    return LBF(image_encoder, words, source, config.embed_dim, options)
