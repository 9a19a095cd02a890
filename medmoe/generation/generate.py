"""Text generation: greedy or sampled, with a KV cache, EOS and stop strings, batches of
prompts of different lengths (left padding), and streaming.

`generate_tokens` is the one loop; `generate` and `stream` are thin views of it.
Greedy decoding is deterministic; sampling is reproducible from `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from ..moe import LayerRouting


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    use_cache: bool = True
    # Rows that all start with the same tokens (the template's system prompt) prefill them once.
    share_prefix: bool = True
    ignore_eos: bool = False  # answers run to max_new_tokens (benchmarks: fixed-length answers)
    logprobs: bool = False  # the engine reports each token's log-probability (engine/sampling.py)
    top_logprobs: int = 0  # and those of the most likely tokens at each position


@dataclass
class GenerationOutput:
    texts: list[str]
    token_ids: list[list[int]]
    input_ids: torch.Tensor  # the padded prompts, [B, S]
    prompt_routing: list[LayerRouting] | None = None  # routing of the prompt tokens, when asked for
    finish_reasons: list[str] = field(default_factory=list)  # "eos", "stop" or "length"


def eos_ids(model, processor) -> set[int]:
    """Token ids that end an answer: the tokenizer's and the LM config's end-of-sequence ids and the
    tokenizer's other special tokens (chat turn markers such as `<|im_start|>`, unknown), which never
    belong inside an answer. Versions of transformers disagree on which special token a GGUF
    tokenizer calls eos; stopping at all of them gives the same answers under every version."""
    tokenizer = processor.tokenizer
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for source in (tokenizer.eos_token_id, getattr(model.config.llm_config(), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    ids.discard(processor.image_token_id)
    return ids


def pick_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(cfg.temperature, 1e-5)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model, batch: dict, cfg: SamplingConfig, eos: set[int], output_routing: bool = False
                    ) -> Iterator[tuple[torch.Tensor, list[LayerRouting] | None]]:
    """Yield the next token of every row ([B] tensor) step by step; the caller decides when to stop."""
    device = model.device
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    pixels = batch.get("pixel_values")
    generator = None
    if cfg.do_sample and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    shared = shared_prefix_length(model, ids, mask) if cfg.use_cache and cfg.share_prefix else 0
    if shared:
        out, mask, position_ids, routing = prefill_shared_prefix(model, ids, mask, shared, pixels,
                                                                 output_routing=output_routing)
    else:
        # logits_to_keep=1: only the last position's logits are needed; the prompt's would cost a fifth
        # of the prefill's work for a 135M model (the output layer of a 49K vocabulary at every position).
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=position_ids,
                    cache=DynamicCache() if cfg.use_cache else None, use_cache=cfg.use_cache,
                    output_routing=output_routing, logits_to_keep=1)
        routing = out.routing
    while True:
        next_token = pick_next(out.logits[:, -1, :].float(), cfg, generator)
        yield next_token, routing
        routing = None
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        if cfg.use_cache:
            out = model(input_ids=next_token[:, None], attention_mask=mask, position_ids=position_ids,
                        cache=out.cache, use_cache=True)
        else:  # recompute everything: the reference the cached path is tested against
            ids = torch.cat([ids, next_token[:, None]], dim=1)
            full_positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=full_positions,
                        use_cache=False, logits_to_keep=1)


MIN_SHARED_PREFIX = 8  # below this, prefilling a prefix apart saves less than it costs


def shared_prefix_length(model, ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every row of a left-padded batch shares (0: do not share).

    Sharing stops before the first image token (image features differ per row) and leaves each row
    at least one token of its own. Per-sample routing pools over the whole prompt, so models that
    route per sample never share."""
    b, s = ids.shape
    if b < 2 or any(block.cfg.routing != "token" for block in getattr(model, "moe_blocks", [])):
        return 0
    if not hasattr(DynamicCache, "batch_repeat_interleave"):
        return 0  # the cache cannot repeat its rows
    lengths = mask.sum(-1)
    starts = s - lengths
    if not torch.equal(mask.bool(), torch.arange(s, device=ids.device)[None] >= starts[:, None]):
        return 0  # not left-padded
    shortest = int(lengths.min())
    heads = ids.gather(1, starts[:, None] + torch.arange(shortest, device=ids.device)[None])
    same = (heads == heads[:1]).all(0) & (heads[0] != model.config.image_token_id)
    length = min(int(same.long().cumprod(0).sum()), shortest - 1)
    return length if length >= MIN_SHARED_PREFIX else 0


def prefill_shared_prefix(model, ids: torch.Tensor, mask: torch.Tensor, shared: int,
                          pixel_values: torch.Tensor | None = None, image_tokens: torch.Tensor | None = None,
                          output_routing: bool = False, logits_to_keep: int = 1):
    """The prompt prefill of a left-padded batch with the rows' common first `shared` tokens
    (`shared_prefix_length`) run once and their KV cache repeated for every row. Rows are laid out
    [shared prefix][padding][own tokens] (positions count real tokens only, so every token keeps its
    position); the last `logits_to_keep` positions are each row's last ones, as before, and routing
    records come back in the batch's own layout. Images: `pixel_values` or encoded `image_tokens`.
    Returns (output, attention mask, position ids of the own tokens, routing)."""
    b, s = ids.shape
    pads = s - mask.sum(-1)  # per row
    cache = DynamicCache()
    start = int(pads[0])
    first = model(input_ids=ids[:1, start:start + shared], cache=cache, use_cache=True,
                  output_routing=output_routing, logits_to_keep=1)
    cache.batch_repeat_interleave(b)
    columns = torch.arange(s - shared, device=ids.device)[None]
    own_mask = (columns >= pads[:, None]).long()
    own_ids = torch.where(own_mask.bool(), ids[:, shared:], ids[:, :1])  # padding: no image tokens
    full_mask = torch.cat([mask.new_ones(b, shared), own_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=model.embed_inputs(own_ids, pixel_values, image_tokens=image_tokens),
                attention_mask=full_mask, position_ids=positions[:, shared:], cache=cache, use_cache=True,
                output_routing=output_routing, logits_to_keep=logits_to_keep)
    routing = None
    if output_routing:
        # Column c of the batch's layout: padding (c < pad) sits at c + shared in ours, the shared
        # prefix (pad <= c < pad + shared) at c - pad, a row's own tokens at c.
        c = torch.arange(s, device=ids.device)[None]
        pad = pads[:, None]
        source = torch.where(c < pad, c + shared, torch.where(c < pad + shared, c - pad, c))
        routing = [_relayout(head, rest, source) for head, rest in zip(first.routing, out.routing)]
    return out, full_mask, positions[:, shared:], routing


def _relayout(head: LayerRouting, rest: LayerRouting, source: torch.Tensor) -> LayerRouting:
    def join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        both = torch.cat([a.expand(b.shape[0], -1, -1), b], dim=1)
        return both.gather(1, source[..., None].expand(-1, -1, both.shape[-1]))

    return LayerRouting(layer=rest.layer, expert_index=join(head.expert_index, rest.expert_index),
                        probs=join(head.probs, rest.probs))


def _normalise_images(questions: Sequence[str], images) -> list:
    if images is None:
        return [None] * len(questions)
    return list(images)


def run_generation(model, processor, questions: Sequence[str], images=None, cfg: SamplingConfig | None = None,
                   output_routing: bool = False, on_text: Callable[[int, str], None] | None = None,
                   batch: dict | None = None) -> GenerationOutput:
    """Generate answers for a batch. `on_text(row, delta)` receives text as it is produced.
    `batch`: prompts already built (left-padded input_ids, attention_mask, pixel_values), e.g. multi-turn."""
    cfg = cfg or SamplingConfig()
    if batch is None:
        batch = processor(list(questions), _normalise_images(questions, images), padding_side="left")
    eos = eos_ids(model, processor)
    n = batch["input_ids"].shape[0]
    tokens: list[list[int]] = [[] for _ in range(n)]
    texts = [""] * n
    sent = [""] * n  # what on_text has been given so far
    reasons = ["length"] * n
    done = [False] * n
    prompt_routing = None
    if cfg.max_new_tokens <= 0:
        return GenerationOutput(texts, tokens, batch["input_ids"], None, reasons)
    for step, (next_token, routing) in enumerate(generate_tokens(model, batch, cfg, eos, output_routing)):
        if routing is not None:
            prompt_routing = routing
        for row, token in enumerate(next_token.tolist()):
            if done[row]:
                continue
            if token in eos and not cfg.ignore_eos:
                done[row], reasons[row] = True, "eos"
                continue
            tokens[row].append(token)
            text = processor.decode(tokens[row])
            for stop in cfg.stop:
                if stop and stop in text:
                    text = text[: text.index(stop)]
                    done[row], reasons[row] = True, "stop"
            texts[row] = text
            if on_text is not None and not text.endswith("\ufffd") and len(text) > len(sent[row]):
                on_text(row, text[len(sent[row]):])
                sent[row] = text
        if all(done) or step + 1 >= cfg.max_new_tokens:
            break
    for row in range(n):  # flush what was held back (a half-decoded character at the very end)
        if on_text is not None and len(texts[row]) > len(sent[row]) and texts[row].startswith(sent[row]):
            on_text(row, texts[row][len(sent[row]):])
    return GenerationOutput([t.strip() for t in texts], tokens, batch["input_ids"], prompt_routing, reasons)


def generate(model, processor, questions: Sequence[str], images=None, max_new_tokens: int = 64,
             do_sample: bool = False, **kwargs) -> list[str]:
    """Answers for a batch of questions (each with zero, one or several images)."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
    return run_generation(model, processor, questions, images, cfg).texts


def stream(model, processor, question: str, image=None, max_new_tokens: int = 64, **kwargs) -> Iterator[str]:
    """Yield the answer to one question piece by piece as it is produced."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, **kwargs)
    batch = processor([question], [image], padding_side="left")
    eos = eos_ids(model, processor)
    tokens: list[int] = []
    shown = ""
    for step, (next_token, _) in enumerate(generate_tokens(model, batch, cfg, eos)):
        token = int(next_token[0])
        end = token in eos and not cfg.ignore_eos
        last = end or step + 1 >= cfg.max_new_tokens
        if not end:
            tokens.append(token)
        text = processor.decode(tokens)
        stop_at = min((text.index(s) for s in cfg.stop if s and s in text), default=None)
        if stop_at is not None:
            text, last = text[:stop_at], True
        text = text.strip() if last else text.lstrip()
        # Hold back a half-decoded multi-byte character until it is complete (or the answer ends).
        if (last or not text.endswith("\ufffd")) and len(text) > len(shown) and text.startswith(shown):
            yield text[len(shown):]
            shown = text
        if last:
            return
