"""Inference only: attention layers whose projections that read the same input are one product.

A decode step at batch 1 reads every weight once, and several matrix-vector products over a
layer's input run at a fraction of the bandwidth that one product over their weights stacked
reaches (docs/speed.md: on an H200 the three attention projections run at about half the copy
bandwidth). The modules here own the stacked weights and run the attention themselves, top to
bottom, with transformers' attention functions (`ALL_ATTENTION_FUNCTIONS`, the seam behind
`config._attn_implementation`):

- `FusedAttention` takes the place of a Llama, Qwen2, StableLM or Phi attention module (`self_attn`):
  one `qkv` linear over [W_q; W_k; W_v], then the heads, rotary embedding, cache update, attention
  and output projection as transformers' module runs them (`RotaryAttention`).
- `FusedPhiDecoderLayer` takes the place of a whole Phi decoder layer, `x + attn(ln(x)) + ffn(ln(x))`:
  the FFN's first projection reads ln(x) too, so `input` is one linear over [W_q; W_k; W_v; W_fc1],
  and the attention's output projection and the FFN's second one are one product over the two
  inputs side by side, `output`: `[attn, act(h)] @ [W_dense | W_fc2]^T + (b_dense + b_fc2)`. Six
  products become two. The FFN is the layer's MLP or, in a Med-MoE layer, its meta expert: the
  layer takes it out of the block (a block without a meta expert runs its routed experts alone,
  moe/block.py) and adds the block's output, whose experts start on a second CUDA stream beside
  the attention where the block allows it (engine/overlap.py).

Which module becomes which is a table from transformers' classes to builders (`REPLACEMENTS`); a
module of another class keeps its plain form. `fuse` applies it once (`engine.prepare` calls it)
and `unfuse` puts the very same plain modules back, their projections rebuilt from the stacked
weights. The replacing modules say so (`inference_only`): a prepared model is not saved as it is.

At one row on a GPU (a batch-1 decode step) the stacked products run through a matrix-vector
kernel (`moe/kernels.py: linear`) that reads their weights nearer the copy bandwidth than cuBLAS.
Phi's one-token step with a static or slot cache writes the rotated key and value in one op
(engine/decode_attention.py).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb
from transformers.models.phi.modeling_phi import PhiAttention, PhiDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.stablelm.modeling_stablelm import StableLmAttention

from ..moe import MedMoEBlock, kernels
from ..moe.experts import fast_activation, plain_ffn
from . import decode_attention
from .overlap import OverlappedMoE

# Phi's parallel layer joins its two output products' inputs up to this many tokens (decode steps, small
# prefills) and adds two products above it (FusedPhiDecoderLayer._output_product).
JOIN_MAX_TOKENS = 256


# ----- stacked weights ------------------------------------------------------------------------------

def _stacked_linear(parts: list[nn.Linear], dim: int) -> nn.Linear:
    """One linear over the weights of `parts` stacked along `dim` (0: outputs, 1: inputs); its bias
    is the parts' biases stacked (dim 0) or summed (dim 1); a part without bias adds zeros."""
    weight = torch.cat([p.weight for p in parts], dim)
    ref = parts[0].weight
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=any(p.bias is not None for p in parts),
                       device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            biases = [p.bias for p in parts if p.bias is not None]
            linear.bias.copy_(torch.stack(biases).float().sum(0) if dim == 1 else
                              torch.cat([p.bias if p.bias is not None else ref.new_zeros(p.out_features) for p in parts]))
    return linear


def _split_linear(linear: nn.Module, sizes: list[int], biases: list[torch.Tensor | None], dim: int) -> list[nn.Linear]:
    """The inverse of _stacked_linear: the parts of the weight along `dim`, each with its bias."""
    if type(linear) is not nn.Linear:
        raise RuntimeError(f"the fused product is a {type(linear).__name__} now (quantised?): its parts cannot be put "
                           "back; load the model again instead of engine.unprepare")
    out = []
    for w, b in zip(linear.weight.split(sizes, dim), biases):
        part = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            part.weight.copy_(w)
            if b is not None:
                part.bias.copy_(b)
        out.append(part)
    return out


def _row_biases(linear: nn.Linear, sizes: list[int], had_bias: list[bool]) -> list[torch.Tensor | None]:
    bias = linear.bias.split(sizes) if linear.bias is not None else [None] * len(sizes)
    return [b if had else None for b, had in zip(bias, had_bias)]


def _product(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x): a plain nn.Linear through kernels.linear (its one-row kernel on a GPU); anything
    else (an int8 replacement, serving/quantize.py) as it is."""
    return kernels.linear(x, linear.weight, linear.bias) if type(linear) is nn.Linear else linear(x)


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _inference_only(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} is for inference (its dropout and gradients are not the plain "
                           "layer's): call medmoe.engine.prepare.unprepare(model) before training")


def _cache_argument(cache, kwargs: dict):
    """The layer's KV cache: `cache` since transformers 5.24, `past_key_values` before."""
    return cache if cache is not None else kwargs.pop("past_key_values", None)


# ----- the attention after its projections ----------------------------------------------------------

class RotaryAttention(nn.Module):
    """What a transformers attention module (`attn`) does between its projections: query, key and
    value into heads, the optional per-head norms, the rotary embedding (on the first
    `rotary_ndims` features of each head: all of them for Llama and Qwen2), the cache update and
    the attention function of `config._attn_implementation`. With `one_token_kernel`, a one-token
    step with a static or slot cache rotates and writes in one op (engine/decode_attention.py).
    Passed to the attention function as transformers passes its own module (it reads the
    settings below)."""

    def __init__(self, attn: nn.Module, one_token_kernel: bool = False):
        super().__init__()
        self.config, self.layer_idx = attn.config, attn.layer_idx
        self.head_dim, self.num_key_value_groups = attn.head_dim, attn.num_key_value_groups
        self.scaling, self.attention_dropout, self.is_causal = attn.scaling, attn.attention_dropout, attn.is_causal
        self.rotary_ndims = getattr(attn, "rotary_ndims", attn.head_dim)
        norms = getattr(attn, "qk_layernorm", False)
        self.q_layernorm = attn.q_layernorm if norms else None
        self.k_layernorm = attn.k_layernorm if norms else None
        # Qwen2 hands its layer's window to the attention function (None: full attention)
        self.extra = {"sliding_window": attn.sliding_window} if hasattr(attn, "sliding_window") else {}
        self.eager = sys.modules[type(attn).__module__].eager_attention_forward
        self.one_token_kernel = one_token_kernel and not norms
        if self.one_token_kernel:
            device = attn.q_proj.weight.device
            self.register_buffer("decode_counter", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_embeddings, attention_mask,
                cache=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k, v [B, T, heads * head_dim] (views of one product are fine) -> (attention output
        [B, T, heads * head_dim] before the output projection, attention weights or None)."""
        layer = (decode_attention.one_token_layer(cache, self.layer_idx, q, self.head_dim)
                 if self.one_token_kernel and position_embeddings is not None else None)
        if layer is not None:  # one token per row: rotary embedding and cache write in one op
            query, keys, values = decode_attention.one_token_inputs(layer, q, k, v, position_embeddings,
                                                                    self.decode_counter)
        else:
            query, keys, values = (t.view(*t.shape[:-1], -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
            if self.q_layernorm is not None:
                query, keys = self.q_layernorm(query), self.k_layernorm(keys)
            query, keys = self._rotate(query, keys, *position_embeddings)
            if cache is not None:
                keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)
        impl = self.config._attn_implementation
        attention = self.eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = attention(self, query, keys, values, attention_mask, dropout=0.0, scaling=self.scaling,
                                 **self.extra, **kwargs)
        return out.reshape(*q.shape[:-1], -1).contiguous(), weights

    def _rotate(self, query, keys, cos, sin):
        r = self.rotary_ndims
        if r == self.head_dim:
            return apply_rotary_pos_emb(query, keys, cos, sin)
        query_rot, keys_rot = apply_rotary_pos_emb(query[..., :r], keys[..., :r], cos, sin)
        # Written over the rotated features in place, not joined with the rest in a copy: query and keys
        # are views of this layer's own product, which nothing else reads.
        query[..., :r], keys[..., :r] = query_rot, keys_rot
        return query, keys


# ----- one attention layer --------------------------------------------------------------------------

class FusedAttention(nn.Module):
    """Takes the place of a transformers attention module (`attn`: Llama, Qwen2, StableLM, Phi):
    one `qkv` linear over its stacked query, key and value weights, then its attention
    (`RotaryAttention`) and its own output projection (`o_proj`, Phi's `dense`)."""

    inference_only = True

    def __init__(self, attn: nn.Module, one_token_kernel: bool = False):
        super().__init__()
        parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.sizes = [p.out_features for p in parts]
        self.had_bias = [p.bias is not None for p in parts]
        self.qkv = _stacked_linear(parts, dim=0)
        self.attention = RotaryAttention(attn, one_token_kernel)
        self.out_name = "dense" if hasattr(attn, "dense") else "o_proj"
        self.out = getattr(attn, self.out_name)
        attn.q_proj = attn.k_proj = attn.v_proj = None  # their weights live in qkv now (None keeps their places)
        object.__setattr__(self, "plain", attn)  # not a child: given back by unfused()

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        _inference_only(self)
        cache = _cache_argument(cache, kwargs)
        q, k, v = _product(self.qkv, hidden_states).split(self.sizes, dim=-1)
        out, weights = self.attention(q, k, v, position_embeddings, attention_mask, cache, **kwargs)
        return self.out(out), weights

    def unfused(self) -> nn.Module:
        """The plain attention module this one replaced, its projections rebuilt from `qkv`."""
        attn = self.plain
        attn.q_proj, attn.k_proj, attn.v_proj = _split_linear(self.qkv, self.sizes,
                                                              _row_biases(self.qkv, self.sizes, self.had_bias), dim=0)
        return attn


# ----- Phi's parallel layer -------------------------------------------------------------------------

def _parallel_parts(layer: PhiDecoderLayer) -> tuple[nn.Module, MedMoEBlock | None] | None:
    """(the FFN whose projections join the attention's, the Med-MoE block around it or None) for a
    Phi layer: its MLP, or a Med-MoE block's meta expert when that is apart from the experts (LoRA
    experts read the meta FFN's weights, so those layers keep it); None where it does not fit."""
    attn, mlp = layer.self_attn, layer.mlp
    if type(attn) is not PhiAttention or not _plain(attn.q_proj, attn.k_proj, attn.v_proj, attn.dense):
        return None
    block = mlp if isinstance(mlp, MedMoEBlock) else None
    ffn = mlp.meta if block is not None else mlp
    if ffn is None or (block is not None and getattr(block.experts, "shared", None) is ffn):
        return None
    if plain_ffn(ffn) != "mlp" or not _plain(ffn.fc1, ffn.fc2):
        return None
    return ffn, block


class FusedPhiDecoderLayer(PhiDecoderLayer):
    """Takes the place of a Phi decoder layer, `x + attn(ln(x)) + ffn(ln(x))`, with two products
    instead of six (module docstring). A PhiDecoderLayer to transformers, which records the hidden
    states (`output_hidden_states`) of that class, but built from the plain layer, not a config."""

    inference_only = True

    def __init__(self, layer: PhiDecoderLayer, ffn: nn.Module, block: MedMoEBlock | None,
                 overlap_experts: bool = True, one_token_kernel: bool = False):
        nn.Module.__init__(self)  # PhiDecoderLayer.__init__ would allocate a second set of weights
        attn = layer.self_attn
        inputs = [attn.q_proj, attn.k_proj, attn.v_proj, ffn.fc1]
        self.sizes = [p.out_features for p in inputs]
        self.had_bias = [p.bias is not None for p in inputs]
        self.input_layernorm = layer.input_layernorm
        self.input = _stacked_linear(inputs, dim=0)
        self.attention = RotaryAttention(attn, one_token_kernel)
        self.activation_fn = fast_activation(ffn.activation_fn)  # GELU's tanh form in one kernel
        self.output_sizes = [attn.dense.in_features, ffn.fc2.in_features]
        self.output = _stacked_linear([attn.dense, ffn.fc2], dim=1)
        for name, part in (("dense_bias", attn.dense), ("fc2_bias", ffn.fc2)):  # for unfused(): a sum does not split
            self.register_buffer(name, part.bias.detach().clone() if part.bias is not None else None, persistent=False)
        self.mlp = block  # the routed experts (and their routing records); None in a dense layer
        self.beside = OverlappedMoE(block) if block is not None and overlap_experts else None
        # their weights live here now (None keeps their places among the modules' children)
        attn.q_proj = attn.k_proj = attn.v_proj = attn.dense = ffn.fc1 = ffn.fc2 = None
        if block is not None:
            block.meta = None  # computed in this layer's products
        object.__setattr__(self, "plain", (layer, ffn))  # not children: given back by unfused()

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
        _inference_only(self)
        cache = _cache_argument(cache, kwargs)
        h = self.input_layernorm(hidden_states)
        # q | k | v | fc1 in one product; in a Med-MoE layer the routed experts start first, on a side stream
        started = self.beside.start(h, self.input) if self.beside is not None else None
        routed, product = started if started is not None else (None, _product(self.input, h))
        q, k, v, ffn_in = product.split(self.sizes, dim=-1)
        attn, _ = self.attention(q, k, v, position_embeddings, attention_mask, cache, position_ids=position_ids,
                                 use_cache=use_cache, **kwargs)
        out = self._output_product(attn, self.activation_fn(ffn_in))
        if routed is not None:
            out = self.beside.finish(routed, out, h)  # the main stream waits for the side one here, as late as it can
        elif self.mlp is not None:
            out = out + self.mlp(h)
        return hidden_states + out

    def _output_product(self, attn: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """dense(attn) + fc2(act): one product over the joined inputs for a few tokens (a decode
        step: one launch), two for many (a prefill: joining would copy every token's inputs once
        more), the second added into the first."""
        tokens = attn.numel() // attn.shape[-1]
        if type(self.output) is not nn.Linear or tokens <= JOIN_MAX_TOKENS:
            return _product(self.output, torch.cat([attn, act], dim=-1))
        split = self.output_sizes[0]
        weight = self.output.weight
        out = F.linear(act, weight[:, split:], self.output.bias)
        out.view(tokens, -1).addmm_(attn.reshape(tokens, split), weight[:, :split].t())
        return out

    def unfused(self) -> PhiDecoderLayer:
        """The plain layer this one replaced, its projections rebuilt from `input` and `output`."""
        layer, ffn = self.plain
        attn = layer.self_attn
        attn.q_proj, attn.k_proj, attn.v_proj, ffn.fc1 = _split_linear(
            self.input, self.sizes, _row_biases(self.input, self.sizes, self.had_bias), dim=0)
        attn.dense, ffn.fc2 = _split_linear(self.output, self.output_sizes, [self.dense_bias, self.fc2_bias], dim=1)
        if self.mlp is not None:
            self.mlp.meta = ffn
        return layer


# ----- which module becomes which -------------------------------------------------------------------

def _attention(attn: nn.Module, parallel: bool, overlap_experts: bool, one_token_kernel: bool):
    if not _plain(attn.q_proj, attn.k_proj, attn.v_proj):  # LoRA-wrapped or quantised: left alone
        return None
    return FusedAttention(attn, one_token_kernel=one_token_kernel and type(attn) is PhiAttention)


def _phi_layer(layer: PhiDecoderLayer, parallel: bool, overlap_experts: bool, one_token_kernel: bool):
    parts = _parallel_parts(layer) if parallel else None
    if parts is None:
        return None  # its attention alone, below
    return FusedPhiDecoderLayer(layer, *parts, overlap_experts=overlap_experts, one_token_kernel=one_token_kernel)


# transformers' class -> builder(module, parallel, overlap_experts, one_token_kernel) -> its
# replacement, or None to keep the module (and look at its children). Exact classes: a subclass
# may compute something else.
REPLACEMENTS = {
    PhiDecoderLayer: _phi_layer,
    LlamaAttention: _attention,
    Qwen2Attention: _attention,
    StableLmAttention: _attention,
    PhiAttention: _attention,
}

FUSED = (FusedAttention, FusedPhiDecoderLayer)


def _replace(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    # transformers records hidden states and attention weights by forward hooks on its layers,
    # installed on first use: the module put in place keeps those its predecessor had
    for hook in old._forward_hooks.values():
        if hook not in new._forward_hooks.values():
            new.register_forward_hook(hook)
    new.train(old.training)
    setattr(parent, name, new)


def fuse(model: nn.Module, parallel: bool = True, overlap_experts: bool = True, one_token_kernel: bool = False) -> int:
    """Replace every module of `model` that REPLACEMENTS knows by its fused form, once: attention
    modules with plain q/k/v linears (LoRA-wrapped or quantised ones are left alone) and, with
    `parallel`, Phi's parallel layers whole (their Med-MoE experts beside the attention unless not
    `overlap_experts`); `one_token_kernel`: Phi's one-token step by engine/decode_attention.py's op.
    Returns how many attention layers were fused."""
    count = 0
    for name, child in list(model.named_children()):
        build = REPLACEMENTS.get(type(child))
        new = build(child, parallel, overlap_experts, one_token_kernel) if build is not None else None
        if new is not None:
            _replace(model, name, child, new)
            count += 1
        else:
            count += fuse(child, parallel, overlap_experts, one_token_kernel)
    return count


def unfuse(model: nn.Module) -> int:
    """Undo `fuse`: the plain modules back, with their own weights; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, FUSED):
            _replace(model, name, child, child.unfused())
            count += 1
        else:
            count += unfuse(child)
    return count


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FUSED) for m in model.modules())


def count_parallel(model: nn.Module) -> int:
    """How many Phi layers run their FFN projections fused with the attention's."""
    return sum(isinstance(m, FusedPhiDecoderLayer) for m in model.modules())


def count_overlapped(model: nn.Module) -> int:
    """How many Med-MoE blocks start their experts beside the attention."""
    return sum(isinstance(m, FusedPhiDecoderLayer) and m.beside is not None for m in model.modules())


def count_one_token(model: nn.Module) -> int:
    """How many fused attention layers run Phi's one-token step by the rotary-and-cache-write op."""
    return sum(isinstance(m, RotaryAttention) and m.one_token_kernel for m in model.modules())
