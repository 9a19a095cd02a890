"""Options shared by `medmoe ask`, `chat` and `serve` for loading a model."""

from __future__ import annotations

import contextlib
import json


def add_model_args(p) -> None:
    p.add_argument("--model", default="nano",
                   help="model folder (save_pretrained, `medmoe train` or `medmoe export` output) or a bundled model; "
                        "default: nano, the bundled Med-MoE-Nano (CPU is enough, no network)")
    p.add_argument("--device", default="auto", help="auto (GPU when present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU and on a CPU with bfloat16 "
                   "hardware, else float32), float32, bfloat16, float16")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: weight-only int8 linears and experts (about 3x less weight memory; see docs/serving.md)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens")


def add_image_args(p) -> None:
    p.add_argument("--window", default=None,
                   help="DICOM/NIfTI window: lung, mediastinum, soft_tissue, abdomen, liver, bone, brain, subdural, "
                        "stroke, rgb (lung/mediastinum/bone as R/G/B) or CENTER,WIDTH (--window=-600,1500 for a "
                        "negative center); default: the file's own")
    p.add_argument("--frame", type=int, default=None, help="frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", help="NIfTI slice (default: the middle one)")
    p.add_argument("--plane", default="axial", choices=["axial", "coronal", "sagittal"], help="NIfTI slice plane")


def open_image(path: str | None, args):
    """The image for a path, honouring the DICOM/NIfTI options; None for no image. A decoder's own
    exception on a corrupt file (PIL's OSError, EOFError, zlib.error, pydicom's and nibabel's
    errors) becomes an ImageError naming the file: the CLI prints one line, not a traceback."""
    if not path:
        return None
    from ..errors import ImageError, MedMoEError

    try:
        return _open_image(path, args)
    except (MedMoEError, MemoryError):
        raise
    except Exception as err:
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise ImageError(f"{path}: cannot read the image ({type(err).__name__}{': ' + detail if detail else ''}); "
                         "check that it is a whole, valid PNG/JPEG/TIFF/BMP/DICOM/NIfTI file") from err


def _open_image(path: str, args):
    from ..data.images import load_image
    from ..data.medical_images import load_medical, medical_kind

    if medical_kind(path) is None:
        return load_image(path)
    window = args.window
    if window and "," in window:
        window = tuple(float(v) for v in window.split(","))
    return load_medical(path, window=window, frame=args.frame, slice_index=args.slice_index, plane=args.plane)


def load(args):
    from ..serving.api import MedMoE

    with loading(args.model):
        return MedMoE.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           max_new_tokens=args.max_new_tokens)


@contextlib.contextmanager
def loading(model: str):
    """An unreadable file in a model folder (transformers raises a bare OSError for a broken
    config.json) becomes a CheckpointError naming the folder."""
    from ..errors import CheckpointError

    try:
        yield
    except (OSError, json.JSONDecodeError) as err:
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise CheckpointError(f"{model}: cannot load the model ({detail}); check the folder's files") from err


def confidence_level(text: str) -> float:
    """argparse type of --min-confidence: a probability."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a probability between 0 and 1, e.g. 0.6")
    return value
