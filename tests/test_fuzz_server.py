"""Fuzzing the server in-process and `medmoe ask`: seeded random inputs an attacker or a broken
client could send. Every HTTP answer must be below 500 and every error an OpenAI error object;
the memory one request takes is measured (tracemalloc) and bounded; every CLI error is one line
with exit code 2.

The cases: corrupted and adversarial PNG/JPEG/TIFF/BMP/DICOM/NIfTI bytes as data URLs (bit flips,
truncation, insertions, header fields rewritten to huge or odd values), malformed data URLs,
JSON bodies with wrong types and sizes in every field, invalid UTF-8 and other encodings,
deeply nested JSON, huge numbers, and multipart, form and plain-text bodies."""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

SEED = 26
# Peak Python-heap growth (tracemalloc: Python objects and numpy arrays, not PIL's or torch's own
# buffers) while one request is answered. The largest is an image near the pixel limit.
MAX_REQUEST_GROWTH = 48 * 2**20
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits, create_app

    torch.manual_seed(0)
    model, processor = build_model("tiny")
    limits = Limits(max_body_bytes=1_000_000, max_image_pixels=500_000, max_prompt_tokens=256, max_tokens=2,
                    default_max_tokens=1, timeout_s=60)
    with TestClient(create_app(model, processor, limits, model_name="tiny")) as c:
        yield c


# --- source files -------------------------------------------------------------------------------

def noise(rng: np.random.Generator, shape, dtype=np.uint8, high=255) -> np.ndarray:
    return rng.integers(0, high, shape).astype(dtype)


def pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def dicom_bytes(pixels: np.ndarray, syntax=None, frames: int = 1, **attrs) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CT", 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def nifti_bytes(volume: np.ndarray, affine=None) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(volume, np.eye(4) if affine is None else affine).to_bytes()


# Where NIfTI-1 header fields live (little-endian): offset and struct format.
NIFTI_FIELDS = {"sizeof_hdr": (0, "<i"), "dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"),
                "pixdim": (76, "<8f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"), "scl_inter": (116, "<f"),
                "qform_code": (252, "<h"), "sform_code": (254, "<h"), "magic": (344, "<4s")}


def nifti_lying(data: bytes, **fields) -> bytes:
    """NIfTI bytes with header fields overwritten, the data left as it is (a header that lies)."""
    data = bytearray(data)
    for name, value in fields.items():
        offset, fmt = NIFTI_FIELDS[name]
        values = value if isinstance(value, (list, tuple)) else [value]
        data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    return bytes(data)


def sources(rng: np.random.Generator) -> dict[str, tuple[bytes, str]]:
    """Valid small files of every format: name -> (bytes, media type)."""
    rgb = noise(rng, (40, 48, 3))
    volume = noise(rng, (16, 12, 8), np.int16, 2000)
    return {
        "png": (pil_bytes(rgb, "PNG"), "image/png"),
        "png16": (pil_bytes(noise(rng, (20, 24), np.uint16, 60000), "PNG"), "image/png"),
        "jpeg": (pil_bytes(rgb, "JPEG"), "image/jpeg"),
        "tiff": (pil_bytes(rgb, "TIFF"), "image/tiff"),
        "bmp": (pil_bytes(rgb, "BMP"), "image/bmp"),
        "dicom": (dicom_bytes(noise(rng, (32, 40), np.uint16, 3000)), "application/dicom"),
        "dicom3": (dicom_bytes(noise(rng, (3, 16, 20), np.uint16, 3000), frames=3), "application/dicom"),
        "nii": (nifti_bytes(volume), "application/x-nifti"),
        "niigz": (gzip.compress(nifti_bytes(volume)), "application/gzip"),
    }


# --- mutations ----------------------------------------------------------------------------------

def mutate(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "truncate", "insert", "zero", "repeat", "swap_magic", "flip_header"])
    if kind == "flip" or kind == "flip_header":
        span = min(len(data), 400) if kind == "flip_header" else len(data)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[:rng.randrange(len(data))]
    elif kind == "insert":
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == "zero":
        at = rng.randrange(len(data))
        data[at:at + rng.randint(1, 256)] = bytes(min(256, len(data) - at))
    elif kind == "repeat":
        at = rng.randrange(len(data))
        data[at:at] = data[at:at + rng.randint(1, 512)] * rng.randint(2, 8)
    else:
        magic = rng.choice([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"BM", b"\x1f\x8b", b"\0" * 128 + b"DICM"])
        data[:len(magic)] = magic
    return bytes(data)


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (valid CRC) over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda tag, body: struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    rows = zlib.compress(b"\0" * min(width + 1, 1 << 20) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def adversarial(rng: np.random.Generator) -> list[tuple[str, bytes, str]]:
    """Files built to mislead a decoder: headers that lie about sizes, types and layout."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

    small = noise(rng, (16, 20), np.uint16, 3000)
    cases = [(f"png {w}x{h}", png_with_size(w, h), "image/png")
             for w, h in [(0, 0), (1, 1), (100_000, 100_000), (2**31 - 1, 1), (1, 2**31 - 1), (800, 800), (5000, 5000)]]
    dicoms = {
        "frames beyond the data": dict(frames=40), "frames short of the data": dict(frames=1, pixels=noise(rng, (4, 16, 20), np.uint16)),
        "huge rows": dict(Rows=65535, Columns=65535), "zero rows": dict(Rows=0), "bits 12": dict(BitsAllocated=12),
        "bits 32 stored 40": dict(BitsAllocated=32, BitsStored=40), "rgb over mono data": dict(SamplesPerPixel=3, PhotometricInterpretation="RGB"),
        "palette": dict(PhotometricInterpretation="PALETTE COLOR"), "nan slope": dict(RescaleSlope="NaN"),
        "huge window": dict(WindowCenter=1e300, WindowWidth=0), "deflated": dict(syntax=DeflatedExplicitVRLittleEndian),
        "implicit": dict(syntax=ImplicitVRLittleEndian), "big endian": dict(syntax=ExplicitVRBigEndian),
        "signed": dict(PixelRepresentation=1), "frames huge": dict(frames=2**30),
    }
    for name, attrs in dicoms.items():
        attrs = dict(attrs)
        try:
            data = dicom_bytes(attrs.pop("pixels", small), attrs.pop("syntax", None), attrs.pop("frames", 1), **attrs)
        except Exception:  # pydicom refuses to write some lies; the case is then skipped
            continue
        cases.append((f"dicom {name}", data, "application/dicom"))
    flipped = nifti_bytes(noise(rng, (12, 10, 6), np.int16, 1000), np.diag([-1.0, 1.0, -1.0, 1.0]))
    niftis = {
        "dims huge": dict(dim=[3, 32767, 32767, 32767, 1, 1, 1, 1]), "dims negative": dict(dim=[3, -5, 10, 6, 1, 1, 1, 1]),
        "dims zero": dict(dim=[3, 0, 10, 6, 1, 1, 1, 1]), "ndim 7": dict(dim=[7, 12, 10, 6, 2, 2, 2, 2]),
        "ndim 99": dict(dim=[99, 12, 10, 6, 1, 1, 1, 1]), "slope nan": dict(scl_slope=float("nan"), scl_inter=5.0),
        "slope inf": dict(scl_slope=float("inf")), "slope huge": dict(scl_slope=3e38),
        "vox offset far": dict(vox_offset=1e9), "vox offset negative": dict(vox_offset=-400.0),
        "datatype rgb": dict(datatype=128, bitpix=24), "datatype complex": dict(datatype=32, bitpix=64),
        "datatype unknown": dict(datatype=999), "bitpix lies": dict(bitpix=64), "pixdim nan": dict(pixdim=[1] + [float("nan")] * 7),
        "sizeof_hdr wrong": dict(sizeof_hdr=12345), "magic wrong": dict(magic=b"xyz\0"), "sform odd": dict(sform_code=77),
        "big endian sizeof": dict(sizeof_hdr=int.from_bytes((348).to_bytes(4, "big"), "little")),
    }
    for name, fields in niftis.items():
        data = nifti_lying(flipped, **fields)
        cases.append((f"nifti {name}", data, "application/x-nifti"))
        cases.append((f"nifti.gz {name}", gzip.compress(data), "application/gzip"))
    # Small on the wire, large inflated: a volume that needs reorienting and scaling, a deflated DICOM.
    bomb = nifti_lying(nifti_bytes(np.zeros((256, 256, 256), np.int16), np.diag([-1.0, -1.0, 1.0, 1.0])), scl_slope=2.0)
    cases.append(("nifti.gz bomb 32 MB", gzip.compress(bomb, 9), "application/gzip"))
    cases.append(("dicom deflated bomb", dicom_bytes(np.zeros((8, 700, 700), np.uint16), DeflatedExplicitVRLittleEndian,
                                                     frames=8), "application/dicom"))
    cases.append(("gzip of garbage", gzip.compress(bytes(range(256)) * 8), "application/gzip"))
    cases.append(("gzip bomb small", gzip.compress(b"\0" * 20_000_000), "application/gzip"))
    return cases


# --- requests -----------------------------------------------------------------------------------

def data_url(data: bytes, media: str) -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_request(url: str, rng: random.Random, window=None) -> dict:
    """Mostly /v1/preview (decoding only); a fifth go on to be answered, image tokens and all."""
    if rng.random() < 0.8:
        body = {"image_url": url}
        if window:
            body["window"] = window
        return dict(method="POST", url="/v1/preview", json=body)
    part = {"type": "image_url", "image_url": {"url": url, **({"window": window} if window else {})}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is shown?"}]}]
    return dict(method="POST", url="/v1/chat/completions", json={"messages": messages, "max_tokens": 1})


STRANGE = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**70, -2**70, 10**300, 1.5, -0.0, 1e308, 1e-320, "", "x",
           "hot", "1", "true", "null", "\u0000", "é" * 50, "\U0001F600", "<image>" * 20, "A" * 5000, [], [1], [None],
           ["a", "b"], {}, {"a": 1}, {"type": "text"}, {"url": "data:,"}, [[[[[[[[[[]]]]]]]]]], [{"role": "user"}]]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stream",
          "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user",
          "tools", "tool_choice", "response_format", "stream_options", "unknown_field"]


def deep(depth: int, leaf="x"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def random_message(rng: random.Random):
    role = rng.choice(["user", "user", "assistant", "system", "developer", "tool", "", None, 5, ["user"]])
    if rng.random() < 0.5:
        content = rng.choice(STRANGE)
    else:
        parts = []
        for _ in range(rng.randint(0, 4)):
            kind = rng.choice(["text", "image_url", "audio", None, 3])
            parts.append(rng.choice([
                {"type": kind, "text": rng.choice(STRANGE)},
                {"type": kind, "image_url": rng.choice(STRANGE + [{"url": rng.choice(STRANGE)}])},
                {"type": kind, "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "window": rng.choice(STRANGE)}},
                rng.choice(STRANGE)]))
        content = parts
    message = {"role": role, "content": content}
    if rng.random() < 0.1:
        message = rng.choice(STRANGE)
    return message


def json_body_cases(rng: random.Random, n: int) -> list[dict]:
    cases = []
    for _ in range(n):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FIELDS)] = rng.choice(STRANGE)
        if rng.random() < 0.4:
            body["messages"] = [random_message(rng) for _ in range(rng.randint(0, 4))]
        cases.append(dict(method="POST", url="/v1/chat/completions", json=body))
    return cases


def raw(body: bytes, content_type: str | None = "application/json", url: str = "/v1/chat/completions") -> dict:
    return dict(method="POST", url=url, content=body, headers={"content-type": content_type} if content_type else {})


def raw_cases(rng: random.Random) -> list[dict]:
    valid = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    bodies = [b"", b"null", b"[]", b'"text"', b"1e999", b"1" * 5000, b"{", valid[:-3].encode(), valid.encode() + b"}",
              b"\xef\xbb\xbf" + valid.encode(), valid.encode("utf-16"), valid.encode("utf-32"),
              b'{"messages": [{"role": "user", "content": "\xff\xfe\xc0\xaf"}]}', b"\xff" * 100, b"\x00" * 100,
              b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, deep_json(900),
              b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
              b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
              b'{"messages": [{"role": "user", "content": "\\ud800\\udc00\\udfff"}]}',
              b'{"messages": [{"role": "user", "content": "hi"}], "messages": 5}', b" " * 900_000 + valid.encode(),
              b"\t\n" * 1000, valid.encode().replace(b'"hi"', b'"' + b"\\u0000" * 10_000 + b'"'),
              b'{"messages": [{"role": "user", "content": "' + b"x" * 999_000 + b'"}]}', b"{}" * 2_000_000]
    bodies += [rng.randbytes(rng.randint(1, 2000)) for _ in range(20)]
    bodies += [bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in valid.encode()) for _ in range(20)]
    cases = [raw(b) for b in bodies] + [raw(b, url="/v1/preview") for b in bodies[:12]]
    for ctype in [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  "multipart/form-data; boundary=zz", "application/xml", "application/json-patch+json", "*/*",
                  "application/json; charset=latin-1", "APPLICATION/JSON", "application/json;;;", "image/png"]:
        for url in ("/v1/chat/completions", "/v1/preview"):
            cases.append(raw("é".encode("latin-1") if ctype and "latin" in ctype else valid.encode(), ctype, url))
    for url in ("/v1/chat/completions", "/v1/preview"):
        cases.append(dict(method="POST", url=url, files={"file": ("x.png", b"\x89PNG\r\n\x1a\n", "image/png")}))
        cases.append(dict(method="POST", url=url, data={"messages": "hi"}))
        cases.append(raw(b"--zz\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--zz--\r\n", "application/json", url))
    for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):
        for url in ("/v1/chat/completions", "/v1/preview", "/v1/models", "/health", "/"):
            cases.append(dict(method=method, url=url))
    for url in ("/v1", "/v1/", "/v1/chat", "/v1/completions", "/v1/chat/completions/", "/../../etc/passwd",
                "/%2e%2e/%2e%2e/etc/passwd", "/v1/models/tiny", "/" + "a" * 5000, "/v1/chat/completions?x=" + "y" * 5000):
        cases.append(dict(method="POST", url=url, json={"messages": []}))
    return cases


def deep_json(depth: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": deep(depth)}]}]}).encode()


def data_url_cases(png: bytes) -> list[dict]:
    b64 = base64.b64encode(png).decode()
    urls = ["", "data:", "data:,", "data:image/png;base64,", "data:image/png;base64", "data:image/png," + b64,
            "DATA:IMAGE/PNG;BASE64," + b64, "data:image/png;base64," + b64[:-2], "data:image/png;base64," + b64 + "===",
            "data:image/png;base64," + b64.replace("+", "-").replace("/", "_"), "data:image/png;base64, " + b64,
            "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
            "data:" + "x" * 5000 + ";base64," + b64, "data:image/png;charset=utf-8;base64," + b64, "javascript:alert(1)",
            "blob:http://x/1", "file:///etc/passwd", "/etc/passwd", "http://169.254.169.254/latest/meta-data",
            "\\\\server\\share\\x.png", "data:image/png;base64,%%%%", "data:image/png;base64,\u00e9\u00e9\u00e9\u00e9",
            "data:application/dicom;base64,AAAA", "data:application/gzip;base64," + base64.b64encode(b"\x1f\x8b\x08").decode(),
            "data:image/png;base64," + "A" * 1_300_000]
    rng = random.Random(SEED)
    return [image_request(u, rng) for u in urls]


def image_cases(rng: random.Random, n_mutations: int) -> list[tuple[str, dict]]:
    files = sources(np.random.default_rng(SEED))
    cases = [(f"valid {name}", image_request(data_url(data, media), rng)) for name, (data, media) in files.items()]
    for name, data, media in adversarial(np.random.default_rng(SEED)):
        cases.append((name, image_request(data_url(data, media), rng, rng.choice([None, "lung", [40, 400], "rgb"]))))
    names = sorted(files)
    for i in range(n_mutations):
        name = rng.choice(names)
        data, media = files[name]
        media = media if rng.random() < 0.8 else rng.choice(["image/png", "application/dicom", "application/gzip",
                                                             "application/octet-stream", "text/plain"])
        window = rng.choice([None, None, "lung", "bone", [50, 350], "no-such-window"])
        cases.append((f"mutated {name} #{i}", image_request(data_url(mutate(data, rng), media), rng, window)))
    return cases


# --- checks -------------------------------------------------------------------------------------

def check(response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    if response.status_code >= 400 and response.request.method != "HEAD":
        error = response.json()["error"]
        assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"], (what, error)


def send(client, case: dict):
    case = dict(case)
    return client.request(case.pop("method"), case.pop("url"), **case)


def test_fuzz_http(client):
    rng = random.Random(SEED)
    png = sources(np.random.default_rng(SEED))["png"][0]
    cases = ([(f"json #{i}", c) for i, c in enumerate(json_body_cases(rng, 180))]
             + [(f"raw #{i}", c) for i, c in enumerate(raw_cases(rng))]
             + [(f"data url #{i}", c) for i, c in enumerate(data_url_cases(png))])
    statuses = {}
    for what, case in cases:
        r = send(client, case)
        check(r, what)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert len(cases) >= 340
    assert {200, 400, 404, 405, 413, 415} <= set(statuses)  # the cases reach every kind of answer


def test_fuzz_images_with_bounded_memory(client):
    rng = random.Random(SEED + 1)
    cases = image_cases(rng, 150)
    growth = []
    tracemalloc.start()
    try:
        for what, case in cases:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            r = send(client, case)
            growth.append(tracemalloc.get_traced_memory()[1] - before)
            check(r, what)
    finally:
        tracemalloc.stop()
    assert len(cases) >= 220
    print(f"\n{len(cases)} image requests: peak heap growth per request median {np.median(growth) / 2**20:.1f} MiB, "
          f"max {max(growth) / 2**20:.1f} MiB")
    pytest.importorskip("medmoe.data.bounded_io", reason="the memory bound needs the bounded image decoders")
    assert max(growth) < MAX_REQUEST_GROWTH


# --- the CLI ------------------------------------------------------------------------------------

def test_fuzz_cli_ask(tmp_path, capsys):
    from medmoe.cli import main

    rng = random.Random(SEED + 2)
    files = sources(np.random.default_rng(SEED))
    suffix = {"png": ".png", "png16": ".png", "jpeg": ".jpg", "tiff": ".tif", "bmp": ".bmp", "dicom": ".dcm",
              "dicom3": ".dcm", "nii": ".nii", "niigz": ".nii.gz"}
    paths = []
    for i in range(36):
        name = rng.choice(sorted(files))
        data = files[name][0]
        data = data[:rng.randrange(len(data))] if i % 2 else mutate(data, rng)  # half truncated, half mutated
        path = tmp_path / f"case{i}{suffix[name]}"
        path.write_bytes(data)
        paths.append(path)
    for path in paths:
        # --model names no model folder: a file that happens to decode ends in that one-line error instead
        code = main(["ask", "--model", str(tmp_path / "no-model"), "--image", str(path), "q"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("medmoe ask: error: "), (path, captured.err)
        assert "Traceback" not in captured.err and captured.out == ""
