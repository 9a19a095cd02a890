"""`medmoe ask`: one question about one image; prints the answer and which domain expert handled the image."""

from __future__ import annotations

import json
import sys

from ._model_args import add_image_args, add_model_args, confidence_level, load, open_image


def register(sub) -> None:
    p = sub.add_parser("ask", help="answer a question about an image (PNG/JPEG/TIFF/BMP/DICOM/NIfTI)")
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--image", default=None, help="image file; omit for a text-only question")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer, routing, finish reason)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (deterministic); >0 samples")
    p.add_argument("--seed", type=int, default=None, help="random seed when sampling")
    p.add_argument("--choices", default=None, metavar="A,B,...",
                   help="classify instead: the likeliest of these comma-separated labels, with each label's "
                        "probability (calibrated by the question without the image unless --no-calibration)")
    p.add_argument("--no-calibration", action="store_true",
                   help="with --choices: the label probabilities as the model gives them")
    p.add_argument("--min-confidence", type=confidence_level, default=None, metavar="P",
                   help="withhold an answer whose confidence is below P (0 to 1; medmoe eval reports the accuracy "
                        "each threshold keeps): stdout stays empty, stderr says why")
    p.set_defaults(func=run)


def run(args) -> int:
    image = open_image(args.image, args)
    model = load(args)
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0, "seed": args.seed}
    if args.choices is not None:
        return classify(model, image, args)
    answer = model.ask(image, args.question, **sampling)
    if args.json:
        record = answer.to_dict()
        if args.min_confidence is not None:
            record["withheld"] = answer.withheld(args.min_confidence)
        if image is not None and image.info.get("medmoe_reduction"):
            record["image_reduction"] = image.info["medmoe_reduction"]
        print(json.dumps(record, indent=2))
        return 0
    if answer.withheld(args.min_confidence):
        shown = "none" if answer.confidence is None else f"{answer.confidence:.0%}"
        print(f"withheld: the answer {answer.text!r} has confidence {shown}, below --min-confidence "
              f"{args.min_confidence:.0%}", file=sys.stderr)
    else:
        print(answer.text)
        if answer.confidence is not None:
            print(f"confidence: {answer.confidence:.0%}", file=sys.stderr)
    if answer.routing is not None:
        r = answer.routing
        print(f"\nrouting: the {r.expert} expert handled the image ({r.shares[r.expert]:.0%} of "
              f"{r.image_tokens} image tokens x {len(r.layers)} MoE layers)", file=sys.stderr)
        print(r.bar(), file=sys.stderr)
    return 0


def classify(model, image, args) -> int:
    labels = [label.strip() for label in args.choices.split(",") if label.strip()]
    result = model.classify(image, labels, args.question, calibrate=not args.no_calibration)
    confidence = result.probabilities[result.label]
    withheld = args.min_confidence is not None and confidence < args.min_confidence
    if args.json:
        print(json.dumps({**result.to_dict(), **({"withheld": withheld} if args.min_confidence is not None else {})},
                         indent=2))
        return 0
    if withheld:
        print(f"withheld: the label {result.label!r} has probability {confidence:.0%}, below --min-confidence "
              f"{args.min_confidence:.0%}", file=sys.stderr)
    else:
        print(result.label)
    shown = ", ".join(f"{label} {percent(p)}" for label, p in result.probabilities.items())
    print(f"probabilities: {shown}" + ("" if args.no_calibration or image is None else
                                      " (calibrated by the question without the image)"), file=sys.stderr)
    return 0


def percent(p: float) -> str:
    """A probability as a whole percentage that never rounds a possibility to 0% or 100%."""
    return "<1%" if 0 < p < 0.005 else ">99%" if 0.995 < p < 1 else f"{p:.0%}"
