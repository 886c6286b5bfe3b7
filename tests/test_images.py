"""The one image pipeline: any decodable photo becomes upright RGB fitted to the model's input by its
preprocessing (crop, pad or targetpad, with an optional pre-crop size)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cirlab.evaluate import result_paths
from cirlab.images import (
    ImageDecodeError,
    Preprocessing,
    as_size,
    centre_offsets,
    decode_image,
    fit_image,
    image_tensor,
    load_image,
    stored_image,
)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


_NOISE_PNG = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))      # fully transparent: white
    rgba.putpixel((1, 0), (0, 0, 0, 128))      # half black over white: mid grey
    rgb = decode_image(_encoded(rgba, "PNG"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((2, 1)) == (255, 0, 0)
    assert all(abs(channel - 127) <= 1 for channel in rgb.getpixel((1, 0)))
    la = Image.new("LA", (2, 2), (0, 0))
    assert decode_image(_encoded(la, "PNG")).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_a_transparent_colour_is_white_there():
    palette = Image.new("P", (3, 1), 0)
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putpixel((2, 0), 1)
    rgb = decode_image(_encoded(palette, "PNG", transparency=0))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (255, 255, 255), (200, 100, 0)]


def test_sixteen_bit_grey_is_scaled_by_its_range_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    rgb = decode_image(_encoded(Image.fromarray(values), "PNG"))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]


def test_cmyk_jpeg_decodes_to_rgb():
    rgb = decode_image(_encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    red, green, blue = rgb.getpixel((4, 4))
    assert rgb.mode == "RGB" and red > 240 and green < 15 and blue < 15


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (6, 2), (0, 0, 0))
    wide.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    upright = decode_image(_encoded(wide, "PNG", exif=exif))
    assert upright.size == (2, 6)
    assert upright.getpixel((1, 0)) == (255, 255, 255)  # the stored top-left corner ends at the top right


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animations_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    red, green, blue = decode_image(data).getpixel((4, 4))
    assert red > 200 and blue < 50


def test_a_pil_image_from_python_gets_the_same_rules_as_a_file():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert fit_image(rgba, None).getpixel((0, 0)) == (255, 255, 255)  # on white, not on black
    assert image_tensor(Image.new("I;16", (3, 3), 65535), 4).shape == (3, 4, 4)


def test_fit_image_covers_then_crops_the_centre():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # the middle third is white
    fitted = fit_image(image, 10)
    assert fitted.size == (10, 10) and np.asarray(fitted).min() >= 250  # only the white centre remains
    assert fit_image(image, (5, 15)).size == (15, 5)                    # (height, width)
    assert fit_image(image, None).size == (30, 10)


# (98, 108) to 64 once failed: its float crop box started at -1e-14, which Pillow refuses
@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (4000, 1), (3, 100000), (98, 108), (108, 98), (7, 3)])
def test_any_size_and_aspect_fits_without_a_huge_intermediate(size):
    image = Image.new("RGB", size, (12, 34, 56))
    assert image_tensor(image, 64).shape == (3, 64, 64)
    assert fit_image(image, 64).getpixel((32, 32)) == (12, 34, 56)


def test_the_pixel_limit_is_on_the_total_so_a_panorama_within_it_passes():
    panorama = _encoded(Image.new("RGB", (8192, 512)), "PNG")
    assert decode_image(panorama, max_pixels=8192 * 512).size == (8192, 512)
    with pytest.raises(ImageDecodeError, match="8192 x 512 pixels") as refused:
        decode_image(panorama, max_pixels=8192 * 512 - 1)
    assert refused.value.too_large


@pytest.mark.parametrize(("data", "fragment"), [(b"", "is empty"), (b"not an image at all", "no known image format"),
                                                (_NOISE_PNG[: len(_NOISE_PNG) // 2], "not a readable")])
def test_undecodable_bytes_say_why(data, fragment):
    with pytest.raises(ImageDecodeError, match=fragment) as refused:
        decode_image(data, formats=("PNG", "JPEG"))
    assert not refused.value.too_large


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ImageDecodeError, match=f"{tmp_path / 'gone.png'}: missing image"):
        load_image(tmp_path / "gone.png")


def test_sizes_are_height_width_and_positive():
    assert as_size(64) == (64, 64) and as_size([48, 32]) == (48, 32) and as_size(None) is None
    with pytest.raises(ValueError, match="positive"):
        as_size(0)


@pytest.mark.parametrize(("given", "written"), [("x.json", ("x.json", "x.md")), ("x.md", ("x.json", "x.md")),
                                                ("run.v2", ("run.v2.json", "run.v2.md")), ("x", ("x.json", "x.md"))])
def test_eval_out_honours_a_given_suffix(given, written):
    assert result_paths(Path("out") / given) == tuple(Path("out") / name for name in written)


RED, GREY, BLUE = (200, 0, 0), (90, 90, 90), (0, 0, 200)


def _noise(width: int, height: int, top: int = 256) -> Image.Image:
    """Random pixels below `top`, so any pure-white column comes from a pad."""
    return Image.fromarray(np.random.default_rng(width + height).integers(0, top, (height, width, 3), dtype=np.uint8))


def _tall_bands() -> Image.Image:
    """100 wide x 300 tall: red rows 0-59, grey 60-239, blue 240-299."""
    pixels = np.empty((300, 100, 3), dtype=np.uint8)
    pixels[:60], pixels[60:240], pixels[240:] = RED, GREY, BLUE
    return Image.fromarray(pixels)


def test_crop_is_the_default_and_keeps_the_centre_rows_of_a_tall_photo():
    photo = _noise(100, 300)
    assert Preprocessing().resize_mode == "crop"
    assert np.array_equal(np.asarray(fit_image(photo, Preprocessing(size=100))), np.asarray(photo)[100:200])
    assert np.array_equal(np.asarray(fit_image(photo, 64)), np.asarray(fit_image(photo, Preprocessing(size=64))))


def test_targetpad_keeps_the_central_rows_of_a_tall_photo_between_black_bars():
    photo = _noise(100, 300)
    # ratio 3 >= 1.25: int((300 / 1.25 - 100) / 2) = 70 black columns a side make it 240 x 300; at 240 the scale
    # is 1 and the centre crop keeps rows 30-269 (where "crop" keeps 100-199), pixel for pixel
    fitted = np.asarray(fit_image(photo, Preprocessing(size=240, resize_mode="targetpad")))
    assert fitted.shape == (240, 240, 3)
    assert np.array_equal(fitted[:, 70:170], np.asarray(photo)[30:270])
    assert (fitted[:, :70] == 0).all() and (fitted[:, 170:] == 0).all()


def test_targetpad_resampled_keeps_the_end_bands_that_crop_cuts_away():
    fitted = np.asarray(fit_image(_tall_bands(), Preprocessing(size=120, resize_mode="targetpad")))
    # scale 1/2 of the 240 x 300 padded photo, box rows 30-269: output row r reads source rows 2r+27 to 2r+34
    # (bicubic reaches 4 source rows), so rows 0-12 see red only and the last 13 blue only
    assert (fitted[:13, 40:80] == RED).all() and (fitted[-13:, 40:80] == BLUE).all()
    assert (fitted[13:-13, 40:80] != RED).any(axis=2).all()
    assert (fitted[:, :30] == 0).all() and (fitted[:, 90:] == 0).all()  # the 70-column bars, halved
    assert (np.asarray(fit_image(_tall_bands(), 120)) == GREY).all()  # crop: rows 100-199 only, all grey


def test_targetpad_leaves_a_photo_below_the_ratio_alone():
    photo = _noise(100, 124)  # ratio 1.24 < 1.25: no pad, so exactly "crop"
    assert np.array_equal(np.asarray(fit_image(photo, Preprocessing(size=64, resize_mode="targetpad"))),
                          np.asarray(fit_image(photo, 64)))


def test_pad_adds_pure_white_bars_with_the_odd_column_on_the_right():
    photo = _noise(101, 300, top=255)
    fitted = np.asarray(fit_image(photo, Preprocessing(size=300, resize_mode="pad")))
    white = (fitted == 255).all(axis=(0, 2))
    assert np.flatnonzero(~white).tolist() == list(range(99, 200))  # 199 columns of pad: 99 left, 100 right
    assert np.array_equal(fitted[:, 99:200], np.asarray(photo))


def test_pad_resampled_blends_only_the_two_columns_at_each_edge():
    colour = np.array([40, 80, 120])
    photo = Image.new("RGB", (100, 300), tuple(colour.tolist()))
    fitted = np.asarray(fit_image(photo, Preprocessing(size=150, resize_mode="pad", interpolation="bilinear")))
    # the photo fills padded columns 100-199 of 300; at scale 1/2 output column c averages padded columns
    # 2c-1 .. 2c+2 with weights 1, 3, 3, 1 (Pillow's bilinear), so columns 49, 50, 99, 100 mix bar and photo
    white = (fitted == 255).all(axis=(0, 2))
    pure = (fitted == colour).all(axis=2).all(axis=0)
    assert white.sum() == 98 and np.flatnonzero(~white).tolist() == list(range(49, 101))
    assert np.flatnonzero(pure).tolist() == list(range(51, 99))
    for column, bar_share in ((49, 7 / 8), (50, 1 / 8), (99, 1 / 8), (100, 7 / 8)):
        expected = bar_share * 255 + (1 - bar_share) * colour
        assert np.abs(fitted[:, column].astype(float) - expected).max() <= 1


def test_a_pre_crop_size_fits_first_then_takes_the_centre_window():
    photo = _noise(200, 256)
    spec = Preprocessing(size=224, resize_mode="pad", pre_crop_size=256)
    stored = np.asarray(stored_image(photo, spec))
    assert stored.shape == (256, 256, 3) and np.array_equal(stored[:, 28:228], np.asarray(photo))
    assert (stored[:, :28] == 255).all() and (stored[:, 228:] == 255).all()
    assert np.array_equal(np.asarray(fit_image(photo, spec)), stored[16:240, 16:240])
    assert centre_offsets((257, 259), (224, 224)) == (16, 18)  # torchvision's CenterCrop rounding, half to even


@pytest.mark.parametrize("mode", ["pad", "targetpad"])
@pytest.mark.parametrize("size", [(1, 100000), (100000, 1), (30, 1)])
def test_extreme_strips_pad_without_a_huge_canvas(mode, size):
    fitted = np.asarray(fit_image(Image.new("RGB", size, (12, 34, 56)), Preprocessing(size=64, resize_mode=mode)))
    assert fitted.shape == (64, 64, 3)
    fill = 255 if mode == "pad" else 0
    assert (fitted[0, 0] == fill).all() and (fitted[-1, -1] == fill).all()
