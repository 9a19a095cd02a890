"""`medmoe eval`: generate answers for a prepared split, score them, analyse routing, report.

Everything lands in one output folder:
    predictions.jsonl   one line per question, keyed by id, appended (and fsynced) batch by batch;
                        a rerun with the same --out skips ids already there (resume)
    run.json            what was evaluated, with a fingerprint of the weights (a rerun with other
                        settings or other weights under the same name refuses to mix results)
    metrics.json        VQA metrics (total and breakdowns), classification, routing
    report.md / report.html, routing.png, confusion_*.png

VQA items are scored with `metrics.py`. Items with `choices` (classification) are scored twice:
label log-likelihood and free generation. Routing is read from the prompt's forward pass of the
same generation call.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.profiler import record_function

from ..errors import ConfigError, DataError
from ..files import weights_fingerprint
from .io import append_jsonl, write_json, write_text
from .scoring import GroundTruth, default_dataset_name, parse_ground_truth, read_json_objects, score_predictions

DEFAULT_MAX_NEW_TOKENS = 64  # VQA answers are a few words; the official 2048 lets closed answers ramble into a match


@dataclass
class EvalSettings:
    model: str
    data: str
    out: str
    split: str | None = "test"
    batch_size: int | None = None  # engine slots; None: `default_batch_size` (128 on a GPU where memory allows, 8 on a CPU)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    routing: bool = True
    share_prefix: bool = True  # prefill the prompts' common start once per batch (generation/generate.py)
    shuffle_images: bool = False  # control run: each question sees another question's image (shuffle_images)
    admit_batch: int | None = None  # engine: free slots new questions wait for while others decode; None: its default
    prefill_graphs: bool | None = None  # engine: prefill as CUDA graphs into the KV cache; None: its default (a GPU)

    def command(self) -> str:
        import shlex

        parts = ["medmoe", "eval", "--model", self.model, "--data", self.data, "--out", self.out]
        if self.split:
            parts += ["--split", self.split]
        if self.batch_size is not None:
            parts += ["--batch-size", str(self.batch_size)]
        parts += ["--max-new-tokens", str(self.max_new_tokens)]
        if self.limit:
            parts += ["--limit", str(self.limit)]
        if not self.routing:
            parts.append("--no-routing")
        if not self.share_prefix:
            parts.append("--no-share-prefix")
        if self.shuffle_images:
            parts.append("--shuffle-images")
        if self.admit_batch is not None:
            parts += ["--admit-batch", str(self.admit_batch)]
        if self.prefill_graphs is False:
            parts.append("--no-prefill-graphs")
        return " ".join(shlex.quote(p) for p in parts)


# ----- data --------------------------------------------------------------------------------
@dataclass
class EvalItem:
    gt: GroundTruth
    image: str | None
    choices: list[str] | None


def resolve_data_file(data: str, split: str | None) -> Path:
    """A records file, a prepared folder holding `{split}.jsonl`, or `sample` (the bundled demo set)."""
    path = Path(data)
    if data == "sample" and not path.exists():
        try:
            from ..data.records import sample_dataset_dir
        except ImportError:
            raise DataError("the bundled sample dataset is not available in this install") from None
        path = sample_dataset_dir()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (f"{split or 'test'}.jsonl", f"{split or 'test'}.json"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: no {split or 'test'}.jsonl in this folder; prepare the dataset first "
                        "(`medmoe data prepare`) or pass the records file")
    raise DataError(f"{data}: no such file or prepared dataset folder (or use 'sample', the bundled demo set)")


def image_root(folder: Path) -> Path:
    """`dataset.json`'s image_root (absolute or relative to the folder), else the folder."""
    info = folder / "dataset.json"
    if info.is_file():
        root = json.loads(info.read_text()).get("image_root")
        if root:
            return (folder / root) if not os.path.isabs(root) else Path(root)
    return folder


def read_eval_items(path: Path, split: str | None, limit: int | None = None) -> list[EvalItem]:
    objects = read_json_objects(path)
    splits = {d.get("split") for _, d in objects if d.get("split")}
    if split and splits:
        if split not in splits:
            raise DataError(f"{path}: no records of split {split!r}; splits here: {sorted(splits)}")
        objects = [(w, d) for w, d in objects if d.get("split") == split]
    root = image_root(path.parent)
    items, seen = [], set()
    for where, d in objects[:limit] if limit else objects:
        gt = parse_ground_truth(d, where, default_dataset=default_dataset_name(path))
        if gt.id in seen:
            raise DataError(f"{where}: question id {gt.id!r} occurs twice; ids must be unique")
        seen.add(gt.id)
        image = d.get("image")
        if image and not os.path.isabs(image):
            image = str(root / image)
        items.append(EvalItem(gt, image, d.get("choices")))
    if not items:
        raise DataError(f"{path}: no records to evaluate")
    return items


def shuffle_images(items: list[EvalItem], seed: int = 0) -> list[EvalItem]:
    """A control for how much the answers depend on the image: the split's distinct images
    permuted so that no image stays with its own questions (a fixed seed, so a rerun resumes the
    same control). The images keep their modality mix and the questions are unchanged: what a
    model still gets right here it answers from the question alone."""
    import random

    images = sorted({i.image for i in items if i.image})
    if len(images) < 2:
        raise DataError("--shuffle-images needs questions about at least two different images")
    shifted = images[:]
    random.Random(seed).shuffle(shifted)
    # Sattolo-style: each image goes to the next one of a random cycle, never to itself.
    swap = {shifted[k]: shifted[(k + 1) % len(shifted)] for k in range(len(shifted))}
    return [EvalItem(i.gt, swap[i.image], i.choices) if i.image else i for i in items]


# ----- resume ------------------------------------------------------------------------------
def read_done(path: Path) -> dict[str, dict]:
    """Rows already written. A torn last line (the process died mid-write) is dropped."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows, good = {}, []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                write_text(path, "".join(good))
                break
            raise DataError(f"{path}:{n}: not valid JSON; fix or delete the line to resume") from None
        rows[str(row["id"])] = row
        good.append(line if line.endswith("\n") else line + "\n")
    return rows


def check_same_run(out: Path, settings: EvalSettings) -> None:
    """Refuse to mix predictions of different models, data or decoding in one folder; "weights"
    tells two versions of one model name apart (e.g. the bundled model after an upgrade)."""
    run_file = out / "run.json"
    key = {k: v for k, v in asdict(settings).items() if k in ("model", "data", "split", "max_new_tokens",
                                                               "shuffle_images")}
    key["weights"] = _weights_of(settings.model)
    if run_file.exists():
        before = {"shuffle_images": False, **json.loads(run_file.read_text())}  # older run.json lack the key
        diff = {k: (before[k], key[k]) for k in key if k in before and before[k] != key[k]}
        if diff and (out / "predictions.jsonl").exists():
            raise DataError(f"{out} holds predictions of another run ({diff}); use a fresh --out to keep both")
    write_json(run_file, key)


def _weights_of(model: str) -> str | None:
    from ..loading import resolve_model_path

    try:
        return weights_fingerprint(resolve_model_path(model))
    except ConfigError:
        return None  # a preset name or a hub id: nothing local to fingerprint


# ----- the loop ----------------------------------------------------------------------------
def prompt_ids(processor, item: EvalItem) -> list[int]:
    """The token ids of an item's prompt (`<image>` expanded), as `encode_question` makes them."""
    from ..config import IMAGE_TOKEN
    from ..data.templates import Turn

    text = processor.prompt(item.gt.question, item.image is not None)
    if text.count(IMAGE_TOKEN) != (item.image is not None):
        raise DataError(f"question {item.gt.id}: {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders for "
                        f"{int(item.image is not None)} image; a question holds at most one, and only with an image")
    return list(processor.encode([Turn(text, None)]).input_ids)


def read_images(processor, items: list[EvalItem]) -> dict:
    """Each distinct image of `items`, read and preprocessed once, several at a time (decoding,
    resizing and hashing release the GIL): path -> (pixel tensor, its digest for the engine's prefix
    cache, so that the engine's thread does not hash the pixels)."""
    from ..engine.prefix_cache import image_digest

    def read(path):
        pixels = processor.image_tensor(path)
        return pixels, image_digest(pixels)

    paths = list(dict.fromkeys(i.image for i in items if i.image))
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(IMAGE_WORKERS, len(paths))) as pool:
        return dict(zip(paths, pool.map(read, paths)))


def encode_items(processor, items: list[EvalItem], pixels: dict | None = None) -> list:
    """The engine prompts of `items`, as `encode_question` would make them for each question;
    `pixels` (read_images) when the images were read ahead."""
    from ..engine import Prompt

    pixels = read_images(processor, items) if pixels is None else pixels
    return [Prompt(prompt_ids(processor, i), pixels[i.image][0][None], (pixels[i.image][1],)) if i.image
            else Prompt(prompt_ids(processor, i)) for i in items]


def eval_engine(model, processor, items: list[EvalItem], settings: EvalSettings):
    """The engine of an evaluation: `batch_size` slots, each as long as the longest prompt and its
    answer need (so that a GPU's warm-up allocates and captures no more than the questions use)."""
    from ..engine import shared_engine

    max_len = slot_length(processor, items, settings)
    options = {} if settings.admit_batch is None else {"admit_batch": settings.admit_batch}
    if settings.prefill_graphs is not None:
        options["prefill_graphs"] = settings.prefill_graphs
    return shared_engine(model, processor, max_slots=settings.batch_size, max_len=max_len, **options)


def slot_length(processor, items: list[EvalItem], settings: EvalSettings) -> int:
    """Tokens an engine slot needs: the longest prompt and its answer."""
    from ..engine.slot_cache import BUCKET

    longest = max((len(prompt_ids(processor, i)) for i in items), default=0)
    return max(longest + settings.max_new_tokens, BUCKET)


def default_batch_size(model, processor, items: list[EvalItem], settings: EvalSettings) -> int:
    """Engine slots when `--batch-size` is not given: CPU_SLOTS on the CPU; on a GPU, GPU_SLOTS
    (the setting of docs/speed.md's evaluations) unless their KV cache would take more than EVAL_KV_FRACTION of
    the GPU's free memory (a large model on a small card)."""
    if model.device.type != "cuda":
        return CPU_SLOTS
    from ..engine.scheduler import free_device_memory
    from ..engine.slot_cache import kv_bytes_per_token

    dtype = model.language_model.get_input_embeddings().weight.dtype
    per_slot = slot_length(processor, items, settings) * kv_bytes_per_token(model.language_model.config, dtype)
    return gpu_slots(per_slot, free_device_memory(model.device))


def gpu_slots(per_slot_bytes: int, free_bytes: int) -> int:
    """GPU_SLOTS, halved while that many slots would take more than EVAL_KV_FRACTION of `free_bytes`
    (at least MIN_GPU_SLOTS)."""
    slots = GPU_SLOTS
    while slots > MIN_GPU_SLOTS and slots * per_slot_bytes > free_bytes * EVAL_KV_FRACTION:
        slots //= 2
    return slots


def choice_scores(model, processor, items: list[EvalItem], share_prefix: bool = True
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Log-likelihood of each choice, by item id, for the items that have choices: one forward pass
    per set of choices in the batch; beside it, for an item with an image, the same question's
    choices without the image (what contextual calibration divides out; once per question)."""
    from ..model.attention_kernels import varying_shape_attention
    from .classification import choice_logprobs_batch

    groups: dict[tuple, list[EvalItem]] = {}
    for item in items:
        if item.choices:
            groups.setdefault(tuple(item.choices), []).append(item)
    scores = {}
    rows = GPU_CHOICE_ROWS if model.device.type == "cuda" else CPU_CHOICE_ROWS
    with varying_shape_attention(model.device):  # new shapes every pass: no per-shape cuDNN plans
        for choices, group in groups.items():
            values = choice_logprobs_batch(model, processor, [i.gt.question for i in group], [i.image for i in group],
                                           list(choices), max_rows=rows, share_prefix=share_prefix)
            asked = list(dict.fromkeys(i.gt.question for i in group if i.image is not None))
            alone = choice_logprobs_batch(model, processor, asked, [None] * len(asked), list(choices), max_rows=rows,
                                          share_prefix=share_prefix) if asked else []
            prior = dict(zip(asked, alone))
            scores.update((item.gt.id, (row, prior[item.gt.question] if item.image is not None else None))
                          for item, row in zip(group, values))
    return scores


CHUNK_BATCHES = 4
GPU_CHOICE_ROWS, CPU_CHOICE_ROWS = 256, 32  # (question, choice) rows a choice-scoring forward holds
GPU_SLOTS, MIN_GPU_SLOTS, CPU_SLOTS = 128, 16, 8  # default engine slots (docs/speed.md measures 128 on a GPU)
EVAL_KV_FRACTION = 0.25  # of the GPU's free memory, the most the default slots' KV cache takes
IMAGE_WORKERS = 8  # threads reading and preprocessing a chunk's images


def run_batch(model, processor, items: list[EvalItem], settings: EvalSettings, engine=None,
              pixels: dict | None = None) -> list[dict]:
    """The rows of `items`, answered by the engine (one batch, start to end)."""
    engine = engine or eval_engine(model, processor, items, settings)
    return collect_batch(model, processor, items, submit_batch(model, processor, items, settings, engine, pixels),
                         settings)


def submit_batch(model, processor, items: list[EvalItem], settings: EvalSettings, engine, pixels: dict | None = None):
    """`items` into the engine's queue (they run when the engine steps); their handles."""
    from ..engine import Request
    from ..generation import SamplingConfig

    want_routing = settings.routing and model.is_moe
    cfg = SamplingConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, share_prefix=settings.share_prefix)
    return [engine.submit(Request(prompt, cfg, output_routing=want_routing))
            for prompt in encode_items(processor, items, pixels)]


def collect_batch(model, processor, items: list[EvalItem], handles, settings: EvalSettings) -> list[dict]:
    """The rows of `items` once their requests have finished (stepping the engine until then)."""
    from .routing import prompt_counts

    with record_function("eval.generate"):
        results = [handle.result() for handle in handles]
    image_id = model.config.image_token_id
    counts = [prompt_counts(r.prompt_routing, r.prompt_ids, image_id) if r.prompt_routing else None for r in results]
    with record_function("eval.choice_scores"):
        scores = choice_scores(model, processor, items, settings.share_prefix)
    rows = []
    for item, result, routing in zip(items, results, counts):
        row = {"id": item.gt.id, "prediction": result.text, "answer": item.gt.answer,
               "answer_type": item.gt.answer_type, "dataset": item.gt.dataset, "modality": item.gt.modality,
               "finish": result.finish_reason,
               "confidence": None if result.confidence is None else round(result.confidence, 5)}
        if item.choices:
            logprobs, prior = scores[item.gt.id]
            row["choice_logprobs"] = [round(float(s), 5) for s in logprobs]
            if prior is not None:  # the question without its image: contextual calibration's prior
                row["prior_logprobs"] = [round(float(s), 5) for s in prior]
        if routing is not None:
            row["routing"] = routing
        rows.append(row)
    return rows


def _read_while_stepping(future, engine):
    """The images `future` reads, the engine stepping (answering what it holds) meanwhile."""
    with record_function("eval.wait_for_images"):
        while engine is not None and not engine.running and not future.done() and engine.step():
            pass
        return future.result()


def generate_all(model, processor, items: list[EvalItem], settings: EvalSettings, pred_path: Path,
                 long_lived: bool = False) -> tuple[dict[str, dict], dict, dict | None]:
    """All rows by id (old and new), the speed of this call's generation and what the engine did
    (engine/stats.py; its warm-up included). `long_lived`: the process keeps the model to its end
    (the CLI), so what lives after warm-up is put out of the garbage collector's sight."""
    from tqdm import tqdm

    done = read_done(pred_path)
    todo = [i for i in items if i.gt.id not in done]
    if done:
        print(f"medmoe eval: resuming, {len(items) - len(todo)} of {len(items)} items already in {pred_path}", flush=True)
    engine = eval_engine(model, processor, todo, settings) if todo else None
    start_time = time.perf_counter()
    if engine is not None:
        before = engine.stats.snapshot()
        if model.device.type == "cuda" and not engine.warm:
            engine.warmup()  # the cache allocated and every graph captured before the first question
        if long_lived:
            from ..engine.scheduler import keep_out_of_gc

            keep_out_of_gc()
    warmup_seconds = time.perf_counter() - start_time
    start_time += warmup_seconds
    # Chunks of several batches (the first one batch, so that answering starts early); each chunk's
    # rows are appended at once (what a resumed run keeps). A chunk is queued as soon as its images
    # are read, before the previous chunk's answers are collected, so that the engine's slots stay
    # full across chunks; the engine steps while the next chunk's images are read in a thread.
    size = settings.batch_size * CHUNK_BATCHES
    first = todo[:settings.batch_size]
    chunks = ([first] if first else []) + [todo[at:at + size] for at in range(len(first), len(todo), size)]
    pending = None  # (items, handles) of the chunk queued last
    with tqdm(total=len(todo), desc="eval", unit="q") as bar, ThreadPoolExecutor(max_workers=1) as reader:
        def write(chunk, handles) -> None:
            rows = collect_batch(model, processor, chunk, handles, settings)
            append_jsonl(pred_path, rows)
            done.update((r["id"], r) for r in rows)
            bar.update(len(rows))

        ahead = reader.submit(read_images, processor, chunks[0]) if chunks else None
        for k, batch in enumerate(chunks + [None]):
            queued = None
            if batch is not None:
                try:
                    pixels = _read_while_stepping(ahead, engine)
                except Exception:  # a broken image: the chunk queued before it is still answered and kept
                    if pending is not None:
                        write(*pending)
                    raise
                if k + 1 < len(chunks):
                    ahead = reader.submit(read_images, processor, chunks[k + 1])
                queued = (batch, submit_batch(model, processor, batch, settings, engine, pixels))
            if pending is not None:
                write(*pending)
            pending = queued
    seconds = time.perf_counter() - start_time
    speed = {"generated": len(todo), "seconds": round(seconds, 2), "warmup_seconds": round(warmup_seconds, 2),
             "questions_per_second": round(len(todo) / seconds, 3) if todo and seconds > 0 else None}
    return done, speed, None if engine is None else engine.stats.since(before).as_dict()


# ----- scoring the rows --------------------------------------------------------------------
def classification_groups(items: list[EvalItem]) -> dict[str, tuple[list[str], list[EvalItem]]]:
    """dataset -> (its classes, its items with choices); every item of a dataset has the same choices
    and an answer among them."""
    groups: dict[str, list[EvalItem]] = {}
    for item in items:
        if item.choices:
            groups.setdefault(item.gt.dataset, []).append(item)
    out = {}
    for dataset, group in groups.items():
        classes = list(group[0].choices)
        for i in group:
            if list(i.choices) != classes or i.gt.answer not in classes:
                raise DataError(f"{i.gt.id}: classification records of {dataset!r} need the same choices {classes} "
                                f"and an answer among them; got choices {i.choices}, answer {i.gt.answer!r}")
        out[dataset] = (classes, group)
    return out


def classification_results(items: list[EvalItem], rows: dict[str, dict], out: Path) -> tuple[dict, dict]:
    from .classification import classification_metrics, method_predictions, plot_confusion
    from .intervals import calibration, plot_calibration
    from .report import METHODS

    results, figures = {}, {}
    for dataset, (classes, keep) in classification_groups(items).items():
        truth = [classes.index(i.gt.answer) for i in keep]
        priors = [rows[i.gt.id].get("prior_logprobs") for i in keep]
        predicted = method_predictions([rows[i.gt.id]["choice_logprobs"] for i in keep],
                                       [rows[i.gt.id]["prediction"] for i in keep], classes,
                                       priors if all(p is not None for p in priors) else None)
        loglik = predicted["loglik"]
        results[dataset] = {method: classification_metrics(truth, pred, classes) for method, pred in predicted.items()}
        # Confidence of a label-likelihood answer: its probability among the labels.
        probs = [torch.tensor(rows[i.gt.id]["choice_logprobs"]).softmax(-1) for i in keep]
        confidence = [float(p[c]) for p, c in zip(probs, loglik)]
        calib = calibration(confidence, [float(t == p) for t, p in zip(truth, loglik)])
        results[dataset]["loglik"]["calibration"] = calib
        for method, m in results[dataset].items():
            name = f"confusion_{dataset}_{method}.png".replace("/", "_")
            plot_confusion(m, out / name, title=f"{dataset}, {METHODS[method]}")
            figures[f"confusion_{dataset}_{method}"] = name
        name = f"calibration_{dataset}_loglik.png".replace("/", "_")
        if calib and plot_calibration(calib, out / name, title=f"{dataset}, {METHODS['loglik']}"):
            figures[f"calibration_{dataset}_loglik"] = name
    return results, figures


def vqa_calibration(scored: list[dict], rows: dict[str, dict], out: Path) -> tuple[dict | None, dict]:
    """Calibration of the generated answers' confidences: closed questions against the official
    (substring) accuracy, open ones against token recall; with the reliability diagrams."""
    from .intervals import calibration, plot_calibration

    result, figures = {}, {}
    for kind, metric in (("CLOSED", "accuracy"), ("OPEN", "recall")):
        pairs = [(rows[r["id"]].get("confidence"), r["scores"][metric]) for r in scored
                 if r["answer_type"] == kind and not r.get("missing") and rows.get(r["id"], {}).get("confidence") is not None]
        calib = calibration([c for c, _ in pairs], [score for _, score in pairs]) if pairs else None
        if calib is None:
            continue
        calib["scored_by"] = metric
        result[kind.lower()] = calib
        name = f"calibration_{kind.lower()}.png"
        if plot_calibration(calib, out / name, title=f"{kind.lower()} questions ({metric})"):
            figures[f"calibration_{kind.lower()}"] = name
    return result or None, figures


def routing_results(items: list[EvalItem], rows: dict[str, dict], layers: list[int], out: Path):
    from .routing import RoutingStats, plot_routing

    stats = RoutingStats()
    stats.layers = layers
    for item in items:
        routing = rows[item.gt.id].get("routing")
        if routing is not None:
            stats.add_sample(item.gt.modality, routing)
    if not stats.samples:
        return None, {}
    summary = stats.summary()
    return summary, ({"routing": "routing.png"} if plot_routing(summary, out / "routing.png") else {})


def evaluate(settings: EvalSettings, model=None, processor=None, long_lived: bool = False) -> dict:
    """Run (or resume) an evaluation; returns the metrics written to OUT/metrics.json. `long_lived`:
    the process ends with the evaluation (the CLI): see `generate_all`."""
    from ..version import __version__
    from .report import write_reports

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    data_file = resolve_data_file(settings.data, settings.split)
    items = read_eval_items(data_file, settings.split, settings.limit)
    if settings.shuffle_images:
        items = shuffle_images(items)
    check_same_run(out, settings)
    if model is None:
        from ..loading import load_for_inference

        model, processor = load_for_inference(settings.model, settings.device, settings.dtype)
    if settings.batch_size is None:
        settings = replace(settings, batch_size=default_batch_size(model, processor, items, settings))
    rows, speed, engine_stats = generate_all(model, processor, items, settings, out / "predictions.jsonl",
                                             long_lived)

    vqa_items = [i for i in items if not i.choices]
    predictions = {i.gt.id: rows[i.gt.id]["prediction"] for i in vqa_items}
    vqa, scored = score_predictions(predictions, [i.gt for i in vqa_items]) if vqa_items else (None, [])
    classification, figures = classification_results(items, rows, out)
    answer_calibration, calibration_figures = vqa_calibration(scored, rows, out)
    figures.update(calibration_figures)
    layers = model.config.moe_layer_indices() if model.is_moe else []
    routing, routing_fig = routing_results(items, rows, layers, out) if settings.routing else (None, {})
    metrics = {
        "run": {"model": settings.model, "data": str(data_file), "split": settings.split, "items": len(items),
                **({"images": "shuffled among the questions (control)"} if settings.shuffle_images else {}),
                "max_new_tokens": settings.max_new_tokens, "decoding": "greedy", "batch_size": settings.batch_size,
                "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                "this_call": speed, "engine": engine_stats, "medmoe": __version__, "command": settings.command()},
        "vqa": vqa, "calibration": answer_calibration, "classification": classification or None, "routing": routing,
        "figures": {**figures, **routing_fig},
    }
    write_json(out / "metrics.json", metrics)
    write_reports(metrics, out, scored)
    return metrics
