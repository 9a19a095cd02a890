"""Image loading and the one preprocessing used by training and evaluation alike:
pad to square with the tower's mean colour, resize, normalise. Training may first take a random
view of the image (`random_view`: crop, small rotation, brightness and contrast; never a mirror
image, since questions ask about left and right)."""

from __future__ import annotations

import io
import os
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError
from .medical_images import load_if_medical

MAX_PIXELS = 100_000_000  # larger images are refused as decompression bombs
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def load_image(source, name: str | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as RGB. Errors name the file and say what to do."""
    medical = None if isinstance(source, Image.Image) else load_if_medical(source, name)  # DICOM / NIfTI
    if medical is not None:
        return medical
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image data>")
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, label)
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def _open(source, label: str) -> Image.Image:
    """Decode fully now, so a bad file fails here with its name rather than deep in a batch."""
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            width, height = image.size  # header only: refuse bombs before decoding them
            if width * height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{width}x{height} pixels")
            image.load()
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found; check the path") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a folder, not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{label}: refused as a possible decompression bomb ({err}); "
                         f"resize it below {MAX_PIXELS // 1_000_000} megapixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            raise ImageError(f"{label}: the file is truncated ({err}); re-download or re-export it") from None
        raise ImageError(f"{label}: not a readable image ({err}); use PNG, JPEG, TIFF or BMP") from None
    return image


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
