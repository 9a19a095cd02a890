"""DICOM and NIfTI input, built in the test with pydicom / nibabel (no downloads)."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest

from medmoe.data.images import load_image
from medmoe.data.medical_images import CT_WINDOWS, load_medical, medical_kind, window_to_unit
from medmoe.errors import ImageError

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

SECRET = "DOE^SECRETNAME"


def write_dicom(path, pixels: np.ndarray, modality: str = "CT", frames: int = 1, **attrs) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = SECRET
    ds.PatientID = "ID-424242"
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = attrs.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = attrs.pop("BitsStored", 16)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def hu_phantom() -> np.ndarray:
    """Stored values for a CT slice with slope 1, intercept -1024: air, fat/water, bone columns."""
    hu = np.zeros((32, 48), dtype=np.float32)
    hu[:, :16] = -1000  # air
    hu[:, 16:32] = 40  # soft tissue
    hu[:, 32:] = 1200  # dense bone
    return (hu + 1024).astype(np.uint16)


def test_ct_modality_lut_then_presets(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    assert medical_kind(path) == "dicom"
    lung = np.asarray(load_medical(path, window="lung"))[..., 0]
    mediastinum = np.asarray(load_medical(path, window="mediastinum"))[..., 0]
    bone = np.asarray(load_medical(path, window="bone"))[..., 0]
    # Soft tissue (40 HU) is mid-grey in the mediastinal window, bright in the lung window.
    assert 100 < mediastinum[0, 20] < 160
    assert lung[0, 20] > 200 and 0 < lung[0, 0] < 80  # air is dark but not clipped
    # Bone (1200 HU) saturates the mediastinal window but not fully the bone window... and air is 0.
    assert mediastinum[0, 40] == 255 and bone[0, 40] > 180 and bone[0, 0] == 0
    # Exactly the DICOM linear window on HU (so the intercept was applied first).
    expected = np.round(window_to_unit(np.float32(40), *CT_WINDOWS["mediastinum"]) * 255)
    assert mediastinum[0, 20] == expected


def test_ct_three_window_rgb(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    img = load_medical(path, window="rgb")
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.info["medmoe_window"].startswith("rgb")
    soft = arr[0, 20]
    assert soft[0] > soft[1] > soft[2]  # lung window brightest, bone window darkest on soft tissue


def test_mr_uses_file_window_and_voi_lut(tmp_path):
    pixels = np.tile(np.arange(0, 1000, 1000 / 64, dtype=np.float32), (16, 1)).astype(np.uint16)
    windowed = write_dicom(tmp_path / "mr.dcm", pixels, modality="MR", BitsStored=12,
                           WindowCenter=500, WindowWidth=200)
    arr = np.asarray(load_image(windowed))[..., 0]
    assert arr[0, 0] == 0 and arr[0, -1] == 255  # outside the window on both sides
    assert 0 < arr[0, 32] < 255  # the centre column sits inside the window
    # VOI LUT: a ramp that inverts the image.
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.LUTData = np.arange(1023, -1, -1, dtype=np.uint16).tobytes()
    lut = write_dicom(tmp_path / "cr.dcm", pixels, modality="CR", BitsStored=12, VOILUTSequence=Sequence([item]))
    arr = np.asarray(load_medical(lut))[..., 0]
    stored = pixels[0, 40]
    assert arr[0, 0] == 255 and arr[0, 40] == round((1023 - stored) / 1023 * 255)


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.tile(np.linspace(0, 4000, 40), (8, 1)).astype(np.uint16)
    path = write_dicom(tmp_path / "dx.dcm", pixels, modality="DX", PhotometricInterpretation="MONOCHROME1")
    arr = np.asarray(load_medical(path))[..., 0]
    assert arr[0, 0] > arr[0, -1]


def test_multiframe_reduces_to_middle_frame_and_says_so(tmp_path, caplog):
    frames = np.stack([np.full((8, 8), 100 * i, dtype=np.uint16) for i in range(5)])
    frames[:, 0, 0] = 0  # a dark corner so min-max has a range
    path = write_dicom(tmp_path / "cine.dcm", frames, modality="MR", frames=5)
    with caplog.at_level(logging.INFO, logger="medmoe"):
        img = load_medical(path)
    assert img.info["medmoe_reduction"] == "frame 2 of 5 (middle frame)"
    assert "frame 2 of 5" in caplog.text
    chosen = load_medical(path, frame=4)
    assert chosen.info["medmoe_reduction"].startswith("frame 4 of 5")
    with pytest.raises(ImageError, match="cine.dcm.*frame 9"):
        load_medical(path, frame=9)


def test_dicom_detected_by_magic_bytes_without_extension(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    data = open(path, "rb").read()
    assert data[128:132] == b"DICM"
    renamed = tmp_path / "scan_without_extension"
    renamed.write_bytes(data)
    assert load_image(str(renamed)).size == (48, 32)
    assert load_image(data).size == (48, 32)  # raw bytes (uploads) too


def test_metadata_never_reaches_logs_or_errors(tmp_path, caplog):
    path = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    truncated = tmp_path / "broken.dcm"
    truncated.write_bytes(open(path, "rb").read()[:400])
    with caplog.at_level(logging.DEBUG):
        load_medical(path, window="lung")
        with pytest.raises(ImageError) as err:
            load_image(str(truncated))
    assert "broken.dcm" in str(err.value)
    for text in (caplog.text, str(err.value)):
        assert "SECRETNAME" not in text and "424242" not in text


def test_bad_files_are_clear_errors(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom at all" * 10)
    with pytest.raises(ImageError, match="scan.dcm"):
        load_image(str(bad))
    nii = tmp_path / "brain.nii.gz"
    nii.write_bytes(gzip.compress(b"\x00" * 100))
    with pytest.raises(ImageError, match="brain.nii.gz"):
        load_image(str(nii))
    with pytest.raises(ImageError, match="unknown window"):
        load_medical(write_dicom(tmp_path / "ok.dcm", hu_phantom()), window="kidney")


def nifti_volume() -> np.ndarray:
    vol = np.zeros((20, 24, 10), dtype=np.float32)
    for z in range(10):
        vol[:, :, z] = z * 10.0  # each axial slice has its own level
    vol[2:6, 2:6, :] = 1000.0  # a bright block so every slice has contrast
    return vol


def test_nifti_middle_axial_slice_by_default(tmp_path):
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(nifti_volume(), np.eye(4)), str(path))
    img = load_image(str(path))
    assert img.size == (20, 24)  # rot90 of [x=20, y=24]: 24 rows, 20 columns
    assert img.info["medmoe_reduction"] == "axial slice 5 of 10 (middle slice)"
    other = load_medical(str(path), slice_index=0)
    assert other.info["medmoe_reduction"].startswith("axial slice 0 of 10")
    coronal = load_medical(str(path), plane="coronal")
    assert coronal.size == (20, 10) and "coronal slice 12 of 24" in coronal.info["medmoe_reduction"]


def test_nifti_from_bytes_4d_and_windows(tmp_path):
    series = np.stack([nifti_volume(), nifti_volume() * 2], axis=-1)
    path = tmp_path / "bold.nii"
    nib.save(nib.Nifti1Image(series, np.eye(4)), str(path))
    data = open(path, "rb").read()
    assert medical_kind(data) == "nifti" and medical_kind(gzip.compress(data)) == "nifti"
    img = load_image(gzip.compress(data), name="upload")
    assert img.info["medmoe_reduction"] == "axial slice 5 of 10 (middle slice), volume 0 of 2"
    assert load_medical(str(path), window="brain").mode == "RGB"
    with pytest.raises(ImageError, match="volume 3"):
        load_medical(str(path), volume=3)


def test_plain_images_still_load(tmp_path):
    from PIL import Image

    Image.new("L", (10, 12), 128).save(tmp_path / "x.png")
    Image.new("RGB", (10, 12)).save(tmp_path / "x.tiff")
    Image.new("RGB", (10, 12)).save(tmp_path / "x.bmp")
    for name in ("x.png", "x.tiff", "x.bmp"):
        assert medical_kind(str(tmp_path / name)) is None
        assert load_image(str(tmp_path / name)).mode == "RGB"
