"""Image backbones (feature maps) and the TIRG-style image encoder on top of them."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50

from cirlab.encoders.base import Backbone
from cirlab.encoders.clip import HUB_PREFIX, create_clip_backbone, is_clip_name
from cirlab.encoders.efficientnet_lite import EfficientNetLite0, default_weights_path

# Output channels of each ResNet stage: the trunk ends a backbone can be cut at.
RESNET_ENDS: dict[str, dict[str, int]] = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
_RESNETS = {"resnet18": resnet18, "resnet50": resnet50}
BACKBONES: tuple[str, ...] = ("resnet18", "efficientnet_lite0", "resnet50")
POOLINGS: tuple[str, ...] = ("gap", "flatten", "tower")
FLATTEN_CHANNELS = 64
# `model.image_weights` for random initialisation; None means the same in code (the checkpoint loader rebuilds
# a model with it, as the weights then come from the checkpoint itself).
RANDOM_INIT = "random"
# torchvision's ImageNet state dicts (IMAGENET1K_V1, what `pretrained=True` loads in the TIRG and CMAP code).
# No package ships them, so the paper recipes expect them under weights/.
RESNET_IMAGENET_FILES: dict[str, str] = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt`` (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise ValueError(f"unsupported weights file type {suffix!r} (use .safetensors, .pth or .pt): {path}")
    try:
        if suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files raise many different types
        raise ValueError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path, ignore_prefix: str) -> None:
    """Load a state-dict file into ``model``; keys under ``ignore_prefix`` (the
    classifier) may be present or absent, every other key must match exactly.
    Raises ValueError naming the file on any mismatch."""
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(ignore_prefix)}
    expected = {k for k in model.state_dict() if not k.startswith(ignore_prefix)}
    # Old BN checkpoints lack num_batches_tracked; BatchNorm's loader fills it in.
    missing = sorted(k for k in expected - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit the model: "
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights file {path} does not fit the model: {err}") from err


def _is_random_init(weights: str | None) -> bool:
    return weights is None or weights == RANDOM_INIT


def _missing_resnet_weights(name: str, weights: str) -> ValueError:
    """The refusal of "default" or of a file that is not there, with the two ways out."""
    file = RESNET_IMAGENET_FILES[name]
    problem = f"no {name} ImageNet weights ship with cirlab or its packages" if weights == "default" else "no such file"
    return ValueError(
        f"model.image_weights={weights}: {problem}. Download torchvision's {file} (IMAGENET1K_V1, "
        f"https://download.pytorch.org/models/{file}) and set model.image_weights=weights/{file} (or another "
        f"local path), or set model.image_weights={RANDOM_INIT} to train from scratch"
    )


def _unknown_backbone(name: str) -> ValueError:
    return ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}, clip:<open_clip config>")


def _resnet_backbone(name: str, weights: str | None, upto: str | None) -> Backbone:
    """torchvision ResNet-18/50 trunk (stem + layer1..upto, no avgpool/fc).

    weights: None = torchvision's random initialisation, or a local file (torchvision key layout; ``fc.*`` is
    ignored). "default" is refused, and so is a file that is not there, each with the two ways out: no ResNet
    weights are available offline, and the papers' code starts from ImageNet, so a silent random start
    would not be the recipe it claims to be.
    """
    upto, ends = upto or "layer4", RESNET_ENDS[name]
    if upto not in ends:
        raise ValueError(f"unknown {name} trunk end {upto!r}; known: {', '.join(ends)}")
    if weights == "default" or (weights is not None and not Path(weights).is_file()):
        raise _missing_resnet_weights(name, weights)
    net = _RESNETS[name](weights=None)
    if weights is not None:
        load_weights(net, weights, ignore_prefix="fc.")
    names = ["conv1", "bn1", "relu", "maxpool", *list(ends)[: list(ends).index(upto) + 1]]
    # Keeping torchvision's child names keeps the trunk's state-dict keys familiar.
    trunk = nn.Sequential(OrderedDict((child, getattr(net, child)) for child in names))
    return Backbone(trunk, ends[upto])


def _efficientnet_lite0_backbone(weights: str | None, upto: str | None) -> Backbone:
    """EfficientNet-Lite0 trunk; ``weights="default"`` = the bundled ImageNet weights, None = random init."""
    net = EfficientNetLite0()
    trunk, channels = net.trunk(upto or "head")  # validates upto before any file is read
    if weights is not None:
        load_weights(net, default_weights_path() if weights == "default" else weights, ignore_prefix="_fc.")
    return Backbone(trunk, channels)


def create_backbone(name: str, weights: str | None = "default", upto: str | None = None) -> Backbone:
    """Build a backbone by name ("resnet18", "efficientnet_lite0" or "resnet50").

    weights (``model.image_weights``): "random" or None = random init; a local file path; or "default" = the
    backbone's offline default: efficientnet_lite0's bundled ImageNet weights. A ResNet has no offline
    default, so "default" raises a ValueError naming the torchvision ImageNet file to give instead.
    upto: where to cut the trunk (resnets: "layer1".."layer4", default "layer4";
    efficientnet_lite0: "stage1".."stage7" or "head", default "head").
    "clip:NAME" is an open_clip image tower (see cirlab.encoders.clip; upto "embedding" or "tokens"; its
    "default" is random init too).
    """
    weights = None if _is_random_init(weights) else weights  # one spelling of random init for every builder
    if name in RESNET_ENDS:
        return _resnet_backbone(name, weights, upto)
    if name == "efficientnet_lite0":
        return _efficientnet_lite0_backbone(weights, upto)
    if is_clip_name(name):  # open_clip is an optional dependency: clip.py imports it when a tower is built
        return create_clip_backbone(name, weights, upto)
    raise _unknown_backbone(name)


def image_initialisation(backbone: str, weights: str | None) -> str:
    """Where `backbone`'s weights start from, in a few words for metrics files and result tables
    (e.g. "random init", "ImageNet weights from weights/resnet18-f37072fd.pth").

    A ResNet file is called ImageNet weights only when it has the name (any suffix) of torchvision's
    ImageNet file; any other file is just "weights from PATH". A ResNet with "default" raises the same
    ValueError as `create_backbone`, as no such model can be built.
    """
    if is_clip_name(backbone):
        return _clip_initialisation(weights)
    if backbone not in BACKBONES:
        raise _unknown_backbone(backbone)
    if _is_random_init(weights):
        return "random init"
    if backbone == "efficientnet_lite0":
        return "bundled EfficientNet-Lite0 ImageNet weights" if weights == "default" else f"weights from {weights}"
    if weights == "default":
        raise _missing_resnet_weights(backbone, weights)
    if Path(weights).stem == Path(RESNET_IMAGENET_FILES[backbone]).stem:
        return f"ImageNet weights from {weights}"
    return f"weights from {weights}"


def _clip_initialisation(weights: str | None) -> str:
    if _is_random_init(weights):
        return "random init"
    if weights == "default":
        raise ValueError("no CLIP weights ship offline: a CLIP tower has no default model.image_weights")
    if weights.startswith(HUB_PREFIX):
        return f"CLIP weights {weights} (downloaded by open_clip)"
    return f"CLIP weights from {weights}"


class ImageEncoder(nn.Module):
    """Backbone map -> pooled image feature of size ``out_dim``.

    pooling="gap": global average pool then Linear(C -> out_dim), exactly TIRG's
    image feature (no norm, no nonlinearity).
    pooling="flatten": 1x1 conv (C -> 64) + ReLU, flatten, Linear(64*h*w -> out_dim).
    It keeps *where* things are, which GAP discards; this matters when the
    backbone is frozen and cannot learn to encode position into channels.
    Needs ``map_size`` = (h, w) of the backbone map.
    pooling="tower": the backbone's own pooling head (a CLIP tower's projected
    feature, see cirlab.encoders.clip); no new layers, so ``out_dim`` must be its size.
    """

    def __init__(
        self,
        backbone: Backbone,
        out_dim: int = 512,
        pooling: str = "gap",
        map_size: tuple[int, int] | None = None,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim
        self.pooling = pooling
        self.map_size = map_size
        self.freeze_backbone = freeze_backbone
        channels = backbone.out_channels
        if pooling == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out_dim))
        elif pooling == "flatten":
            if map_size is None:
                raise ValueError('pooling="flatten" needs map_size=(h, w) of the backbone feature map')
            h, w = map_size
            self.head = nn.Sequential(
                nn.Conv2d(channels, FLATTEN_CHANNELS, 1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(FLATTEN_CHANNELS * h * w, out_dim),
            )
        elif pooling == "tower":
            own_dim = getattr(backbone, "embed_dim", None)
            if own_dim is None:
                raise ValueError(f'pooling="tower" needs a backbone with its own pooling head (a CLIP tower), '
                                 f"not {type(backbone).__name__}")
            if own_dim != out_dim:
                raise ValueError(f'pooling="tower" gives the backbone\'s own {own_dim}-d feature: '
                                 f"set model.embed_dim={own_dim} (got {out_dim})")
            self.head = backbone.pool  # the head's weights stay the backbone's (frozen and lr with it)
        else:
            raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # frozen BN statistics must not drift
        return self

    def feature_map(self, x: Tensor) -> Tensor:
        """Backbone map for pixels (B x 3 x H x W), or ``x`` itself when it already
        is a cached backbone map (B x out_channels x h x w)."""
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D batch, got shape {tuple(x.shape)}")
        channels = self.backbone.out_channels
        if x.shape[1] == channels and channels != 3:
            return x
        if x.shape[1] != 3:
            raise ValueError(f"expected 3 (pixels) or {channels} (cached map) channels, got {x.shape[1]}")
        if self.freeze_backbone:
            with torch.no_grad():  # no backbone gradients needed; saves activation memory
                return self.backbone(x)
        return self.backbone(x)

    def pool(self, fmap: Tensor) -> Tensor:
        """B x C x h x w map -> B x out_dim."""
        if self.pooling == "flatten" and tuple(fmap.shape[-2:]) != tuple(self.map_size):
            raise ValueError(f"feature map size {tuple(fmap.shape[-2:])} != map_size {tuple(self.map_size)}")
        return self.head(fmap)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.feature_map(x))
