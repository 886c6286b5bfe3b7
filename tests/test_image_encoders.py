from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import chelsea
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18

from cirlab.encoders.efficientnet_lite import EfficientNetLite0, default_weights_path
from cirlab.encoders.image import (
    Backbone,
    ImageEncoder,
    create_backbone,
)
from cirlab.images import IMAGENET_MEAN, IMAGENET_STD

IMAGENET_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_efficientnet_lite0_classifies_chelsea_as_a_cat() -> None:
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(default_weights_path(), map_location="cpu", weights_only=True), strict=True)
    preprocess = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    x = preprocess(Image.fromarray(chelsea()))[None]
    with torch.no_grad():
        probs = model.eval()(x).softmax(dim=1)[0]
    top = int(probs.argmax())
    assert top in IMAGENET_CATS
    assert probs[top] > 0.3


def test_efficientnet_default_weights_differ_from_random() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    pretrained = create_backbone("efficientnet_lite0", weights="default").eval()
    random = create_backbone("efficientnet_lite0", weights=None).eval()
    with torch.no_grad():
        assert not torch.allclose(pretrained(x), random(x))


@pytest.mark.parametrize(
    ("name", "upto", "small", "large"),
    [
        ("resnet18", None, (512, 2, 2), (512, 7, 7)),
        ("resnet18", "layer2", (128, 8, 8), (128, 28, 28)),
        ("resnet18", "layer1", (64, 16, 16), (64, 56, 56)),
        ("efficientnet_lite0", None, (1280, 2, 2), (1280, 7, 7)),
        ("efficientnet_lite0", "stage3", (40, 8, 8), (40, 28, 28)),
        ("efficientnet_lite0", "stage5", (112, 4, 4), (112, 14, 14)),
        ("efficientnet_lite0", "stage7", (320, 2, 2), (320, 7, 7)),
    ],
)
def test_upto_map_shapes(name: str, upto: str | None, small: tuple, large: tuple) -> None:
    backbone = create_backbone(name, weights=None, upto=upto).eval()
    assert backbone.out_channels == small[0]
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 64, 64)).shape[1:] == small
        assert backbone(torch.zeros(1, 3, 224, 224)).shape[1:] == large


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="resnet18, efficientnet_lite0"):
        create_backbone("vgg16")
    with pytest.raises(ValueError, match="layer1"):
        create_backbone("resnet18", upto="stage3")
    with pytest.raises(ValueError, match="stage1"):
        create_backbone("efficientnet_lite0", weights=None, upto="layer4")


def test_resnet18_loads_torchvision_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = resnet18(weights=None).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(reference.state_dict(), str(path))
    backbone = create_backbone("resnet18", weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    trunk = nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        assert torch.equal(backbone(x), trunk(x))


def test_resnet18_loads_old_style_pth_without_fc(tmp_path: Path) -> None:
    reference = resnet18(weights=None)
    path = tmp_path / "trunk.pth"
    # Old torchvision checkpoints also lack the BN num_batches_tracked buffers.
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    backbone = create_backbone("resnet18", weights=str(path), upto="layer1")
    assert torch.equal(backbone.trunk.conv1.weight, reference.conv1.weight)


def test_bad_weights_file_raises_naming_it(tmp_path: Path) -> None:
    wrong = tmp_path / "not_a_resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(ValueError, match="not_a_resnet.safetensors"):
        create_backbone("resnet18", weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        create_backbone("efficientnet_lite0", weights=str(garbage))


def _tiny_backbone() -> Backbone:
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    return Backbone(nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU()), out_channels=4)


def test_feature_map_accepts_cached_maps() -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(_tiny_backbone(), out_dim=5).eval()
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        cached = encoder.backbone(pixels)
        assert torch.equal(encoder.feature_map(cached), cached)
        assert torch.equal(encoder(cached), encoder(pixels))
    with pytest.raises(ValueError, match="channels"):
        encoder.feature_map(torch.zeros(1, 7, 4, 4))


def test_frozen_backbone_keeps_eval_mode_and_bn_stats() -> None:
    encoder = ImageEncoder(create_backbone("resnet18", weights=None, upto="layer1"), freeze_backbone=True)
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    encoder.train()
    assert encoder.training and not encoder.backbone.training
    encoder(torch.randn(2, 3, 32, 32)).sum().backward()
    after = encoder.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in encoder.backbone.parameters())
    assert all(p.grad is not None for p in encoder.head.parameters())


def test_gap_matches_hand_computation() -> None:
    encoder = ImageEncoder(_tiny_backbone(), out_dim=2, pooling="gap")
    linear = encoder.head[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]]))
        linear.bias.copy_(torch.tensor([0.0, 1.0]))
    fmap = torch.arange(16.0).view(1, 4, 2, 2)  # channel means: 1.5, 5.5, 9.5, 13.5
    expected = torch.tensor([[1.5 - 9.5 + 27.0, 0.5 * (1.5 + 5.5 + 9.5 + 13.5) + 1.0]])
    assert torch.allclose(encoder.pool(fmap), expected)


def test_flatten_pooling_keeps_position() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="map_size"):
        ImageEncoder(_tiny_backbone(), pooling="flatten")
    encoder = ImageEncoder(_tiny_backbone(), out_dim=3, pooling="flatten", map_size=(2, 2))
    left, right = torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    left[..., 0], right[..., 1] = 1.0, 1.0  # same channel means, different layout
    with torch.no_grad():
        assert encoder.pool(left).shape == (1, 3)
        assert not torch.allclose(encoder.pool(left), encoder.pool(right))
    with pytest.raises(ValueError, match="map_size"):
        encoder.pool(torch.zeros(1, 4, 3, 3))
