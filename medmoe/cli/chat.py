"""`medmoe chat`: a multi-turn conversation in the terminal, answers streamed as they are produced.

Commands at the prompt: `/image PATH` attaches an image to the next question, `/reset` starts over,
`/quit` (or Ctrl-D) leaves. Any other line starting with "/" is refused as an unknown command rather
than sent to the model; start a question with "//" to send it with one "/"."""

from __future__ import annotations

import sys

from ._model_args import add_image_args, add_model_args, load, open_image

COMMANDS = "/image PATH, /reset, /quit"


def register(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat about images with streamed answers")
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--image", default=None, help="image for the first question")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import MedMoEError

    model = load(args)
    session = model.chat()
    pending = open_image(args.image, args)
    print("medmoe chat: /image PATH attaches an image, /reset starts over, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending = None
            print("(conversation cleared)", file=sys.stderr)
            continue
        command, *rest = line.split(maxsplit=1)
        if command == "/image":
            if not rest:
                print("usage: /image PATH", file=sys.stderr)
                continue
            try:
                pending = open_image(rest[0] if rest else "", args)
                print("(image attached to the next question)", file=sys.stderr)
            except MedMoEError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        elif line.startswith("/"):
            print(f"unknown command {command}; commands: {COMMANDS}", file=sys.stderr)
            continue
        print("medmoe> ", end="", flush=True)
        for piece in session.stream(line, pending):
            print(piece, end="", flush=True)
        print()
        pending = None
        r = session.last.routing if session.last else None
        if r is not None:
            print(f"  [routing: {r.expert} expert, {r.shares[r.expert]:.0%} of image tokens]", file=sys.stderr)
