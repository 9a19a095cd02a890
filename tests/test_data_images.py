"""Image loading: bad files are refused with a message naming them; odd formats become RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from medmoe.data import images
from medmoe.data.images import load_image, pad_to_square, preprocess
from medmoe.data.limits import DecodeLimits, ImageTooLargeError
from medmoe.errors import ImageError


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def jpeg_bytes(size=(64, 48)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_text_file_renamed_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes.png: not a readable image"):
        load_image(path)


def test_corrupt_file(tmp_path):
    data = bytearray(jpeg_bytes())
    data[200:600] = b"\x00" * 400  # scrambled entropy-coded data and markers
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(bytes(data[:30]) + b"garbage" * 10)
    with pytest.raises(ImageError, match=r"corrupt.jpg"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes((256, 256))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut.jpg: the file is truncated"):
        load_image(path)


def test_pixel_budget_refused_from_the_header(tmp_path):
    limits = DecodeLimits(max_pixels=100 * 100)
    path = save(Image.new("L", (120, 120)), tmp_path / "bomb.png")
    with pytest.raises(ImageTooLargeError, match=r"bomb.png: image is 120x120 pixels, above the limit of 10,000"):
        load_image(path, limits=limits)
    assert load_image(save(Image.new("L", (100, 100)), tmp_path / "ok.png"), limits=limits).size == (100, 100)


def test_budget_above_pils_guard_is_the_one_used(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)  # PIL's guard alone would refuse 80x80
    path = save(Image.new("L", (80, 80)), tmp_path / "big.png")
    assert load_image(path, limits=DecodeLimits(max_pixels=100 * 100)).size == (80, 80)


def test_sixteen_bit_png_uses_full_range(tmp_path):
    arr = np.linspace(1000, 5000, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "ct16.png")
    assert Image.open(path).mode.startswith("I")
    img = load_image(path)
    out = np.asarray(img)
    assert img.mode == "RGB" and out.min() == 0 and out.max() == 255


def test_palette_and_grey_and_alpha(tmp_path):
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0] * 256)
    assert np.asarray(load_image(save(pal, tmp_path / "pal.png")))[0, 0].tolist() == [255, 0, 0]
    assert load_image(save(Image.new("L", (8, 8), 77), tmp_path / "g.png")).getpixel((0, 0)) == (77, 77, 77)
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert load_image(save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


def test_preprocess_pads_with_mean_colour():
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.2, 0.2)
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    square = pad_to_square(img, mean)
    assert square.size == (40, 40) and square.getpixel((0, 0)) == (128, 64, 191)
    x = preprocess(img, 16, mean, std)
    assert x.shape == (3, 16, 16)
    assert abs(float(x[0, 0, 0])) < 0.02  # padded corner normalises to ~0
    assert float(x[0, 8, 8]) == pytest.approx((1 - 0.5) / 0.2, abs=1e-4)


def test_random_view_crops_rotates_and_never_mirrors():
    import torch

    arr = np.zeros((120, 160, 3), dtype=np.uint8)
    arr[:, :50] = 230  # a bright band on the left: a left-sided finding
    image = Image.fromarray(arr)
    views = [np.asarray(images.random_view(image, (0.5, 0.5, 0.5), torch.Generator().manual_seed(s)), dtype=np.float32)
             for s in range(20)]
    assert all(v.shape[2] == 3 and 0.8 * 160 - 1 <= v.shape[1] <= 160 and 0.8 * 120 - 1 <= v.shape[0] <= 120 for v in views)
    # Every view keeps the band on the left (a flip would move it right).
    assert all(v[:, : v.shape[1] // 4].mean() > 3 * v[:, -v.shape[1] // 4:].mean() for v in views)
    assert len({v.tobytes() for v in views}) == 20  # every draw is another view
    again = images.random_view(image, (0.5, 0.5, 0.5), torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(again, dtype=np.float32), views[3])  # a seeded draw repeats
