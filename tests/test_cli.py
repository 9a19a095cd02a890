"""The `medmoe` command's error handling: what a user sees when a command fails."""

import pytest
import torch

import medmoe.cli.eval as eval_cli
import medmoe.cli.train as train_cli
from medmoe.cli import main


def _raise(err):
    def run(args):
        raise err
    return run


def test_out_of_memory_names_the_fix_per_command(monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "run", _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert main(["eval", "--data", "sample", "--out", "x"]) == 3
    err = capsys.readouterr().err
    assert "medmoe eval: error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "lower --batch-size" in err and "finished questions are kept" in err

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried ...")
    monkeypatch.setattr(train_cli, "run", _raise(cpu))
    assert main(["train", "--recipe", "tiny"]) == 3
    err = capsys.readouterr().err
    assert "medmoe train: error: out of memory" in err and "--resume" in err and "grad_checkpointing" in err


def test_other_runtime_errors_are_not_reported_as_memory(monkeypatch):
    monkeypatch.setattr(eval_cli, "run", _raise(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["eval", "--data", "sample", "--out", "x"])


# --- one line, exit 2, for every user error -------------------------------------------------------

def bad_image_files(folder):
    """Files `medmoe ask --image` cannot read: truncated, empty, not images, wrong contents for the name."""
    import gzip
    import io

    import nibabel as nib
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # does not compress
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(noise).save(png, "PNG")
    Image.fromarray(noise).save(jpeg, "JPEG")
    volume = nib.Nifti1Image(noise.astype(np.int16), np.eye(4)).to_bytes()
    packed = gzip.compress(volume)
    contents = {"truncated.png": png.getvalue()[:2000], "truncated.jpg": jpeg.getvalue()[:2000], "empty.png": b"",
                "text.png": b"just some text\n", "truncated.nii.gz": packed[:len(packed) // 2],
                "not-gzip.nii.gz": b"\x1f\x8b" + b"x" * 100, "truncated.nii": volume[:1000],
                "garbage.dcm": b"\0" * 128 + b"DICM" + bytes(range(256)) * 2, "report.json": b'{"a": 1'}
    paths = []
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    (folder / "folder.png").mkdir()
    return paths + [folder / "folder.png", folder / "missing.png"]


def one_line_error(capsys, name: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("medmoe ask: error: ") and name in lines[0]
    return lines[0]


def test_ask_bad_image_files_are_one_line_exit_2(tmp_path, capsys):
    for path in bad_image_files(tmp_path):
        assert main(["ask", "--model", str(tmp_path / "never-loaded"), "--image", str(path), "q"]) == 2, path
        one_line_error(capsys, str(path))


@pytest.mark.parametrize("err", [OSError("broken data stream when reading image file"), EOFError(),
                                 ValueError("The length of the pixel data doesn't match"), TypeError("NoneType"),
                                 "zlib"])
def test_ask_decoder_exceptions_are_one_line_naming_the_file(tmp_path, monkeypatch, capsys, err):
    import zlib

    import medmoe.data.images as images

    err = zlib.error("Error -3 while decompressing data: incorrect header check") if err == "zlib" else err
    monkeypatch.setattr(images, "load_image", _raise(err))
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["ask", "--model", "nano", "--image", str(path), "q"]) == 2
    assert type(err).__name__ in one_line_error(capsys, str(path))


def test_ask_with_a_broken_model_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["ask", "--model", str(tmp_path), "q"]) == 2
    one_line_error(capsys, str(tmp_path))


def test_a_named_file_the_system_refuses_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "run", _raise(PermissionError(13, "Permission denied", "/data/answers.jsonl")))
    assert main(["eval", "--data", "sample", "--out", "x"]) == 2
    assert capsys.readouterr().err == "medmoe eval: error: /data/answers.jsonl: Permission denied\n"


def test_serve_leaves_a_core_to_the_http_side_unless_told(monkeypatch):
    from medmoe.cli import build_parser
    from medmoe.cli.serve import model_threads
    from medmoe.errors import ConfigError

    assert [model_threads(None, cores) for cores in (1, 2, 16)] == [1, 1, 15]
    assert model_threads(2, 2) == 2
    with pytest.raises(ConfigError, match="--threads 0"):
        model_threads(0, 8)
    assert build_parser().parse_args(["serve", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["serve"]).threads is None
