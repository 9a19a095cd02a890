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
