"""Servers for the load benchmarks (`medmoe bench --what serve,soak`), always on 127.0.0.1.

`serve_process` runs the real `medmoe serve` in a subprocess (its own interpreter: the load
generator's Python work does not share the server's GIL); `serve_thread` runs the same app in a
thread of this process (tests). A preset name other than a bundled model (`phi2`, `tiny`, ...)
becomes a random-weight model folder first, so it is served exactly as a user's folder is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, MedMoEError

HOST = "127.0.0.1"  # the benchmarks never listen beyond loopback


class ServerError(MedMoEError):
    """The server under test did not start or died."""


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    pid: int  # the process whose memory is the server's
    kind: str  # "process" or "thread"
    model: str


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS in /proc; 0.0 where /proc is missing or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def is_random_preset(name: str) -> bool:
    from ..model.presets import PRESETS
    from ..model.pretrained import BUNDLED_MODELS

    return name in PRESETS and name not in BUNDLED_MODELS and not os.path.isdir(name)


def random_model(name: str, device: torch.device, text: dict | None = None):
    """(model, processor) with random weights: `phi2` is the bench's Phi-2-size Med-MoE (bench/models.py,
    576 image tokens from a stand-in tower), any other preset is upcycled to a Med-MoE."""
    from ..data.processor import MedMoEProcessor
    from ..model.pretrained import build_model
    from . import models

    if name != "phi2":
        model, processor = build_model(name, pretrained=False)
        model.upcycle()
        return model.to(device), processor
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = models.phi2_medmoe(device, dtype, text=text)
    cfg = model.config
    tokenizer = word_tokenizer(cfg.text_config["vocab_size"])
    processor = MedMoEProcessor(tokenizer, cfg.vision_config, template=cfg.chat_template)
    cfg.image_token_id = processor.image_token_id  # the placeholder the byte tokenizer writes
    return model, processor


def word_tokenizer(vocab_size: int):
    """The byte tokenizer with a word for every further id of the model's vocabulary ("w0", "w1", ...):
    a random model's tokens then have text, so a stream sends one chunk per token (time to first
    token and inter-token latency measurable); ids past the bytes would otherwise decode to nothing."""
    from ..model.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    spare = 8  # room for the processor's image token and other special tokens
    tok.add_tokens([f"w{i}" for i in range(max(vocab_size - spare - len(tok), 0))])
    return tok


def save_random_model(name: str, directory: str, device: torch.device, text: dict | None = None) -> str:
    model, processor = random_model(name, device, text)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return directory


@contextlib.contextmanager
def model_folder(model: str, device: torch.device):
    """The folder (or bundled name) to serve: a random preset is saved to a temporary folder first."""
    if not is_random_preset(model):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix=f"medmoe-bench-{model}-") as tmp:
        print(f"bench: saving a random-weight {model} model to {tmp}", file=sys.stderr, flush=True)
        yield save_random_model(model, tmp, device)


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


@contextlib.contextmanager
def serve_process(model: str, device: str | None = None, serve_args: list[str] = (), log_path: str | None = None,
                  start_timeout_s: float = 900.0):
    """`python -m medmoe serve --model MODEL` on a free loopback port; yields a Served, stops it on exit."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "medmoe", "serve", "--model", model, "--host", HOST, "--port", str(port),
           *(["--device", device] if device else []), *serve_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)}
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                lines = [line for line in log.read()[-4000:].decode(errors="replace").splitlines() if line.strip()]
                where = f" (log: {log_path})" if log_path else ""
                raise ServerError(f"`medmoe serve --model {model}` exited with code {proc.returncode}{where}: "
                                  f"{lines[-1] if lines else 'no output'}")
            if time.monotonic() > deadline:
                raise ServerError(f"`{' '.join(cmd)}` did not answer /health within {start_timeout_s:g} s")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield Served(base, proc.pid, "process", model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def serve_thread(model, processor, limits=None, name: str = "medmoe"):
    """The app for a loaded model in a thread of this process (its memory is this process's)."""
    from ..serving.server import create_app, serve_in_thread

    app = create_app(model, processor, limits)
    with serve_in_thread(app, host=HOST) as base:
        yield Served(base, os.getpid(), "thread", name)


@contextlib.contextmanager
def served(model: str, device: str | None = None, kind: str = "process", serve_args: list[str] = (),
           log_path: str | None = None):
    """Serve a model folder, a bundled name or a random preset, in a subprocess or a thread."""
    from ..model.pretrained import pick_device

    dev = pick_device(device)
    if kind == "process":
        with model_folder(model, dev) as folder, serve_process(folder, device, list(serve_args), log_path) as s:
            s.model = model
            yield s
    elif kind == "thread":
        if serve_args:
            raise ConfigError("--serve-args applies to --server process only")
        if is_random_preset(model):
            m, processor = random_model(model, dev)
        else:
            from ..serving.api import load_model

            m, processor = load_model(model, device)
        with serve_thread(m, processor, name=model) as s:
            yield s
    else:
        raise ConfigError(f"--server {kind!r}: use process or thread")
