"""The decoding budget: adversarial PNG / TIFF / DICOM / NIfTI files, small on disk and built
here, are refused from their headers or within a capped inflation, with one clean message, while
the Python heap stays small (tracemalloc; PIL's own pixel buffers are not traced by it)."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from medmoe.data.bounded_io import CappedReader, inflate
from medmoe.data.images import load_image
from medmoe.data.limits import DEFAULT_LIMITS, DecodeLimits, ImageTooLargeError
from medmoe.data.medical_images import load_medical
from medmoe.errors import ImageError

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_file_meta_info  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless  # noqa: E402
from test_medical_images import hu_phantom, write_dicom  # noqa: E402

HEAP_BOUND = 64 * 2**20
MIB = bytes(1 << 20)


def peak_heap(fn) -> int:
    """Peak bytes the Python heap (numpy included) grew by while `fn` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(fn, error=ImageError) -> tuple[str, int]:
    """(the message of the error `fn` raised, the peak bytes the Python heap grew by meanwhile)."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as err:
            fn()
        return str(err.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def zeros_stream(prefix: bytes, mib: int, gzip_wrap: bool = False) -> bytes:
    """`prefix` then `mib` MiB of zeros, deflated, built from one compressed MiB repeated: after a
    full flush deflate keeps no history, so the repeats are a valid stream (about 1 KB per MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    body += (c.compress(MIB) + c.flush(zlib.Z_FULL_FLUSH)) * mib + c.flush()
    if not gzip_wrap:
        return body
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(MIB, crc)
    size = (len(prefix) + mib * len(MIB)) & 0xFFFFFFFF
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + struct.pack("<II", crc, size)


def test_inflate_is_capped_and_exact():
    data = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    assert inflate(gzip.compress(data), len(data), "x.gz") == data
    assert inflate(gzip.compress(data[:10]) + gzip.compress(data[10:]), len(data), "x.gz") == data  # multi-member
    with pytest.raises(ImageTooLargeError, match="x.gz: .*passes 0 MiB"):
        inflate(gzip.compress(data), len(data) - 1, "x.gz")
    with pytest.raises(EOFError):
        inflate(gzip.compress(data)[:-20], len(data), "x.gz")
    bomb = zeros_stream(b"", 300, gzip_wrap=True)
    assert len(bomb) < 1_000_000
    message, peak = refused(lambda: inflate(bomb, DEFAULT_LIMITS.max_bytes, "bomb.gz"), ImageTooLargeError)
    assert "bomb.gz: inflated data passes 256 MiB" in message and peak < 8 * 2**20


def test_capped_reader_stops_at_the_cap():
    data = bytes(range(256)) * 400  # 102,400 bytes
    reader = io.BufferedReader(CappedReader(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))), 60_000, "v.gz"))
    reader.seek(50_000)
    assert reader.read(10_000) == data[50_000:60_000]
    with pytest.raises(ImageTooLargeError, match="v.gz: reading it needs more than"):
        reader.read(1)
    exact = CappedReader(gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))), len(data), "v.gz")
    assert exact.read() == data  # a stream that ends at the cap reads to its end


# --- PNG / TIFF ---------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: what a bomb looks like to open()."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 7_000])
def test_huge_png_states_the_real_limit(side):
    data = png_header_only(side, side)
    message, peak = refused(lambda: load_image(data, name="scan.png"), ImageTooLargeError)
    assert message.startswith("scan.png: ") and "above the limit of 40,000,000 pixels" in message
    assert f"{side * side:,} pixels" in message or f"{side}x{side} pixels" in message
    assert "megapixels" not in message and peak < HEAP_BOUND


def test_server_upload_limits_and_messages():
    from medmoe.serving.server import HTTPProblem, Limits, open_upload

    with pytest.raises(HTTPProblem) as err:
        open_upload(png_header_only(20_000, 20_000), "upload", Limits())
    assert err.value.status == 413 and "above the limit of 40,000,000 pixels" in err.value.message
    with pytest.raises(HTTPProblem) as err:  # the server's own --max-image-pixels is the one stated
        open_upload(png_header_only(2_000, 2_000), "upload", Limits(max_image_pixels=1_000_000))
    assert err.value.status == 413 and "2000x2000 pixels, above the limit of 1,000,000" in err.value.message
    with pytest.raises(HTTPProblem) as err:
        open_upload(b"junk" * 20, "upload", Limits())
    message = err.value.message
    assert err.value.status == 400 and "<_io" not in message and " at 0x" not in message
    assert message.startswith("the uploaded image: not a readable image") and "PNG, JPEG, TIFF, BMP, DICOM" in message


def test_server_upload_of_damaged_medical_files_is_400(tmp_path):
    from medmoe.serving.server import HTTPProblem, Limits, open_upload

    frames = np.stack([np.full((8, 8), 100 * i, dtype=np.uint16) for i in range(3)])
    cine = open(write_dicom(tmp_path / "cine.dcm", frames, modality="MR"), "rb").read()  # no NumberOfFrames
    for data, name, expected in ((cine, "upload.dcm", "the pixel data holds"),
                                 (open(truncated_nifti(tmp_path), "rb").read(), "upload.nii.gz", "truncated or corrupt")):
        with pytest.raises(HTTPProblem) as err:
            open_upload(data, name, Limits())
        assert err.value.status == 400 and expected in err.value.message


def test_byte_budget_counts_the_decoded_image():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "PNG")
    assert load_image(buf.getvalue(), limits=DecodeLimits(max_bytes=40 * 30 * 3)).size == (40, 30)
    with pytest.raises(ImageTooLargeError, match="the uploaded image: the decoded 40x30 RGB image would be"):
        load_image(buf.getvalue(), limits=DecodeLimits(max_bytes=40 * 30 * 3 - 1))


def test_multipage_tiff_decodes_the_first_page_only(tmp_path):
    limits = DecodeLimits(max_pixels=100 * 100)
    small_first = tmp_path / "small_first.tiff"
    Image.new("L", (20, 20), 50).save(small_first, save_all=True, append_images=[Image.new("L", (300, 300))])
    assert load_image(str(small_first), limits=limits).size == (20, 20)
    big_first = tmp_path / "big_first.tiff"
    Image.new("L", (300, 300)).save(big_first, save_all=True, append_images=[Image.new("L", (20, 20))])
    with pytest.raises(ImageTooLargeError, match="big_first.tiff: image is 300x300 pixels"):
        load_image(str(big_first), limits=limits)


# --- DICOM --------------------------------------------------------------------------------------

def deflated_dicom(tmp_path, rows: int, cols: int, frames: int, pixel_mib: int) -> bytes:
    """A Deflated Explicit VR Little Endian file whose pixel data is `pixel_mib` MiB of zeros."""
    path = write_dicom(tmp_path / "head.dcm", np.zeros((2, 2), np.uint16), modality="CT")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    plain = DicomBytesIO()
    ds.save_as(plain, enforce_file_format=True)
    from medmoe.data.dicom_io import _file_meta

    start, _ = _file_meta(plain.getvalue())
    body = plain.getvalue()[start:] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_mib << 20)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + zeros_stream(body, pixel_mib)


def test_deflated_dicom_bomb_is_refused_within_the_budget(tmp_path):
    bomb = deflated_dicom(tmp_path, 512, 512, 2048, 1024)  # 1 GiB of 16-bit frames, about 1 MB on disk
    assert len(bomb) < 2_000_000
    message, peak = refused(lambda: load_image(bomb, name="upload.dcm"), ImageTooLargeError)
    assert message.startswith("upload.dcm: the deflated DICOM data set passes 256 MiB") and peak < HEAP_BOUND


def test_deflated_dicom_within_the_budget_still_loads(tmp_path):
    plain = write_dicom(tmp_path / "ct.dcm", hu_phantom(), RescaleSlope=1, RescaleIntercept=-1024)
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "ct_deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    assert np.array_equal(np.asarray(load_medical(str(deflated), window="lung")),
                          np.asarray(load_medical(plain, window="lung")))
    small = deflated_dicom(tmp_path, 64, 64, 2, 1)  # 1 MiB of pixel data where the header says 16 KiB
    with pytest.raises(ImageError, match="holds 1,048,576 bytes .* but the header says 2 frame"):
        load_image(small, name="upload.dcm")


@pytest.mark.parametrize("header_frames,data_frames", [(None, 3), (5, 7), (5, 3), (3, 1)])
def test_dicom_frames_other_than_the_header_says(tmp_path, header_frames, data_frames):
    frames = np.stack([np.full((8, 8), 100 * i, dtype=np.uint16) for i in range(data_frames)])
    path = write_dicom(tmp_path / "cine.dcm", frames if data_frames > 1 else frames[0], modality="MR")
    ds = pydicom.dcmread(path)
    if header_frames is not None:
        ds.NumberOfFrames = header_frames
    ds.save_as(path)
    with pytest.raises(ImageError, match=rf"cine.dcm: the pixel data holds .*{data_frames} frames.* but the header "
                                         rf"says {header_frames or 1} frame"):
        load_image(path)


def test_dicom_header_size_is_checked_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 8000  # 64M pixels claimed, 128 bytes held
    ds.save_as(path)
    with pytest.raises(ImageTooLargeError, match="huge.dcm: each DICOM frame is 8000x8000 pixels, above the limit of "
                                                 "40,000,000"):
        load_image(str(path))


@pytest.mark.parametrize("name", ["MR_small_padded.dcm", "image_dfl.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtdose_1frame.dcm"])
def test_pydicom_example_files_still_load(name):
    """Padding, deflate, RLE, JPEG 2000, YBR 4:2:2 and 1-frame files pass the checks unchanged."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    image = load_medical(get_testdata_file(name))
    assert image.size == (ds.Columns, ds.Rows) and image.mode == "RGB"


def test_pydicom_truncated_example_is_a_clean_error():
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageError, match="MR_truncated.dcm: the pixel data holds 8,130 bytes"):
        load_medical(get_testdata_file("MR_truncated.dcm"))


def encapsulated(tmp_path, syntax, frame: bytes, rows: int, cols: int) -> str:
    path = write_dicom(tmp_path / "enc.dcm", np.zeros((rows, cols), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def test_jpeg_frame_larger_than_the_header_is_refused_before_decoding(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, "JPEG")
    jpeg = bytearray(buf.getvalue())
    assert np.asarray(load_medical(encapsulated(tmp_path, JPEGBaseline8Bit, bytes(jpeg), 64, 64))).shape == (64, 64, 3)
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 6000, 6000)  # the codestream now claims 36M pixels
    path = encapsulated(tmp_path, JPEGBaseline8Bit, bytes(jpeg), 64, 64)
    message, peak = refused(lambda: load_image(path))
    assert "enc.dcm: a compressed frame is 6000x6000 pixels but the header says 64x64" in message and peak < HEAP_BOUND


def test_rle_bomb_frame_is_refused_before_decoding(tmp_path):
    segment = b"\x81\x00" * 1_000_000  # 2 MB of runs that decode to 128 MB
    frame = struct.pack("<16I", 1, 64, *([0] * 14)) + segment
    path = encapsulated(tmp_path, RLELossless, frame, 64, 64)
    message, peak = refused(lambda: load_image(path))
    assert "enc.dcm: an RLE segment decodes past its 64x64 frame" in message and peak < HEAP_BOUND
    good = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\xc1\x07" * 64  # 64 runs of 64 bytes
    assert load_medical(encapsulated(tmp_path, RLELossless, good, 64, 64)).size == (64, 64)


# --- NIfTI --------------------------------------------------------------------------------------

def nifti_gz(shape, affine, dtype=np.int16, slope=None, data=None) -> bytes:
    img = nib.Nifti1Image(np.zeros(shape, dtype) if data is None else data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 10.0)
    return gzip.compress(img.to_bytes(), compresslevel=1)


LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def test_reoriented_scaled_nifti_reads_one_slice(tmp_path):
    raw = nib.Nifti1Image(np.zeros((256, 256, 256), np.int16), LPS)
    raw.header.set_slope_inter(2.0, 10.0)
    header = raw.header.binaryblock + b"\0" * 4  # 352 bytes: the header and an empty extension block
    data = zeros_stream(header, 32, gzip_wrap=True)  # 32 MiB of voxels, scaled to float64 would be 128 MiB
    image = None

    def load():
        nonlocal image
        image = load_image(data, name="lps.nii.gz")
    assert peak_heap(load) < 16 * 2**20
    assert image.size == (256, 256) and image.info["medmoe_reduction"].startswith("axial slice 128 of 256")


def test_nifti_over_the_budget_is_refused_from_its_header():
    raw = nib.Nifti1Image(np.zeros((512, 512, 600), np.int16), LPS)  # 300 MiB declared
    raw.header.set_slope_inter(2.0, 10.0)
    data = zeros_stream(raw.header.binaryblock + b"\0" * 4, 300, gzip_wrap=True)
    assert len(data) < 1_000_000
    message, peak = refused(lambda: load_image(data, name="big.nii.gz"), ImageTooLargeError)
    assert message.startswith("big.nii.gz: the NIfTI data read to reach the slice would be 300 MiB") and peak < 8 * 2**20


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (1, 1, 1)), ((0, 1, 2), (-1, -1, 1)), ((2, 0, 1), (1, -1, 1)),
                                        ((1, 2, 0), (-1, 1, -1))])
def test_per_slice_reorientation_matches_the_whole_volume(plane, perm, flips):
    from medmoe.data.nifti_io import PLANES, read_slice, stored_axis

    vol = np.random.default_rng(1).integers(0, 1000, (5, 6, 7)).astype(np.int16)
    affine = np.zeros((4, 4))
    for stored, (ras, flip) in enumerate(zip(perm, flips)):
        affine[ras, stored] = flip * (stored + 1.5)
    affine[3, 3] = 1
    img = nib.Nifti1Image(vol, affine)
    img.header.set_slope_inter(0.5, -3.0)
    img = nib.Nifti1Image.from_bytes(img.to_bytes())  # scaling applies on read, as from a file
    canonical = nib.as_closest_canonical(img).get_fdata()
    axis = PLANES[plane]
    k = img.shape[stored_axis(img, axis)] // 2
    expected = np.take(canonical, k, axis=axis)
    got = read_slice(img, "x.nii", img.shape, plane, k, 0)
    assert got.shape == expected.shape and np.allclose(got, expected)


def truncated_nifti(tmp_path) -> str:
    vol = np.random.default_rng(2).integers(0, 1000, (64, 64, 64)).astype(np.int16)
    data = nifti_gz(vol.shape, np.eye(4), data=vol)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[:len(data) // 3])
    return str(path)


def test_truncated_nifti_is_a_clean_error(tmp_path):
    path = truncated_nifti(tmp_path)
    with pytest.raises(ImageError, match="cut.nii.gz: the NIfTI file is truncated or corrupt"):
        load_image(path)
    with pytest.raises(ImageError, match="cut.nii.gz: the NIfTI file is truncated or corrupt"):
        load_image(open(path, "rb").read(), name="cut.nii.gz")


def test_cli_ask_bad_medical_files_are_one_line_exit_2(tmp_path, capsys):
    from medmoe.cli import main

    frames = np.stack([np.full((8, 8), 100 * i, dtype=np.uint16) for i in range(3)])
    cine = write_dicom(tmp_path / "cine.dcm", frames, modality="MR")  # three frames, no NumberOfFrames
    for path, expected in ((truncated_nifti(tmp_path), "cut.nii.gz: the NIfTI file is truncated"),
                           (cine, "cine.dcm: the pixel data holds")):
        assert main(["ask", "--image", path, "What is shown?"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err


# --- mutated files --------------------------------------------------------------------------------

def seed_files() -> list[tuple[str, bytes]]:
    from pydicom.data import get_testdata_file

    seeds = []
    for fmt in ("PNG", "JPEG", "TIFF", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, fmt)
        seeds.append((f"x.{fmt.lower()}", buf.getvalue()))
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm"):
        seeds.append((name, open(get_testdata_file(name), "rb").read()))
    img = nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10), np.diag([-1.0, 1, 2, 1]))
    img.header.set_slope_inter(2.0, 1.0)
    return seeds + [("v.nii", img.to_bytes()), ("v.nii.gz", gzip.compress(img.to_bytes()))]


def test_mutated_files_give_one_line_image_errors():
    """Flipped bytes, truncations and insertions in every format: an ImageError of one line, or an image."""
    rng = np.random.default_rng(0)
    seeds = seed_files()
    for case in range(200):
        name, data = seeds[case % len(seeds)]
        data = bytearray(data)
        op = case // len(seeds) % 3
        if op == 0:
            for at in rng.integers(len(data), size=4):
                data[int(at)] = int(rng.integers(256))
        elif op == 1:
            data = data[:int(rng.integers(len(data)))]
        else:
            at = int(rng.integers(len(data)))
            data[at:at] = rng.integers(256, size=int(rng.integers(1, 40)), dtype=np.uint8).tobytes()
        try:
            load_image(bytes(data), name=name)
        except ImageError as err:
            assert "\n" not in str(err) and " at 0x" not in str(err) and str(err).startswith(name)
