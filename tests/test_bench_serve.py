"""`medmoe bench --what serve,soak`: the load generator and the soak against a tiny model served on
loopback in this process. Bounded in count and time; speed itself is never asserted."""

from __future__ import annotations

import asyncio
import time
import json

import httpx
import pytest
import torch

from medmoe.bench import plot, serve_load, servers, soak
from medmoe.bench.serve_load import Record


@pytest.fixture(scope="module")
def served():
    from medmoe.model.pretrained import build_model
    from medmoe.serving.server import Limits

    torch.manual_seed(0)
    model, processor = build_model("tiny")
    model.upcycle()
    with servers.serve_thread(model, processor, Limits(max_tokens=32, timeout_s=60)) as s:
        yield s


def test_summary_counts_tokens_latencies_and_errors_by_hand():
    records = [Record(start=0.0, end=1.0, chunk_times=[0.2, 0.4, 0.5, 0.8], completion_tokens=5),
               Record(start=0.5, end=1.5, chunk_times=[1.0, 1.5], completion_tokens=3),
               Record(start=0.1, end=0.2, status=503, error="http 503"),
               Record(start=0.1, end=0.9, chunk_times=[0.3], error="stream error 504")]
    s = serve_load.summarize(records, wall_s=2.0)
    assert (s["requests"], s["requests_ok"], s["errors"]) == (4, 2, 2)
    assert s["error_kinds"] == {"http 503": 1, "stream error 504": 1}
    assert s["completion_tokens"] == 8 and s["tokens_per_s"] == 4.0  # failed requests' tokens do not count
    assert s["samples_ms"]["ttft"] == [200.0, 500.0]
    assert s["samples_ms"]["itl"] == pytest.approx([200.0, 100.0, 300.0, 500.0])
    assert s["tpot_ms"]["n"] == 2 and s["tpot_ms"]["p50"] == pytest.approx((150.0 + 250.0) / 2)
    assert s["ttft_ms"]["p50"] == pytest.approx(350.0)
    assert serve_load.percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert serve_load.percentile([], 50) is None
    assert s["chunks_per_token"] == pytest.approx(6 / 8) and serve_load.burst_note({**s, "clients": 2}) is None


def test_a_run_whose_tokens_arrive_in_one_burst_says_so():
    burst = serve_load.summarize([Record(start=0.0, end=1.0, chunk_times=[1.0], completion_tokens=128)], wall_s=1.0)
    assert burst["chunks_per_token"] == pytest.approx(1 / 128)
    assert serve_load.burst_note({**burst, "clients": 1}).startswith("note: 1 clients: 0.01 text chunks per token")


def test_load_generator_counts_the_servers_tokens_without_errors(served):
    words = asyncio.run(_calibrate(served.base, 12))
    report = asyncio.run(serve_load.drive(served.base, 1, 2, 6, words))
    plain = [httpx.post(f"{served.base}/v1/chat/completions", json=serve_load.chat_body(words, r, 6, stream=False),
                        timeout=60).json()["usage"] for r in range(2)]  # the same requests, answered whole
    assert report["errors"] == 0 and report["requests_ok"] == 2
    assert report["completion_tokens"] == sum(u["completion_tokens"] for u in plain)
    assert report["prompt_tokens"] == sum(u["prompt_tokens"] for u in plain) / 2  # the median of two
    assert len(report["samples_ms"]["latency"]) == 2 and report["latency_ms"]["p99"] > 0

    concurrent = asyncio.run(serve_load.drive(served.base, 3, 2, 4, words, image="random"))
    assert concurrent["requests"] == 6 and concurrent["errors"] == 0 and concurrent["error_kinds"] == {}
    assert 0 < concurrent["completion_tokens_per_request"]["max"] <= 4
    for key in ("tokens_per_s", "requests_per_s", "wall_s"):
        assert concurrent[key] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "latency_ms"):
        assert set(concurrent[key]) == {"p50", "p99", "mean", "n"}
    assert concurrent["ttft_ms"]["n"] == len(concurrent["samples_ms"]["ttft"]) <= 6
    assert concurrent["client_loop_lag_ms"]["n"] > 0


def test_loop_lag_sees_a_blocked_event_loop():
    async def main() -> list[float]:
        lag: list[float] = []
        probe = asyncio.create_task(serve_load.loop_lag(lag, period=0.001))
        await asyncio.sleep(0.01)
        time.sleep(0.08)  # a client's work that holds the loop
        await asyncio.sleep(0.01)
        probe.cancel()
        return lag

    lag = asyncio.run(main())
    assert max(lag) >= 0.07 and min(lag) >= 0


async def _calibrate(base: str, tokens: int) -> int:
    async with httpx.AsyncClient(timeout=60) as client:
        return await serve_load.calibrate_words(client, base, tokens, None)


def test_calibrated_prompt_has_about_the_asked_text_tokens(served):
    words = asyncio.run(_calibrate(served.base, 40))
    usage = [httpx.post(f"{served.base}/v1/chat/completions", json=serve_load.chat_body(n, 0, 1, stream=False),
                        timeout=60).json()["usage"]["prompt_tokens"] for n in (1, words + 1)]
    assert abs((usage[1] - usage[0]) - 40) <= 8  # shuffled words tokenize to slightly different lengths


def test_server_errors_are_counted_by_kind(served):
    async def one(body):
        async with httpx.AsyncClient(timeout=60) as client:
            return await serve_load.stream_request(client, served.base, body, 0.0)

    rec = asyncio.run(one({**serve_load.chat_body(2, 0, 4), "max_tokens": 10_000}))
    assert not rec.ok and rec.error == "http 400" and rec.completion_tokens == 0
    summary = serve_load.summarize([rec], 1.0)
    assert summary["error_kinds"] == {"http 400": 1} and summary["tokens_per_s"] == 0.0


def test_soak_counts_bad_inputs_and_disconnects_apart_from_good_failures(served, tmp_path):
    report = soak.run(served.base, served.pid, clients=5, seconds=3, disconnect_fraction=0.2, bad_fraction=0.2,
                      max_tokens=8, idle_s=0.5, settle_s=1.0, log=lambda *a: None)
    assert report["clients"] == {"good": 3, "disconnect": 1, "bad": 1}
    good, gone, bad = report["good"], report["disconnect"], report["bad"]
    assert good["requests"] > 0 and good["failed"] == 0 and good["failure_kinds"] == {}
    assert gone["requests"] > 0 and gone["left_mid_stream"] + gone["finished_first"] == gone["requests"]
    assert gone["other"] == {}
    outcomes = bad["outcomes"]
    assert bad["requests"] == sum(sum(v.values()) for v in outcomes.values()) > 0
    assert set(outcomes.get("invalid_json", {"400": 1})) == {"400"}
    assert bad["unexpected"] == sum(n for v in outcomes.values() for o, n in v.items()
                                    if not o.startswith("4") or "not the OpenAI" in o)
    assert report["statuses"].get("200", 0) >= good["requests"]  # every good answer was a 200
    rss = report["rss_mb"]
    assert report["rss_samples"] and rss["start"] > 0 and rss["peak"] >= rss["end"]
    assert isinstance(report["rss_mb"]["within_10_percent"], bool)
    report.update(model="tiny", device="cpu")
    picture = tmp_path / "soak.png"
    assert plot.plot_soak(report, str(picture)) and picture.stat().st_size > 1000
    json.dumps(report)  # the report is plain JSON


def test_soak_refuses_fractions_that_leave_no_good_client():
    from medmoe.errors import ConfigError

    assert soak.roles(10, 0.1, 0.2) == ["good"] * 7 + ["disconnect"] + ["bad"] * 2
    with pytest.raises(ConfigError, match="no good client"):
        soak.roles(4, 0.5, 0.5)


def test_bench_cli_serve_writes_json_and_plot(tmp_path):
    from medmoe.cli import main

    out = tmp_path / "serve"
    assert main(["bench", "--what", "serve", "--model", "tiny", "--server", "thread", "--device", "cpu",
                 "--clients", "1,2", "--requests-per-client", "1", "--max-tokens", "3", "--prompt-tokens", "8",
                 "--out", str(out)]) == 0
    report = json.loads((out / "serve.json").read_text())
    assert [r["clients"] for r in report["runs"]] == [1, 2] and report["model"] == "tiny"
    assert all(r["errors"] == 0 and r["requests"] == r["clients"] for r in report["runs"])
    assert (out / "serve.png").stat().st_size > 1000
    assert main(["bench", "--what", "serve", "--clients", "x", "--out", str(out)]) == 2


def test_random_phi2_folder_serves_image_prompts(tmp_path):
    """The Phi-2-size bench model (here narrowed) saves as a folder whose processor places its image tokens."""
    from medmoe.serving.api import MedMoE
    from PIL import Image

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512)
    folder = servers.save_random_model("phi2", str(tmp_path / "phi2"), torch.device("cpu"), text=text)
    m = MedMoE.load(folder, device="cpu", max_new_tokens=2)
    answer = m.ask(Image.new("RGB", (64, 64), (90, 90, 90)), "What is shown?")
    assert answer.prompt_tokens > 576 and answer.routing.image_tokens == 576
    assert servers.is_random_preset("phi2") and not servers.is_random_preset("nano")
    tokenizer = m.processor.tokenizer
    assert len(tokenizer) <= 512 and tokenizer.convert_tokens_to_ids("<image>") < 512
    assert all(tokenizer.decode([i]) for i in range(258, len(tokenizer) - 1))  # every word id streams text


def test_a_server_that_does_not_start_is_a_one_line_error(tmp_path, capsys):
    from medmoe.cli import main

    missing = str(tmp_path / "missing")
    assert main(["bench", "--what", "serve", "--model", missing, "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exited with code 2" in err and "not a model folder" in err
    assert (tmp_path / "serve-server.log").exists()  # the server's own output, for the details


def test_each_run_reports_what_the_servers_engine_did(served):
    lines = []
    report = serve_load.run(served.base, [1, 2], requests_per_client=2, max_tokens=4, prompt_tokens=12,
                            log=lines.append)
    assert report["engine_at_start"]["stats"]["warmup_s"] > 0
    for run in report["runs"]:
        engine = run["engine"]
        assert engine["requests_finished"] == run["requests_ok"] == 2 * run["clients"]
        assert engine["tokens_generated"] == run["completion_tokens"]
        assert engine["first_tokens"] == 2 * run["clients"] and engine["decode_steps"] > 0
    assert report["engine_after"]["stats"]["requests_finished"] >= 6
    assert sum(line.startswith(("1 clients, engine:", "2 clients, engine:")) for line in lines) == 2
