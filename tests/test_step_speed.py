"""The CPU speed paths of training and evaluation: bfloat16 autocast where the CPU multiplies bfloat16 natively,
each distinct image of a step embedded once, and evaluation composing queries from
the gallery's own features. Each must change how much work is done, not what is computed."""

from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from cirlab.acceleration import autocast_dtype, grad_scaler, uses_channels_last
from cirlab.config import load_config
from cirlab.data.benchmarks import load_splits
from cirlab.encoders.text import Vocabulary
from cirlab.evaluate import css_protocol, evaluate_split, reference_features
from cirlab.image_batches import PixelImages
from cirlab.models.registry import create_model
from cirlab.train import DistinctImagesForward, TrainingForward, distinct_images, distinct_rows, train

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
TIRG = ["model.name=tirg", "model.image_backbone=resnet18", "model.image_weights=null", "model.backbone_upto=layer1",
        "model.embed_dim=8"]
TEXTS = ["make it red", "add a cube", "remove the small sphere", "move it left"]
# A small version of configs/css/tirg.yaml: a ResNet-18 stem trained end to end from pixels.
PIXELS = [*TIRG, "train.batch_size=8", "train.log_every=1", "train.selection=last", "train.eval_every=2"]


def _cpu(monkeypatch, **flags: bool) -> None:
    """Pretend the CPU has exactly these capability flags."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags))


def test_bfloat16_autocast_on_cpus_with_native_bfloat16_and_float32_elsewhere(monkeypatch):
    train_config = load_config(None, []).train
    _cpu(monkeypatch, avx512_bf16=True)
    assert autocast_dtype(train_config, CPU) is torch.bfloat16
    assert autocast_dtype(load_config(None, ["train.cpu_amp=false"]).train, CPU) is None
    assert autocast_dtype(load_config(None, ["train.amp_dtype=float16"]).train, CPU) is torch.bfloat16
    _cpu(monkeypatch, amx_bf16=True)
    assert autocast_dtype(train_config, CPU) is torch.bfloat16
    _cpu(monkeypatch, avx512_f=True, avx512_bf16=False)  # AVX-512 alone emulates bfloat16: slower than float32
    assert autocast_dtype(train_config, CPU) is None
    assert autocast_dtype(train_config, CUDA) is torch.bfloat16
    assert autocast_dtype(load_config(None, ["train.amp_dtype=float16"]).train, CUDA) is torch.float16
    assert autocast_dtype(load_config(None, ["train.amp=false"]).train, CUDA) is None
    assert not grad_scaler(torch.bfloat16, CPU).is_enabled()  # only float16 needs loss scaling
    with pytest.raises(ValueError, match="train.amp_dtype must be one of bfloat16, float16, got 'float8'"):
        autocast_dtype(load_config(None, ["train.amp_dtype=float8"]).train, CPU)


def test_channels_last_is_a_cuda_switch(monkeypatch):
    _cpu(monkeypatch)  # a float32 CPU: NHWC gave no steady gain there either
    assert uses_channels_last(load_config(None, []).train, CUDA)
    assert not uses_channels_last(load_config(None, []).train, CPU)
    assert not uses_channels_last(load_config(None, ["train.channels_last=false"]).train, CUDA)


def test_distinct_rows_list_each_image_once_in_order_of_first_appearance():
    images, reference_rows, target_rows = distinct_rows([5, 5, 7, 7], [7, 9, 5, 2])
    assert images == [5, 7, 9, 2]
    assert reference_rows.tolist() == [0, 0, 1, 1]
    assert target_rows.tolist() == [1, 2, 0, 3]


def _tirg(*overrides: str):
    torch.manual_seed(0)
    config = load_config(None, [*TIRG, *overrides])
    return create_model(config.model, Vocabulary.build(TEXTS)), config


def _tower_batches(model) -> list[int]:
    """The batch size of every image-tower pass from now on."""
    sizes: list[int] = []
    model.image_encoder.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    return sizes


def test_the_distinct_image_forward_gives_the_two_pass_features_and_gradients_in_one_smaller_pass():
    # Eval mode: BatchNorm uses its running statistics, so one pass over the distinct images and one pass each
    # over references and targets compute the same function.
    model, _ = _tirg()
    model.eval()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    references, targets, texts = [0, 0, 1, 1, 2, 2], [3, 4, 0, 2, 4, 1], [TEXTS[i % 4] for i in range(6)]
    sizes = _tower_batches(model)
    two_pass = TrainingForward(model)(images[references], texts, images[targets])
    assert sizes == [6, 6]
    gradients = torch.autograd.grad(sum(f.square().sum() for f in two_pass), list(model.parameters()))
    order, reference_rows, target_rows = distinct_rows(references, targets)
    one_pass = DistinctImagesForward(model)(images[order], texts, reference_rows, target_rows)
    assert sizes == [6, 6, 5]  # five distinct images of twelve
    for distinct, separate in zip(one_pass, two_pass, strict=True):
        torch.testing.assert_close(distinct, separate, atol=1e-5, rtol=1e-5)
    for distinct, separate in zip(torch.autograd.grad(sum(f.square().sum() for f in one_pass),
                                                      list(model.parameters())), gradients, strict=True):
        torch.testing.assert_close(distinct, separate, atol=1e-4, rtol=1e-4)


def test_distinct_images_apply_to_composing_models_without_augmentation_or_attention():
    tirg, config = _tirg()
    assert distinct_images(config, tirg, augment_rng=None, attention=None)
    assert not distinct_images(load_config(None, [*TIRG, "train.distinct_images=false"]), tirg, None, None)
    assert not distinct_images(config, tirg, augment_rng=torch.Generator(), attention=None)
    lastconv, config = _tirg("model.name=tirg_lastconv")  # composes a feature map, not the target vector
    assert not lastconv.composes_image_features
    assert not distinct_images(config, lastconv, None, None)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "last" / "model.safetensors")


def test_bfloat16_training_from_pixels_resumes_exactly_and_differs_from_float32(monkeypatch, tiny_css, tmp_path):
    _cpu(monkeypatch, avx512_bf16=True)  # bfloat16 on any CPU (emulated where it is not native)
    settings = [f"data.root={tiny_css}", *PIXELS]
    train(load_config(None, [*settings, "train.iterations=4"]), tmp_path / "straight", progress=False)
    train(load_config(None, [*settings, "train.iterations=2"]), tmp_path / "resumed", progress=False)
    train(load_config(None, [*settings, "train.iterations=4"]), tmp_path / "resumed", resume=True, progress=False)
    train(load_config(None, [*settings, "train.iterations=4", "train.cpu_amp=false"]), tmp_path / "float32",
          progress=False)
    straight, resumed, float32 = (_weights(tmp_path / run) for run in ("straight", "resumed", "float32"))
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    conv = "image_encoder.backbone.trunk.conv1.weight"
    assert conv in straight and not torch.equal(straight[conv], float32[conv])
    torch.testing.assert_close(straight[conv], float32[conv], atol=0.05, rtol=0)  # rounding, not another path


class _Doubling:
    """A stand-in with the one method `embed_targets` calls: an image's feature is twice its index."""

    def __init__(self) -> None:
        self.embedded: list[list[int]] = []

    def encode_targets(self, images: torch.Tensor) -> torch.Tensor:
        self.embedded.append(images[:, 0].tolist())
        return 2 * images


class _Indices:
    def batch(self, indices, device="cpu") -> torch.Tensor:
        return torch.tensor(list(indices), dtype=torch.float32)[:, None]


def test_reference_features_reuse_the_gallery_and_embed_each_other_image_once():
    gallery = torch.tensor([[10.0], [12.0], [14.0]])  # the features of images 0, 2 and 4
    model = _Doubling()
    table, rows = reference_features(model, _Indices(), [2, 7, 2, 0, 7, 9], gallery, {0: 0, 2: 1, 4: 2}, CPU,
                                     progress=False)
    assert model.embedded == [[7.0, 9.0]]
    assert table.flatten().tolist() == [10.0, 12.0, 14.0, 14.0, 18.0]
    assert rows.tolist() == [1, 3, 1, 0, 3, 4]


def test_evaluation_from_gallery_features_matches_encoding_every_reference(tiny_css):
    model, config = _tirg()
    _, test_split = load_splits(load_config(None, [f"data.root={tiny_css}"]).data)
    images = PixelImages(test_split.image_paths, progress=False)
    evaluate = partial(evaluate_split, split=test_split, images=images, protocol=css_protocol(config.protocol),
                       device=CPU, progress=False)
    sizes = _tower_batches(model)
    reused = evaluate(model)
    gallery_passes = len(sizes)
    model.composes_image_features = False  # the instance encodes its references as a pixel model would
    assert reused == pytest.approx(evaluate(model), abs=1e-9)
    assert sum(sizes[:gallery_passes]) == len(images)  # the gallery alone: no reference took a pass of its own
    assert sum(sizes[gallery_passes:]) == len(images) + len(test_split.queries)
