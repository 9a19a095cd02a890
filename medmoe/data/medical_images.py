"""DICOM and NIfTI files -> 8-bit RGB PIL images the vision tower can take.

DICOM (pydicom): stored values -> modality LUT (RescaleSlope/Intercept or a Modality LUT
Sequence, giving Hounsfield units for CT) -> a window or VOI LUT -> 0..255 -> MONOCHROME1
inverted. The window is, in order of preference: the one asked for (a CT preset such as "lung",
"rgb" for three CT windows as the three colour channels, or an explicit (center, width)); the
file's own VOI LUT or WindowCenter/WindowWidth (MR, CR, DX, ...); else the robust min-max of the
pixels. Multi-frame files are reduced to one frame (the middle one unless `frame` is given).

NIfTI (nibabel): one slice of the volume in RAS+ orientation (middle axial by default; `plane`
and `slice_index` choose another; 4-D series use volume `volume`, 0 by default), shown in
neurological convention (patient right on the image right, anterior up). Only that slice is read,
reoriented and scaled.

Both are decoded within a budget (`limits`, see limits.py) checked from their headers first.

How a multi-frame or volume input was reduced is written to `image.info["medmoe_reduction"]` and
logged. Nothing from the DICOM header other than the modality ever reaches a log or an error:
headers carry patient data.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import warnings
import zlib

import numpy as np
from PIL import Image

from ..errors import ImageError
from .dicom_io import check_compressed_frame, check_native, frame_geometry, read_dicom
from .limits import DEFAULT_LIMITS, DecodeLimits
from .nifti_io import PLANES, check_header, open_nifti, read_slice, stored_axis

logger = logging.getLogger(__name__)


# (center, width) in Hounsfield units; the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
}
# window="rgb": red = lung, green = mediastinum, blue = bone (one window per channel, so the
# tower sees air, soft tissue and bone contrast at once).
RGB_WINDOWS = ("lung", "mediastinum", "bone")

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


# --- sniffing ---------------------------------------------------------------------------------

def _head(source, n: int = 352) -> bytes:
    """First n bytes of a path, bytes or seekable file, leaving a file where it was."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:n])
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return f.read(n)
        except OSError:
            return b""
    if hasattr(source, "read") and hasattr(source, "seek"):
        pos = source.tell()
        data = source.read(n)
        source.seek(pos)
        return data if isinstance(data, bytes) else b""
    return b""


def _nifti_header_magic(head: bytes) -> bool:
    if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):  # NIfTI-1
        return True
    return len(head) >= 8 and head[4:7] in (b"n+2", b"ni2")  # NIfTI-2


def medical_kind(source, name: str | None = None) -> str | None:
    """'dicom', 'nifti' or None, from the magic bytes (DICM at 128, NIfTI magic) or the name."""
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) and not hasattr(source, "read"):
        return None
    head = _head(source)
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":  # gzip: look inside for a NIfTI header
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(_head(source, 4096))).read(352)
        except (OSError, EOFError, zlib.error):
            head = b""
    if _nifti_header_magic(head):
        return "nifti"
    label = (name or (str(source) if isinstance(source, (str, os.PathLike)) else "")).lower()
    if label.endswith(DICOM_EXTENSIONS):
        return "dicom"
    if label.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    return None


def load_if_medical(source, name: str | None = None, limits: DecodeLimits | None = None) -> Image.Image | None:
    """The RGB image when `source` is a DICOM or NIfTI file, else None (used by `load_image`)."""
    kind = medical_kind(source, name)
    if kind is None:
        return None
    return load_medical(source, name=name, kind=kind, limits=limits)


def load_medical(source, name: str | None = None, kind: str | None = None, *, window=None,
                 frame: int | None = None, slice_index: int | None = None, plane: str = "axial",
                 volume: int | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    """Open a DICOM or NIfTI file (path, bytes or file) as an 8-bit RGB image.

    window: None (the file's own), a preset name from CT_WINDOWS, "rgb", or (center, width).
    frame: DICOM frame to keep (default middle). slice_index/plane/volume: the NIfTI slice.
    limits: the decoding budget (DEFAULT_LIMITS when None), checked from the header first.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image data>")
    kind = kind or medical_kind(source, name)
    if kind == "dicom":
        return load_dicom(source, label, window=window, frame=frame, limits=limits)
    if kind == "nifti":
        return load_nifti(source, label, window=window, slice_index=slice_index, plane=plane, volume=volume,
                          limits=limits)
    raise ImageError(f"{label}: neither DICOM nor NIfTI; use .dcm or .nii/.nii.gz files")


# --- intensity mapping ------------------------------------------------------------------------

def window_to_unit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear window (PS3.3 C.11.2.1.2.1) mapped to 0..1."""
    width = max(float(width), 1.0)
    lower = center - 0.5 - (width - 1) / 2
    return np.clip((values - lower) / max(width - 1, 1e-6), 0.0, 1.0)


def robust_unit(values: np.ndarray) -> np.ndarray:
    """0.5 to 99.5 percentile -> 0..1: one bright voxel does not make the image black."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values, dtype=np.float32)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def apply_window(values: np.ndarray, window, label: str) -> tuple[np.ndarray, str]:
    """Window an array of physical values: [H,W] -> [H,W] or [H,W,3] in 0..1, and its name."""
    if isinstance(window, str):
        key = window.lower().replace("-", "_")
        if key == "rgb":
            channels = [window_to_unit(values, *CT_WINDOWS[w]) for w in RGB_WINDOWS]
            return np.stack(channels, axis=-1), "rgb(" + "/".join(RGB_WINDOWS) + ")"
        if key not in CT_WINDOWS:
            raise ImageError(f"{label}: unknown window {window!r}; use one of {sorted(CT_WINDOWS)}, 'rgb' "
                             "or a (center, width) pair")
        return window_to_unit(values, *CT_WINDOWS[key]), key
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ImageError(f"{label}: window must be a preset name, 'rgb' or (center, width); got {window!r}") from None
    return window_to_unit(values, center, width), f"center={center:g},width={width:g}"


def unit_to_rgb(unit: np.ndarray) -> Image.Image:
    arr = np.round(unit * 255.0).astype(np.uint8)
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L").convert("RGB")
    return Image.fromarray(arr, mode="RGB")


# --- DICOM ------------------------------------------------------------------------------------

def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401
    except ImportError:
        raise ImageError("DICOM input needs pydicom: pip install 'medmoe[medical]'") from None
    return pydicom


def load_dicom(source, label: str, window=None, frame: int | None = None,
               limits: DecodeLimits | None = None) -> Image.Image:
    _pydicom()
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    limits = limits or DEFAULT_LIMITS
    try:
        ds = read_dicom(source, label, limits)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found; check the path") from None
    except (ImageError, MemoryError):
        raise
    except Exception as err:  # pydicom raises many kinds; none of them carry header values we show
        raise ImageError(f"{label}: not a readable DICOM file ({type(err).__name__}); check the file is complete") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{label}: DICOM file has no pixel data (a report or structured document?); "
                         "pass an image series file")
    geometry = frame_geometry(ds, label, limits)
    frames = geometry[4]
    reduction = ""
    index = 0
    if frames > 1:
        index = frames // 2 if frame is None else int(frame)
        if not 0 <= index < frames:
            raise ImageError(f"{label}: frame {index} asked for but the file has {frames} frames (0..{frames - 1})")
        reduction = f"frame {index} of {frames} ({'middle frame' if frame is None else 'chosen frame'})"
    pixels = _decode_frame(ds, index, label, limits, geometry)

    modality = str(ds.get("Modality", "") or "")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # colour (RGB / YBR converted by pydicom)
        image = Image.fromarray(pixels.astype(np.uint8) if pixels.dtype != np.uint8 else pixels, mode="RGB")
        how = "colour"
    else:
        values = apply_modality_lut(pixels, ds)  # stored values -> physical (HU for CT)
        if window is not None:
            unit, how = apply_window(values.astype(np.float32), window, label)
        elif "VOILUTSequence" in ds or "WindowCenter" in ds:
            try:
                voi = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float32)
            except Exception as err:
                raise ImageError(f"{label}: invalid VOI LUT / window in the header ({type(err).__name__}); "
                                 "pass window=(center, width) explicitly") from None
            unit, how = _voi_to_unit(voi, ds), "file VOI LUT" if "VOILUTSequence" in ds else "file window"
        else:
            unit, how = robust_unit(values.astype(np.float32)), "min-max"
        if photometric == "MONOCHROME1":  # high values are dark in MONOCHROME1
            unit = 1.0 - unit
        image = unit_to_rgb(unit)
    _note(image, label, "dicom", reduction, modality=modality, window=how)
    return image


def _decode_frame(ds, index: int, label: str, limits: DecodeLimits, geometry) -> np.ndarray:
    """One frame, decoded only after its size (and for compressed data its codestream header)
    has been checked against the budget and against the bytes the file holds."""
    import pydicom
    from pydicom.encaps import get_frame

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_transfer_syntax:
        raise ImageError(f"{label}: the DICOM transfer syntax is not one pydicom knows; the file is damaged")
    compressed = bool(syntax is not None and syntax.is_compressed and "PixelData" in ds)
    name = getattr(syntax, "name", "unknown transfer syntax")
    try:
        if compressed:
            encoded = get_frame(ds.PixelData, index, number_of_frames=geometry[4])
            check_compressed_frame(encoded, str(syntax), label, limits, geometry)
        else:
            check_native(ds, label, limits, geometry)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings quote header values
            pixels = pydicom.pixels.pixel_array(ds, index=index)
    except (ImageError, MemoryError):
        raise
    except Exception as err:
        hint = ("compressed files may need a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg or "
                "python-gdcm)" if compressed else "the file is damaged; re-export it")
        raise ImageError(f"{label}: cannot decode DICOM pixel data ({name}: {type(err).__name__}); {hint}") from None
    rows, cols, samples = geometry[:3]
    if pixels.shape[:2] != (rows, cols) or pixels.ndim != (2 if samples == 1 else 3):
        raise ImageError(f"{label}: a decoded frame has shape {pixels.shape}, not the {cols}x{rows} x {samples} "
                         "the header says; the file is damaged")
    return pixels


def _voi_to_unit(voi: np.ndarray, ds) -> np.ndarray:
    """pydicom's VOI output range: a LUT's own value range, or the window's output range."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):  # OW: 8- or 16-bit entries, as the descriptor says
            data = np.frombuffer(raw, dtype=np.uint8 if int(item.LUTDescriptor[2]) <= 8 else "<u2")
        else:
            data = np.asarray(raw if isinstance(raw, (list, tuple)) or hasattr(raw, "__len__") else [raw])
        data = data.astype(np.float32).ravel()
        lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 1.0)
    else:
        lo, hi = float(voi.min()), float(voi.max())
        # The window maps to the full stored range; take that range when it is known.
        bits = int(ds.get("BitsStored", 0) or 0)
        if bits and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
            signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if hi <= lo:
        return np.zeros_like(voi, dtype=np.float32)
    return np.clip((voi - lo) / (hi - lo), 0.0, 1.0)


# --- NIfTI ------------------------------------------------------------------------------------

def load_nifti(source, label: str, window=None, slice_index: int | None = None, plane: str = "axial",
               volume: int | None = None, limits: DecodeLimits | None = None) -> Image.Image:
    if plane not in PLANES:
        raise ImageError(f"{label}: plane {plane!r} unknown; use axial, coronal or sagittal")
    limits = limits or DEFAULT_LIMITS
    v = 0 if volume is None else int(volume)
    notes = []
    with open_nifti(source, label, limits) as img:
        shape = tuple(int(n) for n in img.header.get_data_shape())
        if len(shape) > 3:  # a 4-D series: one volume of it (higher dimensions: their first entry)
            count = shape[3]
            if not 0 <= v < count:
                raise ImageError(f"{label}: volume {v} asked for but the series has {count} (0..{count - 1})")
            if count > 1:
                notes.append(f"volume {v} of {count}")
        shape = check_header(img, label, limits, plane, v if len(shape) > 3 else 0)
        k = 0
        if len(shape) > 2:
            n = shape[stored_axis(img, PLANES[plane])]
            k = n // 2 if slice_index is None else int(slice_index)
            if not 0 <= k < n:
                raise ImageError(f"{label}: {plane} slice {k} asked for but there are {n} (0..{n - 1})")
            notes.insert(0, f"{plane} slice {k} of {n} ({'middle slice' if slice_index is None else 'chosen slice'})")
        arr = read_slice(img, label, shape, plane, k, v)
    arr = np.rot90(arr)  # RAS array [x, y] -> rows run anterior (top) to posterior
    unit, how = apply_window(arr, window, label) if window is not None else (robust_unit(arr), "min-max")
    image = unit_to_rgb(unit)
    _note(image, label, "nifti", ", ".join(notes), window=how)
    return image


def _note(image: Image.Image, label: str, kind: str, reduction: str, modality: str = "", window: str = "") -> None:
    image.info["medmoe_source"] = kind
    image.info["medmoe_window"] = window
    if modality:
        image.info["medmoe_modality"] = modality
    if reduction:
        image.info["medmoe_reduction"] = reduction
        logger.info("%s: %s reduced to %s", os.path.basename(label), kind, reduction)
