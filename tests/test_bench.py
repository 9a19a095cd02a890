"""`medmoe bench` sections run end to end on tiny shapes on the CPU (speed itself is never asserted)."""

from __future__ import annotations

import torch

from medmoe.bench import models, moe_layer, train


def test_moe_layer_bench_reports_every_path_and_agreeing_outputs():
    report = moe_layer.run(torch.device("cpu"), dtype=torch.float32, sizes=(1, 8), hidden=32, ffn=64, log=lambda *a: None)
    for row in report["rows"]:
        assert set(row["fwd_bwd_ms"]) == {"ours", "ours_meta_fused", "loop", "official", "official_fused_act",
                                          "floor", "floor_hf"}
        assert max(row["rel_err_vs_loop"].values()) < 1e-5
        assert row["rel_err_vs_fp32"]["ours"] < 1e-5


def test_train_bench_measures_each_checkpointing_setting():
    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)
    model = models.phi2_medmoe(torch.device("cpu"), torch.float32, text=tiny)
    results = [train.run(torch.device("cpu"), batch=2, text_tokens=8, steps=1, model=model, checkpoint_every=n,
                         log=lambda *a: None) for n in (1, 2, 0, "selective", "activations")]
    assert [r["checkpoint_every"] for r in results] == [1, 2, 0, "selective", "activations"]
    assert all(r["tokens_per_step"] == 2 * (1 + 576 + 7) and r["tokens_per_s"] > 0 for r in results)
    assert results[0]["n_activated"] < sum(p.numel() for p in model.language_model.parameters())


def test_decode_bench_fuses_qkv_for_its_own_path_only():
    from medmoe.bench import decode
    from medmoe.engine.fused_layers import is_fused

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)
    model = models.phi2_medmoe(torch.device("cpu"), torch.float32, text=tiny)
    reports = [decode.run(torch.device("cpu"), (1,), new_tokens=4, text_tokens=4, model=model, plain_steps=2,
                          fuse_qkv=fuse, log=lambda *a: None) for fuse in (True, False)]
    fused, plain = (r["rows"][0] for r in reports)
    assert fused["fused_qkv"] is True and plain["fused_qkv"] is False
    assert fused["fused_parallel_layers"] == 2 and plain["fused_parallel_layers"] == 0  # Phi's parallel layers
    assert fused["overlapped_moe_layers"] == 1 and plain["overlapped_moe_layers"] == 0  # every other layer is MoE
    assert fused["decode_rotary_layers"] == 2 and plain["decode_rotary_layers"] == 0
    assert fused["first_tokens"] == plain["first_tokens"] and fused["graph_equals_eager"]
    assert fused["compile"] is False and not fused["compile_fell_back"]
    assert not is_fused(model)  # handed back as it came
    assert fused["step_bytes"] == plain["step_bytes"]
    graph = fused["graph"]  # the measured run, after warm-up: on the CPU every decode step is eager
    assert (graph["eager_steps"], graph["graph_replays"], graph["graph_captures"], graph["cache_growths"]) == (3, 0, 0, 0)


def test_decode_bench_reports_a_compile_that_fell_back(monkeypatch):
    from medmoe.bench import decode

    def failing_compile(fn, dynamic=None, mode=None):
        def compiled(*args):
            raise AssertionError("sources must not be empty for symbol s15")  # dynamo's, on torch 2.11
        return compiled

    tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=256)
    model = models.phi2_medmoe(torch.device("cpu"), torch.float32, text=tiny)
    monkeypatch.setattr(torch, "compile", failing_compile)
    row = decode.run(torch.device("cpu"), (1,), new_tokens=4, text_tokens=4, model=model, plain_steps=2,
                     compile=True, log=lambda *a: None)["rows"][0]
    assert row["compile"] is True and row["compile_fell_back"]
    assert row["graph_equals_eager"]  # the fallen-back engine's tokens are the uncompiled engine's


def test_checkpoint_every_settings_parse_or_fail_with_the_choices():
    import pytest

    from medmoe.cli import main
    from medmoe.errors import ConfigError
    from medmoe.model.recompute import checkpointing_options
    from medmoe.training.recipe import checkpointing_setting

    assert [checkpointing_setting(t) for t in ("0", " 2", "selective", "activations", "full", True)] == [
        ("off", 1), ("full", 2), ("selective", 1), ("activations", 1), ("full", 1), ("full", 1)]
    assert checkpointing_options(*checkpointing_setting("selective")) == {"every": 1, "selective": True}
    assert checkpointing_options(*checkpointing_setting("activations")) == {"activations": True}
    assert checkpointing_options(*checkpointing_setting("3")) == {"every": 3, "selective": False}
    for bad in ("x", "-1", "1.5", -1):
        with pytest.raises(ConfigError, match="grad_checkpointing="):
            checkpointing_setting(bad)
    assert main(["bench", "--what", "train", "--checkpoint-every", "1,x", "--device", "cpu"]) != 0


def test_cpu_bench_runs_the_bundled_model_in_the_dtype_asked():
    """`medmoe bench --what cpu --dtype D` times the bundled nano in D (auto: what `ask` picks here)."""
    from conftest import require_efficientnet, require_smollm2
    from medmoe.bench import cpu
    from medmoe.model.pretrained import pick_dtype

    require_smollm2()
    require_efficientnet()
    expected = {"bfloat16": "bfloat16", "auto": str(pick_dtype("auto", torch.device("cpu"))).replace("torch.", "")}
    for dtype, name in expected.items():
        result = cpu.run(threads=1, new_tokens=3, repeats=1, dtype=dtype, log=lambda *_: None)
        assert result["dtype"] == name
        assert result["first_token_ms"] > 0 and result["answer_ms"] > 0  # times, not their order: one repeat is noisy
        assert "lora_loop" in result and "adapters_unmerged" in result


def test_cpu_bench_times_a_model_folder(tmp_path, tiny):
    """`medmoe bench --what cpu --model DIR` times that model (its image tokens reported), not the
    bundled one."""
    from medmoe.bench import cpu

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    result = cpu.run(threads=1, new_tokens=3, repeats=1, dtype="float32", log=lambda *_: None, model_name=str(tmp_path))
    assert result["model"] == str(tmp_path)
    assert result["image_tokens"] == processor.num_image_tokens
    assert result["first_token_ms"] > 0 and "adapters_unmerged" in result
