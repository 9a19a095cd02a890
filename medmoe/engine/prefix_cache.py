"""The keys and values of prompt prefixes kept across requests (SGLang's RadixAttention, sized for
this project), so that a request prefills only the tokens no earlier request has had before it.

Every request's prompt starts with the chat template's system prompt, and questions about the same
image share the image's tokens too. The cache is a radix tree over prompts: each node holds the
keys and values of a run of tokens that follow its parent's, a node splits where two prompts part.
A prompt's key is its token ids with each image token replaced by (digest of the image's pixels,
index within the image), so that an image's tokens match only the same image. At admission the
engine copies the longest cached prefix into the request's slot and prefills the rest; after the
prefill it inserts the whole prompt.

    cache = PrefixCache(max_bytes=256 << 20)
    hit = cache.match(key, limit=len(key) - 1)       # hit.length tokens, hit.kv [2, layers, heads, n, dim]
    cache.insert(key, kv, routing)                   # the prompt's keys and values, after its prefill

Memory is bounded: past `max_bytes` the least recently used leaves go first (a parent is used
whenever a child is, so shared prefixes stay). Reuse is exact only when a token's keys and values
depend on the tokens before it alone: `reuse_safe` says whether the model routes that way; and
only while the weights stay the same: the engine empties the cache when `weights_version` changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .routing_records import Records, join


def reuse_safe(model) -> bool:
    """Whether a prefix's keys and values are the same whatever follows it: token routing without
    inference capacity (per-sample routing pools over the whole prompt; a capacity limit makes a
    token's expert depend on the other tokens of the batch)."""
    return all(b.cfg.routing == "token" and b.cfg.capacity_factor_at_inference is None
               for b in getattr(model, "moe_blocks", []))


def weights_version(model) -> int:
    """Changes when a parameter is changed in place (a training step, loading weights, merging
    adapters): the cached keys and values are then stale."""
    return sum(p._version for p in model.parameters())


def image_digest(pixels: torch.Tensor) -> bytes:
    data = pixels.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(f"{tuple(pixels.shape)}{pixels.dtype}".encode() + data, digest_size=16).digest()


def prompt_key(input_ids: list[int], pixel_values: torch.Tensor | None, image_token_id: int | None,
               digests: tuple[bytes, ...] | None = None) -> tuple | None:
    """The prompt's tokens with image tokens named by their image (`digests`: the images'
    `image_digest`s, when known already); None when the images do not match the image tokens (the
    prefill reports that error)."""
    image_at = [i for i, t in enumerate(input_ids) if t == image_token_id] if image_token_id is not None else []
    if not image_at:
        return tuple(input_ids)
    images = 0 if pixel_values is None else pixel_values.shape[0]
    if images == 0 or len(image_at) % images:
        return None
    per_image = len(image_at) // images
    if digests is None or len(digests) != images:
        digests = [image_digest(p) for p in pixel_values]
    key = list(input_ids)
    for n, i in enumerate(image_at):
        key[i] = (digests[n // per_image], n % per_image)
    return tuple(key)


@dataclass
class Hit:
    length: int  # prompt tokens found
    kv: torch.Tensor | None  # [2, layers, kv heads, length, head dim]
    routing: Records | None  # the prompt's first `length` tokens


class _Node:
    __slots__ = ("key", "kv", "routing", "children", "parent", "used")

    def __init__(self, key: tuple, kv, routing: Records | None, parent):
        self.key, self.kv, self.routing, self.parent = key, kv, routing, parent
        self.children: dict = {}
        self.used = 0

    @property
    def bytes(self) -> int:
        if self.kv is None:
            return 0
        return self.kv.numel() * self.kv.element_size() + (self.routing.bytes if self.routing is not None else 0)


def _common(a: tuple, b: tuple, start: int, limit: int) -> int:
    n = 0
    while n < len(a) and start + n < limit and a[n] == b[start + n]:
        n += 1
    return n


def _slice(routing: Records | None, start: int, end: int | None = None) -> Records | None:
    return None if routing is None else routing.slice(start, end)


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = _Node((), None, None, None)
        self.nodes: set[_Node] = set()
        self.bytes = 0
        self.clock = 0
        self.lookups = self.hits = self.hit_tokens = self.evicted = 0
        self.version: int | None = None  # of the model's weights (weights_version) the entries were made with

    def _touch(self, nodes) -> None:
        self.clock += 1
        for node in nodes:
            node.used = self.clock

    def match(self, key: tuple, limit: int, need_routing: bool = False) -> Hit:
        """The longest cached prefix of key[:limit] (with routing records when `need_routing`)."""
        self.lookups += 1
        parts, node, at = [], self.root, 0
        while at < limit:
            child = node.children.get(key[at])
            if child is None or (need_routing and child.routing is None):
                break
            n = _common(child.key, key, at, limit)
            parts.append((child, n))
            at += n
            if n < len(child.key):
                break
            node = child
        if not parts:
            return Hit(0, None, None)
        self._touch(c for c, _ in parts)
        self.hits += 1
        self.hit_tokens += at
        kv = torch.cat([c.kv[..., :n, :] for c, n in parts], dim=3)
        routing = None
        if all(c.routing is not None for c, _ in parts):
            routing = join([c.routing.view(0, n) for c, n in parts])
        return Hit(at, kv, routing)

    def insert(self, key: tuple, kv: torch.Tensor, routing: Records | None = None) -> None:
        """Keep the keys and values kv [2, layers, kv heads, len(key), head dim] of a prompt (and its
        routing records, which nodes without records take)."""
        path, node, at = [], self.root, 0
        while at < len(key):
            child = node.children.get(key[at])
            if child is None:
                break
            n = _common(child.key, key, at, len(key))
            if n < len(child.key):
                child = self._split(child, n)
            if child.routing is None and routing is not None:
                child.routing = _slice(routing, at, at + n)
                self.bytes += child.routing.bytes
            path.append(child)
            node, at = child, at + n
        if at < len(key):
            per_token = kv[..., :1, :].numel() * kv.element_size()
            per_token += routing.bytes // max(len(routing), 1) if routing is not None else 0
            end = min(len(key), at + self.max_bytes // 2 // per_token)  # a prompt larger than the cache: its start
            if end > at:
                leaf = _Node(key[at:end], kv[..., at:end, :].clone(), _slice(routing, at, end), node)
                node.children[key[at]] = leaf
                self.nodes.add(leaf)
                self.bytes += leaf.bytes
                path.append(leaf)
        self._touch(reversed(path))  # the leaf first: a parent is never older than its children
        self._evict()

    def _split(self, node: _Node, n: int) -> _Node:
        """Cut `node` after its first n tokens; returns the new parent (the first n)."""
        head = _Node(node.key[:n], node.kv[..., :n, :].clone(), _slice(node.routing, 0, n), node.parent)
        head.used = node.used
        head.parent.children[head.key[0]] = head
        node.key, node.kv, node.routing = node.key[n:], node.kv[..., n:, :].clone(), _slice(node.routing, n)
        node.parent = head
        head.children[node.key[0]] = node
        self.nodes.add(head)
        return head

    def shrink(self, keep_bytes: int) -> None:
        """Evict least recently used leaves down to `keep_bytes` (an idle CPU server keeps the
        prefix every prompt shares, the template's system prompt, and gives the rest back)."""
        self._evict(keep_bytes)

    def _evict(self, limit: int | None = None) -> None:
        limit = self.max_bytes if limit is None else limit
        while self.bytes > limit and self.nodes:
            leaf = min((n for n in self.nodes if not n.children), key=lambda n: n.used)
            del leaf.parent.children[leaf.key[0]]
            self.nodes.discard(leaf)
            self.bytes -= leaf.bytes
            self.evicted += 1

    def clear(self) -> None:
        self.root.children.clear()
        self.nodes.clear()
        self.bytes = 0

    def check(self, version: int) -> None:
        """Empty the cache when the model's weights have changed since the last check."""
        if self.version is not None and version != self.version:
            self.clear()
        self.version = version

    def stats(self) -> dict:
        return {"nodes": len(self.nodes), "bytes": self.bytes, "max_bytes": self.max_bytes, "lookups": self.lookups,
                "hits": self.hits, "hit_tokens": self.hit_tokens, "evicted": self.evicted}
