"""The decoding budget every image input is held to: pixels of the one 2-D image that is built
(a PNG, a DICOM frame, a NIfTI slice) and bytes decoded or inflated to get there. Sizes come
from headers and are checked before the bytes are inflated or the array is built, so a small
file that claims or inflates to a huge image is refused at the cost of reading its header.
`medmoe ask` uses DEFAULT_LIMITS; the server passes its own `--max-image-pixels`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ImageError


class ImageTooLargeError(ImageError):
    """An image, frame, slice or inflated stream is over the decoding budget (the server's 413)."""


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000  # width x height of one decoded image, DICOM frame or NIfTI slice
    max_bytes: int = 256 * 1024 * 1024  # decoded or inflated bytes for one file (a volume, all frames)

    def with_pixels(self, max_pixels: int | None) -> "DecodeLimits":
        return self if max_pixels is None else replace(self, max_pixels=int(max_pixels))

    def check_pixels(self, width: int, height: int, label: str, what: str = "image") -> None:
        if width * height > self.max_pixels:
            raise ImageTooLargeError(f"{label}: {what} is {width}x{height} pixels, above the limit of "
                                     f"{self.max_pixels:,} pixels; downsample it first")

    def check_bytes(self, size: int, label: str, what: str = "decoded data") -> None:
        if size > self.max_bytes:
            raise ImageTooLargeError(f"{label}: {what} would be {size / 2**20:,.0f} MiB, above the "
                                     f"{self.max_bytes / 2**20:,.0f} MiB decoding budget; refused")


DEFAULT_LIMITS = DecodeLimits()
