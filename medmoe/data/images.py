"""Image loading and the one preprocessing used by training and evaluation alike:
pad to square with the tower's mean colour, resize, normalise. Training may first take a random
view of the image (`random_view`: crop, small rotation, brightness and contrast; never a mirror
image, since questions ask about left and right)."""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .limits import DEFAULT_LIMITS, DecodeLimits, ImageTooLargeError
from .medical_images import load_if_medical

# PIL's own guard (for any Image.open in the process) follows the default budget; load_image
# checks the budget it is given itself, from the header, so this global never decides alone.
Image.MAX_IMAGE_PIXELS = DEFAULT_LIMITS.max_pixels
FORMATS = "PNG, JPEG, TIFF, BMP, DICOM (.dcm) or NIfTI (.nii, .nii.gz)"
# Bytes per pixel of each PIL mode once decoded.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBX": 4, "CMYK": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}


def load_image(source, name: str | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as RGB within the decoding budget (`limits`, default
    DEFAULT_LIMITS). Errors name the file and say what to do."""
    limits = limits or DEFAULT_LIMITS
    medical = None if isinstance(source, Image.Image) else load_if_medical(source, name, limits)  # DICOM / NIfTI
    if medical is not None:
        return medical
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "the uploaded image")
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, label, limits)
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _open(source, label: str, limits: DecodeLimits) -> Image.Image:
    """Decode fully now, so a bad file fails here with its name rather than deep in a batch.
    Only the first frame of a multi-page TIFF or GIF is decoded, after its size is checked."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # PIL's guard never tighter than the budget asked for
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below decides
            image = Image.open(fp)  # the header only
            width, height = image.size
            limits.check_pixels(width, height, label)
            limits.check_bytes(width * height * _MODE_BYTES.get(image.mode, 4), label,
                               f"the decoded {width}x{height} {image.mode} image")
            image.load()
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a folder, not an image file") from None
    except Image.DecompressionBombError as err:  # past twice PIL's guard, which reports the size
        found = re.search(r"(\d+) pixels", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLargeError(f"{label}: image has {size}, above the limit of {limits.max_pixels:,} pixels; "
                                 "downsample it first") from None
    except (ImageError, MemoryError):
        raise
    except UnidentifiedImageError:  # PIL's message names the stream object, not the file
        raise ImageError(f"{label}: not a readable image (unknown format); use {FORMATS}") from None
    except Exception as err:  # PIL raises many kinds on a malformed file (OSError, SyntaxError, ...)
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            raise ImageError(f"{label}: the file is truncated; re-download or re-export it") from None
        raise ImageError(f"{label}: not a readable image ({type(err).__name__}: {_clean(err)}); use {FORMATS}") from None
    return image


def _clean(err: BaseException) -> str:
    """PIL's message without object reprs (`<_io.BytesIO object at 0x...>`), on one line."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(err)).splitlines()
    return text[0][:200] if text else "no details"


def to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette, 16-bit and alpha images become 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill: Sequence[float]) -> Image.Image:
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    colour = tuple(int(round(c * 255)) for c in fill)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def random_view(image: Image.Image, fill: Sequence[float], generator: torch.Generator | None = None,
                min_scale: float = 0.8, max_degrees: float = 10.0, jitter: float = 0.1) -> Image.Image:
    """A random view of `image` for training: a crop of min_scale to all of each side at a random
    place, a rotation of up to max_degrees either way (corners filled with `fill`, the tower's mean
    colour), brightness and contrast each scaled by 1 +- jitter. No flips: a mirrored radiograph
    turns a left-sided finding into a right-sided one and the answer with it."""
    u = torch.rand(6, generator=generator).tolist()
    image = to_rgb(image)
    w, h = image.size
    scale = min_scale + (1.0 - min_scale) * u[0]
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    left, top = round((w - cw) * u[1]), round((h - ch) * u[2])
    image = image.crop((left, top, left + cw, top + ch))
    colour = tuple(int(round(c * 255)) for c in fill)
    image = image.rotate((2 * u[3] - 1) * max_degrees, resample=Image.BILINEAR, fillcolor=colour)
    arr = np.asarray(image, dtype=np.float32)
    mean = arr.mean()
    arr = (arr - mean) * (1 + (2 * u[4] - 1) * jitter) + mean  # contrast around the image's mean
    arr = arr * (1 + (2 * u[5] - 1) * jitter)  # brightness
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def preprocess(image: Image.Image, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB image -> normalised float tensor [3, image_size, image_size]."""
    image = pad_to_square(to_rgb(image), mean).resize((image_size, image_size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (arr - mean_t) / std_t
