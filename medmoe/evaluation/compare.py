"""`medmoe compare A B`: is evaluation B better than evaluation A beyond noise?

A and B are `medmoe eval` output folders (or predictions files) of the same questions. Only the
questions both answered are compared, and every difference B - A carries a paired 95% bootstrap
interval: the questions are resampled once for both runs (intervals.py's seed and count), so
what the two runs share cancels. A row's verdict is "B better" or "A better" when the interval
excludes 0, else "within noise".

VQA rows: closed accuracy (official substring rule, and strict), open recall, and "all": the
mean over every question of its headline score (closed accuracy or open recall). For closed
questions also how many only A or only B gets right, with McNemar's exact test. Classification
rows (records with choices): accuracy and balanced accuracy of each method.

The ground truth is the records file the runs' metrics.json names (run.json's data and split
in a folder without one), or `gt`.

`compare_draws(A_RUNS, B_RUNS)`: two recipes, each trained several times (draws), each draw
evaluated on the same questions (`medmoe compare A1 A2 --vs B1 B2`). A side scores the mean over
its draws; the interval resamples the questions and each side's draws
(intervals.bootstrap_ci_draws), so it is as wide as the spread between trainings of one recipe
makes it. Each draw's own score is listed beside the means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .classification import method_predictions, parse_choice
from .evaluate import EvalItem, classification_groups, read_eval_items, resolve_data_file
from .intervals import LEVEL, RESAMPLES, balanced_accuracy, bootstrap_ci, bootstrap_ci_draws, bootstrap_ci_paired
from .metrics import CLOSED, closed_strict, closed_substring, open_recall
from .report import text_table
from .scoring import map_official_ids, read_json_objects, read_predictions


@dataclass
class Run:
    """One side of a comparison: its answers and what its folder says it evaluated."""
    path: Path  # the predictions file
    predictions: dict[str, str]
    logprobs: dict[str, list[float]]  # classification items: each choice's log-likelihood
    priors: dict[str, list[float]]  # the same without the image (contextual calibration), where recorded
    data: str | None  # the records file (or prepared folder) it scored, when its folder says
    split: str | None
    model: str | None
    shuffled: bool  # a --shuffle-images control run


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix or delete it and pass --gt") from None


def read_run(path) -> Run:
    path = Path(path)
    pred = path / "predictions.jsonl" if path.is_dir() else path
    if not pred.is_file():
        raise DataError(f"{pred}: not found; pass a `medmoe eval` output folder or a predictions file")
    run = {**_json(pred.parent / "run.json"), **_json(pred.parent / "metrics.json").get("run", {})}
    rows = [d for _, d in read_json_objects(pred)]
    logprobs = {str(d["id"]): d["choice_logprobs"] for d in rows if "choice_logprobs" in d}
    priors = {str(d["id"]): d["prior_logprobs"] for d in rows if "prior_logprobs" in d}
    return Run(pred, read_predictions(pred), logprobs, priors, run.get("data"), run.get("split"), run.get("model"),
               bool(run.get("shuffle_images") or run.get("images")))


def ground_truth(runs: list[Run], gt: str | None = None, split: str | None = None) -> tuple[Path, str, list[EvalItem]]:
    """(records file, split, its items): `gt` if given, else the data every run scored."""
    if gt:
        split = split or next((run.split for run in runs if run.split), None) or "test"
        file = resolve_data_file(gt, split)
        return file, split, read_eval_items(file, split)
    sides = []
    for run in runs:
        if run.data is None:
            continue
        try:
            file = resolve_data_file(run.data, run.split)
        except DataError:
            raise DataError(f"{run.data}: the data {run.path} was evaluated on is not there; pass --gt with its "
                            "records file or prepared folder") from None
        sides.append((run.path, file.resolve(), run.split or "test"))
    if not sides:
        paths = [str(run.path) for run in runs]
        names = f"neither {paths[0]} nor {paths[1]}" if len(paths) == 2 else f"none of {', '.join(paths)}"
        raise DataError(f"{names} has a metrics.json or run.json beside it naming the data it scored; pass --gt "
                        "with the records file or prepared folder")
    differing = [side for side in sides if side[1:] != sides[0][1:]]
    if differing:
        (pa, fa, sa), (pb, fb, sb) = sides[0], differing[0]
        raise DataError(f"{pa} scored {fa} (split {sa}) but {pb} scored {fb} (split {sb}): different questions; "
                        "compare evaluations of the same split, or pass --gt to score both against one file")
    _, file, split = sides[0]
    return file, split, read_eval_items(file, split)


def verdict(ci: list[float] | None) -> str:
    if ci is None:
        return "too few questions"
    return "B better" if ci[0] > 0 else "A better" if ci[1] < 0 else "within noise"


def row(metric: str, n: int, a: float, b: float, ci: list[float] | None) -> dict:
    a, b = float(a), float(b)
    return {"metric": metric, "n": n, "a": round(a, 4), "b": round(b, 4), "difference": round(b - a, 4),
            "ci95": ci, "verdict": verdict(ci)}


def mean_row(metric: str, a: np.ndarray, b: np.ndarray) -> dict:
    """Per-question scores in [0, 1] -> means in percent and B - A with its paired interval."""
    return row(metric, len(a), 100 * a.mean(), 100 * b.mean(), bootstrap_ci(b - a, scale=100.0))


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Questions by who gets them right (0/1 scores), and McNemar's exact two-sided p-value: how
    likely a split of the questions only one run gets right this uneven is if neither is better."""
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n) if n else 1.0
    return {"both_right": int(((a == 1) & (b == 1)).sum()), "only_a": only_a, "only_b": only_b,
            "both_wrong": int(((a == 0) & (b == 0)).sum()), "mcnemar_p": float(f"{p:.3g}")}


def is_closed(items: list[EvalItem]) -> np.ndarray:
    return np.array([i.gt.answer_type == CLOSED for i in items], dtype=bool)


def scores(run: Run, items: list[EvalItem], closed_metric=closed_substring) -> np.ndarray:
    """Each question's score in [0, 1]: closed ones by `closed_metric`, open ones by recall."""
    return np.array([(closed_metric if i.gt.answer_type == CLOSED else open_recall)(run.predictions[i.gt.id],
                                                                                    i.gt.answer) for i in items])


def vqa_rows(items: list[EvalItem], a: Run, b: Run) -> tuple[list[dict], dict | None]:
    closed = is_closed(items)
    sa, sb = scores(a, items), scores(b, items)
    strict_a, strict_b = scores(a, items, closed_strict), scores(b, items, closed_strict)
    rows = []
    if closed.any():
        rows += [mean_row("closed accuracy", sa[closed], sb[closed]),
                 mean_row("closed strict", strict_a[closed], strict_b[closed])]
    if (~closed).any():
        rows.append(mean_row("open recall", sa[~closed], sb[~closed]))
    if closed.any() and (~closed).any():
        rows.append(mean_row("all (closed acc., open recall)", sa, sb))
    return rows, agreement(sa[closed], sb[closed]) if closed.any() else None


def _predicted(run: Run, items: list[EvalItem], classes: list[str]) -> dict[str, list[int]]:
    if all(i.gt.id in run.logprobs for i in items):
        priors = [run.priors[i.gt.id] for i in items] if all(i.gt.id in run.priors for i in items) else None
        return method_predictions([run.logprobs[i.gt.id] for i in items],
                                  [run.predictions[i.gt.id] for i in items], classes, priors)
    return {"generate": [parse_choice(run.predictions[i.gt.id], classes) for i in items]}  # no log-likelihoods


def classification_rows(items: list[EvalItem], a: Run, b: Run) -> list[dict]:
    rows = []
    for dataset, (classes, group) in classification_groups(items).items():
        truth = np.array([classes.index(i.gt.answer) for i in group])
        by_a, by_b = _predicted(a, group, classes), _predicted(b, group, classes)
        k = len(classes)
        for method in [m for m in by_a if m in by_b]:
            pa, pb = np.array(by_a[method]), np.array(by_b[method])
            rows.append(mean_row(f"{dataset} {method} accuracy", (pa == truth) * 1.0, (pb == truth) * 1.0))
            gain = lambda t, x, y: balanced_accuracy(t, y, k) - balanced_accuracy(t, x, k)
            rows.append(row(f"{dataset} {method} balanced acc.", len(truth), balanced_accuracy(truth, pa, k),
                            balanced_accuracy(truth, pb, k), bootstrap_ci_paired(gain, truth, pa, pb)))
    return rows


def compare(a_path, b_path, gt: str | None = None, split: str | None = None) -> dict:
    a, b = read_run(a_path), read_run(b_path)
    file, split, items = ground_truth([a, b], gt, split)
    for run in (a, b):  # the official answer files number their questions
        run.predictions = map_official_ids(run.predictions, [i.gt for i in items])[0]
    ids = {i.gt.id for i in items}
    in_a, in_b = ids & a.predictions.keys(), ids & b.predictions.keys()
    shared = [i for i in items if i.gt.id in in_a and i.gt.id in in_b]
    if not shared:
        raise DataError(f"no question of {file} (split {split}) is answered in both {a.path} ({len(in_a)} of them) "
                        f"and {b.path} ({len(in_b)}); compare evaluations of the same split, or pass the --gt "
                        "they were made for")
    rows, closed = vqa_rows([i for i in shared if not i.choices], a, b)
    rows += classification_rows(shared, a, b)
    return {"a": _described(a), "b": _described(b), "ground_truth": str(file), "split": split,
            "counts": {"compared": len(shared), "only_a": len(in_a - in_b), "only_b": len(in_b - in_a),
                       "not_in_ground_truth": len((a.predictions.keys() | b.predictions.keys()) - ids)},
            "rows": rows, "closed": closed, "resamples": RESAMPLES, "level": LEVEL}


def _mean_score(s: np.ndarray) -> float:
    return 100.0 * float(s.mean())


def _class_mean_score(s: np.ndarray, truth: np.ndarray) -> float | None:
    """Balanced accuracy (percent) from per-question correctness: the mean of each class's mean."""
    recalls = [float(s[truth == c].mean()) for c in np.unique(truth)]
    return 100.0 * float(np.mean(recalls)) if recalls else None


def draws_row(metric: str, a: np.ndarray, b: np.ndarray, statistic=_mean_score, *columns) -> dict:
    """a, b [draws, questions] -> each side's statistic over its draws' mean, B - A with the
    interval over questions and draws, and each draw's own statistic."""
    stat = lambda s: statistic(s, *columns)
    out = row(metric, a.shape[1], stat(a.mean(axis=0)), stat(b.mean(axis=0)),
              bootstrap_ci_draws(statistic, a, b, *columns))
    out.update(a_draws=[round(stat(d), 4) for d in a], b_draws=[round(stat(d), 4) for d in b])
    return out


def draws_vqa_rows(items: list[EvalItem], a_runs: list[Run], b_runs: list[Run]) -> list[dict]:
    if not items:
        return []
    closed = is_closed(items)
    sa, sb = np.stack([scores(r, items) for r in a_runs]), np.stack([scores(r, items) for r in b_runs])
    rows = []
    if closed.any():
        rows.append(draws_row("closed accuracy", sa[:, closed], sb[:, closed]))
    if (~closed).any():
        rows.append(draws_row("open recall", sa[:, ~closed], sb[:, ~closed]))
    if closed.any() and (~closed).any():
        rows.append(draws_row("all (closed acc., open recall)", sa, sb))
    return rows


def draws_classification_rows(items: list[EvalItem], a_runs: list[Run], b_runs: list[Run]) -> list[dict]:
    rows = []
    for dataset, (classes, group) in classification_groups(items).items():
        truth = np.array([classes.index(i.gt.answer) for i in group])
        by_a = [_predicted(r, group, classes) for r in a_runs]
        by_b = [_predicted(r, group, classes) for r in b_runs]
        methods = [m for m in by_a[0] if all(m in p for p in by_a + by_b)]
        for method in methods:
            right_a = np.stack([np.array(p[method]) == truth for p in by_a]).astype(np.float64)
            right_b = np.stack([np.array(p[method]) == truth for p in by_b]).astype(np.float64)
            rows.append(draws_row(f"{dataset} {method} accuracy", right_a, right_b))
            rows.append(draws_row(f"{dataset} {method} balanced acc.", right_a, right_b, _class_mean_score, truth))
    return rows


def compare_draws(a_paths: list, b_paths: list, gt: str | None = None, split: str | None = None) -> dict:
    """Recipe A's draws (evaluations of its trainings) against recipe B's, on the questions every
    draw answered."""
    a_runs, b_runs = [read_run(p) for p in a_paths], [read_run(p) for p in b_paths]
    runs = a_runs + b_runs
    file, split, items = ground_truth(runs, gt, split)
    for run in runs:
        run.predictions = map_official_ids(run.predictions, [i.gt for i in items])[0]
    answered = [i for i in items if any(i.gt.id in r.predictions for r in runs)]
    shared = [i for i in answered if all(i.gt.id in r.predictions for r in runs)]
    if not shared:
        raise DataError(f"no question of {file} (split {split}) is answered in every one of "
                        f"{', '.join(str(r.path) for r in runs)}; compare evaluations of the same split")
    rows = draws_vqa_rows([i for i in shared if not i.choices], a_runs, b_runs)
    rows += draws_classification_rows(shared, a_runs, b_runs)
    return {"a": [_described(r) for r in a_runs], "b": [_described(r) for r in b_runs], "ground_truth": str(file),
            "split": split, "counts": {"compared": len(shared), "not_in_every_draw": len(answered) - len(shared)},
            "rows": rows, "resamples": RESAMPLES, "level": LEVEL}


def compare_draws_text(result: dict) -> str:
    c = result["counts"]
    lines = [f"A, {len(result['a'])} draws: " + "; ".join(_side(s) for s in result["a"]),
             f"B, {len(result['b'])} draws: " + "; ".join(_side(s) for s in result["b"]),
             f"ground truth: {result['ground_truth']} (split {result['split']}); {c['compared']} questions "
             f"compared" + (f"; dropped: {c['not_in_every_draw']} not answered in every draw"
                            if c["not_in_every_draw"] else ""), ""]
    draws = lambda values: " / ".join(f"{v:.2f}" for v in values)
    lines.append(text_table([[r["metric"], str(r["n"]), f"{r['a']:.2f}", f"{r['b']:.2f}", f"{r['difference']:+.2f}",
                              _ci_text(r), r["verdict"], draws(r["a_draws"]), draws(r["b_draws"])]
                             for r in result["rows"]],
                            header=("metric", "n", "A", "B", "B - A", "95% interval", "verdict", "A by draw",
                                    "B by draw")))
    lines.append(f"(percent; A and B are the means over their draws; the intervals resample the questions and "
                 f"each side's draws {result['resamples']} times)")
    return "\n".join(lines)


def _described(run: Run) -> dict:
    return {"predictions": str(run.path), "model": run.model, "images_shuffled": run.shuffled}


def _ci_text(r: dict) -> str:
    return f"[{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}]" if r["ci95"] else "-"


def _side(s: dict) -> str:
    notes = ([f"model {s['model']}"] if s["model"] else []) + (["images shuffled"] if s["images_shuffled"] else [])
    return s["predictions"] + (f" ({', '.join(notes)})" if notes else "")


def compare_text(result: dict) -> str:
    c = result["counts"]
    dropped = [f"{c[k]} {what}" for k, what in (("only_a", "answered only in A"), ("only_b", "answered only in B"),
                                                ("not_in_ground_truth", "not in the ground truth")) if c[k]]
    lines = [f"A: {_side(result['a'])}", f"B: {_side(result['b'])}",
             f"ground truth: {result['ground_truth']} (split {result['split']}); {c['compared']} questions "
             f"compared" + (f"; dropped: {', '.join(dropped)}" if dropped else ""), ""]
    lines.append(text_table([[r["metric"], str(r["n"]), f"{r['a']:.2f}", f"{r['b']:.2f}", f"{r['difference']:+.2f}",
                              _ci_text(r), r["verdict"]] for r in result["rows"]],
                            header=("metric", "n", "A", "B", "B - A", "95% interval", "verdict")))
    lines.append(f"(percent; the intervals resample the questions {result['resamples']} times, once for both runs)")
    if result["closed"]:
        k = result["closed"]
        lines.append(f"closed questions: both right {k['both_right']}, only A right {k['only_a']}, only B right "
                     f"{k['only_b']}, both wrong {k['both_wrong']} (McNemar exact p = {k['mcnemar_p']:.3g})")
    return "\n".join(lines)
