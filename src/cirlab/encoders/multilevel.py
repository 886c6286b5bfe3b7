"""Multi-level image features with CMAP's cross-level interaction, over a ResNet or EfficientNet-Lite0 trunk.

The trunk is tapped at L levels, lowest first: ResNet layer2, layer3, layer4 (C2, C3, C4; 28, 14 and 7
pixels square at 224 px input) or, for EfficientNet-Lite0, the stages of matching strides 8, 16 and 32
(stage3, stage5, head). As in the CMAP code (`encoders.py`), the level features are, top level first:

    H1 = C4
    H2 = Conv3x3( resize(C3 -> C4's grid) + Conv1x1(C4) )      (C3's channels, on C4's grid)
    H3 = Conv3x3( resize(C2 -> C3's grid) + Conv1x1(C3) )      (C2's channels, on C3's grid)
    e_k = L2N( Linear( GeM_p(H_k) ) )                          (out_dim, p = 3)

"resize" is bilinear (align_corners=False, PyTorch's `upsample` default): it *shrinks* the lower map onto
the higher one's grid, where the higher level's projected semantics are added. H3 uses the raw C3, not H2,
exactly as the code does; every convolution has a bias. The README's "fusion gate" is not in the released
code (the levels are only summed, later, by the scores), so none is built. GeM clamps at 1e-6, so negative
responses count as zero.

A frozen backbone is kept in eval mode (its BatchNorm statistics fixed), so its maps can be cached once
(`cirlab.image_batches.CachedMaps`) and handed back as `LevelMaps`. The CMAP code leaves the frozen
backbone in train mode, where BatchNorm keeps updating its running statistics; a cache cannot follow that.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.encoders.efficientnet_lite import HEAD_CHANNELS, STAGE_NAMES, STAGES
from cirlab.encoders.image import RESNET_ENDS, Backbone
from cirlab.image_batches import LevelMaps

# The trunk's maps at output strides 8, 16 and 32, lowest first.
DEFAULT_LEVELS: dict[str, tuple[str, ...]] = {
    "resnet18": ("layer2", "layer3", "layer4"),
    "resnet50": ("layer2", "layer3", "layer4"),
    "efficientnet_lite0": ("stage3", "stage5", "head"),
}
GEM_EPS = 1e-6


def level_channels(backbone: str) -> dict[str, int]:
    """Every point of `backbone`'s trunk a level can be tapped at, with its channel count."""
    if backbone in RESNET_ENDS:
        return RESNET_ENDS[backbone]
    if backbone == "efficientnet_lite0":
        return {**{name: spec.out_channels for name, spec in zip(STAGE_NAMES, STAGES, strict=True)},
                "head": HEAD_CHANNELS}
    raise ValueError(f"multi-level features need a {', '.join(DEFAULT_LEVELS)} trunk, not {backbone!r}")


def _trunk_steps(backbone: str, trunk: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """The trunk as named steps that end where a level can be tapped (`cirlab.encoders.image` builds it)."""
    if backbone in RESNET_ENDS:  # conv1, bn1, relu, maxpool, layer1..layer4
        return list(trunk.named_children())
    parts = dict(trunk.named_children())
    steps: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(parts["_conv_stem"], parts["_bn0"], parts["_act0"]))]
    blocks, start = list(parts["_blocks"]), 0
    for name, spec in zip(STAGE_NAMES, STAGES, strict=True):
        if start < len(blocks):  # a trunk cut early lacks the later stages
            steps.append((name, nn.Sequential(*blocks[start:start + spec.repeats])))
        start += spec.repeats
    if "_conv_head" in parts:
        steps.append(("head", nn.Sequential(parts["_conv_head"], parts["_bn1"], parts["_act1"])))
    return steps


class MultiLevelBackbone(nn.Module):
    """A trunk split into segments, each ending at one level: pixels -> the levels' maps, lowest first."""

    def __init__(self, backbone: str, trunk: Backbone, levels: Sequence[str] | None = None) -> None:
        super().__init__()
        channels = level_channels(backbone)
        self.levels = tuple(levels or DEFAULT_LEVELS[backbone])
        unknown = [level for level in self.levels if level not in channels]
        if unknown:
            raise ValueError(f"unknown {backbone} level(s) {', '.join(unknown)} (known: {', '.join(channels)})")
        steps = _trunk_steps(backbone, trunk.trunk)
        names = [name for name, _ in steps]
        missing = [level for level in self.levels if level not in names]
        if missing:
            raise ValueError(f"level(s) {', '.join(missing)} lie past the end of the {backbone} trunk "
                             f"(it ends at {names[-1]}): leave model.backbone_upto unset")
        ends = [names.index(level) for level in self.levels]
        if ends != sorted(set(ends)):
            raise ValueError(f"levels {list(self.levels)} must be distinct and ordered from the lowest to the top")
        starts = [0, *(end + 1 for end in ends[:-1])]
        self.segments = nn.ModuleList(nn.Sequential(OrderedDict(steps[start:end + 1]))
                                      for start, end in zip(starts, ends, strict=True))
        self.out_channels = tuple(channels[level] for level in self.levels)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = []
        for segment in self.segments:
            x = segment(x)
            maps.append(x)
        return tuple(maps)


def gem(feature_map: Tensor, p: float) -> Tensor:
    """Generalised-mean pooling, B x C x h x w -> B x C: (mean(clamp(x, 1e-6)^p))^(1/p).

    In float32: under half-precision autocast, 1e-6 ** 3 would underflow to 0, whose root has no gradient."""
    return feature_map.float().clamp(min=GEM_EPS).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class CrossLevelInteraction(nn.Module):
    """Maps C_1..C_L (lowest first) -> H_1..H_L (top first), see the module docstring."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        pairs = list(zip(channels[:-1], channels[1:], strict=True))  # (lower, higher), lowest pair first
        self.lateral = nn.ModuleList(nn.Conv2d(higher, lower, 1) for lower, higher in pairs)
        self.smooth = nn.ModuleList(nn.Conv2d(lower, lower, 3, padding=1) for lower, _ in pairs)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        levels = [maps[-1]]
        for j in reversed(range(len(maps) - 1)):
            lower, higher = maps[j], maps[j + 1]
            shrunk = F.interpolate(lower, size=higher.shape[-2:], mode="bilinear", align_corners=False)
            levels.append(self.smooth[j](shrunk + self.lateral[j](higher)))
        return levels


class MultiLevelImageEncoder(nn.Module):
    """Pixels (or `LevelMaps`) -> B x L x out_dim unit-length level features, top level first."""

    def __init__(self, backbone: MultiLevelBackbone, out_dim: int = 512, freeze_backbone: bool = True,
                 gem_p: float = 3.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim
        self.freeze_backbone = freeze_backbone
        self.gem_p = gem_p
        self.interaction = CrossLevelInteraction(backbone.out_channels)
        self.heads = nn.ModuleList(nn.Linear(channels, out_dim) for channels in reversed(backbone.out_channels))
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    @property
    def levels(self) -> tuple[str, ...]:
        return self.backbone.levels

    def train(self, mode: bool = True) -> MultiLevelImageEncoder:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BN statistics must not drift (and cached maps stay valid)
        return self

    def feature_maps(self, images: Tensor | LevelMaps) -> tuple[Tensor, ...]:
        """The backbone's maps (lowest level first) of pixels B x 3 x H x W, or cached ones as given."""
        if isinstance(images, LevelMaps):
            channels = tuple(level.shape[1] for level in images.maps)
            if channels != self.backbone.out_channels:
                raise ValueError(f"cached maps have {channels} channels; this encoder's levels "
                                 f"{list(self.levels)} have {self.backbone.out_channels}")
            return images.maps
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected pixels B x 3 x H x W or cached LevelMaps, got shape {tuple(images.shape)}")
        if self.freeze_backbone:
            with torch.no_grad():  # no backbone gradients needed; saves activation memory
                return self.backbone(images)
        return self.backbone(images)

    def feature_map(self, images: Tensor) -> Tensor:
        # Grad-CAM-style explanations differentiate one backbone map; these features come from several.
        raise ValueError("explanations need one backbone feature map, and multi-level features "
                         f"({', '.join(self.levels)}) have several; they are not supported for this model")

    def forward(self, images: Tensor | LevelMaps) -> Tensor:
        levels = self.interaction(self.feature_maps(images))
        return torch.stack([F.normalize(head(gem(level, self.gem_p)), dim=-1)
                            for head, level in zip(self.heads, levels, strict=True)], dim=1)
