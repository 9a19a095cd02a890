"""Metrics JSON -> plain-text table, Markdown report and a self-contained HTML page.

The HTML page embeds its figures as base64 data URLs, so it can be mailed or attached as one file.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

COLUMNS = ("group", "n", "open n", "open recall", "closed n", "closed acc", "closed strict",
           "EMS", "F1 (open)", "BLEU-1", "BLEU-2", "BLEU-3")


METHODS = {"loglik": "label log-likelihood", "loglik_calibrated": "label log-likelihood, batch-calibrated",
           "loglik_contextual": "label log-likelihood, calibrated by the question without the image",
           "generate": "free generation"}


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def metric_row(name: str, agg: dict) -> list[str]:
    o, c = agg.get("open") or {}, agg.get("closed") or {}
    return [name, str(agg["n"]), str(o.get("n", 0)), _pct(o.get("recall")), str(c.get("n", 0)),
            _pct(c.get("accuracy")), _pct(c.get("accuracy_strict")), _pct(o.get("ems")), _pct(o.get("f1")),
            _pct(o.get("bleu1")), _pct(o.get("bleu2")), _pct(o.get("bleu3"))]


def metric_rows(metrics: dict) -> list[list[str]]:
    """The total, then one row per breakdown group ("dataset=slake", "modality=CT", ...)."""
    rows = [metric_row("total", metrics["total"])]
    for key, groups in metrics.get("by", {}).items():
        if key == "answer_type":
            continue  # the columns already split open and closed
        rows.extend(metric_row(f"{key}={name}", agg) for name, agg in groups.items())
    return rows


def text_table(rows: list[list[str]], header=COLUMNS) -> str:
    widths = [max(len(str(r[i])) for r in [list(header), *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(rows: list[list[str]], header=COLUMNS) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def counts_line(metrics: dict) -> str:
    c = metrics["counts"]
    text = (f"{c['scored']} scored of {c['ground_truth']} ground-truth items; {c['predictions']} predictions; "
            f"{c['missing']} missing (counted as {c['missing_counted_as']}), {c['extra']} extra ids")
    if c["missing"]:
        text += f"; first missing: {', '.join(c['missing_ids'][:5])}"
    return text


def interval_line(agg: dict) -> str:
    """The total's headline metrics with their 95% bootstrap intervals, one line."""
    parts = []
    for kind, metric, label in (("closed", "accuracy", "closed accuracy"), ("closed", "accuracy_strict", "closed strict"),
                                ("open", "recall", "open recall")):
        group = agg.get(kind) or {}
        ci = (group.get("ci95") or {}).get(metric)
        if ci:
            parts.append(f"{label} {group[metric]:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]")
    return ("95% bootstrap intervals (questions resampled): " + "; ".join(parts)) if parts else ""


def score_text(metrics: dict) -> str:
    line = interval_line(metrics["total"])
    return (counts_line(metrics) + "\n\n" + text_table(metric_rows(metrics)) + "\n(percent)"
            + (f"\n{line}" if line else ""))


# ----- the report: one list of blocks, rendered as Markdown or as HTML -------------------------
# A block is ("h", level, text) | ("p", text) | ("code", text) | ("table", header, rows) | ("img", path, caption)

def _classification_blocks(name: str, m: dict, figure: str | None) -> list:
    recall = ", ".join(f"{c} {v:.1f}" if v is not None else f"{c} -" for c, v in m["per_class_recall"].items())
    ci = lambda key: (f" [{m[key][0]:.2f}, {m[key][1]:.2f}]" if m.get(key) else "")
    balanced = (f"; balanced accuracy {m['balanced_accuracy']:.2f}%{ci('balanced_accuracy_ci95')}"
                if m.get("balanced_accuracy") is not None else "")
    blocks = [("h", 3, name), ("p", f"accuracy {m['accuracy']:.2f}%{ci('accuracy_ci95')} of {m['n']}{balanced}; "
                                    f"per-class recall: {recall}"
                                    + (f"; {m['unparsed']} answers named no label" if m.get("unparsed") else "")
                                    + " (95% bootstrap intervals in brackets)")]
    header = ["true \\ predicted", *m["classes"], "unparsed"]
    blocks.append(("table", header, [[c, *map(str, row)] for c, row in zip(m["classes"], m["confusion"])]))
    if figure:
        blocks.append(("img", figure, f"confusion matrix, {name}"))
    return blocks


def _calibration_blocks(calib: dict, figure: str | None) -> list:
    """ECE and accuracy at each coverage: what a user gains by withholding the least confident answers."""
    rows = [[f"{100 * c['coverage']:.0f}%", str(c["n"]), f"{c['accuracy']:.2f}", f"{c['threshold']:.3f}"]
            for c in calib["coverage"]]
    blocks = [("p", f"calibration: expected calibration error {calib['ece']:.2f} points (10 bins); mean confidence "
                    f"{calib['mean_confidence']:.2f}% against accuracy {calib['accuracy']:.2f}%"),
              ("table", ["coverage", "answers kept", "accuracy", "confidence threshold"], rows)]
    if figure:
        blocks.append(("img", figure, "reliability diagram and accuracy against coverage"))
    return blocks


def _examples(rows: list[dict], limit: int = 10) -> list:
    wrong = [r for r in rows if (r["scores"].get("accuracy_strict", 1) == 0 or r["scores"].get("recall", 1) < 1)]
    if not wrong:
        return []
    table = [[r["id"], r["answer_type"], r["question"][:80], r["answer"][:40], r["prediction"][:60]] for r in wrong[:limit]]
    return [("h", 2, "Examples of wrong answers"),
            ("p", f"first {len(table)} of {len(wrong)} items that are not strictly correct (closed) or have recall < 1 (open)"),
            ("table", ["id", "type", "question", "answer", "prediction"], table)]


def report_blocks(metrics: dict, rows: list[dict] | None = None, figure_dir=None) -> list:
    run = metrics.get("run", {})
    figures = metrics.get("figures", {})
    fig = lambda key: str(Path(figure_dir, figures[key])) if key in figures and figure_dir else figures.get(key)
    title = f"Evaluation: {run['model']} on {run['data']}" if run else "Evaluation: " + " vs ".join(
        metrics.get("files", {}).values())
    blocks: list = [("h", 1, title)]
    if run.get("command"):
        blocks += [("p", "Produced by:"), ("code", run["command"])]
    show = lambda v: ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else v
    facts = [f"{k}: {show(v)}" for k, v in run.items() if k not in ("command", "model", "data")]
    if facts:
        blocks.append(("p", "; ".join(facts)))
    vqa = metrics.get("vqa")
    if vqa and vqa["counts"]["scored"]:
        blocks += [("h", 2, "VQA"), ("p", counts_line(vqa)),
                   ("p", "Percent. open recall, EMS, F1 and BLEU over open questions; closed accuracy by the official "
                         "substring rule and by strict normalised match (docs/evaluation.md)."),
                   ("table", list(COLUMNS), metric_rows(vqa))]
        if interval_line(vqa["total"]):
            blocks.append(("p", interval_line(vqa["total"])))
    for kind, calib in (metrics.get("calibration") or {}).items():
        blocks += [("h", 3, f"Confidence of {kind} answers (scored by {calib.get('scored_by', 'accuracy')})")]
        blocks += _calibration_blocks(calib, fig(f"calibration_{kind}"))
    cls = metrics.get("classification")
    if cls:
        blocks.append(("h", 2, "Classification"))
        for dataset, methods in cls.items():
            for method, m in methods.items():
                blocks += _classification_blocks(f"{dataset}: {METHODS.get(method, method)}", m,
                                                 fig(f"confusion_{dataset}_{method}"))
                if m.get("calibration"):
                    blocks += _calibration_blocks(m["calibration"], fig(f"calibration_{dataset}_{method}"))
    if "routing" in metrics:
        blocks += _routing_blocks(metrics["routing"], fig("routing") if "routing" in figures else None)
    if rows:
        blocks += _examples(rows)
    return blocks


def _routing_blocks(routing: dict | None, figure: str | None) -> list:
    blocks: list = [("h", 2, "Routing")]
    if routing and routing.get("layers"):
        acc = routing["router_accuracy"]
        if acc["samples"]:
            per = ", ".join(f"{m} {v:.1f}" for m, v in acc["per_modality"].items())
            blocks.append(("p", f"Router modality accuracy on image tokens (expert j = {', '.join(routing['expert_names'])}): "
                                f"{acc['sample_accuracy']:.2f}% of {acc['samples']} samples by majority vote, "
                                f"{acc['token_accuracy']:.2f}% of image tokens; per modality: {per}"))
        else:
            blocks.append(("p", "No sample had a modality the router knows; router accuracy not measured."))
        if figure:
            blocks.append(("img", figure, "expert choice per MoE layer, per modality, image vs text tokens"))
    else:
        blocks.append(("p", "No routing analysis: a dense model (no MoE layers), or run with --no-routing."))
    return blocks


def to_markdown(blocks: list) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append("#" * block[1] + " " + block[2])
        elif kind == "p":
            out.append(block[1])
        elif kind == "code":
            out.append("```\n" + block[1] + "\n```")
        elif kind == "table":
            cells = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in block[2]]
            out.append(markdown_table(cells, header=block[1]))
        elif kind == "img":
            out.append(f"![{block[2]}]({os.path.basename(block[1])})")
    return "\n\n".join(out) + "\n"


_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px}"
          "td:not(:first-child){text-align:right}th{background:#f3f3f3}pre{background:#f6f6f6;padding:.7em;"
          "overflow-x:auto}img{max-width:100%}")


def _data_url(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def to_html(blocks: list) -> str:
    """One self-contained page: figures are embedded, nothing is fetched."""
    esc = html.escape
    body = []
    title = next((b[2] for b in blocks if b[0] == "h"), "medmoe evaluation")
    for block in blocks:
        kind = block[0]
        if kind == "h":
            body.append(f"<h{block[1]}>{esc(block[2])}</h{block[1]}>")
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "code":
            body.append(f"<pre><code>{esc(block[1])}</code></pre>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(c))}</th>" for c in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img" and Path(block[1]).is_file():
            body.append(f'<figure><img src="{_data_url(block[1])}" alt="{esc(block[2])}">'
                        f"<figcaption>{esc(block[2])}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_reports(metrics: dict, out_dir, rows: list[dict] | None = None) -> tuple[Path, Path]:
    """report.md (figures linked beside it) and report.html (figures embedded) in out_dir."""
    from .io import write_text

    out_dir = Path(out_dir)
    blocks = report_blocks(metrics, rows, figure_dir=out_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_text(md, to_markdown(blocks))
    write_text(page, to_html(blocks))
    return md, page


# ----- a row for docs/RESULTS.md ------------------------------------------------------------
RESULTS_DATASETS = ("vqa-rad", "slake", "pathvqa")


def _with_ci(value, ci) -> str:
    if value is None:
        return ""
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}"


def _pneumonia_loglik(metrics: dict) -> dict | None:
    """PneumoniaMNIST's scores by label log-likelihood (the column docs/RESULTS.md reports)."""
    return ((metrics.get("classification") or {}).get("pneumoniamnist") or {}).get("loglik")


def interval_row(label: str, runs: list[dict]) -> str:
    """One Markdown row of docs/RESULTS.md's intervals table: each VQA dataset's open recall and
    closed accuracy, then PneumoniaMNIST's accuracy and balanced accuracy (label log-likelihood),
    each with its 95% bootstrap interval, from eval metrics."""
    cells, pneumonia = {}, ["", ""]
    for m in runs:
        for name, agg in ((m.get("vqa") or {}).get("by", {}).get("dataset", {})).items():
            o, c = agg.get("open") or {}, agg.get("closed") or {}
            cells[name] = [_with_ci(o.get("recall"), (o.get("ci95") or {}).get("recall")),
                           _with_ci(c.get("accuracy"), (c.get("ci95") or {}).get("accuracy"))]
        loglik = _pneumonia_loglik(m)
        if loglik:
            pneumonia = [_with_ci(loglik["accuracy"], loglik.get("accuracy_ci95")),
                         _with_ci(loglik["balanced_accuracy"], loglik.get("balanced_accuracy_ci95"))]
    values = [v for d in RESULTS_DATASETS for v in cells.get(d, ["", ""])] + pneumonia
    return "| " + " | ".join([label, *values]) + " |"


def results_row(label: str, activated: str, runs: list[dict]) -> str:
    """One Markdown row of docs/RESULTS.md's "Our runs" table from eval metrics (one per dataset
    or one covering several): open recall, closed accuracy substring / strict, PneumoniaMNIST's
    accuracy (label log-likelihood), and the commands."""
    cells, pneumonia = {}, ""
    for m in runs:
        for name, agg in ((m.get("vqa") or {}).get("by", {}).get("dataset", {})).items():
            o, c = agg.get("open") or {}, agg.get("closed") or {}
            cells[name] = [_pct(o.get("recall")), f"{_pct(c.get('accuracy'))} / {_pct(c.get('accuracy_strict'))}"]
        loglik = _pneumonia_loglik(m)
        if loglik:
            pneumonia = _pct(loglik["accuracy"])
    values = [v for d in RESULTS_DATASETS for v in cells.get(d, ["", ""])] + [pneumonia]
    commands = "<br>".join(f"`{m['run']['command']}`" for m in runs if m.get("run", {}).get("command"))
    return "| " + " | ".join([label, activated, *values, commands]) + " |"
