"""Loading a portrait safely, and the official resize-and-centre-crop that turns it into the model's reference.

`load_image` is the one door every portrait comes through: it checks the file, refuses images that are too
large before decoding their pixels, applies EXIF orientation and flattens transparency onto white, and turns
every failure into an `ImageError` with a one-line message naming the file.

`resize_and_center_crop` and `to_tensor` reproduce the official `resize_and_centercrop` and the
`(x / 255 - 0.5) * 2` normalisation (SPEC §6.2, §5.2) without depending on torchvision.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from flashhead.errors import ImageError

MAX_PIXELS = 50_000_000  # a 50 MP image decodes to 150 MB of RGB; above that we refuse before decoding
MIN_SIDE = 64  # smaller images have too few pixels to give a usable 512x512 reference

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load_image(source: ImageInput, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """Load a portrait as an RGB PIL image.

    Args:
        source: a path to any file PIL reads (PNG, JPEG, WebP, ...), a PIL image, or a uint8 array of shape
            (H, W), (H, W, 3) RGB or (H, W, 4) RGBA.
        max_pixels: refuse images with more pixels than this. For files the size is read from the header, so a
            decompression bomb is rejected before its pixels are decoded.
        min_side: refuse images with a side shorter than this.

    Returns:
        An RGB image (a new object; the input is never modified). EXIF orientation is applied, so the result
        looks the way a photo viewer shows the file. Transparent pixels are composited on white, so a cut-out
        portrait gets a plain white background. 16-bit images are scaled to 8 bits; of an animated file only
        the first frame is used.

    Raises:
        ImageError: the file is missing, empty, not an image, corrupt or truncated, too large or too small.
    """
    if isinstance(source, np.ndarray):
        return _checked_rgb(_from_array(source), "<array>", max_pixels, min_side)
    if isinstance(source, Image.Image):
        return _checked_rgb(source, "<PIL image>", max_pixels, min_side)
    if isinstance(source, (str, os.PathLike)):
        with _open_file(Path(source), max_pixels) as opened:  # closed once copied to RGB
            return _checked_rgb(opened, str(source), max_pixels, min_side)
    raise ImageError(f"cannot read an image from a {type(source).__name__}; pass a path, PIL image or array")


def _checked_rgb(image: Image.Image, name: str, max_pixels: int, min_side: int) -> Image.Image:
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(name, f"{width}x{height}", max_pixels)
    if min(width, height) < min_side:
        raise ImageError(f"{name}: image too small ({width}x{height}); need at least {min_side} px on each side")
    # A malformed EXIF block must not make an otherwise readable photo unusable.
    with contextlib.suppress(Exception):
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image, name)  # always a new image: convert() copies


def _open_file(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: image file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise _too_large(path, _claimed_size(e), max_pixels) from None
    except UnidentifiedImageError:
        if _is_video(path):
            raise ImageError(f"{path}: a video, not an image; give one still frame of it as the portrait") from None
        raise ImageError(f"{path}: not an image, or a format that cannot be read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: corrupt image header ({_first_line(e)})") from None
    width, height = image.size
    # Checked on the header's size, before load() allocates and decodes anything.
    if width * height > max_pixels:
        image.close()
        raise _too_large(path, f"{width}x{height}", max_pixels)
    try:
        image.seek(0)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        image.close()
        raise ImageError(f"{path}: corrupt or truncated image ({_first_line(e)})") from None
    return image


def _is_video(path: Path) -> bool:
    """Whether FFmpeg reads `path` as a video (its still-image demuxers would take any file named .png)."""
    import av

    from flashhead.media.audio_io import is_still_image

    try:
        with av.open(str(path)) as container:
            moving = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
            return bool(moving) and not is_still_image(container)  # (an MP3's cover art is a "video" stream)
    except (av.FFmpegError, OSError, UnicodeDecodeError):
        return False


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"<array>: expected a uint8 image array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[2] == 3 else "RGBA")
    raise ImageError(f"<array>: expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # convert("L") would clip 16-bit values at 255 and give a white image; scale them instead.
            values = np.asarray(image, dtype=np.float64)
            top = 65535.0 if values.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot convert image mode {image.mode} to RGB ({_first_line(e)})") from None


def _too_large(name: object, size: str, max_pixels: int) -> ImageError:
    return ImageError(f"{name}: image too large ({size}; the limit is {max_pixels / 1e6:g} megapixels)")


def _claimed_size(error: Exception) -> str:
    # PIL's message reads "Image size (W pixels) exceeds limit ..."; keep just the pixel count.
    text = str(error)
    start, end = text.find("("), text.find(")")
    return text[start + 1 : end] if 0 <= start < end else "over PIL's limit"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def resize_and_center_crop(image: Image.Image | np.ndarray, size: int | tuple[int, int] = (512, 512)) -> np.ndarray:
    """Scale an image to cover `size` and crop the centre: the official `resize_and_centercrop` (SPEC §6.2).

    Args:
        image: an RGB PIL image or a uint8 (H, W, 3) array.
        size: (height, width) of the result, or one int for a square.

    Returns:
        uint8 array (height, width, 3). The scale is max(h_t / h, w_t / w); the image is resized with PIL
        BILINEAR to (ceil(scale * w), ceil(scale * h)), so aspect is kept and only the excess is cropped.
        The crop offset is round((resized - target) / 2) with Python's round-half-to-even, as in torchvision's
        `center_crop`, so an odd excess of 1 or 5 px is split with the extra pixel on the far side and one
        of 3 px with it on the near side -- exactly what the official code does.
    """
    target_h, target_w = (size, size) if isinstance(size, int) else size
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    # Same float expressions as the official code, so ceil() rounds the same way (it can give target + 1).
    scale = max(target_h / image.height, target_w / image.width)
    final_h, final_w = math.ceil(scale * image.height), math.ceil(scale * image.width)
    resized = np.asarray(image.resize((final_w, final_h), resample=Image.BILINEAR))
    top = int(round((final_h - target_h) / 2.0))
    left = int(round((final_w - target_w) / 2.0))
    return np.ascontiguousarray(resized[top : top + target_h, left : left + target_w])


def to_tensor(
    image: np.ndarray, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uint8 (H, W, 3) image -> reference tensor (1, 3, 1, H, W) in [-1, 1].

    Computed as the official pipeline does: cast to `dtype` first, then (x / 255 - 0.5) * 2, so the
    bf16 reference is bit-identical to the official one.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W)
    x = x.to(device=device, dtype=dtype)
    return (x / 255 - 0.5) * 2
