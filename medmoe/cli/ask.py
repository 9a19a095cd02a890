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
    p.add_argument("--min-confidence", type=confidence_level, default=None, metavar="P",
                   help="withhold an answer whose confidence is below P (0 to 1; medmoe eval reports the accuracy "
                        "each threshold keeps): stdout stays empty, stderr says why")
    p.set_defaults(func=run)


def run(args) -> int:
    image = open_image(args.image, args)
    model = load(args)
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature or 1.0, "seed": args.seed}
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
