"""Portrait loading (every bad input gets its own one-line ImageError) and the official resize-and-centre-crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from _util import MEDIA, png_header_only
from flashhead.errors import ImageError
from flashhead.media.image import load_image, resize_and_center_crop, to_tensor

PORTRAITS = MEDIA / "portraits"


# --- loading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut_woman_512.png", "cc0_man_three_quarter_profile.jpg", "tiny_face_112.png"])
def test_load_real_portraits(name):
    image = load_image(PORTRAITS / name)
    assert image.mode == "RGB"
    with Image.open(PORTRAITS / name) as original:
        assert image.size == original.size


def test_load_webp_and_inputs_of_every_kind(tmp_path):
    source = load_image(PORTRAITS / "painting_mona_lisa.png")
    source.save(tmp_path / "p.webp", quality=90)
    assert load_image(tmp_path / "p.webp").size == source.size
    assert load_image(str(tmp_path / "p.webp")).size == source.size
    array = np.asarray(source)
    assert np.array_equal(np.asarray(load_image(array)), array)
    assert np.array_equal(np.asarray(load_image(source)), array)
    assert load_image(array[..., 0]).mode == "RGB"  # greyscale (H, W)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (100, 200)  # displayed upright: portrait orientation
    top, bottom = np.asarray(image)[:100].mean(), np.asarray(image)[100:].mean()
    assert top > 200 and bottom < 50  # the white half is on top after a clockwise turn


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish everywhere ...
    rgba[:, 40:, 3] = 255  # ... but only the right half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    image = np.asarray(load_image(tmp_path / "cutout.png"))
    assert (image[:, :40] == 255).all()
    assert (image[:, 40:] == (200, 0, 0)).all()
    assert np.array_equal(np.asarray(load_image(rgba)), image)  # RGBA arrays too
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    palette.info["transparency"] = 0
    assert load_image(palette).mode == "RGB"


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    image = np.asarray(load_image(tmp_path / "deep.png"))
    assert image[0, 0, 0] == 0 and image[0, -1, 0] == 255
    assert 100 < image[0, 64, 0] < 160  # mid-grey stays mid-grey


def error_of(source) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file():
    message = error_of(PORTRAITS / "does_not_exist.png")
    assert "does_not_exist.png" in message and "not found" in message


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    message = error_of(tmp_path / "empty.jpg")
    assert "empty.jpg" in message and "empty" in message


def test_not_an_image():
    message = error_of(MEDIA / "bad" / "not_an_image.png")
    assert "not_an_image.png" in message and "not an image" in message


def test_truncated_jpeg(tmp_path):
    data = (PORTRAITS / "cc0_woman_headscarf.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    message = error_of(tmp_path / "half.jpg")
    assert "half.jpg" in message and "truncated" in message


def test_huge_image_is_refused_from_its_header(tmp_path):
    # 30000 x 30000 is past PIL's own decompression-bomb limit; 8000 x 8000 (64 MP) only past ours.
    # Neither file holds pixels, so a passing test also shows nothing was decoded.
    for side in (30000, 8000):
        message = error_of(png_header_only(tmp_path / f"huge{side}.png", side, side))
        assert f"huge{side}.png" in message and "too large" in message
    assert "8000x8000" in error_of(png_header_only(tmp_path / "huge.png", 8000, 8000))
    with pytest.raises(ImageError, match="too large"):
        load_image(np.zeros((100, 100, 3), np.uint8), max_pixels=5000)


def test_too_small_and_other_bad_inputs(tmp_path):
    Image.new("RGB", (32, 200)).save(tmp_path / "thin.png")
    message = error_of(tmp_path / "thin.png")
    assert "thin.png" in message and "too small" in message and "32x200" in message
    assert "not a file" in error_of(tmp_path)
    assert "dtype" in error_of(np.zeros((100, 100, 3), np.float32))
    assert "shape" in error_of(np.zeros((100, 100, 2), np.uint8))
    assert "cannot read an image" in error_of(12345)


# --- resize and centre crop --------------------------------------------------------------------------------


def coordinate_image(width: int, height: int) -> np.ndarray:
    """Pixels that say where they are: R, G = column (low, high byte), B = row."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return np.stack([x % 256, x // 256, y % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("width", "height", "left", "top"),
    [
        (513, 512, 0, 0),  # excess 1: round(0.5) = 0, extra column on the right
        (515, 512, 2, 0),  # excess 3: round(1.5) = 2, extra column on the left
        (517, 512, 2, 0),  # excess 5: round(2.5) = 2 (half to even), extra columns on the right
        (512, 519, 0, 4),  # excess 7: round(3.5) = 4
        (512, 512, 0, 0),
    ],
)
def test_center_crop_rounds_like_torchvision(width, height, left, top):
    # At scale 1 PIL's resize is a copy, so the crop offset can be read straight off the pixels.
    out = resize_and_center_crop(coordinate_image(width, height), (512, 512))
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    assert int(out[0, 0, 0]) + 256 * int(out[0, 0, 1]) == left
    assert int(out[0, 0, 2]) == top


def official_resize_and_centercrop(image: Image.Image, target_h: int, target_w: int) -> np.ndarray:
    """The official function, written out with numpy in place of torchvision's center_crop."""
    scale = max(target_h / image.height, target_w / image.width)
    final_h, final_w = math.ceil(scale * image.height), math.ceil(scale * image.width)
    resized = np.array(image.resize((final_w, final_h), resample=Image.BILINEAR))
    top, left = int(round((final_h - target_h) / 2.0)), int(round((final_w - target_w) / 2.0))
    return resized[top : top + target_h, left : left + target_w]


@pytest.mark.parametrize("size", [(97, 131), (300, 447), (1434, 2333), (640, 360), (1001, 999), (2000, 1000)])
@pytest.mark.parametrize("target", [(512, 512), (480, 832), (511, 509)])
def test_resize_and_center_crop_matches_official(size, target):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = resize_and_center_crop(image, target)
    assert out.shape == (*target, 3)
    assert np.array_equal(out, official_resize_and_centercrop(image, *target))
    assert np.array_equal(resize_and_center_crop(np.asarray(image), target), out)  # arrays too


def test_to_tensor_is_the_official_normalisation():
    image = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        x = to_tensor(image, dtype=dtype)
        assert x.shape == (1, 3, 1, 16, 16) and x.dtype == dtype
        official = (torch.from_numpy(image)[None].permute(0, 3, 1, 2)[:, :, None].to(dtype) / 255 - 0.5) * 2
        assert torch.equal(x, official)
    x = to_tensor(image)
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, :, 0, 0, 0].tolist() == pytest.approx([-1.0, 1 / 255 * 2 - 1, 2 / 255 * 2 - 1])
    with pytest.raises(ImageError):
        to_tensor(image.astype(np.float32))


def test_a_video_given_as_the_portrait_is_named_as_such():
    video = MEDIA / "video" / "talk_man_suit_6s.mp4"
    assert error_of(video) == f"{video}: a video, not an image; give one still frame of it as the portrait"
    assert "a video" not in error_of(MEDIA / "audio" / "speech_en_radio31_16k_8s.wav")
