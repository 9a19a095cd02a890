"""The GPU-run scripts behind docs/RESULTS.md, dry: nano.sh's stages print the medmoe commands they
would run (MEDMOE="echo medmoe"), gpu_run.sh runs them in the background and gpu_wait.sh brings
back what they made, downscale_images.py shrinks only what is too large, and profile_speed.py summarises a decode trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def nano_sh(tmp_path, *stages, train_args=""):
    (tmp_path / "data").mkdir(exist_ok=True)
    env = {**os.environ, "MEDMOE": "echo medmoe", "TRAIN_ARGS": train_args}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "nano.sh"), str(tmp_path / "data"), str(tmp_path / "work"), *stages],
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_base_and_moe_stages_split_training_at_phase_3(tmp_path):
    lines = nano_sh(tmp_path, "base", "moe", train_args="vision.image_size=448")
    phases = [line.split("--phase ")[1].split()[0] for line in lines]
    assert phases == ["tower", "1", "2", "router", "3"]  # the tower phase skips itself unless the recipe enables it
    assert all("output_dir=runs/nano" in line and line.endswith("vision.image_size=448") for line in lines)


def test_an_ablation_trains_phase_3_from_the_main_runs_phase_2(tmp_path):
    lines = nano_sh(tmp_path, "pooled")
    assert lines[0].startswith("medmoe train --recipe nano --phase 3 --resume output_dir=runs/pooled")
    assert lines[0].endswith("phase3.moe.routing=pooled")
    assert os.readlink(tmp_path / "work" / "runs" / "pooled" / "phase2") == str(tmp_path / "work" / "runs" / "nano" / "phase2")
    evals = [line for line in lines[1:] if line.startswith("medmoe eval --model runs/pooled/phase3/model")]
    assert len(evals) == 4  # VQA-RAD, SLAKE, PathVQA held out, PneumoniaMNIST


def test_eval_dense_evaluates_the_phase_2_model_only(tmp_path):
    lines = nano_sh(tmp_path, "eval-dense")
    assert len(lines) == 4 and all("--model runs/nano/phase2/model" in line for line in lines)
    with pytest.raises(subprocess.CalledProcessError):
        nano_sh(tmp_path, "no-such-stage")


def test_control_stage_shows_the_shipped_model_shuffled_images(tmp_path):
    lines = nano_sh(tmp_path, "control")
    for line, ds in zip(lines, ["vqa-rad", "slake"], strict=True):
        assert line.startswith(f"medmoe eval --model export/nano --data data/{ds} --split test")
        assert "--shuffle-images" in line and f"--out evals/medmoe-shuffled/{ds}" in line


def test_eval_datasets_picks_and_orders_the_evaluations(tmp_path):
    (tmp_path / "data").mkdir()
    env = {**os.environ, "MEDMOE": "echo medmoe", "EVAL_DATASETS": "pneumoniamnist vqa-rad"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "nano.sh"), str(tmp_path / "data"), str(tmp_path / "work"),
                          "eval-medmoe"], env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [line.split("--data ")[1].split()[0] for line in lines] == ["data/pneumoniamnist", "data/vqa-rad"]
    assert "--split validation" in lines[0] and "--split test" in lines[1]


def test_probe_asks_yes_no_label_questions_about_the_test_images(tmp_path):
    lines = nano_sh(tmp_path, "probe")
    assert len(lines) == 4
    for (make, ask), ds in zip([lines[0:2], lines[2:4]], ["vqa-rad", "slake"], strict=True):
        assert make == f"medmoe data label-questions data/{ds} --split test --out evals/label-questions/{ds}.jsonl"
        assert ask.startswith(f"medmoe eval --model export/nano --data evals/label-questions/{ds}.jsonl --split test")
        assert ask.endswith("--max-new-tokens 8")


def test_recipe_variable_trains_another_recipe(tmp_path):
    (tmp_path / "data").mkdir()
    env = {**os.environ, "MEDMOE": "echo medmoe", "RECIPE": "nano-balanced"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "nano.sh"), str(tmp_path / "data"), str(tmp_path / "work"), "train"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "medmoe train --recipe nano-balanced --resume output_dir=runs/nano"


def prepared_stage(tmp_path, datasets=("vqa-rad", "slake", "pathvqa", "pneumoniamnist")) -> Path:
    """A GPU machine's stage with the payload assembled and `datasets` prepared."""
    stage = tmp_path / "stage"
    for ds in datasets:
        (stage / "work" / "data" / ds).mkdir(parents=True)
        (stage / "work" / "data" / ds / "dataset.json").write_text("{}")
    (stage / "data").mkdir(parents=True)
    (stage / "ready").touch()
    return stage


def test_gpu_nano_v2_starts_each_variant_and_collects(tmp_path):
    """Dry: each variant trains, exports and evaluates in its own work folder beside the others."""
    stage = prepared_stage(tmp_path)
    env = {**os.environ, "STAGE": str(stage), "MEDMOE": "echo medmoe", "VARIANTS": "nano nano-balanced",
           "OUT": str(tmp_path / "out")}
    (tmp_path / "out").mkdir()
    start = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "start"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=60)
    assert start.returncode == 0 and start.stdout.count("started") == 2, start.stdout + start.stderr
    wait = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "wait", "60"], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=90)
    assert wait.returncode == 0, wait.stdout + wait.stderr
    log = (tmp_path / "out" / "nano-balanced.log").read_text()
    assert "medmoe train --recipe nano-balanced --resume output_dir=runs/nano" in log
    assert "--data data/slake --split test --out evals/medmoe-shuffled/slake --shuffle-images" in log
    assert "medmoe export runs/nano/phase3/model export/nano" in log
    assert (stage / "v2" / "nano" / "data").is_symlink() and (tmp_path / "out" / "nano.tgz").exists()


def start_each_then_wait(tmp_path, starts, names):
    """Dry: one `gpu_nano_v2.sh start` per (VARIANTS, TRAIN_ARGS) of `starts`, then one `wait` for
    `names`; returns the stage, each start's output and each name's log."""
    stage = prepared_stage(tmp_path)
    (tmp_path / "out").mkdir()
    base = {**os.environ, "STAGE": str(stage), "MEDMOE": "echo medmoe", "OUT": str(tmp_path / "out"), "EVALS": "none"}
    outputs = []
    for variants, args in starts:
        start = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "start"], cwd=ROOT, capture_output=True,
                               text=True, env={**base, "VARIANTS": variants, "TRAIN_ARGS": args}, timeout=60)
        assert start.returncode == 0, start.stdout + start.stderr
        outputs.append(start.stdout)
    wait = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "wait", "60"], cwd=ROOT, capture_output=True,
                          text=True, env={**base, "VARIANTS": " ".join(names)}, timeout=90)
    assert wait.returncode == 0, wait.stdout + wait.stderr
    return stage, outputs, {name: (tmp_path / "out" / f"{name}.log").read_text() for name in names}


def test_gpu_nano_v2_second_start_leaves_the_first_runs_code_and_settings(tmp_path):
    """Two starts (other variants, other TRAIN_ARGS) beside each other: each run trains from its own
    copy of the repository, with its own start's settings."""
    stage, _, logs = start_each_then_wait(tmp_path, [("nano-balanced", ""), ("nano", "phase2.compile=true")],
                                          ["nano-balanced", "nano"])
    assert len(list((stage / "v2").glob("repo.*"))) == 2
    assert "medmoe train --recipe nano-balanced --resume output_dir=runs/nano\n" in logs["nano-balanced"]
    assert "medmoe train --recipe nano --resume output_dir=runs/nano phase2.compile=true" in logs["nano"]


def test_gpu_nano_v2_trains_one_recipe_twice_under_two_names(tmp_path):
    """VARIANTS="NAME=RECIPE": two draws of one recipe side by side, each in its own folder and with its
    own seed; `wait` takes the names."""
    stage, outputs, logs = start_each_then_wait(tmp_path, [("mix0=nano-mix", ""), ("mix1=nano-mix", "seed=1")],
                                                ["mix0", "mix1"])
    assert "started mix0 in" in outputs[0] and "started mix1 in" in outputs[1]
    assert "medmoe train --recipe nano-mix --resume output_dir=runs/nano\n" in logs["mix0"]
    assert "medmoe train --recipe nano-mix --resume output_dir=runs/nano seed=1" in logs["mix1"]
    assert not (stage / "v2" / "nano-mix").exists()


def test_gpu_nano_v2_fetch_brings_back_the_parts_asked_for(tmp_path):
    stage = prepared_stage(tmp_path)
    (stage / "v2" / "x" / "export" / "nano").mkdir(parents=True)
    (stage / "v2" / "x" / "export" / "nano" / "model.safetensors").write_bytes(os.urandom(40 * 2**20))
    env = {**os.environ, "STAGE": str(stage), "OUT": str(tmp_path / "out")}
    got = []
    for span in ("1-2", "3-4"):
        (tmp_path / "out").mkdir()
        subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "fetch", "x", span], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=60)
        got.append(sorted(p.name for p in (tmp_path / "out").iterdir()))
        for p in (tmp_path / "out").iterdir():
            (tmp_path / p.name).write_bytes(p.read_bytes())
            p.unlink()
        (tmp_path / "out").rmdir()
    assert got == [["x-delta.partaa", "x-delta.partab"], ["x-delta.partac"]]
    joined = b"".join((tmp_path / name).read_bytes() for name in got[0] + got[1])
    tar = subprocess.run(["tar", "tf", "-"], input=joined, capture_output=True, check=True).stdout.decode()
    assert "export/nano/model.safetensors" in tar


def test_gpu_nano_v2_start_returns_while_the_runs_go_on(tmp_path):
    """The call that starts the runs ends at once, though its output is a pipe the caller reads to
    the end: no background process keeps it open."""
    stage = prepared_stage(tmp_path)
    slow = tmp_path / "slow-medmoe"
    slow.write_text("#!/bin/sh\nsleep 20\n")
    slow.chmod(0o755)
    env = {**os.environ, "STAGE": str(stage), "MEDMOE": str(slow), "VARIANTS": "nano", "OUT": str(tmp_path)}
    start = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "start"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=15)
    assert start.returncode == 0 and "started nano" in start.stdout
    subprocess.run(["pkill", "-f", str(slow)], check=False)


def test_gpu_nano_v2_refuses_a_payload_without_every_dataset(tmp_path):
    stage = prepared_stage(tmp_path, datasets=("vqa-rad", "pneumoniamnist"))
    env = {**os.environ, "STAGE": str(stage), "MEDMOE": "echo medmoe", "VARIANTS": "nano", "OUT": str(tmp_path)}
    start = subprocess.run(["bash", "scripts/lab/gpu_nano_v2.sh", "start"], cwd=ROOT, capture_output=True, text=True,
                           env=env, timeout=60)
    assert start.returncode == 3 and "no prepared slake" in start.stdout and "started" not in start.stdout


def test_place_prepared_points_the_payloads_data_at_the_stage(tmp_path):
    """Data prepared where the payload was built move under work/data, their image roots
    rewritten to the stage's copy of the images."""
    stage = tmp_path / "stage"
    built = "/tmp/build-xyz"
    (stage / "prepared" / "slake").mkdir(parents=True)
    (stage / "prepared" / ".built_in").write_text(built + "\n")
    (stage / "prepared" / "slake" / "dataset.json").write_text(f'{{"image_root": "{built}/data/slake"}}')
    (stage / "work" / "data").mkdir(parents=True)  # an older preparation, replaced
    subprocess.run(["bash", "scripts/lab/place_prepared.sh", str(stage)], cwd=ROOT, check=True)
    assert (stage / "work" / "data" / "slake" / "dataset.json").read_text() == f'{{"image_root": "{stage}/data/slake"}}'
    assert not (stage / "prepared").exists()
    subprocess.run(["bash", "scripts/lab/place_prepared.sh", str(stage)], cwd=ROOT, check=True)  # again: nothing to do


def test_gpu_run_detached_then_gpu_wait_brings_back_its_output(tmp_path):
    """DETACH=1 returns at once and runs the stages from a copy of the repo; gpu_wait.sh waits for
    the end and copies the packed output into its own call's OUT (dry: MEDMOE echoes)."""
    stage = tmp_path / "stage"
    (stage / "data").mkdir(parents=True)
    (stage / "ready").touch()  # the payload is in place
    env = {**os.environ, "STAGE": str(stage), "MEDMOE": "echo medmoe"}
    run = subprocess.run(["bash", "scripts/lab/gpu_run.sh", "eval-dense"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "DETACH": "1", "OUT": str(tmp_path / "call1")}, timeout=60)
    assert run.returncode == 0 and "started stages eval-dense in the background" in run.stdout
    assert (stage / "repo" / "scripts" / "nano.sh").is_file() and not (stage / "repo" / ".venv").exists()
    (tmp_path / "call2").mkdir()
    wait = subprocess.run(["bash", "scripts/lab/gpu_wait.sh", "60"], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "OUT": str(tmp_path / "call2")}, timeout=90)
    assert wait.returncode == 0, wait.stdout + wait.stderr
    log = (tmp_path / "call2" / "log.txt").read_text()
    assert "medmoe eval --model runs/nano/phase2/model" in log and "stages eval-dense rc=0" in log
    (stage / "run.pid").unlink()
    nothing = subprocess.run(["bash", "scripts/lab/gpu_wait.sh", "1"], cwd=ROOT, capture_output=True, text=True,
                             env={**env, "OUT": str(tmp_path / "call2")}, timeout=30)
    assert nothing.returncode == 3 and "DETACH=1" in nothing.stdout


def test_downscale_images_keeps_small_images_and_shrinks_large_ones(tmp_path):
    src = tmp_path / "src" / "vqa-rad"
    src.mkdir(parents=True)
    Image.new("RGB", (900, 600)).save(src / "big.jpg")
    Image.new("RGB", (200, 100)).save(src / "small.png")
    (src / "notes.txt").write_text("kept")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "downscale_images.py"), str(tmp_path / "src"),
                    str(tmp_path / "dst"), "448"], check=True, capture_output=True)
    dst = tmp_path / "dst" / "vqa-rad"
    assert Image.open(dst / "big.jpg").size == (448, 299)
    assert Image.open(dst / "small.png").size == (200, 100)
    assert (dst / "notes.txt").read_text() == "kept"


def test_finetune_stage_tunes_and_tests_each_benchmark_alone(tmp_path):
    lines = nano_sh(tmp_path, "finetune")
    tunes = [line for line in lines if line.startswith("medmoe finetune --model export/nano")]
    evals = [line for line in lines if line.startswith("medmoe eval")]
    assert [t.split("--data ")[1].split()[0] for t in tunes] == ["data/vqa-rad", "data/slake", "data/pathvqa"]
    assert [e.split("--split ")[1].split()[0] for e in evals] == ["test", "test", "heldout"]
    assert all("--model runs/ft-" in e for e in evals)


def test_profile_trace_summary_reads_layers_and_kernels_off_a_trace(tmp_path):
    import json

    def kernel(name, ts, dur, grid, stream=7):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"grid": [grid, 1, 1], "stream": stream}}

    events = []  # five replays (as decode-trace takes) of an MoE layer, where an expert product starts, and two dense ones
    for replay in range(5):
        for start, moe in ((0, True), (90, False), (150, False)):
            start += 1000 * replay
            events.append(kernel("linear_matvec_kernel", start, 20, 17920))  # the fused input product
            events.append(kernel("cudnn_generated_fort_native_sdpa", start + 22, 8, 4))
            if moe:
                events.append(kernel("matvec", start + 25, 15, 1, stream=9))
            events.append(kernel("linear_matvec_kernel", start + 40, 15, 640))  # the output product
        events.append(kernel("linear_matvec_kernel", 1000 * replay + 210, 20, 17920))  # where the next layer would start
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events + [{"cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}]}))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_speed.py"), f"trace-summary={path}"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True).stdout
    assert "MoE 90.0 us (5), dense 60.0 us (10)" in out  # the gaps between replays are not layers
    assert "7: 10 kernels" in out and "9: 1 kernels" in out
    assert "expert products: 15.0 us median" in out and "attention: 8.0 us median" in out


def test_trace_timeline_charges_device_idle_time_to_the_innermost_host_range(tmp_path):
    import gzip
    import json

    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [event("user_annotation", "eval.generate", 0, 10_000),
              event("user_annotation", "engine.prefill_forward", 1_000, 3_000),  # the device idles 2 ms of it
              event("kernel", "gemm", 0, 1_000), event("kernel", "gemm", 3_000, 6_000),
              event("gpu_memcpy", "copy", 9_000, 500),  # a copy is device work too
              event("cuda_runtime", "cudaStreamSynchronize", 2_000, 1_000),
              event("cpu_op", "aten::mm", 0, 10_000)]  # host operators are not device work
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab" / "trace_timeline.py"), str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "(75%)" in out  # busy 1 + 6 + 0.5 ms of 10
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("eval.", "engine."))}
    assert lines["engine.prefill_forward"][1:] == ["1", "0.003", "0.002"]
    assert lines["eval.generate"][1:] == ["1", "0.010", "0.001"]  # the last 0.5 ms after the copy
    assert "cudaStreamSynchronize" in out and "2.00 ms at +  0.001 s in engine.prefill_forward" in out


def test_serve_profile_runs_lock_step_clients_through_one_engine(capsys):
    """profile_speed.py serve=N: each client sends its next request when its answer ends; the
    engine (stepped by the profiling thread) batches the clients' decode steps together."""

    import torch

    from medmoe.bench.models import phi2_medmoe

    profile_speed = load_script("scripts/profile_speed.py")
    torch.manual_seed(0)
    model = phi2_medmoe(torch.device("cpu"), torch.float32,
                        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=300))
    result = profile_speed.serve_profile(model, torch.device("cpu"), clients=3, requests=2, max_tokens=4,
                                         text_tokens=8, slots=4)
    stats = result["stats"]
    assert stats["requests_finished"] == 6 and stats["requests_failed"] == 0
    assert stats["decode_steps"] < 6 * 3  # 3 steps a request after its prefilled first token, shared between clients
    assert "3 clients x 2 requests" in capsys.readouterr().out and result["tokens_per_s"] > 0


def test_attention_bench_checks_each_option_against_the_reference(tmp_path):
    """attention_bench.py --smoke: the engine's masked decode and prefill attention and FlexAttention
    (eager on the CPU) agree with the float32 reference on rows of different lengths; an option
    this machine cannot run says why instead of a time."""
    import json

    bench = load_script("scripts/lab/attention_bench.py")
    out = tmp_path / "attention.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [c["batch"] for c in report["decode"]] == [1, 3] and [c["rows"] for c in report["prefill"]] == [1, 3]
    for case in report["decode"] + report["prefill"]:
        measured = {name: r for name, r in case.items() if isinstance(r, dict) and "max_abs_diff" in r}
        assert {"flex"} < set(measured) and ("sdpa_bias" in measured or "sdpa_mask" in measured)
        assert all(r["max_abs_diff"] < 1e-4 for r in measured.values())
    assert "skipped" in report["decode"][0]["varlen_paged"] and "skipped" in report["prefill"][0]["varlen_causal"]
    # rows of different lengths: a decode case spans its longest row, rounded up to a page
    assert report["decode"][1]["span"] == 256 and len(set(report["decode"][1]["lengths"])) > 1


def test_overlap_bench_prefills_into_staging_slots_beside_the_decode_rows(tmp_path):
    """overlap_bench.py --smoke: the prefill it times writes its prompts' keys into staging slots only,
    so that on a GPU it can run beside the decode steps without touching their rows; the report is
    written as JSON."""
    import json

    import torch

    bench = load_script("scripts/lab/overlap_bench.py")
    torch.manual_seed(0)
    _, engine = bench.build(torch.device("cpu"), rows=3, prefill_rows=2, prompt=24, smoke=True)
    prefill = bench.prefill_runner(engine, prefill_rows=2, prompt=24)
    kv = engine.cache.kv
    kv.zero_()
    with torch.no_grad():
        prefill()
    slots = engine.cache.slots
    assert kv[:, :, :slots].abs().sum() == 0  # the decode rows untouched
    assert kv[:, :, slots:slots + 2, :, :24].abs().amin(dim=-1).gt(0).all()  # every prompt token written
    assert kv[:, :, slots + 2:].abs().sum() == 0
    out = tmp_path / "overlap.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["decode_shape"] == [3, 880]


def test_overlap_bench_names_the_stream_that_never_finishes(monkeypatch, capsys):
    """wait_or_report: GPU work that does not finish in time is reported by name (which of the two
    streams is stuck) and the process stops, instead of waiting until the call's limit."""

    bench = load_script("scripts/lab/overlap_bench.py")

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    def stop(code):
        raise SystemExit(code)

    monkeypatch.setattr(bench.os, "_exit", stop)
    bench.wait_or_report({"decode steps": Event(True), "prefill": Event(True)}, seconds=0.05)  # returns
    with pytest.raises(SystemExit) as stopped:
        bench.wait_or_report({"decode steps": Event(True), "prefill": Event(False)}, seconds=0.05)
    assert stopped.value.code == 3
    assert "decode steps done, prefill NOT done" in capsys.readouterr().out


def test_label_priors_divides_the_priors_out_of_predictions_and_yes_no_questions(tmp_path):
    """scripts/lab/label_priors.py, behind docs/lab/nano-v2.md's calibration tables, on a tiny model."""
    import json

    import torch

    from medmoe.model.pretrained import build_model

    priors = load_script("scripts/lab/label_priors.py")
    torch.manual_seed(0)
    model, processor = build_model("tiny")
    model.eval()
    rows = [{"answer": a, "choice_logprobs": lp} for a, lp in
            [("normal", [-0.1, -2.3]), ("pneumonia", [-1.0, -0.5]), ("pneumonia", [-3.0, -0.05])]]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with torch.no_grad():
        lines = priors.content_free(model, processor, tmp_path / "predictions.jsonl")
    assert [line.split(":")[0] for line in lines[:4]] == ["prior of black", "prior of grey", "prior of white",
                                                          "prior of question alone"]
    assert lines[4].startswith("none") and "accuracy 100.00" in lines[4]  # the raw likelihoods are all right here
    data = tmp_path / "set"
    data.mkdir()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(data / "a.png")
    records = [{"question": q, "answer": a, "answer_type": t, "image": "a.png"} for q, a, t in
               [("Is it green?", "yes", "CLOSED"), ("Is it red?", "no", "CLOSED "), ("Which colour?", "green", "OPEN")]]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "dataset.json").write_text(json.dumps({"image_root": str(data)}))
    with torch.no_grad():
        lines = priors.yes_no(model, processor, data, "test")
    assert lines[0] == "set test: 2 closed yes/no questions" and len(lines) == 2 + len(priors.ALPHAS)
