"""Reading a DICOM file within the decoding budget (see limits.py), before any pixel is decoded.

pydicom inflates a Deflated Explicit VR Little Endian file whole as it reads it, and builds
`pixel_array` from whatever the pixel data holds. Here the deflated body is inflated with a cap,
the header's size (Rows x Columns x SamplesPerPixel x BitsAllocated per frame, times
NumberOfFrames for native data) is checked against the budget and against the bytes the file
really holds, and a compressed frame's own header (JPEG, JPEG-LS, JPEG 2000, RLE) is checked
before that one frame is decoded. Messages give sizes only: headers carry patient data."""

from __future__ import annotations

import io
import os
import struct
import zlib

from ..errors import ImageError
from .bounded_io import RAW_WBITS, inflate
from .limits import DecodeLimits

DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_dicom(source, label: str, limits: DecodeLimits):
    """The pydicom dataset of a path, bytes or file; a deflated body is inflated within the budget."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    data = _read_bytes(source, label, limits)
    meta_end, syntax = _file_meta(data)
    if syntax != DEFLATED:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    try:
        body = inflate(memoryview(data)[meta_end:], limits.max_bytes, label, RAW_WBITS, "the deflated DICOM data set")
    except (EOFError, zlib.error) as err:
        raise ImageError(f"{label}: the deflated DICOM data is truncated or corrupt ({type(err).__name__}); "
                         "re-export the file") from None
    meta = FileMetaDataset(read_dataset(io.BytesIO(data[132:meta_end]), is_implicit_VR=False, is_little_endian=True))
    meta.TransferSyntaxUID = EXPLICIT_LE  # the body is plain explicit VR little endian from here on
    ds = read_dataset(io.BytesIO(body), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = meta
    return ds


def _read_bytes(source, label: str, limits: DecodeLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        limits.check_bytes(os.path.getsize(source), label, "the file")  # FileNotFoundError: the caller's
        with open(source, "rb") as f:
            data = f.read()
    else:
        data = source.read(limits.max_bytes + 1)
    limits.check_bytes(len(data), label, "the file")
    return data


def _file_meta(data: bytes) -> tuple[int, str]:
    """(offset where the data set starts, transfer syntax UID) from the group-2 file meta
    information, which is always explicit VR little endian; (0, "") without a DICM preamble."""
    if data[128:132] != b"DICM":
        return 0, ""
    pos, syntax = 132, ""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            header, length = 12, struct.unpack_from("<I", data, pos + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", data, pos + 6)[0]
        if element == 0x10:
            syntax = data[pos + header:pos + header + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += header + length
    return pos, syntax


# --- the budget, from the header ----------------------------------------------------------------

def frame_geometry(ds, label: str, limits: DecodeLimits) -> tuple[int, int, int, int, int]:
    """(rows, columns, samples per pixel, bits allocated, frames) from the header, checked against
    the budget: one frame within max_pixels, and its decoded array within max_bytes."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ImageError(f"{label}: the image size in the DICOM header is not a number; the file is damaged") from None
    if rows <= 0 or cols <= 0 or frames <= 0 or samples not in (1, 3, 4) or bits not in (1, 8, 16, 32, 64):
        raise ImageError(f"{label}: the DICOM header gives an impossible image size ({rows} rows, {cols} columns, "
                         f"{samples} samples, {bits} bits, {frames} frames); the file is damaged")
    limits.check_pixels(cols, rows, label, "each DICOM frame")
    limits.check_bytes(rows * cols * samples * max(bits, 8) // 8, label, f"one decoded {cols}x{rows} frame")
    return rows, cols, samples, bits, frames


def native_size(rows: int, cols: int, samples: int, bits: int, frames: int) -> int:
    """Bytes of uncompressed pixel data the header promises (1-bit data is packed)."""
    return (rows * cols * samples * frames * bits + 7) // 8


def check_native(ds, label: str, limits: DecodeLimits, geometry) -> None:
    """Uncompressed pixel data: the size the header promises is within the budget and is what the
    file holds (more or fewer frames than NumberOfFrames is a damaged file, not a guess; padding
    short of one more frame is ignored, as pydicom does)."""
    expected = native_size(*geometry)
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":  # two chroma samples per pixel pair
        expected = expected * 2 // 3
    limits.check_bytes(expected, label, "the pixel data the header describes")
    key = next(k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
    held = len(ds[key].value or b"")
    if key != "PixelData":
        expected = geometry[0] * geometry[1] * geometry[2] * geometry[4] * (4 if key == "FloatPixelData" else 8)
    rows, cols, samples, bits, frames = geometry
    per_frame = max(expected // frames, 1)
    if not expected <= held < expected + per_frame:  # trailing padding short of one more frame is allowed
        holds = f"{held / per_frame:.4g} frames"
        raise ImageError(f"{label}: the pixel data holds {held:,} bytes ({holds}) but the header says {frames} "
                         f"frame(s) of {cols}x{rows} x {samples} sample(s) at {bits} bits ({expected:,} bytes); "
                         "the file is damaged or its Number of Frames is wrong")


def check_compressed_frame(frame: bytes, syntax: str, label: str, limits: DecodeLimits, geometry) -> None:
    """A compressed frame's own header must describe the size the DICOM header promised: the
    decoder allocates what the codestream says, not what the DICOM header says."""
    rows, cols = geometry[:2]
    if syntax == RLE_LOSSLESS:  # one segment per byte plane of a sample: rows x columns bytes each
        for segment in _rle_segments(frame, label):
            if rle_decoded_size(segment, rows * cols + 1) > rows * cols + 1:
                raise ImageError(f"{label}: an RLE segment decodes past its {cols}x{rows} frame; the file is damaged")
        return
    size = codestream_size(frame)
    if size is not None and size != (cols, rows):  # the header's size is the one within the budget
        raise ImageError(f"{label}: a compressed frame is {size[0]}x{size[1]} pixels but the header says "
                         f"{cols}x{rows}; the file is damaged")


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS start-of-frame or a JPEG 2000 SIZ marker; None otherwise."""
    if frame[:2] == b"\xff\xd8":  # JPEG, JPEG-LS: walk the markers to the first SOFn
        pos = 2
        while pos + 4 <= len(frame):
            if frame[pos] != 0xFF:
                return None
            marker = frame[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            length = struct.unpack_from(">H", frame, pos + 2)[0]
            if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
                if pos + 9 > len(frame):
                    return None
                height, width = struct.unpack_from(">HH", frame, pos + 5)
                return width, height
            pos += 2 + length
        return None
    j2k = frame.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (a JP2 box wraps the codestream)
    if j2k >= 0 and j2k + 22 <= len(frame):
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", frame, j2k + 8)
        return xsiz - xosiz, ysiz - yosiz
    return None


def _rle_segments(frame: bytes, label: str) -> list[bytes]:
    """The segments of a DICOM RLE frame (PS3.5 G.3: a 64-byte header of segment offsets)."""
    if len(frame) < 64:
        raise ImageError(f"{label}: an RLE frame is shorter than its 64-byte header; the file is damaged")
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    ends = offsets[1:count] + [len(frame)]
    if not 1 <= count <= 15 or any(not 64 <= a <= b <= len(frame) for a, b in zip(offsets[:count], ends)):
        raise ImageError(f"{label}: an RLE frame header is invalid; the file is damaged")
    return [frame[start:end] for start, end in zip(offsets[:count], ends)]


def rle_decoded_size(segment: bytes, stop: int) -> int:
    """Bytes a PackBits segment decodes to, counted from its run headers without decoding;
    the count stops once it passes `stop` (a run of 2 bytes makes 128, so a bomb ends early)."""
    pos = size = 0
    n = len(segment)
    while pos < n and size <= stop:
        header = segment[pos]
        if header < 128:
            size += header + 1
            pos += header + 2
        elif header > 128:
            size += 257 - header
            pos += 2
        else:
            pos += 1
    return size
