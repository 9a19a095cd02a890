"""The Med-MoE model: vision tower -> projector -> image tokens spliced into the prompt -> causal LM
whose chosen FFN blocks are Med-MoE blocks. The whole forward pass is in `forward` below."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from ..adapters import DEFAULT_TARGETS, add_lora, merge_lora
from ..config import MedMoEConfig, MoEConfig, RuntimeOptions
from ..data.templates import IGNORE_INDEX
from ..errors import CheckpointError, ConfigError
from ..moe import LayerRouting, MedMoEBlock, MoEState, Router, decoder_layers, upcycle_llm
from ..moe.experts import ffn_forward, plain_ffn, use_fused_activations
from ..moe.router import router_feature
from ..moe.upcycle import ffn_attribute
from ..projector import build_projector
from ..vision import build_vision_tower
from .recompute import checkpoint_kwargs

WEIGHTS_NAME = "model.safetensors"

# Folders in formats other than our own (an official checkpoint, a delta on pretrained base
# weights), by name: (recognise(path) -> bool, load(path, dtype=, device=, **kwargs) -> model).
# medmoe.loading registers them: it sits above both this model and the conversion code.
FOLDER_FORMATS: dict[str, tuple[Callable[[str], bool], Callable[..., torch.nn.Module]]] = {}


def register_folder_format(name: str, recognise: Callable[[str], bool], load: Callable[..., torch.nn.Module]) -> None:
    """`MedMoEForCausalLM.from_pretrained(path)` hands a folder that `recognise` accepts to `load`."""
    FOLDER_FORMATS[name] = (recognise, load)


def prepared_for_inference(model: torch.nn.Module) -> bool:
    """Whether an engine replaced modules of `model` for inference: they say so with a true
    `inference_only` attribute, and the state dict is then not the one from_pretrained reads."""
    return any(getattr(m, "inference_only", False) for m in model.modules())


@dataclass
class MedMoEOutput(ModelOutput):
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, what training minimises
    lm_loss: torch.Tensor | None = None  # cross-entropy on answer tokens
    aux_loss: torch.Tensor | None = None  # weighted load-balancing + z-loss of all MoE layers
    logits: torch.Tensor | None = None
    cache: object | None = None  # the KV cache to pass back as `cache` for the next token
    routing: list[LayerRouting] | None = None  # per MoE layer, when output_routing=True


def cache_argument(lm: torch.nn.Module) -> str:
    """The name under which this transformers model takes its KV cache: `cache` since transformers
    5.24, `past_key_values` before (and still in remote code)."""
    return _cache_argument_of(type(lm))


@functools.cache  # once per model class: forward calls this for every generated token
def _cache_argument_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a transformers output, under either name (see `cache_argument`)."""
    fields = getattr(out, "__dataclass_fields__", {})
    return out.cache if "cache" in fields else getattr(out, "past_key_values", None)


def place(model: torch.nn.Module, dtype: torch.dtype | str | None, device) -> torch.nn.Module:
    """Move a loaded model to `dtype` ("auto"/None: keep) and `device`, in eval mode."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (answer) positions only."""
    rows, cols, targets = labelled_positions(labels)
    if rows.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][rows, cols].float(), targets)


def labelled_positions_loss(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """`causal_lm_loss` with the output layer applied only to positions that predict a label."""
    rows, cols, targets = labelled_positions(labels)
    if rows.numel() == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(head(hidden[:, :-1][rows, cols]).float(), targets)


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, targets) of the positions that predict a label, in row-major order: what
    indexing by the boolean mask selects, for one host sync (sizing the selection) instead of three."""
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, targets[rows, cols]


class MedMoEForCausalLM(PreTrainedModel):
    config_class = MedMoEConfig
    base_model_prefix = "medmoe"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MedMoEBlock"]

    def __init__(self, config: MedMoEConfig, language_model: PreTrainedModel | None = None,
                 vision_tower: torch.nn.Module | None = None, load_vision_weights: bool = False):
        super().__init__(config)
        self.vision_tower = vision_tower or build_vision_tower(config.vision_config, load_weights=load_vision_weights)
        config.vision["hidden_size"] = self.vision_tower.hidden_size
        config.vision["num_tokens"] = self.vision_tower.num_tokens
        # An hf tower loaded from a folder records its architecture, so from_pretrained can rebuild it.
        tower_cfg = getattr(self.vision_tower, "cfg", None)
        config.vision["model_config"] = getattr(tower_cfg, "model_config", config.vision.get("model_config"))
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.llm_config())
        use_fused_activations(self.language_model)  # Phi's gelu_new: 8 kernels -> 1, the same function
        self.projector = build_projector(config.projector, self.vision_tower.hidden_size, config.hidden_size)
        if config.llm_lora:
            add_lora(self.language_model, **config.llm_lora)
        self.moe_state = MoEState()
        self.router: Router | None = None
        self.moe_blocks: list[MedMoEBlock] = []
        if config.moe_config.enabled:
            self._install_moe(config.moe_config)

    # ----- Med-MoE -------------------------------------------------------------------------
    def _install_moe(self, moe: MoEConfig) -> None:
        device = self.language_model.get_input_embeddings().weight.device
        if moe.router_sharing == "shared":
            self.router = Router(self.config.hidden_size, moe.num_experts).to(device)
        self.moe_blocks = upcycle_llm(self.language_model, moe, self.moe_state, self.router)

    def upcycle(self, moe: MoEConfig | dict | None = None) -> "MedMoEForCausalLM":
        """Turn this dense model into Med-MoE in place: FFNs copied into experts, kept as meta expert."""
        if self.moe_blocks:
            raise ConfigError("this model is already a Med-MoE model; upcycle the dense (phase-2) model")
        moe = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe)
        moe = dataclasses.replace(moe, enabled=True)
        self.config.moe = dataclasses.asdict(moe)
        self._install_moe(moe)
        return self

    def set_dispatch(self, mode: str) -> None:
        """How tokens reach their experts: "auto", "loop" or "grouped" (config.RuntimeOptions). A
        speed choice with the same result, so it is not saved with the model."""
        RuntimeOptions(dispatch=mode)  # ConfigError naming the choices
        for block in self.moe_blocks:
            if hasattr(block.experts, "dispatch_mode"):  # stacked experts; LoRA and generic ones loop
                block.experts.dispatch_mode = mode

    def add_llm_lora(self, rank: int, alpha: float, targets=DEFAULT_TARGETS) -> list[str]:
        """LoRA adapters on the LLM's linear layers (compact fine-tuning); recorded in the config."""
        if self.config.llm_lora:
            raise ConfigError("the LLM already has LoRA adapters")
        self.config.llm_lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
        return add_lora(self.language_model, rank, alpha, targets)

    def merge_llm_lora(self) -> int:
        """Fold the LLM's LoRA adapters into its weights (faster inference); the model becomes a
        plain one, and its config says so (it saves and loads as full weights)."""
        merged = merge_lora(self.language_model)
        self.config.llm_lora = None
        return merged

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_blocks)

    # ----- inputs ----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> image tokens [n, num_tokens, d]."""
        features = self.vision_tower(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(proj_dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_tokens: torch.Tensor | None = None,
                     image_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every `<image>` position filled by image tokens, in order.
        `image_tokens` [n, num_tokens, d]: already encoded images (`encode_images`), e.g. one image
        scored against several answers, instead of `pixel_values`. `image_positions`: the flat
        indices of the `<image>` positions, where the caller found them on the host (the inference
        engine), so that nothing is read back from the device."""
        embed = self.language_model.get_input_embeddings()
        image_id = self.config.image_token_id
        is_image = input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        embeds = embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is None and image_tokens is None:
            return embeds
        tokens = image_tokens
        if tokens is None:
            tower_dtype = next(self.vision_tower.parameters()).dtype
            tokens = self.encode_images(pixel_values.to(self.device, tower_dtype))
        found = int(is_image.sum()) if image_positions is None else image_positions.numel()
        expected = tokens.shape[0] * tokens.shape[1]
        if found != expected:
            raise ValueError(f"{found} image-token positions in input_ids but {tokens.shape[0]} images x "
                             f"{tokens.shape[1]} tokens = {expected}; build inputs with MedMoEProcessor")
        tokens = tokens.to(embeds.dtype).reshape(-1, embeds.shape[-1])
        if image_positions is None:
            return embeds.masked_scatter(is_image.unsqueeze(-1), tokens)
        flat = embeds.reshape(-1, embeds.shape[-1])
        return flat.index_copy(0, image_positions.to(flat.device, non_blocking=True), tokens).view_as(embeds)

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache=None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_routing: bool = False, return_logits: bool = True, prompt_mask: torch.Tensor | None = None,
                **kwargs) -> MedMoEOutput:
        """`return_logits=False` (training): the output layer runs only where there are labels, which
        saves the [batch, length, vocab] logits; `logits` is then None.
        `prompt_mask` [B, S]: the prompt's positions, the only ones per-sample routing pools (by
        default the positions without labels), so that an answer never chooses its own expert.
        `cache`: a transformers Cache (`past_key_values=` is accepted too, the name before 5.24)."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if use_cache is None and cache is None and labels is not None:
            use_cache = False  # a loss needs no KV cache; building one copies every layer's keys and values
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        new_sequence = cache is None or cache.get_seq_length() == 0
        if prompt_mask is None and labels is not None:
            prompt_mask = labels.eq(IGNORE_INDEX)
        pool_mask = attention_mask
        if prompt_mask is not None and (attention_mask is None or attention_mask.dim() == 2):
            pool_mask = prompt_mask.long() if attention_mask is None else attention_mask * prompt_mask
        self.moe_state.start(pool_mask, output_routing, new_sequence)
        if new_sequence:
            self.route_by_prompt(inputs_embeds, attention_mask, pool_mask, position_ids)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                  cache_argument(self.language_model): cache, "use_cache": use_cache, **kwargs}
        logits = lm_loss = aux_loss = loss = None
        if labels is not None and not return_logits:
            out = self.language_model.get_decoder()(**inputs)
            lm_loss = labelled_positions_loss(out.last_hidden_state, labels, self.language_model.get_output_embeddings())
        else:
            out = self.language_model(**inputs)
            logits = out.logits
            if labels is not None:
                lm_loss = causal_lm_loss(logits, labels)
        if labels is not None:
            aux_losses = self.moe_state.aux_losses
            aux_loss = torch.stack(aux_losses).sum() if aux_losses else lm_loss.new_zeros(())
            loss = lm_loss + aux_loss
        return MedMoEOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=logits,
                            cache=output_cache(out),
                            routing=list(self.moe_state.routing) if output_routing else None)

    def route_by_prompt(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                        pool_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """routing="pooled" (otherwise nothing to do): choose each sample's expert once, for every
        MoE layer, from the feature the router was trained on (training/router.py): the mean over
        all layers' hidden states and the prompt's positions, from a pass through the meta experts
        alone (the dense phase-2 model the router saw). Returns the [B, E] probabilities, kept in
        the MoE state for the real pass and for decoding."""
        if not self.is_moe or self.config.moe.get("routing") != "pooled":
            return None
        state = self.moe_state
        state.meta_only = True
        try:
            with torch.no_grad():
                hidden = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             position_ids=position_ids, use_cache=False, output_hidden_states=True,
                                             logits_to_keep=1).hidden_states
        finally:
            state.meta_only = False
        mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device) if pool_mask is None else pool_mask
        # Outside no_grad: with phase3.train_router the router still learns.
        probs = self.router(router_feature(hidden, mask.to(inputs_embeds.device))).softmax(-1)
        state.sample_probs = {block.layer_idx: probs for block in self.moe_blocks}
        return probs

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every: int = 1,
                                      selective: bool = False, activations: bool = False):
        """Recompute the LM's layer activations in backward, in every `every`-th decoder layer
        (1: all of them; 2: every other one, which recomputes half as much and keeps more
        activations). `selective`: keep the matrix products' and attention's outputs and recompute
        only the cheap ops between them (model/recompute.py). `activations`: checkpoint no layer;
        every FFN (dense, expert, meta expert) recomputes its activation's output, the widest
        tensor it keeps, in backward (moe/recompute.py; LoRA experts excepted).
        transformers 5.24 renamed this "activation checkpointing"; either name works."""
        # One way at a time: inside a checkpointed layer, recomputation would keep what checkpointing frees.
        self.gradient_checkpointing_disable()
        if activations:
            self._recompute_activations(True)
            return
        lm = self.language_model
        kwargs = {**checkpoint_kwargs(selective), **(gradient_checkpointing_kwargs or {})}
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if every > 1:
            for i, layer in enumerate(decoder_layers(lm)):
                layer.gradient_checkpointing = i % every == 0

    def gradient_checkpointing_disable(self):
        self._recompute_activations(False)
        lm = self.language_model
        if hasattr(lm, "activation_checkpointing_disable"):
            lm.activation_checkpointing_disable()
        else:
            lm.gradient_checkpointing_disable()

    def _recompute_activations(self, on: bool) -> None:
        for layer in decoder_layers(self.language_model):
            ffn = getattr(layer, ffn_attribute(layer))
            if isinstance(ffn, MedMoEBlock):
                ffn.recompute_activations = on
                if hasattr(ffn.experts, "recompute_activations"):
                    ffn.experts.recompute_activations = on
            elif plain_ffn(ffn) is not None:
                # A dense FFN runs as ffn_forward while this is on (an instance attribute, removed after).
                if on:
                    ffn.forward = functools.partial(ffn_forward, ffn, recompute=True)
                else:
                    ffn.__dict__.pop("forward", None)

    # ----- save / load (safetensors + config.json) ---------------------------------------------
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if prepared_for_inference(self):
            raise ConfigError("this model was prepared for inference (medmoe.engine.prepare): call "
                              "medmoe.engine.prepare.unprepare(model) before saving, or save the model as loaded")
        os.makedirs(save_directory, exist_ok=True)
        source = self.config.vision.get("name_or_path")
        if source and os.path.isabs(source):  # a saved model must not point into one machine's folders
            self.config.vision["name_or_path"] = os.path.basename(source.rstrip("/"))
        self.config.save_pretrained(save_directory)
        final = os.path.join(save_directory, WEIGHTS_NAME)
        tmp = final + ".tmp"
        save_model(self, tmp, metadata={"format": "pt"})
        os.replace(tmp, final)  # atomic: a crash never leaves a half-written weights file

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args, config: MedMoEConfig | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        **kwargs) -> "MedMoEForCausalLM":
        path = str(pretrained_model_name_or_path)
        for recognise, load in FOLDER_FORMATS.values():  # an official checkpoint, a delta (medmoe.loading)
            if recognise(path):
                return load(path, dtype=dtype, device=device, **kwargs)
        config = config or (MedMoEConfig.from_pretrained(path) if os.path.isfile(os.path.join(path, "config.json")) else None)
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{weights} not found: a Med-MoE model folder holds config.json and {WEIGHTS_NAME} "
                                  "(made by save_pretrained or `medmoe train`)")
        model = cls(config)
        missing, unexpected = load_model(model, weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{weights} does not match its config.json: missing {sorted(missing)[:10]}, "
                                  f"unexpected {sorted(unexpected)[:10]}")
        return place(model, dtype, device)


AutoConfig.register("medmoe", MedMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MedMoEConfig, MedMoEForCausalLM, exist_ok=True)
