"""Where a served request's time goes before and after the engine: sums of host seconds by
stage, cumulative from the server's start, in the shape of engine/stats.py (two snapshots'
difference, `engine.stats.delta`, gives a run's share; a sum over its count, the mean).

    arrival ─ read ─ images ─ encode ─┬─ engine: queue, prefill (engine/stats.py first_token_s) ─┐
                                      │                                                        first token posted
                                      └───────────── to_first_chunk ─────────── hand-off ──── first chunk to HTTP

A client's time to first token minus `to_first_chunk` is its transport and its own event loop;
`to_first_chunk` minus the engine's `first_token_s` is the server's front end (`read`, `images`,
`encode`, `handoff`). Only the event loop's thread writes these sums.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class FrontEndStats:
    requests: int = 0  # chat requests handed to the engine
    read_s: float = 0.0  # arrival -> body read and parsed
    images_s: float = 0.0  # decoding the request's images (a worker thread)
    encode_s: float = 0.0  # tokenising, image preprocessing and queueing (engine submit, a worker thread)
    first_chunks: int = 0  # streamed requests whose first content chunk went out
    to_first_chunk_s: float = 0.0  # arrival -> first content chunk handed to the HTTP server
    handoff_s: float = 0.0  # engine posted the first token -> its chunk handed to the HTTP server

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def front_end_line(s: dict) -> str:
    """The means, in milliseconds, of one `as_dict()` record (or a difference of two)."""
    mean = lambda total, n: 1000 * total / n if n else 0.0  # noqa: E731
    n, first = s["requests"], s["first_chunks"]
    return (f"front end: {n} requests, read {mean(s['read_s'], n):.1f} ms, images {mean(s['images_s'], n):.1f} ms, "
            f"encode {mean(s['encode_s'], n):.1f} ms; arrival to first chunk {mean(s['to_first_chunk_s'], first):.1f} ms, "
            f"of it the engine's first token to its chunk {mean(s['handoff_s'], first):.1f} ms")
