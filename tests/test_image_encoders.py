from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.data import chelsea
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18

from cirlab.config import load_config
from cirlab.encoders.efficientnet_lite import EfficientNetLite0, default_weights_path
from cirlab.encoders.image import (
    RESNET_ENDS,
    Backbone,
    ImageEncoder,
    create_backbone,
    image_initialisation,
)
from cirlab.encoders.text import Vocabulary
from cirlab.images import IMAGENET_MEAN, IMAGENET_STD
from cirlab.models.registry import create_model

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


@pytest.mark.parametrize("random_init", [None, "random"])
def test_efficientnet_default_weights_differ_from_random(random_init: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    pretrained = create_backbone("efficientnet_lite0", weights="default").eval()
    random = create_backbone("efficientnet_lite0", weights=random_init).eval()
    bundled = torch.load(default_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(pretrained.trunk.state_dict()["_conv_stem.weight"], bundled["_conv_stem.weight"])
    assert not torch.equal(random.trunk.state_dict()["_conv_stem.weight"], bundled["_conv_stem.weight"])
    with torch.no_grad():
        assert not torch.allclose(pretrained(x), random(x))


# -- where the weights come from --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "file"), [
    ("resnet18", "resnet18-f37072fd.pth"), ("resnet50", "resnet50-0676ba61.pth")])
def test_resnet_default_weights_refuse_and_name_the_file(name: str, file: str) -> None:
    with pytest.raises(ValueError) as refusal:
        create_backbone(name, weights="default")
    message = str(refusal.value)
    assert "model.image_weights" in message
    assert f"model.image_weights=weights/{file}" in message  # the first way out: a local file
    assert "IMAGENET1K_V1" in message
    assert "model.image_weights=random" in message  # the second: train from scratch, said so
    with pytest.raises(ValueError, match=file):
        create_backbone(name)  # "default" is what an unset weights argument means


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_random_weights_are_the_same_random_init_as_none(name: str) -> None:
    torch.manual_seed(3)
    spelled = create_backbone(name, weights="random").state_dict()
    torch.manual_seed(3)
    code = create_backbone(name, weights=None).state_dict()
    assert spelled.keys() == code.keys()
    assert all(torch.equal(spelled[key], code[key]) for key in spelled)


def test_random_weights_reach_a_clip_tower_as_random_init() -> None:
    pytest.importorskip("open_clip")
    torch.manual_seed(4)
    spelled = create_backbone("clip:cirlab-tiny-vit", weights="random").state_dict()
    torch.manual_seed(4)
    code = create_backbone("clip:cirlab-tiny-vit", weights=None).state_dict()
    assert all(torch.equal(spelled[key], code[key]) for key in spelled)


def test_paper_recipe_loads_a_stand_in_imagenet_file(tmp_path: Path) -> None:
    """configs/css/tirg.yaml with a random ResNet-18 state dict in the ImageNet file's place: every trunk
    tensor of the built model is the file's."""
    torch.manual_seed(5)
    state = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.safetensors"
    save_file(state, str(path))
    config = load_config("configs/css/tirg.yaml", [f"model.image_weights={path}"])
    model = create_model(config.model, Vocabulary.build(["make it red"]))
    trunk = model.image_encoder.backbone.trunk.state_dict()
    assert trunk.keys() == {key for key in state if not key.startswith("fc.")}
    assert all(torch.equal(trunk[key], state[key]) for key in trunk)
    assert image_initialisation(config.model.image_backbone, config.model.image_weights) == \
        f"ImageNet weights from {path}"
    missing = tmp_path / "resnet18-f37072fd.pth"
    config = load_config("configs/css/tirg.yaml", [f"model.image_weights={missing}"])
    with pytest.raises(ValueError, match=f"model.image_weights={missing}: no such file.*image_weights=random"):
        create_model(config.model, Vocabulary.build(["make it red"]))


@pytest.mark.parametrize(("backbone", "weights", "text"), [
    ("resnet18", "random", "random init"),
    ("resnet50", None, "random init"),
    ("resnet18", "weights/resnet18-f37072fd.pth", "ImageNet weights from weights/resnet18-f37072fd.pth"),
    ("resnet50", "/data/resnet50-0676ba61.safetensors", "ImageNet weights from /data/resnet50-0676ba61.safetensors"),
    ("resnet50", "weights/resnet18-f37072fd.pth", "weights from weights/resnet18-f37072fd.pth"),  # not resnet50's
    ("resnet18", "runs/a/trunk.pth", "weights from runs/a/trunk.pth"),
    ("efficientnet_lite0", "default", "bundled EfficientNet-Lite0 ImageNet weights"),
    ("efficientnet_lite0", "random", "random init"),
    ("efficientnet_lite0", "mine.pth", "weights from mine.pth"),
    ("clip:ViT-B-32", "random", "random init"),
    ("clip:ViT-B-32", "open_clip:openai", "CLIP weights open_clip:openai (downloaded by open_clip)"),
    ("clip:RN50-quickgelu", "weights/clip/rn50.safetensors", "CLIP weights from weights/clip/rn50.safetensors"),
])
def test_image_initialisation_says_where_the_weights_start(backbone: str, weights: str | None, text: str) -> None:
    assert image_initialisation(backbone, weights) == text


def test_image_initialisation_refuses_what_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="resnet50-0676ba61.pth"):
        image_initialisation("resnet50", "default")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        image_initialisation("vgg16", "random")


def test_every_resnet_recipe_names_its_imagenet_file_or_says_random() -> None:
    """A recipe with a ResNet must say where its weights come from: a torchvision ImageNet file under weights/
    (the papers' start), or "random" on purpose; never "default" or null."""
    resnet_recipes = {}
    for path in sorted(Path("configs").rglob("*.yaml")):
        model = load_config(path).model
        if model.image_backbone in RESNET_ENDS:
            resnet_recipes[path.relative_to("configs").as_posix()] = (model.image_backbone, model.image_weights)
    assert {"css/tirg.yaml", "css/lbf_big.yaml", "fashion200k/lbf_small.yaml", "mitstates/lbf_big.yaml",
            "fashioniq/cmap.yaml"} <= resnet_recipes.keys()
    for recipe, (backbone, weights) in resnet_recipes.items():
        assert weights == "random" or (isinstance(weights, str) and Path(weights).parts[0] == "weights"), recipe
        if weights != "random":
            assert image_initialisation(backbone, weights).startswith("ImageNet weights from weights/"), recipe


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
