import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cirlab.checkpoint import load_checkpoint
from cirlab.config import ModelConfig, load_config
from cirlab.data.css import object_mask, render_scene
from cirlab.data.regions import mask_box
from cirlab.encoders.regions import (
    REGION_CACHE,
    GridRegions,
    RegionBatch,
    RegionImages,
    attach_regions,
    grid_boxes,
    position_features,
    propose_boxes,
    read_region_file,
    roi_features,
    write_region_file,
)
from cirlab.encoders.text import Vocabulary
from cirlab.image_batches import PixelImages
from cirlab.images import load_image
from cirlab.index.build import build_index, list_images
from cirlab.index.search import search_index
from cirlab.models.lbf import LBF
from cirlab.models.registry import create_model
from cirlab.train import METRICS, train

TEXTS = ("add red circle to topleft", "remove blue object")


def lbf_model(texts: tuple[str, ...] = TEXTS, **options) -> LBF:
    """A small LBF over a random ResNet-18 cut after layer1 (64 channels, a 16 x 16 map at 64 px)."""
    config = ModelConfig(name="lbf", embed_dim=8, image_backbone="resnet18", image_weights=None,
                         backbone_upto="layer1",
                         options={"width": 16, "heads": 2, "visual_layers": 1, "text_layers": 1, **options})
    return create_model(config, Vocabulary.build(texts)).eval()


def test_position_features_of_known_boxes(tmp_path):
    # A 32 x 32 px box with its top-left corner at (16, 8) in a 64 x 64 image.
    boxes = torch.tensor([[16.0, 8.0, 48.0, 40.0]]) / 64
    assert position_features(boxes).tolist() == [[0.25, 0.125, 0.5, 0.5]]
    assert position_features(boxes, anchor="center").tolist() == [[0.5, 0.375, 0.5, 0.5]]
    # Detector files hold pixel boxes of a 200 x 100 image: normalised by its own width and height.
    write_region_file(tmp_path / "img.npz", np.array([[50, 25, 150, 75], [0, 0, 20, 10]]), image_w=200, image_h=100)
    normalised, features, aspect = read_region_file(tmp_path / "img.npz", limit=1, with_features=False)
    assert normalised.tolist() == [[0.25, 0.25, 0.75, 0.75]] and features is None and aspect == 2.0
    assert position_features(torch.from_numpy(normalised)).tolist() == [[0.25, 0.25, 0.5, 0.5]]


def test_grid_boxes_tile_the_image():
    assert grid_boxes(4).tolist() == [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    small = grid_boxes(18)  # 3 rows x 6 columns
    assert small.shape == (18, 4) and small[5].tolist() == pytest.approx([5 / 6, 0, 1, 1 / 3])


@pytest.mark.parametrize("count, height, width, size", [(16, 8, 8, 2), (6, 7, 10, 3), (4, 16, 16, 1)])
def test_grid_features_equal_roi_align_and_have_a_double_backward(count, height, width, size):
    torch.manual_seed(0)
    feature_map = torch.randn(3, 5, height, width, requires_grad=True)
    boxes = grid_boxes(count).expand(3, -1, -1)
    grid = GridRegions(count).features(feature_map, boxes, size)
    assert grid.shape == (3, count, 5 * size * size)
    torch.testing.assert_close(grid, roi_features(feature_map, boxes, size), atol=1e-5, rtol=1e-5)
    (gradient,) = torch.autograd.grad(grid.square().sum(), feature_map, create_graph=True)
    gradient.sum().backward()  # torchvision's roi_align refuses this second backward
    assert feature_map.grad.abs().sum() > 0


def test_proposals_find_each_css_object():
    objects = [{"shape": "rectangle", "color": "red", "size": "large", "pos": (0.25, 0.25)},
               {"shape": "triangle", "color": "blue", "size": "small", "pos": (0.75, 0.6)}]
    image = (render_scene(objects) * 255).round().astype(np.uint8)
    boxes = propose_boxes(image, limit=10, sigma=0.0, min_size=8) * 64
    expected = [[0, 0, 64, 64]] + [mask_box(object_mask(obj)) for obj in objects]  # whole image, then by area
    assert boxes.tolist() == expected
    assert propose_boxes(image, limit=2, sigma=0.0, min_size=8).shape == (2, 4)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_padding_changes_nothing(combine):
    model = lbf_model(regions="detector", region_dir="unused", region_dim=6, combine=combine)
    torch.manual_seed(0)
    features, boxes = torch.randn(2, 3, 6), torch.rand(2, 3, 2).repeat(1, 1, 2) * torch.tensor([1, 1, 2, 2]) / 2
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tight = RegionBatch(None, boxes, mask, features)
    # The same real regions, padded to 5 slots with other junk (image 1's third slot included).
    junk_features, junk_boxes = torch.randn(2, 5, 6) * 9, torch.rand(2, 5, 4)
    junk_features[0, :3], junk_boxes[0, :3] = features[0], boxes[0]
    junk_features[1, :2], junk_boxes[1, :2] = features[1, :2], boxes[1, :2]
    loose = RegionBatch(None, junk_boxes, torch.tensor([[True] * 3 + [False] * 2, [True] * 2 + [False] * 3]),
                        junk_features)
    texts = ["add red circle", "remove"]
    with torch.no_grad():
        assert torch.allclose(model.encode_targets(tight), model.encode_targets(loose), atol=1e-5)
        assert torch.allclose(model.encode_queries(tight, texts), model.encode_queries(loose, texts), atol=1e-5)
        # Padding words: "remove" alone (one word) or beside a five-word text (padded to five).
        alone = model.encode_queries(RegionBatch(None, boxes[1:], mask[1:], features[1:]), ["remove"])
        assert torch.allclose(alone[0], model.encode_queries(tight, ["add red circle to topleft", "remove"])[1],
                              atol=1e-5)
        assert not torch.allclose(alone[0], model.encode_queries(tight, texts)[0], atol=1e-3)


def test_the_three_region_sources_feed_the_fusion(tiny_css, tmp_path):
    paths = sorted((tiny_css / "images").glob("*.png"))[:3]
    pixels = PixelImages(paths, progress=False)
    # Detector files: 4 boxes and 12-d features for image 0, 2 for the others.
    for i, path in enumerate(paths):
        count = 4 if i == 0 else 2
        write_region_file(tmp_path / f"{path.stem}.npz", np.tile([[0, 0, 32, 32]], (count, 1)), 64, 64,
                          features=np.full((count, 12), float(i)))
    for options, dim in [({"regions": "grid", "num_regions": 6}, 64 * 4),
                         ({"regions": "proposals", "num_regions": 6, "proposal_sigma": 0.0}, 64 * 4),
                         ({"regions": "boxes", "num_regions": 6, "region_dir": str(tmp_path)}, 64 * 4),
                         ({"regions": "detector", "num_regions": 3, "region_dir": str(tmp_path),
                           "region_dim": 12}, 12)]:
        model = lbf_model(**options)
        images = attach_regions(model, pixels, pixels, paths, cache_dir=None, progress=False)
        assert isinstance(images, RegionImages) == (options["regions"] != "grid")
        features, boxes, mask = model.region_features(images.batch([0, 1, 2]))
        count = {"grid": 6, "detector": 3, "boxes": 4}.get(options["regions"], int(mask.sum(1).max()))
        assert features.shape == (3, count, dim) and boxes.shape == (3, count, 4) and mask.shape == (3, count)
        with torch.no_grad():
            assert model.encode_queries(images.batch([0, 1, 2]), list(TEXTS) + [""]).shape == (3, 8)
            assert model.encode_targets(images.batch([0, 1, 2])).shape == (3, 8)
        if options["regions"] == "detector":  # at most K = 3 read, features as written
            assert mask.tolist() == [[True] * 3, [True, True, False], [True, True, False]]
            assert features[2, :2].eq(2.0).all()
        if options["regions"] == "proposals":  # the whole image first, then the objects
            assert boxes[:, 0].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 3 and mask.sum(1).min() >= 2


def test_file_sources_refuse_what_they_cannot_use(tiny_css, tmp_path):
    paths = sorted((tiny_css / "images").glob("*.png"))[:2]
    pixels = PixelImages(paths, progress=False)
    model = lbf_model(regions="detector", region_dir=str(tmp_path), region_dim=4)
    with pytest.raises(ValueError, match="has no detector output"):
        model.encode_targets(pixels.batch([0]))
    with pytest.raises(ValueError, match=f"no detector output for image .*{paths[0].stem}.npz"):
        attach_regions(model, pixels, pixels, paths, progress=False)
    np.savez(tmp_path / f"{paths[0].stem}.npz", bbox=np.zeros((2, 3)), image_w=64, image_h=64, x=np.zeros((2, 4)))
    with pytest.raises(ValueError, match=f"region file .*{paths[0].stem}.npz: bbox must be n x 4"):
        attach_regions(model, pixels, pixels, paths, progress=False)
    write_region_file(tmp_path / f"{paths[0].stem}.npz", np.zeros((1, 4)), image_w=128, image_h=64)
    boxes_model = lbf_model(regions="boxes", region_dir=str(tmp_path))
    with pytest.raises(ValueError, match="do not fit the resized and cropped images"):
        attach_regions(boxes_model, pixels, pixels, paths[:1], progress=False)
    with pytest.raises(ValueError, match="unknown LBF option.*num_region\\b"):
        lbf_model(num_region=3)


def test_each_word_attends_the_region_it_names():
    # Regions and words in 2-d, no self-attention layers, hand-set weights: a "red" region [1, -1], a
    # "blue" region [-1, 1], and a padded third region that looks red but must get no attention.
    model = lbf_model(("red", "blue"), regions="detector", region_dir="unused", region_dim=2, width=2, heads=1,
                      visual_layers=0, text_layers=0, dropout=0.0)
    with torch.no_grad():
        model.position.weight.zero_(), model.position.bias.zero_()
        model.region_projection[0].weight.copy_(2 * torch.eye(2)), model.region_projection[0].bias.zero_()
        words = model.text_encoder
        words.position.weight.zero_()
        words.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [-3.0, 3.0], [3.0, -3.0]]))  # <UNK>, blue, red
        attention = model.words_to_regions[0].attention
        attention.in_proj_weight.copy_(torch.cat([5 * torch.eye(2), 5 * torch.eye(2), torch.eye(2)]))
        attention.in_proj_bias.zero_()
        regions = torch.tensor([[[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]]])
        batch = RegionBatch(None, torch.tensor([[[0, 0, 0.5, 1], [0.5, 0, 1, 1], [0, 0, 1, 1]]]),
                            torch.tensor([[True, True, False]]), regions)
        result = model.attention(batch, ["blue red"])
    assert result.words == [["blue", "red"]]
    assert result.weights.shape == (1, 2, 2)  # padding trimmed away
    assert result.weights[0].argmax(dim=1).tolist() == [1, 0]  # blue -> region 1, red -> region 0
    assert result.weights[0].max(dim=1).values.min() > 0.99
    assert result.boxes[0, 1].tolist() == [0.5, 0, 1, 1]


def test_training_reduces_the_loss_and_proposals_are_cached(tiny_css, tmp_path):
    tiny_css = Path(shutil.copytree(tiny_css, tmp_path / "css"))  # the proposal cache is written under it
    options = ("{regions: proposals, num_regions: 8, width: 32, heads: 2, visual_layers: 1, text_layers: 1, "
               "proposal_sigma: 0.0, proposal_min_size: 8}")
    config = load_config("configs/css/lbf_big_cpu.yaml", [
        f"data.root={tiny_css}", f"model.options={options}", "model.embed_dim=32", "train.batch_size=16",
        "train.iterations=40", "train.eval_every=40", "train.log_every=1", "train.lr=0.05", "data.val_fraction=0.2"])
    train(config, tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    losses = [record["loss"] for record in records if "step" in record and "loss" in record]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.7 * first, (first, last)
    cached = list((tiny_css / REGION_CACHE).glob("proposals-*.npz"))
    assert len(cached) == 1
    # The cached boxes are what the model computes on the fly from bare pixels (search with a new image).
    model = load_checkpoint(tmp_path / "run" / "best").model.eval()
    with np.load(cached[0]) as stored:
        boxes = torch.from_numpy(stored["boxes"][:2])
    paths = sorted((tiny_css / "images").glob("css_train_*.png"))[:2]
    pixels = PixelImages(paths, progress=False)
    bare = pixels.batch([0, 1])  # what a search with these two files hands the model
    assert torch.equal(model.region_source.boxes_of(bare)[0], boxes)
    wrapped = attach_regions(model, pixels, pixels, paths, cache_dir=None, progress=False)
    with torch.no_grad():
        assert torch.allclose(model.encode_queries(bare, list(TEXTS)),
                              model.encode_queries(wrapped.batch([0, 1]), list(TEXTS)), atol=1e-6)
    # Index the images and search with an uploaded one: the ranking of the model's own exact scores.
    names = list_images(tiny_css / "images")
    with build_index(tmp_path / "run" / "best", tiny_css / "images", tmp_path / "index", progress=False) as index:
        hits = search_index(index, model, load_image(paths[0]), TEXTS[1], k=3)
    gallery = PixelImages([tiny_css / "images" / name for name in names], progress=False)
    with torch.no_grad():
        scores = model.score(model.encode_queries(bare[:1], [TEXTS[1]]), model.encode_targets(gallery.batch(
            range(len(names)))))
    assert [name for name, _ in hits] == [names[i] for i in scores[0].topk(3).indices]
