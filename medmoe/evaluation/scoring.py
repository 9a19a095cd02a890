"""Score a predictions file against ground truth, matched by question id (never by order).

Predictions: JSONL (or a JSON list) of `{"id", "prediction"}` (ours) or `{"question_id", "text"}`
(the official LLaVA-Med / Med-MoE answer files).
Ground truth: our canonical records JSONL (`id, question, answer, answer_type, modality, dataset,
...`, optional `question_type`), or the official LLaVA json list (`id, conversations,
answer_type`).

The official answer files number their questions (`question_id` 10) where prepared splits name
them (`vqa-rad-10`, the dataset's own question id after the dataset name): a numeric id that names
no ground-truth item is matched to the one ground-truth id `<its dataset>-<that number>`. When no prediction matches any ground-truth id, the
files are for different questions: an error, not a score of 0.

Totals and breakdowns per dataset, answer type, modality and question type, with the metrics of
`metrics.py`. A ground-truth item without a prediction counts as an empty (wrong) answer unless
`only_predicted` is set; missing and extra ids are always reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .metrics import aggregate, normalize_answer_type, score_item

UNKNOWN = "unknown"
BREAKDOWNS = ("dataset", "answer_type", "modality", "question_type")
MAX_LISTED_IDS = 20
SPLIT_NAMES = ("train", "test", "val", "valid", "validate", "validation", "dev")


@dataclass
class GroundTruth:
    id: str
    question: str
    answer: str
    answer_type: str  # OPEN | CLOSED
    dataset: str = UNKNOWN
    modality: str = UNKNOWN
    question_type: str = UNKNOWN
    image: str | None = None


# ----- reading -----------------------------------------------------------------------------
def read_json_objects(path) -> list[tuple[str, dict]]:
    """(location, object) for every object of a JSONL file or a JSON list; errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        out = [(f"{path}: item {i}", d) for i, d in enumerate(items)]
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg}); expected one JSON object per line") from None
    for where, d in out:
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return out


def read_predictions(path) -> dict[str, str]:
    """id -> predicted text. Later lines win over earlier ones with the same id."""
    predictions: dict[str, str] = {}
    for where, d in read_json_objects(path):
        qid = d.get("id", d.get("question_id"))
        text = d.get("prediction", d.get("text"))
        if qid is None or text is None:
            raise DataError(f"{where}: a prediction needs 'id' and 'prediction' (or the official 'question_id' "
                            f"and 'text'); found keys {sorted(d)}")
        predictions[str(qid)] = str(text)
    return predictions


def _question_type(d: dict) -> str:
    meta = d.get("meta") or {}
    for value in (d.get("question_type"), meta.get("question_type"), meta.get("content_type")):
        if value:
            return str(value).strip()
    return UNKNOWN


def _answer_type(d: dict, answer: str, where: str) -> str:
    value = d.get("answer_type")
    if value is None or not str(value).strip():  # the usual convention: yes/no answers are closed
        return "CLOSED" if answer.strip().lower() in ("yes", "no") else "OPEN"
    try:
        return normalize_answer_type(value)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def parse_ground_truth(d: dict, where: str, default_dataset: str = UNKNOWN) -> GroundTruth:
    if "id" not in d:
        raise DataError(f"{where}: ground truth needs an 'id'")
    if "conversations" in d:  # the official LLaVA layout: human turn, then gpt turn
        turns = d["conversations"]
        if len(turns) < 2:
            raise DataError(f"{where}: 'conversations' needs a question and an answer turn")
        question, answer = str(turns[0]["value"]).replace("<image>", "").strip(), str(turns[1]["value"])
    elif "answer" in d and "question" in d:
        question, answer = str(d["question"]), str(d["answer"])
    else:
        raise DataError(f"{where}: ground truth needs 'question' and 'answer' (or LLaVA 'conversations')")
    return GroundTruth(id=str(d["id"]), question=question, answer=answer, answer_type=_answer_type(d, answer, where),
                       dataset=str(d.get("dataset") or default_dataset), modality=str(d.get("modality") or UNKNOWN),
                       question_type=_question_type(d), image=d.get("image"))


def default_dataset_name(path) -> str:
    """For records without a `dataset` field: the file name, or its folder's when the file is
    named after a split (the official layout is `DATASET/test.json`)."""
    path = Path(path)
    return path.parent.name if path.stem.lower() in SPLIT_NAMES and path.parent.name else path.stem


def read_ground_truth(path) -> list[GroundTruth]:
    items = [parse_ground_truth(d, where, default_dataset=default_dataset_name(path)) for where, d in read_json_objects(path)]
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: question id {item.id!r} occurs twice; ids must be unique to match predictions")
        seen.add(item.id)
    return items


# ----- scoring -----------------------------------------------------------------------------
def score_predictions(predictions: dict[str, str], ground_truth: list[GroundTruth], only_predicted: bool = False
                      ) -> tuple[dict, list[dict]]:
    """(metrics, per-item rows). Metrics: counts, total and breakdowns, in percent."""
    gt_ids = {g.id for g in ground_truth}
    missing = [g.id for g in ground_truth if g.id not in predictions]
    extra = sorted(i for i in predictions if i not in gt_ids)
    rows = []
    for g in ground_truth:
        if g.id not in predictions and only_predicted:
            continue
        prediction = predictions.get(g.id, "")
        rows.append({"id": g.id, "dataset": g.dataset, "answer_type": g.answer_type, "modality": g.modality,
                     "question_type": g.question_type, "question": g.question, "answer": g.answer,
                     "prediction": prediction, "missing": g.id not in predictions,
                     "scores": score_item(prediction, g.answer, g.answer_type)})
    metrics = {
        "counts": {"ground_truth": len(ground_truth), "predictions": len(predictions), "scored": len(rows),
                   "missing": len(missing), "extra": len(extra), "missing_ids": missing[:MAX_LISTED_IDS],
                   "extra_ids": extra[:MAX_LISTED_IDS],
                   "missing_counted_as": "skipped" if only_predicted else "wrong (empty prediction)"},
        "total": aggregate([(r["answer_type"], r["scores"]) for r in rows]),
        "by": {},
    }
    for key in BREAKDOWNS:
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            groups[r[key]].append((r["answer_type"], r["scores"]))
        if key == "question_type" and set(groups) <= {UNKNOWN}:
            continue
        metrics["by"][key] = {name: aggregate(groups[name]) for name in sorted(groups)}
    return metrics, rows


def map_official_ids(predictions: dict[str, str], ground_truth: list[GroundTruth]) -> tuple[dict[str, str], int]:
    """(predictions keyed by ground-truth ids, how many were mapped). A numeric id that is no
    ground-truth id (the official `question_id` 10) takes the only ground-truth id that is its
    dataset's name and that number (`vqa-rad-10`, `slake-10`: prepare.py keeps the source's qid
    there). Ids numbered by us (`pathvqa-test-10`, a line number) are never matched; an ambiguous
    number, or one whose target has its own prediction, stays as it is (reported as extra)."""
    gt_ids = {g.id for g in ground_truth}
    by_number: dict[str, list[str]] = defaultdict(list)
    for g in ground_truth:
        head, _, tail = g.id.rpartition("-")
        if head == g.dataset and tail.isdigit():
            by_number[tail].append(g.id)
    out, mapped = {}, 0
    for pid, text in predictions.items():
        targets = by_number.get(pid, []) if pid.isdigit() and pid not in gt_ids else []
        if len(targets) == 1 and targets[0] not in predictions:
            out[targets[0]] = text
            mapped += 1
        else:
            out[pid] = text
    return out, mapped


def score_files(pred_path, gt_path, only_predicted: bool = False) -> tuple[dict, list[dict]]:
    ground_truth = read_ground_truth(gt_path)
    predictions, mapped = map_official_ids(read_predictions(pred_path), ground_truth)
    if not predictions:
        raise DataError(f"{pred_path}: no predictions in the file")
    if ground_truth and not any(g.id in predictions for g in ground_truth):
        raise DataError(f"{pred_path}: none of its {len(predictions)} prediction ids (e.g. {next(iter(predictions))!r}) "
                        f"matches a ground-truth id of {gt_path} (e.g. {ground_truth[0].id!r}); score predictions "
                        "against the split they were made for")
    metrics, rows = score_predictions(predictions, ground_truth, only_predicted)
    metrics["counts"]["mapped_official_ids"] = mapped
    metrics["files"] = {"predictions": str(pred_path), "ground_truth": str(gt_path)}
    return metrics, rows
