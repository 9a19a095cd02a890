"""Reading one 2-D slice of a NIfTI volume within the decoding budget (see limits.py).

The header is read first and the sizes it declares are checked; then only the slice asked for
is read through nibabel's array proxy (a .nii.gz is inflated as a stream, never past the budget)
and that slice alone is reoriented to RAS+ and scaled (scl_slope / scl_inter), instead of
reorienting and scaling the whole volume in memory."""

from __future__ import annotations

import gzip
import io
import os
from contextlib import contextmanager

import numpy as np

from ..errors import ImageError
from .bounded_io import CappedReader
from .limits import DecodeLimits

PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise ImageError("NIfTI input needs nibabel: pip install 'medmoe[medical]'") from None
    return nibabel


@contextmanager
def open_nifti(source, label: str, limits: DecodeLimits):
    """The nibabel image of a path, bytes or file, its data still on the (capped) stream."""
    nib = _nibabel()
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise ImageError(f"{label}: file not found; check the path")
        raw = open(source, "rb")
    else:
        raw = io.BytesIO(bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else source.read())
    try:
        yield _from_stream(nib, raw, label, limits)
    finally:
        raw.close()


def _from_stream(nib, raw, label: str, limits: DecodeLimits):
    try:
        stream = raw
        if raw.read(2) == b"\x1f\x8b":  # any gzip input is inflated lazily, never past the budget
            raw.seek(0)
            stream = io.BufferedReader(CappedReader(gzip.GzipFile(fileobj=raw), limits.max_bytes, label))
        stream.seek(0)
        size = int.from_bytes(stream.read(4), "little")
        stream.seek(0)
        swapped = int.from_bytes((540).to_bytes(4, "big"), "little")
        return (nib.Nifti2Image if size in (540, swapped) else nib.Nifti1Image).from_stream(stream)
    except (ImageError, MemoryError):
        raise
    except Exception as err:  # a bad header, or gzip's BadGzipFile / EOFError / zlib.error
        raise ImageError(f"{label}: not a readable NIfTI file ({type(err).__name__}); check it is a complete "
                         ".nii or .nii.gz") from None


def check_header(img, label: str, limits: DecodeLimits, plane: str, volume: int) -> tuple[int, ...]:
    """The shape from the header, its slice within max_pixels and the bytes to read up to the end
    of the chosen volume within max_bytes, before any voxel is read."""
    shape = tuple(int(n) for n in img.header.get_data_shape())
    if len(shape) < 2 or min(shape) <= 0:
        raise ImageError(f"{label}: NIfTI image has shape {shape}; need at least 2 non-empty dimensions")
    itemsize = img.header.get_data_dtype().itemsize
    if len(shape) == 2:
        limits.check_pixels(shape[0], shape[1], label, "the NIfTI image")
    else:
        rest = [n for axis, n in enumerate(shape[:3]) if axis != stored_axis(img, PLANES[plane])]
        limits.check_pixels(rest[0], rest[1], label, f"a {plane} slice")
    volume_bytes = int(np.prod(shape[:3], dtype=np.int64)) * itemsize
    offset = int(img.header.get_data_offset())
    limits.check_bytes(offset + (volume + 1) * volume_bytes, label, "the NIfTI data read to reach the slice")
    return shape


def _orientation(img) -> np.ndarray:
    """For each stored axis: (its RAS+ axis, +1 or -1); the stored order when the affine is unusual."""
    nib = _nibabel()
    try:
        ornt = nib.orientations.io_orientation(img.affine)
        if np.isfinite(ornt).all() and sorted(ornt[:, 0].astype(int)) == [0, 1, 2]:
            return ornt
    except Exception:
        pass
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def stored_axis(img, ras_axis: int) -> int:
    return int(np.flatnonzero(_orientation(img)[:, 0] == ras_axis)[0])


def read_slice(img, label: str, shape: tuple[int, ...], plane: str, k: int, volume: int) -> np.ndarray:
    """Slice `k` of RAS+ axis PLANES[plane] (volume `volume` of a 4-D series) as float32 [RAS
    lower axis, RAS higher axis]: what nibabel's as_closest_canonical would give, from one slice."""
    try:
        if len(shape) == 2:
            return np.asarray(img.dataobj[...], dtype=np.float32).reshape(shape)
        ornt = _orientation(img)
        axis = stored_axis(img, PLANES[plane])
        index = [slice(None)] * len(shape)
        index[axis] = shape[axis] - 1 - k if ornt[axis, 1] < 0 else k
        if len(shape) > 3:
            index[3:] = [volume] + [0] * (len(shape) - 4)
        arr = np.asarray(img.dataobj[tuple(index)], dtype=np.float32).reshape(
            [n for a, n in enumerate(shape[:3]) if a != axis])
    except (ImageError, MemoryError):
        raise
    except Exception as err:  # EOFError, zlib.error, gzip's CRC check, a short read
        raise ImageError(f"{label}: the NIfTI file is truncated or corrupt ({type(err).__name__}); "
                         "re-download or re-export it") from None
    rest = [a for a in range(3) if a != axis]
    for i, a in enumerate(rest):  # flip each remaining axis to run in the RAS+ direction
        if ornt[a, 1] < 0:
            arr = np.flip(arr, axis=i)
    if ornt[rest[0], 0] > ornt[rest[1], 0]:
        arr = arr.T
    return arr
