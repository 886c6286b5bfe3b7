"""CLIP image and text towers from open_clip, named "clip:<open_clip config>" (e.g. "clip:ViT-B-32").

Weights (`model.image_weights`, `model.text_weights`):
- "random" (or null): random initialisation, only when asked for by name; "default" is refused, as no CLIP
  weights ship with a package;
- a local file: an open_clip or OpenAI-layout state dict (.safetensors, .bin, .pt, .pth; read without
  unpickling), or a cirlab checkpoint's model.safetensors (its fine-tuned CLIP towers, for CLIP4Cir's second stage);
- "open_clip:<tag>" (e.g. "open_clip:openai"): downloaded by open_clip, only when asked for by name.
Each tower loads only its own part of the file, and every key of that part must fit.

OpenAI's weights were trained with QuickGELU: load them into the "-quickgelu" configs ("clip:RN50-quickgelu").
The towers take cirlab's ImageNet-normalised batches and re-normalise them with CLIP's mean and std inside,
so data loading, caching, indexing and search stay the same for every backbone.

open_clip is an optional dependency (`pip install 'cirlab[clip]'`); it is imported when a tower is built.
The tiny configs "cirlab-tiny-vit" and "cirlab-tiny-rn" (clip_configs/) are for tests.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cirlab.encoders.base import Backbone, TextEncoder
from cirlab.images import IMAGENET_MEAN, IMAGENET_STD

CLIP_PREFIX = "clip:"
HUB_PREFIX = "open_clip:"
# What a CLIP image tower hands out as its backbone map (model.backbone_upto).
CLIP_OUTPUTS: tuple[str, ...] = ("embedding", "tokens")
_TINY_CONFIGS = Path(__file__).parent / "clip_configs"
# Prefixes of the towers' weights in a cirlab checkpoint (see the attribute names below) and in open_clip's layout.
_CIRLAB_KEYS = {"visual": "image_encoder.backbone.trunk.", "text": "text_encoder.text."}


def is_clip_name(name: str) -> bool:
    return name.startswith(CLIP_PREFIX)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as error:
        raise ValueError("CLIP towers need the open_clip package: pip install 'cirlab[clip]'") from error
    if "cirlab-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIGS)
    return open_clip


def clip_model_config(name: str) -> tuple[str, dict[str, Any]]:
    """open_clip's config name and model config for "clip:NAME"."""
    if not is_clip_name(name):
        raise ValueError(f"a CLIP tower name looks like 'clip:ViT-B-32', got {name!r}")
    model_name = name[len(CLIP_PREFIX):]
    if ":" in model_name:  # open_clip's hf-hub:/local-dir: schemas would fetch or read a config elsewhere
        raise ValueError(f"{name!r}: name an open_clip config (e.g. clip:ViT-B-32) and give the weights in "
                         "model.image_weights / model.text_weights")
    open_clip = _open_clip()
    config = open_clip.get_model_config(model_name)
    if config is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        hint = f"close names: {', '.join(close)}" if close else "see open_clip.list_models()"
        raise ValueError(f"unknown open_clip config {model_name!r} in {name!r} ({hint})")
    return model_name, config


def _resolve_weights(model_name: str, weights: str | None, what: str) -> tuple[Path | None, dict[str, Any]]:
    """The file `weights` names (None: random init) and, for an open_clip tag, its settings (mean, std, ...).
    An "open_clip:<tag>" is downloaded here, and only here."""
    if weights in (None, "random"):
        return None, {}
    if weights == "default":
        raise ValueError(f"no CLIP weights ship offline, so {model_name} has no default {what}: give a local file "
                         f"(model.image_weights / model.text_weights), open_clip:<tag> to download, or random")
    if weights.startswith(HUB_PREFIX):
        open_clip = _open_clip()
        tag = weights[len(HUB_PREFIX):]
        pretrained = open_clip.get_pretrained_cfg(model_name, tag)
        if not pretrained:
            known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
            raise ValueError(f"open_clip has no weights {tag!r} for {model_name} (known tags: {known})")
        try:
            return Path(open_clip.download_pretrained(pretrained)), pretrained
        except Exception as error:  # no network, hub switched off, interrupted download: all mean the same here
            raise ValueError(f"cannot download the open_clip weights {tag!r} of {model_name} (offline?); download "
                             f"them where there is a network and give the local file as the {what}: {error}") from error
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"CLIP {what} file not found: {path}")
    return path, {}


def _read_tower_state(path: Path, tower: str) -> dict[str, Tensor]:
    """The `tower` ("visual" or "text") part of a weights file, keyed as in that open_clip module."""
    from open_clip.factory import load_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as error:  # corrupt files, TorchScript archives, foreign pickles raise many types
        raise ValueError(f"cannot read CLIP weights file {path} (a state dict of tensors; OpenAI's original .pt "
                         f"files are TorchScript: use the open_clip release of the same weights): {error}") from error
    if any(key.startswith(("image_encoder.", "text_encoder.")) for key in state):
        prefix = _CIRLAB_KEYS[tower]
    else:  # the standard CLIP layout keeps the text tower at the top level; open_clip moves it under "text."
        state, prefix = convert_to_custom_text_state_dict(state), f"{tower}."
    part = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not part:
        raise ValueError(f"CLIP weights file {path} holds no {tower} tower (no keys under {prefix!r})")
    return part


def _load_tower(module: nn.Module, path: Path, tower: str, name: str) -> None:
    state = _read_tower_state(path, tower)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"CLIP weights file {path} does not fit the {tower} tower of {name}: {error}") from error
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"CLIP weights file {path} does not fit the {tower} tower of {name}: "
                         f"missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}")


class CLIPImageTower(Backbone):
    """An open_clip image tower as a cirlab Backbone: ImageNet-normalised pixels -> backbone map.

    output="embedding": the map is the tower's projected image feature (CLIP's `encode_image`), B x D x 1 x 1.
    output="tokens": the map is what the tower's pooling head reads: for a ViT, the last block's tokens laid
    out as B x width x 1 x (1 + N) (class token first, then the patches in raster order, before ln_post); for
    a ModifiedResNet (RN50, ...), the layer4 map B x C x h x w.
    `pool(map)` gives the projected image feature from either map, exactly as `encode_image` computes it.

    The open_clip module stays in eval mode even while the tower trains (its weights still get gradients), as
    CLIP4Cir's code does: it calls `clip_model.eval()` once and fine-tunes from there, so a ModifiedResNet's
    BatchNorm layers keep their pretrained running statistics instead of re-estimating them from small
    fine-tuning batches. `batchnorm_statistics="train"` lets them update (the usual PyTorch behaviour).
    """

    def __init__(self, name: str, visual: nn.Module, embed_dim: int, output: str,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 batchnorm_statistics: str = "frozen") -> None:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if batchnorm_statistics not in ("frozen", "train"):
            raise ValueError(f"batchnorm_statistics must be 'frozen' or 'train', got {batchnorm_statistics!r}")
        if output not in CLIP_OUTPUTS:
            raise ValueError(f"unknown CLIP tower output {output!r} (model.backbone_upto); known: "
                             f"{', '.join(CLIP_OUTPUTS)}")
        kind = "vit" if isinstance(visual, VisionTransformer) else "resnet" if isinstance(visual, ModifiedResNet) \
            else "other"
        if output == "tokens" and (kind == "other" or getattr(visual, "attn_pool", None) is not None):
            raise ValueError(f"{name}: token output needs a plain ViT or ModifiedResNet image tower")
        if output == "embedding":
            channels = embed_dim
        else:
            channels = visual.transformer.width if kind == "vit" else visual.attnpool.k_proj.in_features
        super().__init__(visual, channels)  # `trunk` = the open_clip module, so its keys are open_clip's
        self.name, self.kind, self.output, self.embed_dim = name, kind, output, embed_dim
        self.batchnorm_statistics = batchnorm_statistics
        size = visual.image_size  # every open_clip image tower has one; ints mean square
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        # x_clip = (x * std_in + mean_in - mean_clip) / std_clip, folded into one scale and shift per channel.
        mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean_clip, std_clip = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (std_in / std_clip).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean_clip) / std_clip).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> CLIPImageTower:
        super().train(mode)
        if self.batchnorm_statistics == "frozen":
            self.trunk.eval()
        return self

    @property
    def token_dim(self) -> int:
        """Width of the patch tokens (`patch_tokens`); needs output="tokens"."""
        self._needs_tokens()
        return self.out_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the patch grid that `patch_tokens` flattens in raster order."""
        if self.kind == "vit":
            return tuple(self.trunk.grid_size)
        h, w = self.image_size
        return h // 32, w // 32

    def clip_pixels(self, pixels: Tensor) -> Tensor:
        """cirlab's ImageNet-normalised pixels -> CLIP-normalised pixels (what open_clip's towers take)."""
        if tuple(pixels.shape[-2:]) != self.image_size:
            h, w = self.image_size
            raise ValueError(f"{self.name} takes {h} x {w} images, got {pixels.shape[-2]} x {pixels.shape[-1]}: "
                             f"set data.image_size={h}")
        return pixels * self.scale + self.shift

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.clip_pixels(pixels)
        if self.output == "embedding":
            return self.trunk(x)[:, :, None, None]
        if self.kind == "vit":
            sequence = self.trunk.transformer(self.trunk._embeds(x))
            return sequence.transpose(1, 2)[:, :, None, :]
        trunk = self.trunk
        return trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(trunk.stem(x)))))

    def _sequence(self, fmap: Tensor) -> Tensor:
        return fmap[:, :, 0, :].transpose(1, 2)

    def pool(self, fmap: Tensor) -> Tensor:
        """Backbone map -> B x embed_dim: the tower's projected image feature."""
        if self.output == "embedding":
            return fmap.flatten(1)
        if self.kind == "resnet":
            return self.trunk.attnpool(fmap)
        pooled, _ = self.trunk._pool(self._sequence(fmap))
        return pooled @ self.trunk.proj

    def patch_tokens(self, fmap: Tensor) -> Tensor:
        """B x N x token_dim patch tokens (ViT: after ln_post, unprojected; ResNet: layer4 positions)."""
        self._needs_tokens()
        if self.kind == "resnet":
            return fmap.flatten(2).transpose(1, 2)
        _, tokens = self.trunk._pool(self._sequence(fmap))
        return tokens

    def project_tokens(self, tokens: Tensor) -> Tensor:
        """... x token_dim -> ... x embed_dim with the tower's own output projection (ViT: `proj`, applied as is:
        `pool` is this projection of the class token after ln_post; ResNet: the attention pool's value and output
        maps, i.e. its output when all attention falls on that one token)."""
        self._needs_tokens()
        if self.kind == "resnet":
            attnpool = self.trunk.attnpool
            return attnpool.c_proj(attnpool.v_proj(tokens))
        return tokens @ self.trunk.proj

    def _needs_tokens(self) -> None:
        if self.output != "tokens":
            raise ValueError(f"{self.name}: patch tokens need the token map (model.backbone_upto=tokens)")


def create_clip_backbone(name: str, weights: str | None = None, upto: str | None = None) -> CLIPImageTower:
    """The image tower of "clip:NAME"; `upto` picks the map (None = "embedding", or "tokens")."""
    open_clip = _open_clip()
    from open_clip.model import _build_vision_tower

    model_name, config = clip_model_config(name)
    path, pretrained = _resolve_weights(model_name, weights, "image weights")
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    if path is not None:
        _load_tower(visual, path, "visual", name)
    mean = tuple(pretrained.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pretrained.get("std", open_clip.OPENAI_DATASET_STD))
    return CLIPImageTower(name, visual, config["embed_dim"], upto or "embedding", mean, std)


class CLIPTextEncoder(TextEncoder):
    """An open_clip text tower behind cirlab's TextEncoder interface, with open_clip's own BPE tokenizer.

    forward: the projected text feature (CLIP's `encode_text`), B x embed_dim. forward_tokens: the ln_final
    token features (unprojected, B x context_length x width: every text is padded to the tower's fixed
    context) and a mask that is True from the start token to the end token; pooled_and_tokens gives both
    from one pass. Frozen (`trainable=False`): no gradients and no graph.
    """

    def __init__(self, name: str, text: nn.Module, tokenizer: Any, trainable: bool = True) -> None:
        super().__init__()
        self.name = name
        self.text = text
        self.text.output_tokens = True  # the module returns (pooled, tokens); both views come from one pass
        self.tokenizer = tokenizer
        self.out_dim = text.output_dim
        self.token_dim = text.width
        self.trainable = trainable
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> CLIPTextEncoder:
        return super().train(mode and self.trainable)

    @property
    def context_length(self) -> int:
        """The number of positions every text's tokens have (padding after the end token included)."""
        return self.text.context_length

    def token_ids(self, texts: list[str]) -> Tensor:
        """B x context_length token ids (start, BPE tokens, end, zero padding; long texts are cut)."""
        return self.tokenizer(texts).to(self.device)

    def _run(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids = self.token_ids(texts)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pooled, tokens = self.text(ids)
        return ids, pooled, tokens

    def forward(self, texts: list[str]) -> Tensor:
        return self._run(texts)[1]

    def forward_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self.pooled_and_tokens(texts)[1:]

    def pooled_and_tokens(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, pooled, tokens = self._run(texts)
        return pooled, tokens, self._real_tokens(ids)

    def _real_tokens(self, ids: Tensor) -> Tensor:
        # Id 0 is both the padding and a real BPE token ("!"), so the mask ends at the end token instead.
        end = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return positions[None, :] <= end[:, None]


def create_clip_text_encoder(name: str, out_dim: int | None = None, weights: str | None = None,
                             trainable: bool = True) -> CLIPTextEncoder:
    """The text tower of "clip:NAME". `out_dim`, when given, must be the tower's own embed_dim."""
    open_clip = _open_clip()
    from open_clip.model import _build_text_tower
    from open_clip.transformer import TextTransformer

    model_name, config = clip_model_config(name)
    text_config = config["text_cfg"]
    if text_config.get("hf_model_name") or text_config.get("hf_tokenizer_name") or "siglip" in model_name.lower():
        raise ValueError(f"{name}: its text side comes from the Hugging Face hub; cirlab takes CLIP text towers "
                         "with open_clip's own tokenizer (e.g. clip:ViT-B-32, clip:RN50)")
    if out_dim is not None and out_dim != config["embed_dim"]:
        raise ValueError(f"{name} gives {config['embed_dim']}-d text features, not {out_dim}: "
                         f"set model.embed_dim={config['embed_dim']}")
    path, _ = _resolve_weights(model_name, weights, "text weights")
    text = _build_text_tower(config["embed_dim"], text_config, config.get("quick_gelu", False))
    if not isinstance(text, TextTransformer):
        raise ValueError(f"{name}: unsupported text tower {type(text).__name__}")
    if path is not None:
        _load_tower(text, path, "text", name)
    return CLIPTextEncoder(name, text, open_clip.get_tokenizer(model_name), trainable=trainable)
