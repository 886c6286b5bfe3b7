"""Dominant-portion masks: the cache, IoU, the sources (saliency, oracle, CLIPSeg) and how masks reach a model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.cli import main
from cirlab.data.garments import generate_garments
from cirlab.encoders.image import ImageEncoder, create_backbone
from cirlab.image_batches import CachedMaps, PixelImages
from cirlab.images import fit_image
from cirlab.masks.batches import MaskedBatch, attach_masks, mask_images
from cirlab.masks.build import build_masks, dataset_images
from cirlab.masks.cache import MANIFEST, MaskCache
from cirlab.masks.iou import IoUSummary, mask_iou
from cirlab.masks.saliency import saliency_mask
from cirlab.masks.sources import OracleMasks, SaliencyMasks, create_mask_source, ground_truth_path


@pytest.fixture(scope="module")
def garments(tmp_path_factory) -> Path:
    """One family per category and split (45 photos), in both layouts (the Fashion200k photos are hard links)."""
    return generate_garments(tmp_path_factory.mktemp("garments") / "g", image_size=48, progress=False, families=1)


def test_cache_round_trip_keeps_every_pixel(tmp_path):
    image = tmp_path / "data" / "images" / "a.jpg"
    image.parent.mkdir(parents=True)
    mask = np.random.default_rng(0).integers(0, 256, size=(7, 5), dtype=np.uint8)
    cache = MaskCache(tmp_path / "data", "saliency")
    cache.prepare({"version": 1})
    cache.write(image, mask)
    assert cache.path_of(image) == tmp_path / "data" / "dominant_masks" / "saliency" / "images" / "a.png"
    np.testing.assert_array_equal(cache.read(image), mask)
    assert MaskCache.find(image, "saliency").root == tmp_path / "data"
    assert MaskCache.find(image, "oracle") is None
    assert json.loads((cache.folder / MANIFEST).read_text())["settings"] == {"version": 1}
    with pytest.raises(ValueError, match="made with"):
        cache.prepare({"version": 2})
    cache.prepare({"version": 2}, overwrite=True)
    assert not cache.has(image) and cache.settings() == {"version": 2}
    with pytest.raises(ValueError, match="not inside the dataset folder"):
        cache.path_of(tmp_path / "elsewhere.jpg")


def test_iou_of_hand_made_masks():
    truth = np.zeros((4, 4), dtype=np.uint8)
    truth[0, :] = 255                               # 4 pixels
    predicted = np.zeros((4, 4), dtype=np.uint8)
    predicted[0, 2:] = 200                          # 2 of them
    predicted[1, 0] = 128                           # one more, just in (>= 128)
    predicted[2, 0] = 127                           # just out
    assert mask_iou(predicted, truth) == pytest.approx(2 / 5)
    assert mask_iou(truth, truth) == 1.0
    assert mask_iou(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    assert mask_iou(np.zeros_like(truth), truth) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        mask_iou(truth, truth[:3])
    summary = IoUSummary.of([0.0, 0.5, 1.0])
    assert (summary.count, summary.mean, summary.median) == (3, 0.5, 0.5) and summary.p10 == pytest.approx(0.1)


def test_saliency_finds_the_central_object_not_the_clutter():
    image = np.full((64, 64, 3), (200, 180, 120), dtype=np.uint8)
    image[16:48, 20:44] = (30, 60, 200)      # the dominant object, 32 x 24
    image[4:10, 4:10] = (220, 30, 30)        # a small prop near a corner, not touching the border
    truth = np.zeros((64, 64), dtype=np.uint8)
    truth[16:48, 20:44] = 255
    mask = saliency_mask(image)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert mask_iou(mask, truth) > 0.9 and mask[7, 7] == 0
    assert not saliency_mask(np.full((40, 30, 3), 90, dtype=np.uint8)).any()   # nothing stands out
    large = np.asarray(Image.fromarray(image).resize((256, 256), Image.Resampling.NEAREST))
    assert mask_iou(saliency_mask(large), np.asarray(Image.fromarray(truth).resize((256, 256)))) > 0.9


def test_build_scores_each_source_against_the_ground_truth(garments, capsys):
    images = dataset_images(garments)
    assert len(images) == 90 and not any("masks" in image.parts for image in images)   # 45 photos, two layouts
    f200k = next(image for image in images if "women" in image.parts)
    assert ground_truth_path(garments, f200k) == garments / "masks" / f"{f200k.parent.name}.png"

    oracle = build_masks(garments, OracleMasks(), progress=False)
    assert (oracle.computed, oracle.cached, oracle.iou.count, oracle.iou.mean) == (90, 0, 90, 1.0)
    saliency = build_masks(garments, SaliencyMasks(), progress=False)
    assert saliency.iou.count == 90 and saliency.iou.mean > 0.6
    again = build_masks(garments, SaliencyMasks(), progress=False)
    assert (again.computed, again.cached, again.iou) == (0, 90, saliency.iou)
    cache = MaskCache(garments, "saliency")
    layouts = [image for image in images if image.stem in (f200k.parent.name, f200k.stem)]
    np.testing.assert_array_equal(cache.read(layouts[0]), cache.read(layouts[1]))  # one photo, computed once

    assert main(["data", "masks", str(garments), "--source", "oracle"]) == 0
    out = capsys.readouterr().out
    assert "0 oracle mask(s) computed, 90 already cached" in out and "over 90 images: mean 1.000" in out


def test_attached_masks_follow_the_images_preprocessing(garments):
    paths = sorted((garments / "images").glob("*.jpg"))[:4]
    model = torch.nn.Module()
    model.mask_source = OracleMasks()
    pixels = PixelImages(paths, progress=False, size=32)       # 48 px photos resized to 32
    images = attach_masks(model, pixels, pixels, paths, garments, progress=False)
    batch = images.batch([2, 0])
    assert isinstance(batch, MaskedBatch) and batch.images.shape == batch.masks.shape == (2, 3, 32, 32)
    truths = [np.asarray(fit_image(Image.open(ground_truth_path(garments, path)), 32).convert("L"))
              for path in paths]
    expected = mask_images(torch.from_numpy(np.stack(truths))[:, None])
    torch.testing.assert_close(batch.masks, expected[[2, 0]], rtol=0, atol=0)

    encoder = ImageEncoder(create_backbone("efficientnet_lite0", upto="stage2"), out_dim=8, freeze_backbone=True)
    model.image_encoder = encoder
    maps = attach_masks(model, CachedMaps(encoder, pixels, "cpu", progress=False), pixels, paths, garments,
                        progress=False)
    with torch.no_grad():
        direct = encoder.backbone(expected)   # the whole split in one batch, as CachedMaps computes it
    torch.testing.assert_close(maps.batch([2]).masks, direct[2:3].half().float(), rtol=0, atol=0)

    model.mask_source = create_mask_source("none")
    constant = attach_masks(model, pixels, pixels, paths, progress=False).batch([1, 3])
    white = mask_images(torch.full((2, 1, 32, 32), 255, dtype=torch.uint8))
    torch.testing.assert_close(constant.masks, white, rtol=0, atol=0)

    model.mask_source = create_mask_source("clipseg")   # without weights: reads caches only
    with pytest.raises(ValueError, match="--source clipseg --weights"):
        attach_masks(model, pixels, pixels, paths, garments, progress=False)


def _tiny_clipseg(folder: Path) -> torch.nn.Module:
    """A random-init CLIPSeg a few kilobytes big, and a processor with a 54-token vocabulary, saved to `folder`."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {token: i for i, token in enumerate(letters + [f"{c}</w>" for c in letters]
                                                + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                               image_std=[0.229, 0.224, 0.225])
    ids = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
           "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPSegConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16, **ids},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16, reduce_dim=8, extract_layers=[0, 1], decoder_num_attention_heads=2,
        decoder_intermediate_size=16, **ids)
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(folder)
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return model


def test_clipseg_masks_from_a_saved_tiny_model(garments, tmp_path):
    pytest.importorskip("transformers")
    folder = tmp_path / "clipseg"
    folder.mkdir()
    model = _tiny_clipseg(folder)
    from transformers import CLIPSegProcessor

    paths = sorted((garments / "images").glob("*.jpg"))[:3]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({paths[1].stem: "a red dress"}))
    source = create_mask_source("clipseg", folder, "a shirt", captions)
    assert [source.prompt_for(path) for path in paths] == ["a shirt", "a red dress", "a shirt"]
    masks = list(source.compute(garments, paths))

    processor = CLIPSegProcessor.from_pretrained(str(folder))
    for path, mask in zip(paths, masks):
        picture = Image.open(path).convert("RGB")
        inputs = processor(text=[source.prompt_for(path)], images=[picture], return_tensors="pt", padding=True)
        with torch.no_grad():
            probability = torch.sigmoid(model(**inputs).logits).reshape(1, 1, 32, 32)
        resized = torch.nn.functional.interpolate(probability, size=(48, 48), mode="bilinear", align_corners=False)
        expected = (resized[0, 0] * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(mask, expected)
        assert mask.shape == (48, 48) and len(np.unique(mask)) > 1

    built = build_masks(garments, source, progress=False)
    assert built.computed == 90 and built.iou.count == 90 and 0.0 <= built.iou.mean <= 1.0
    assert MaskCache(garments, "clipseg").settings() == {"weights": str(folder), "prompt": "a shirt",
                                                         "captions": str(captions)}
    with pytest.raises(ValueError, match="made with"):
        build_masks(garments, create_mask_source("clipseg", folder), progress=False)   # another prompt
    with pytest.raises(ValueError, match="no config.json"):
        create_mask_source("clipseg", tmp_path)
