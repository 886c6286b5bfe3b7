"""Run configuration: dataclasses loaded from YAML, with `--set key=value` overrides.

One resolved `Config` describes a run completely; it is saved next to every checkpoint and
printed into every metrics file, so a result can always be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as given."""


@dataclass
class DataConfig:
    format: str = "css"
    root: str = "data/css-demo"
    # Images the benchmark's files name but the disk lacks (FashionIQ's dead URLs): "error" stops at load time,
    # naming the first missing file and the count; "skip" drops every training triplet and evaluation query whose
    # reference or target is missing and takes missing images out of the gallery, and every result states what
    # was kept (results on different image subsets are not comparable). Not for CSS.
    missing_images: str = "error"
    # Fraction of training *source images* held out as the validation split (train.selection=carve).
    val_fraction: float = 0.1
    # Side of the square images the model sees: the shorter side is resized to it, then centre-cropped.
    # null keeps the files' own size (CSS: every image is 64 x 64 already).
    image_size: int | None = None
    # How an image is fitted to image_size (cirlab.images.Preprocessing, recorded in each checkpoint):
    # "crop" scales it to cover and centre-crops (the default); "pad" pads it to a square first (CMAP);
    # "targetpad" pads only an image whose long/short side ratio is at least pad_ratio, to that ratio (CLIP4Cir).
    resize_mode: str = "crop"
    pad_ratio: float = 1.25
    # Grey level 0-255 of the pad; null = the mode's reference: 255 (white) for pad, 0 (black) for targetpad.
    pad_fill: int | None = None
    # Fit to this side first, then take an image_size window: the centre for evaluation, a random one with
    # augment=crop_flip (CMAP: 256, then 224). null = fit straight to image_size.
    pre_crop_size: int | None = None
    # Resampling of that fit: "bicubic" (CLIP4Cir, open_clip) or "bilinear" (torchvision's Resize default: CMAP).
    interpolation: str = "bicubic"
    # Training augmentation, drawn per image every step: "none", "crop_flip" (a random window of the pre-crop
    # image, mirrored half the time: CMAP) or "resized_crop" (a random window of area fraction in augment_scale,
    # aspect 3/4-4/3, resized to image_size: OFFSET). Evaluation always sees the deterministic view.
    augment: str = "none"
    augment_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    # FashionIQ: the categories trained on together and evaluated one by one (null = all three).
    categories: list[str] | None = None
    # FashionIQ training texts: "join" (protocol.caption_join's) or "clip4cir_random" (CLIP4Cir: each step one of
    # "C1 and c2", "C2 and c1", "C1", "C2" at random).
    train_captions: str = "join"
    # FashionIQ with protocol.caption_join=offset: DQU-CIR's spelling corrections, one JSON file per category,
    # "{category}" standing for the category (e.g. data/fashioniq/correction_dict_{category}.json).
    caption_corrections: str | None = None
    # Folder format (`root` = the image folder): JSONL files of {reference, text, target}, relative to root.
    train_file: str | None = None
    eval_file: str | None = None
    # CSS: which images are read, "2d" (images/) or "3d" (images_3d/ of `make-css --with-3d`; TIRG's
    # original release: images/). query_render / target_render override it for the reference images
    # and for the targets and gallery: 2D-to-3D is query_render=2d, target_render=3d.
    render: str = "2d"
    query_render: str | None = None
    target_render: str | None = None


@dataclass
class ModelConfig:
    name: str = "tirg"
    embed_dim: int = 512
    image_backbone: str = "resnet18"
    # "random" (or null) = random init, a local file path, or "default" = the backbone's offline default:
    # efficientnet_lite0's bundled ImageNet weights. No ResNet or CLIP weights ship offline, so those refuse
    # "default" (and so the bare default config) and say what to give, e.g. weights/resnet18-f37072fd.pth.
    # CLIP towers ("clip:ViT-B-32", see cirlab.encoders.clip) also take "open_clip:<tag>" to download.
    image_weights: str | None = "default"
    # Where the trunk ends; CLIP towers: "embedding" (default, the projected feature) or "tokens".
    backbone_upto: str | None = None
    # "gap" | "flatten" | "tower" (the backbone's own pooling head: a CLIP tower's projected feature).
    pooling: str = "gap"
    freeze_backbone: bool = False
    # Backbone map size (h, w) that "flatten" pooling needs; filled in by the trainer from the data.
    map_size: list[int] | None = None
    text_encoder: str = "lstm"
    # A local word-vector file for the "bigru" text encoder (GloVe text format: `word v1 ... v300` per
    # line), frozen once read; null = word embeddings learned from scratch. Read only to build a model for
    # training: a checkpoint holds the vectors itself. A CLIP text tower ("clip:ViT-B-32") takes its
    # weights here in the form image_weights takes them (null = random init).
    text_weights: str | None = None
    # Keep a CLIP text tower's weights fixed (CLIP4Cir's Combiner stage).
    freeze_text: bool = False
    # Method-specific switches, passed to the method's constructor (e.g. TIRG's `gate_layers`).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MMGradConfig:
    """MMGrad training: retrieval loss + weight x attention loss on the MMGrad map (see
    cirlab.explain.gradcam and the project's MMGrad notes, section 3.4)."""

    weight: float = 0.0               # lambda; 0 turns the attention loss off
    loss: str = "amc_margin"          # amc_margin | energy | mse
    scalar: str = "diff_thresh"       # diff_thresh | diff_l2 | sim | retrieval_score
    side: str = "reference"           # whose backbone map is supervised
    # "sidecar" (the dataset's edit_regions.jsonl), "pixel_diff" (pixel-aligned synthetic pairs
    # only), or the path of a sidecar-format file from an external segmentation/grounding source.
    masks: str = "sidecar"
    # Detached: the Grad-CAM weights are constants (no double backpropagation, cheaper); the loss
    # then reaches the model only through the feature map, so it needs a trainable backbone.
    detached: bool = False
    # The attention loss joins at this step (0: from the first). A warm-up lets the retrieval embedding
    # form before its maps are steered.
    start_step: int = 0


@dataclass
class TrainConfig:
    loss: str = "soft_triplet"
    # "pairs": TIRG's CSS sampler (pairs of queries sharing a source image); "shuffled": uniform
    # batches of distinct queries (FashionIQ, CIRR, Shoes, ...).
    sampler: str = "pairs"
    # Per process: N processes under torchrun train on a global batch of N x batch_size.
    batch_size: int = 32
    iterations: int = 160_000
    # "sgd" (TIRG's recipe; uses momentum) or "adamw" (CMAP, OFFSET and CLIP4Cir recipes).
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-6
    # Learning-rate multiplier of a trainable pretrained backbone (TIRG: 1.0 on CSS, 0.1 elsewhere).
    backbone_lr_mult: float = 1.0
    # Learning-rate multiplier of the text encoder's trainable parameters (a fine-tuned CLIP text tower);
    # 1.0 keeps them in the main group.
    text_lr_mult: float = 1.0
    lr_decay_every: int | None = None
    # Steps at which the lr is multiplied by lr_decay_factor (OFFSET: epochs 4 and 9); not with lr_decay_every.
    lr_milestones: list[int] | None = None
    lr_decay_factor: float = 0.1
    eval_every: int = 1000
    # Which checkpoint `best` is (see cirlab.selection): "carve" (best on a validation split carved from train,
    # data.val_fraction), "val" (best on the benchmark's own val split: FashionIQ, CIRR) or "last".
    selection: str = "carve"
    # The validation metric that picks `best`, or a sum ("R@10+R@50"); null: R@1 for carve, "avg" for val.
    select_metric: str | None = None
    # Stop after this many evaluations in a row without a better validation metric (null: never).
    early_stop_patience: int | None = None
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    # Mixed precision on CUDA: autocast to amp_dtype, "bfloat16" or "float16" (float16 adds a gradient scaler).
    amp: bool = True
    amp_dtype: str = "bfloat16"
    # Mixed precision on the CPU: bfloat16 autocast where the CPU has native bfloat16 (AVX512-BF16, AMX-BF16),
    # float32 on other CPUs (cirlab.acceleration).
    cpu_amp: bool = True
    # CUDA only: NHWC weights and batches, the layout tensor-core convolutions run fastest on.
    channels_last: bool = True
    # Embed each distinct image of a step once, for models whose query reads its reference image through the
    # target feature (TIRG, Concat, the baselines, the Combiner; see CIRModel.queries_from_image_features).
    # The loss is the same function of the same features, but BatchNorm's batch statistics come from one pass
    # over the step's distinct images, where the TIRG code makes one pass over the references and one over the
    # targets; false gives the code's two passes. Off with a random augmentation or MMGrad's attention term.
    distinct_images: bool = True
    # torch.compile the image encoder (slow to start, so off by default; mainly for long GPU runs).
    compile: bool = False
    # Under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm) instead of
    # each process's slice; with it N processes of batch B match one process of batch N x B exactly.
    sync_batchnorm: bool = False
    # Train from backbone feature maps computed once (only possible with a frozen backbone).
    cache_features: bool = True
    mmgrad: MMGradConfig = field(default_factory=MMGradConfig)


@dataclass
class ProtocolConfig:
    name: str = "css"
    # null = the benchmark's own K (CSS 1/5/10/50, FashionIQ 10/50, CIRR 1/5/10/50, ...).
    ks: list[int] | None = None
    # CSS: also report mAP@K for these K (every gallery image with the target's label is a ground truth).
    map_ks: list[int] | None = None
    # CSS: drop the query's own reference image from its ranking.
    remove_reference: bool = True
    # Benchmark-specific choices; null = the benchmark's default. Setting one that the chosen
    # benchmark does not have is an error (see cirlab.data.benchmarks.PROTOCOL_CHOICES).
    split: str | None = None          # evaluation split: FashionIQ val|test, CIRR val|test1, CIRCO val|test
    gallery: str | None = None        # FashionIQ split|queries; folder eval_images|folder
    reference: str | None = None      # FashionIQ, folder and CIRCO: kept|removed
    caption_join: str | None = None   # FashionIQ: clip4cir|starter_kit|offset|cmap|symmetric; CIRCO caption|concept


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Numbers given as text (YAML reads `1e-3` as a string) become the field's number type."""
    accepts = set(typing.get_args(hint)) or {hint}
    if value is None or type(value) in accepts or bool in accepts or not isinstance(value, (str, int)):
        return value
    for number_type in (int, float):
        if number_type in accepts:
            try:
                return number_type(value)
            except ValueError:
                raise ConfigError(f"config key '{key}' needs a number, got {value!r}") from None
    return value


def _merge(instance: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a nested dict, rejecting keys the dataclass does not have."""
    known = {f.name: f for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(sorted(known))})")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' is a section and needs a mapping, got {value!r}")
            _merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            # A mapping field (model.options) takes keys one by one: `--set model.options.k=v` keeps the others.
            setattr(instance, key, {**current, **value})
        else:
            setattr(instance, key, _coerce(hints[key], value, f"{where}{key}"))


def parse_override(text: str) -> dict[str, Any]:
    """Turn `a.b=value` into `{"a": {"b": value}}`; the value is parsed as YAML (so 1e-3, true, null work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Defaults, then `base` (e.g. a checkpoint's saved config), then the YAML file, then overrides."""
    config = Config()
    if base:
        _merge(config, base, "")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error.__class__.__name__})") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(config, loaded, "")
    for text in overrides or []:
        _merge(config, parse_override(text), "")
    return config
