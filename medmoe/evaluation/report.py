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


def score_text(metrics: dict) -> str:
    return counts_line(metrics) + "\n\n" + text_table(metric_rows(metrics)) + "\n(percent)"
