"""Can decoding alone make a model use the image? Yes/no closed questions scored by label
log-likelihood, with image-contrastive scoring and batch calibration, behind docs/lab/closed-contrast.md:

    python scripts/lab/closed_contrast.py --model nano --data data/slake --split validation --out slake-val.json
    python scripts/lab/closed_contrast.py --table slake-val.json slake-test.json vqarad-test.json

For every closed question whose answer is "yes" or "no", log p("yes") and log p("no") are computed
(evaluation/classification.py's choice_logprobs_batch) three ways: with the question's image, with
no image (the text-only prompt), and with another question's image (`--shuffle-images`'s
permutation). The table then compares, on the same questions:
- the plain choice: yes when m_image > 0, m = log p(yes) - log p(no);
- image-contrastive scoring (visual contrastive decoding, Leng et al. 2023):
  (1 + alpha) m_image - alpha m_ref, the reference being no image or the shuffled image;
- batch calibration: m_image minus its median over the split (the model's lean divided out).
Differences come with paired 95% bootstrap intervals (questions resampled, 2,000 draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def score(model_name: str, data: str, split: str, out: str) -> None:
    from medmoe.evaluation.classification import choice_logprobs_batch
    from medmoe.evaluation.evaluate import read_eval_items, resolve_data_file, shuffle_images
    from medmoe.loading import load_for_inference

    items = read_eval_items(resolve_data_file(data, split), split)
    other = {i.gt.id: i.image for i in shuffle_images(items)}
    yes_no = [i for i in items if i.gt.answer_type == "CLOSED" and i.gt.answer.lower().strip() in ("yes", "no")]
    model, processor = load_for_inference(model_name, "auto", "auto")
    questions = [i.gt.question for i in yes_no]
    scores = {}
    for name, images in (("image", [i.image for i in yes_no]), ("none", [None] * len(yes_no)),
                         ("shuffled", [other[i.gt.id] for i in yes_no])):
        scores[name] = choice_logprobs_batch(model, processor, questions, images, ["yes", "no"]).tolist()
    Path(out).write_text(json.dumps({"data": data, "split": split, "ids": [i.gt.id for i in yes_no],
                                     "answers": [i.gt.answer.lower().strip() for i in yes_no], **scores}))


def paired(better: np.ndarray, base: np.ndarray, draws: int = 2000) -> tuple[float, float, float]:
    """Accuracy difference in points with its paired 95% bootstrap interval."""
    idx = np.random.default_rng(0).integers(0, len(base), (draws, len(base)))
    diffs = (better[idx].mean(1) - base[idx].mean(1)) * 100
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return (better.mean() - base.mean()) * 100, lo, hi


def table(files: list[str]) -> None:
    for f in files:
        d = json.loads(Path(f).read_text())
        truth = np.array([a == "yes" for a in d["answers"]])
        margin = {k: np.array(d[k])[:, 0] - np.array(d[k])[:, 1] for k in ("image", "none", "shuffled")}
        correct = lambda m: ((m > 0) == truth).astype(float)  # noqa: E731
        base = correct(margin["image"])
        print(f"{d['data']} {d['split']}: {len(truth)} yes/no questions, {truth.mean():.1%} yes; "
              f"the model says yes to {(margin['image'] > 0).mean():.1%}")
        for name in ("image", "none", "shuffled"):
            print(f"  {name:9s} {correct(margin[name]).mean() * 100:6.2f}")
        diff = paired(correct(margin["image"] - np.median(margin["image"])), base)
        print("  batch-calibrated %6.2f  %+.2f [%.2f, %.2f]" % (diff[0] + base.mean() * 100, *diff))
        for ref in ("none", "shuffled"):
            for a in ALPHAS:
                diff = paired(correct((1 + a) * margin["image"] - a * margin[ref]), base)
                print("  contrast vs %-8s alpha %-4g %6.2f  %+.2f [%.2f, %.2f]" % (ref, a, diff[0] + base.mean() * 100, *diff))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nano")
    p.add_argument("--data")
    p.add_argument("--split", default="test")
    p.add_argument("--out")
    p.add_argument("--table", nargs="+", help="score files to tabulate")
    args = p.parse_args()
    if args.table:
        table(args.table)
    else:
        score(args.model, args.data, args.split, args.out)


if __name__ == "__main__":
    main()
