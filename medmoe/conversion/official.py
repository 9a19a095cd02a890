"""Official Med-MoE and MoE-LLaVA checkpoints -> our model, without DeepSpeed.

Both releases share one layout (MoE-LLaVA's code base, LLaVA-style names, prefix `model.`):

    model.layers.{i}.mlp.deepspeed_moe.gate.wg.{weight,bias}                     router (Med-MoE: with bias)
    model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.<ffn>      domain expert j
    model.layers.{i}.mlp.meta_moe.<ffn>                                          meta expert (Med-MoE only)
    model.mm_projector.image_spatial_proj.{0,2}.{weight,bias}                    mlp2x_gelu projector
    model.image_tower.image_tower.vision_model.<CLIP>                            vision tower (when saved)
    model.<the LLM's own names>, lm_head.weight                                  everything else

<ffn> is `fc1`, `fc2` for Phi and `gate_proj`, `up_proj`, `down_proj` for StableLM. config.json is the
LLM's config plus a `moe` dict (moe_enable, moe_layers_idx, num_experts [per layer], top_k_experts,
capacity_factor, use_residual, router_aux_loss_coef, ...) and LLaVA keys (mm_image_tower: a path on
the authors' machine, mm_vision_select_layer, image_projector_type, ...).

What the official forward computes, and we reproduce (tests/test_convert.py checks logits):
- top-1 (Med-MoE): p = softmax(wg(x)) in fp32, y = p_top1 * E_top1(x) + meta(x), not renormalised.
- top-2 (MoE-LLaVA, DeepSpeed top2gating): y = (p1 E1(x) + p2 E2(x)) / (p1 + p2). DeepSpeed picks the
  second expert with Gumbel noise even at inference; we take the noise-free second choice, so answers
  are deterministic.
- capacity: Med-MoE never drops tokens; MoE-LLaVA's DeepSpeed gate can (eval_capacity_factor). We drop
  none unless asked (drop_tokens_like_official: moe.capacity_factor_at_inference), and warn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from ..config import MedMoEConfig
from ..errors import CheckpointError, ConfigError
from ..files import folder_config
from ..model.presets import CLIP_L14_336
from .files import load_folder

PHI_TYPES = ("phi", "llava_phi", "moe_llava_phi")
STABLELM_TYPES = ("stablelm", "stablelm_epoch", "llava_stablelm", "moe_llava_stablelm")
FFN_PARAMS = {"phi": ("fc1", "fc2"), "stablelm": ("gate_proj", "up_proj", "down_proj")}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KNOWN_TOWERS = {"clip-vit-large-patch14-336": CLIP_L14_336["model_config"],
                "clip-vit-large-patch14": {**CLIP_L14_336["model_config"], "image_size": 224}}

# Conversation modes (moellava/conversation.py): all USER/ASSISTANT ones are our "medmoe" template.
CONV_MODES = {"phi": "medmoe", "stablelm": "medmoe", "qwen": "medmoe", "v1": "medmoe", "vicuna_v1": "medmoe",
              "llava_v1": "medmoe", "minicpm": "medmoe", "openchat": "medmoe", "mistral": "medmoe",
              "plain": "plain", "v0_plain": "plain"}

VISION_PREFIXES = ("model.image_tower.image_tower.", "model.vision_tower.vision_tower.")
PROJECTOR_PREFIXES = ("model.mm_projector.image_spatial_proj.", "model.mm_projector.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
HF_BOOKKEEPING = {"architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
                  "auto_map"}
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq", "position_ids")  # old checkpoints saved these; they are recomputed


def is_official_config(cfg: dict) -> bool:
    """An official (MoE-LLaVA code base) config.json: a `moe` dict with `moe_enable`, or `mm_image_tower`."""
    moe = cfg.get("moe")
    return (isinstance(moe, dict) and "moe_enable" in moe) or "mm_image_tower" in cfg


@dataclass
class Report:
    """What a conversion did, for the CLI summary and for tests."""

    layout: str = "dense"  # "medmoe" (top-k + meta expert), "moe-llava" (top-k, no meta), "dense" (stage 2)
    llm: str = ""
    num_layers: int = 0
    moe_layers: list[int] = field(default_factory=list)
    num_experts: int = 0
    top_k: int = 0
    meta_expert: bool = False
    router: str = ""
    mapped: dict[str, int] = field(default_factory=dict)  # category -> number of official tensors mapped
    filled: list[str] = field(default_factory=list)  # our tensors the official model does not have (zeros, exact)
    dropped: list[str] = field(default_factory=list)  # official tensors recomputed or unused, by name
    ignored_config: list[str] = field(default_factory=list)  # official config keys with no meaning for us
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the converted model can answer differently from the official

    def count(self, category: str, n: int = 1) -> None:
        self.mapped[category] = self.mapped.get(category, 0) + n


# ----- reading ---------------------------------------------------------------------------------
def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json; an official checkpoint folder holds config.json and its weights")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def llm_family(cfg: dict) -> str:
    kind = str(cfg.get("model_type", ""))
    if kind in PHI_TYPES or "phi" in kind:
        return "phi"
    if kind in STABLELM_TYPES or "stablelm" in kind:
        return "stablelm"
    raise ConfigError(f"config.json model_type {kind!r}: medmoe converts Phi ({', '.join(PHI_TYPES)}) and StableLM "
                      f"({', '.join(STABLELM_TYPES)}) checkpoints")


# ----- config ----------------------------------------------------------------------------------
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rope_theta",
             "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout")
PHI_KEYS = ("layer_norm_eps", "partial_rotary_factor", "qk_layernorm", "resid_pdrop", "embd_pdrop")
STABLELM_KEYS = ("layer_norm_eps", "partial_rotary_factor", "use_qkv_bias", "qk_layernorm", "use_parallel_residual",
                 "hidden_dropout")
PHI_MSFT = ("this is the old Phi-2 remote-code layout (phi-msft: `transformer.h.*.mixer.Wqkv`); convert it to the "
            "transformers Phi layout first (transformers' models/phi/convert_phi_weights_to_hf.py), then convert that")
RENAMED = {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}  # StableLM-epoch remote code names


def text_config(cfg: dict, family: str) -> dict:
    """Their LLM config keys -> a transformers PhiConfig / StableLmConfig dict."""
    if cfg.get("rope_scaling"):
        raise ConfigError(f"config.json rope_scaling={cfg['rope_scaling']!r} is not supported by the converter")
    if cfg.get("model_type") == "phi-msft" or "n_embd" in cfg:
        raise ConfigError(PHI_MSFT)
    keys = TEXT_KEYS + (PHI_KEYS if family == "phi" else STABLELM_KEYS)
    out = {"model_type": family}
    for key, value in cfg.items():
        key = RENAMED.get(key, key)
        if key in keys and value is not None:
            out[key] = value
    lacking = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers") if k not in out]
    if lacking:
        raise ConfigError(f"config.json lacks {', '.join(lacking)}: an official checkpoint's config.json holds the LLM's config")
    return out


def moe_settings(cfg: dict, state: dict, num_layers: int, report: Report, drop_tokens: bool = False) -> dict:
    """The official `moe` dict (plus what the weights show) -> our MoEConfig dict."""
    moe = cfg.get("moe") or {}
    if not moe.get("moe_enable", False):
        return {"enabled": False}
    if moe.get("use_residual"):
        raise ConfigError("config.json moe.use_residual=true (DeepSpeed residual MoE, `mlp.coefficient`) is not supported")
    layers = moe.get("moe_layers_idx")
    if layers is None:
        mode = moe.get("moe_mode", "sparse")
        modes = {"sparse": list(range(0, num_layers, 2)), "dense": list(range(num_layers)),
                 "first_half": list(range(num_layers // 2)), "second_half": list(range(num_layers // 2, num_layers))}
        if mode not in modes:
            raise ConfigError(f"config.json moe.moe_mode={mode!r} without moe_layers_idx; expected one of {sorted(modes)}")
        layers = modes[mode]
    layers = sorted(int(i) for i in layers)
    counts = moe.get("num_experts", 4)
    counts = list(counts) if isinstance(counts, (list, tuple)) else [counts] * len(layers)
    if len(set(counts)) != 1:
        raise ConfigError(f"config.json moe.num_experts={counts}: medmoe needs the same number of experts in every layer")
    top_k = moe.get("top_k_experts", 1)
    if isinstance(top_k, bool) or top_k not in (1, 2):  # DeepSpeed's TopKGate: "Only top-1 and top-2 gatings"
        raise ConfigError(f"config.json moe.top_k_experts={top_k!r}: the official gate (DeepSpeed TopKGate) "
                          "supports only 1 or 2; this checkpoint cannot come from it")
    top_k = int(top_k)
    meta = any(".mlp.meta_moe." in k for k in state)
    known = {"moe_enable", "moe_mode", "moe_layers_idx", "num_experts", "top_k_experts", "use_residual",
             "router_aux_loss_coef", "eval_capacity_factor", "min_capacity"}
    report.ignored_config += [f"moe.{k}" for k in moe if k not in known]  # capacity_factor, ep_size, train_modules
    out = {"enabled": True, "layers": layers, "num_experts": int(counts[0]), "top_k": top_k, "meta_expert": meta,
           # DeepSpeed's top2gating divides by p1 + p2; top-1 (Med-MoE) keeps the raw softmax probability
           "renormalize": top_k == 2, "router_sharing": "shared",
           "aux_loss_coef": float(moe.get("router_aux_loss_coef", 0.0) or 0.0)}
    return {**out, **inference_capacity(moe, top_k, int(counts[0]), meta, drop_tokens, report)}


def inference_capacity(moe: dict, top_k: int, num_experts: int, meta: bool, drop_tokens: bool, report: Report) -> dict:
    """DeepSpeed's capacity at inference, as the official code sets it up.

    Med-MoE's model class hard-codes capacity factor 4 and drop_tokens=False whatever config.json
    says: it never drops a token. MoE-LLaVA's passes config.json's eval_capacity_factor and
    min_capacity to DeepSpeed, which drops tokens once an expert gets more than
    ceil(k * tokens / experts * factor) of a forward's tokens: possible whenever k * factor < experts.
    """
    if meta:
        if drop_tokens:
            report.notes.append("Med-MoE's code never drops tokens (capacity factor 4 and drop_tokens=False, whatever "
                                "config.json says): --drop-tokens-like-official changes nothing")
        return {}
    factor = float(moe.get("eval_capacity_factor", 1.0))  # MoELLaVAConfig's defaults
    min_capacity = int(moe.get("min_capacity", 4))
    if drop_tokens:
        report.notes.append(f"tokens over capacity are dropped as in the official gate: eval_capacity_factor {factor}, "
                            f"min_capacity {min_capacity} (moe.capacity_factor_at_inference)")
        return {"capacity_factor_at_inference": factor, "min_capacity_at_inference": min_capacity}
    if top_k * factor < num_experts:
        report.warnings.append(
            f"the official gate drops tokens at inference here (moe.eval_capacity_factor {factor} x top-{top_k} < "
            f"{num_experts} experts: an expert takes at most ceil({top_k} x tokens / {num_experts} x {factor}) of a "
            "forward's tokens); this conversion drops none, so answers can differ from the official ones. "
            "--drop-tokens-like-official reproduces the dropping")
    return {}


def chat_template(cfg: dict, report: Report) -> str:
    mode = cfg.get("conv_mode") or cfg.get("conv_template")
    if mode is None:
        return "medmoe"  # their Phi and StableLM modes are both `{system} USER: ... ASSISTANT: ...<|endoftext|>`
    if mode not in CONV_MODES:
        report.notes.append(f"conversation mode {mode!r} has no medmoe template; using 'medmoe' (USER/ASSISTANT)")
    return CONV_MODES.get(mode, "medmoe")


def tower_name(path: str | None) -> str | None:
    """'/mnt/authors/ckpt/openai/clip-vit-large-patch14-336' -> 'openai/clip-vit-large-patch14-336'."""
    if not path:
        return None
    base = os.path.basename(os.path.normpath(str(path)))
    return f"openai/{base}" if base.startswith("clip-vit") else base


# ----- vision tower ------------------------------------------------------------------------------
def clip_name(key: str) -> str:
    """A CLIP vision tensor's name without its wrappers: `embeddings...`, `encoder.layers...`."""
    return key[key.index("vision_model.") + len("vision_model."):] if "vision_model." in key else key


def split_vision(state: dict) -> dict:
    """Pop the vision tower's tensors out of `state`, renamed by `clip_name`."""
    out = {}
    for key in [k for k in state if k.startswith(VISION_PREFIXES)]:
        prefix = next(p for p in VISION_PREFIXES if key.startswith(p))
        out[clip_name(key[len(prefix):])] = state.pop(key)
    return out


TOWER_KEYS = ("mm_image_tower", "image_tower", "mm_vision_tower")  # MoE-LLaVA's name first, then LLaVA's


def tower_path_in(cfg: dict) -> str | None:
    """The CLIP path config.json names (an absolute path on the authors' machine, usually)."""
    return next((str(cfg[k]) for k in TOWER_KEYS if cfg.get(k)), None)


def local_tower(path: str, source: str = "--vision-tower") -> tuple[dict, dict, dict]:
    """(vision model_config, CLIP vision weights, preprocessing) from a local CLIP folder.
    The weights are empty when the folder holds a config only."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{source} {path}: not a folder (expected a local CLIP folder with config.json and weights)")
    cfg = read_config(path)
    if "vision_config" in cfg:
        cfg = {**cfg["vision_config"], "model_type": f"{cfg.get('model_type', 'clip')}_vision_model"}
    weights = {}
    # The folder config.json names may hold the config alone: then the checkpoint's CLIP weights are used.
    config_only = source != "--vision-tower" and not any(n.endswith((".safetensors", ".bin")) for n in os.listdir(path))
    files = {} if config_only else load_folder(path)
    for key, value in files.items():
        if "vision_model." in key or key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
            weights[clip_name(key)] = value  # a CLIPModel's text tower and projections are not ours
    if files and not weights:
        raise CheckpointError(f"{source} {path}: its weights hold no CLIP vision tensors (vision_model.*)")
    pre = {}
    pre_path = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        with open(pre_path) as f:
            pre = json.load(f)
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "num_channels", "projection_dim")
    return {k: v for k, v in cfg.items() if k in keep}, weights, pre


def vision_settings(cfg: dict, vision: dict, tower_path: str | None, report: Report) -> tuple[dict, dict]:
    """Our VisionConfig dict and the CLIP weights to load into it.

    The CLIP config comes from --vision-tower; else, as in the official code (CLIPVisionTower
    loads config and weights from exactly the path config.json names), from that folder when it
    exists here; else from the two known OpenAI CLIPs. Any other tower is refused: its head count
    cannot be read from weight shapes, and a wrong one changes the image features silently.
    """
    named = tower_path_in(cfg)
    name = tower_name(named)
    pre = {}
    if tower_path is None and named and os.path.isdir(named):
        model_config, weights, pre = local_tower(named, source=f"config.json {TOWER_KEYS[0]}")
        if weights:
            if vision:
                report.dropped.append(f"{len(vision)} vision-tower tensors of the checkpoint (the official code loads "
                                      f"the CLIP weights from {named}, as we do)")
            vision = weights
        elif not vision:
            raise CheckpointError(f"neither the checkpoint nor {named} (config.json's {TOWER_KEYS[0]}) holds CLIP weights: "
                                  "pass --vision-tower PATH (vision_tower=PATH in Python) with a local copy of the CLIP "
                                  "model (config.json + weights)")
        report.notes.append(f"vision tower config read from {named} (config.json's {TOWER_KEYS[0]}, found here)")
    elif tower_path is not None:
        if vision:
            report.dropped.append(f"{len(vision)} vision-tower tensors of the checkpoint (replaced by --vision-tower {tower_path})")
        model_config, vision, pre = local_tower(tower_path)
        name = name or os.path.basename(os.path.normpath(tower_path))
    elif not vision:
        where = (f"config.json names {named!r}, a folder that is not on this machine" if named
                 else "config.json names no vision tower (mm_image_tower)")
        raise CheckpointError(
            f"the checkpoint holds no vision-tower weights (model.image_tower.*) and {where}. Pass --vision-tower PATH "
            f"(vision_tower=PATH in Python) with a local copy of {name or 'its CLIP model'} (config.json + weights).")
    elif name and name.split("/")[-1] in KNOWN_TOWERS:
        model_config = dict(KNOWN_TOWERS[name.split("/")[-1]])
    else:
        raise CheckpointError(
            f"config.json's vision tower {named!r} is neither a CLIP medmoe knows ({', '.join(KNOWN_TOWERS)}) nor a "
            "folder on this machine, and its config (head count) cannot be read from the weights: pass "
            f"--vision-tower PATH (vision_tower=PATH in Python) with a local copy of {name or 'it'} (config.json + weights)")
    mean = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(pre.get("image_std", OPENAI_CLIP_STD))
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"config.json mm_vision_select_feature={select!r}: expected 'patch' or 'cls_patch'")
    settings = dict(kind="hf", name_or_path=name, model_config=model_config,
                    feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
                    select="patch" if select == "patch" else "all", image_size=int(model_config["image_size"]),
                    hidden_size=int(model_config["hidden_size"]), image_mean=mean, image_std=std)
    if cfg.get("image_aspect_ratio", "pad") != "pad":
        report.notes.append(f"image_aspect_ratio={cfg['image_aspect_ratio']!r}: medmoe always pads to square")
    return settings, vision


def projector_kind(cfg: dict) -> str:
    kind = cfg.get("image_projector_type") or cfg.get("mm_projector_type") or "linear"
    if kind not in ("linear", "mlp2x_gelu"):
        raise ConfigError(f"config.json image_projector_type={kind!r}: medmoe supports 'linear' and 'mlp2x_gelu'")
    return kind


# ----- state dict ----------------------------------------------------------------------------------
def _stack_experts(tensors: dict, family: str, layer: int, num: int, hidden: int, ffn: int) -> dict[str, torch.Tensor]:
    """Per-expert nn.Linear weights -> our stacked [E, ...] input-major tensors (x @ w).

    Every tensor's shape is checked against config.json's hidden_size / intermediate_size first,
    so a wrong-shaped or transposed one is named instead of failing inside torch.stack."""
    shapes = {"fc1.weight": (ffn, hidden), "fc1.bias": (ffn,), "fc2.weight": (hidden, ffn), "fc2.bias": (hidden,),
              "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden), "gate_proj.bias": (ffn,),
              "up_proj.bias": (ffn,), "down_proj.weight": (hidden, ffn), "down_proj.bias": (hidden,)}

    def get(j, name):
        key = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{j}.{name}"
        if key not in tensors:
            return None
        tensor = tensors.pop(key)
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{key} has shape {tuple(tensor.shape)}, config.json (hidden_size {hidden}, "
                                  f"intermediate_size {ffn}) needs {shapes[name]}")
        return tensor

    w_in, b_in, w_out, b_out = [], [], [], []
    for j in range(num):
        if family == "phi":
            win, bin_ = get(j, "fc1.weight"), get(j, "fc1.bias")
            wout, bout = get(j, "fc2.weight"), get(j, "fc2.bias")
            if win is None or wout is None:
                raise CheckpointError(f"layer {layer} expert {j}: missing fc1.weight or fc2.weight")
            w_in.append(win.T)
        else:
            gate, up = get(j, "gate_proj.weight"), get(j, "up_proj.weight")
            wout, bout = get(j, "down_proj.weight"), get(j, "down_proj.bias")
            if gate is None or up is None or wout is None:
                raise CheckpointError(f"layer {layer} expert {j}: missing gate_proj, up_proj or down_proj weight")
            gb, ub = get(j, "gate_proj.bias"), get(j, "up_proj.bias")
            bin_ = torch.cat([gb, ub]) if gb is not None and ub is not None else None
            w_in.append(torch.cat([gate.T, up.T], dim=1))
        w_out.append(wout.T)
        b_in.append(bin_)
        b_out.append(bout)
    out = {"w_in": torch.stack(w_in), "w_out": torch.stack(w_out)}
    if b_in[0] is not None:
        out["b_in"] = torch.stack(b_in)
    if b_out[0] is not None:
        out["b_out"] = torch.stack(b_out)
    return out


def map_state(official: dict, family: str, moe: dict, report: Report, text: dict) -> dict[str, torch.Tensor]:
    """Official LLM + projector tensors -> our names. Consumes `official`; leftovers are reported by the caller."""
    if any(".mixer.Wqkv." in k or k.startswith("transformer.h.") for k in official):
        raise CheckpointError(PHI_MSFT)
    ours: dict[str, torch.Tensor] = {}
    layers = moe.get("layers", []) if moe.get("enabled") else []
    gates = {}
    for i in layers:
        base = f"model.layers.{i}.mlp."
        stray = [k for k in official if k.startswith(base + "coefficient.") or k.startswith(base + "mlp.")]
        if stray:
            raise CheckpointError(f"residual-MoE tensors {stray[:4]} are not supported (DeepSpeed use_residual)")
        weight = official.pop(base + "deepspeed_moe.gate.wg.weight", None)
        if weight is None:
            raise CheckpointError(f"missing router {base}deepspeed_moe.gate.wg.weight: is layer {i} a MoE layer?")
        bias = official.pop(base + "deepspeed_moe.gate.wg.bias", None)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
            report.filled.append(f"layer {i} router bias (DeepSpeed's gate has none: zeros)")
        if weight.shape[0] != moe["num_experts"]:
            raise CheckpointError(f"{base}deepspeed_moe.gate.wg.weight has {weight.shape[0]} experts, config.json says {moe['num_experts']}")
        gates[i] = (weight, bias)
        stacked = _stack_experts(official, family, i, moe["num_experts"], int(text["hidden_size"]),
                                 int(text["intermediate_size"]))
        for name, tensor in stacked.items():
            ours[f"language_model.model.layers.{i}.mlp.experts.{name}"] = tensor
        report.count("experts", moe["num_experts"] * len(FFN_PARAMS[family]))
        for key in [k for k in official if k.startswith(base + "meta_moe.")]:
            ours[f"language_model.model.layers.{i}.mlp.meta.{key[len(base + 'meta_moe.'):]}"] = official.pop(key)
            report.count("meta expert")
    if gates:
        first_w, first_b = next(iter(gates.values()))
        shared = all(torch.equal(w, first_w) and torch.equal(b, first_b) for w, b in gates.values())
        moe["router_sharing"] = "shared" if shared else "per_layer"
        if shared:
            ours["router.weight"], ours["router.bias"] = first_w, first_b
        else:
            for i, (w, b) in gates.items():
                ours[f"language_model.model.layers.{i}.mlp.router.weight"] = w
                ours[f"language_model.model.layers.{i}.mlp.router.bias"] = b
        report.count("router", 2 * len(gates))
    for key in [k for k in official if k.startswith(PROJECTOR_PREFIXES)]:
        prefix = next(p for p in PROJECTOR_PREFIXES if key.startswith(p))
        rest = key[len(prefix):]
        if not re.fullmatch(r"(\d+\.)?(weight|bias)", rest):
            continue  # e.g. video projector tensors: left over, reported as unknown
        ours["projector." + rest] = official.pop(key)
        report.count("projector")
    for key in [k for k in official if k.startswith(("model.", "lm_head."))]:
        if key.endswith(RECOMPUTED_BUFFERS):
            official.pop(key)
            report.dropped.append(f"{key} (a buffer we recompute)")
            continue
        if ".mlp.deepspeed_moe." in key or ".mlp.meta_moe." in key:
            continue  # a MoE tensor outside the configured MoE layers or past num_experts: reported as unknown
        ours["language_model." + key] = official.pop(key)
        report.count("llm")
    return ours


def match_vision(our_keys: list[str], vision: dict, report: Report) -> dict[str, torch.Tensor]:
    """CLIP tensors -> our vision tower's names, matched by name suffix (whatever wraps the CLIP model)."""
    out, used = {}, set()
    for key in our_keys:
        rel = key[len("vision_tower."):]
        hits = [s for s in vision if rel == s or rel.endswith("." + s)]
        if hits:
            out[key] = vision[hits[0]]
            used.add(hits[0])
    for key in sorted(set(vision) - used):
        if key.endswith("position_ids") or "post_layernorm" in key or re.search(r"encoder\.layers\.\d+\.", key):
            report.dropped.append(f"vision {key} (not used by our tower: features come from layer "
                                  "mm_vision_select_layer)" if "position_ids" not in key else f"vision {key} (recomputed)")
        else:
            raise CheckpointError(f"vision-tower tensor {key!r} has no place in our CLIP tower")
    report.count("vision", len(used))
    return out


# ----- building ----------------------------------------------------------------------------------
@dataclass
class Converted:
    config: MedMoEConfig
    state: dict[str, torch.Tensor]  # our names, except the vision tower
    vision: dict[str, torch.Tensor]  # CLIP names (vision_model....)
    official: dict[str, torch.Tensor]  # what is left of the checkpoint: must be empty
    report: Report


def convert_checkpoint(cfg: dict, state: dict, vision_tower: str | None = None, expect: str | None = None,
                       drop_tokens_like_official: bool = False) -> Converted:
    """Official config + tensors -> our config and tensors (no model is built here)."""
    state = dict(state)
    report = Report()
    family = llm_family(cfg)
    text = text_config(cfg, family)
    num_layers = int(text["num_hidden_layers"])
    moe = moe_settings(cfg, state, num_layers, report, drop_tokens_like_official)
    vision_state = split_vision(state)
    vision, vision_state = vision_settings(cfg, vision_state, vision_tower, report)
    ours = map_state(state, family, moe, report, text)
    report.layout = "dense" if not moe["enabled"] else ("medmoe" if moe["meta_expert"] else "moe-llava")
    if expect and report.layout != "dense" and expect != report.layout:
        report.notes.append(f"--from {expect} but the weights look like a {report.layout} checkpoint "
                            f"({'meta_moe tensors found' if moe['meta_expert'] else 'no meta_moe tensors'}); converted as found")
    report.llm, report.num_layers = family, num_layers
    if moe["enabled"]:
        report.moe_layers, report.num_experts, report.top_k = moe["layers"], moe["num_experts"], moe["top_k"]
        report.meta_expert, report.router = moe["meta_expert"], moe["router_sharing"]
    known = set(text) | set(RENAMED) | set(TOWER_KEYS) | {"moe", "mm_vision_select_layer", "mm_vision_select_feature",
                                        "image_projector_type", "mm_projector_type", "model_type", "conv_mode",
                                        "mm_hidden_size", "image_aspect_ratio", "rope_scaling"}
    report.ignored_config += sorted(k for k in cfg if k not in known and k not in HF_BOOKKEEPING)
    config = MedMoEConfig(vision=vision, text_config=text, projector=projector_kind(cfg), moe=moe,
                          chat_template=chat_template(cfg, report), llm_source=None)
    return Converted(config, ours, vision_state, state, report)


def dominant_dtype(state: dict) -> torch.dtype:
    """The dtype holding most parameters (checkpoints mix fp16 weights with an fp32 gate)."""
    sizes: dict[torch.dtype, int] = {}
    for t in state.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get)


def _materialise_buffers(model) -> bool:
    """Recompute the non-persistent buffers a meta-device build left empty; False if one is not known."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=module.config))
        elif [n for n, b in module.named_buffers(recurse=False) if b.is_meta] == ["position_ids"]:
            n = module.position_ids.shape[-1]
            module.register_buffer("position_ids", torch.arange(n).expand((1, -1)), persistent=False)
        else:
            return False
    return not any(b.is_meta for b in model.buffers())


def _cast(key: str, tensor: torch.Tensor, target: torch.dtype, vision_dtype: torch.dtype | None) -> torch.Tensor:
    if key.endswith(("router.weight", "router.bias")):
        return tensor.to(torch.float32)
    if key.startswith("vision_tower."):
        return tensor if vision_dtype is None else tensor.to(vision_dtype)
    return tensor.to(target)


def build_model(conv: Converted, dtype: torch.dtype | None = None, vision_dtype: torch.dtype | None = None):
    """Our model with the converted tensors; every tensor is accounted for, by name.

    `dtype` is the LLM's and the projector's (None: the checkpoint's main dtype). The vision tower
    keeps the precision its weights come in (an fp32 CLIP from --vision-tower stays fp32 beside a
    bf16 LLM) unless `vision_dtype` is given; the official loader casts it to fp16.
    The model is built on the meta device and takes the converted tensors as they are (assign), so
    converting a 6B-parameter checkpoint needs about one copy of it in memory, not two.
    """
    from ..model.modeling import MedMoEForCausalLM

    if conv.official:
        raise CheckpointError(f"{len(conv.official)} checkpoint tensors have no place in the converted model: "
                              f"{sorted(conv.official)[:20]}")
    with torch.device("meta"):
        model = MedMoEForCausalLM(conv.config)
    expected = model.state_dict()
    target = dtype or dominant_dtype(conv.state)
    state = dict(conv.state)
    vision_keys = [k for k in expected if k.startswith("vision_tower.")]
    state.update(match_vision(vision_keys, conv.vision, conv.report))
    lm_bias = "language_model.lm_head.bias"
    if lm_bias in expected and lm_bias not in state:
        # The official Phi wrappers build lm_head with bias=False, so their logits have no bias: zeros are exact.
        state[lm_bias] = torch.zeros(expected[lm_bias].shape, dtype=target)
        conv.report.filled.append("lm_head.bias (the official Phi wrapper has none: zeros)")
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"the checkpoint does not match the model its config.json describes: missing {missing[:20]}"
                              f"{' ...' if len(missing) > 20 else ''}; unknown {unknown[:20]}")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"shape mismatch between checkpoint and config.json: {bad[:10]}")
    # Routers stay fp32 (DeepSpeed's gate ran in fp32 and was often saved so): no round trip through fp16.
    state = {k: _cast(k, v, target, vision_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if not _materialise_buffers(model):  # a module we do not know how to rebuild: build on CPU instead
        model = MedMoEForCausalLM(conv.config)
        model.load_state_dict(state, strict=True, assign=True)
    if getattr(model.language_model.config, "tie_word_embeddings", False):
        model.language_model.tie_weights()
    return model.eval()


def attach_tokenizer(model, folder: str, report: Report):
    """The checkpoint's tokenizer as a MedMoEProcessor (adds `<image>`), or None with a note."""
    from transformers import AutoTokenizer

    from ..data.processor import MedMoEProcessor

    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        report.notes.append(f"no tokenizer files in {folder}; copy the base LLM's tokenizer into the output folder")
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure means "no usable tokenizer here", reported
        report.notes.append(f"the tokenizer in {folder} did not load without running its own code "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); copy a transformers-native "
                            "tokenizer of the base LLM into the output folder")
        return None
    processor = MedMoEProcessor(tokenizer, model.config.vision_config, template=model.config.chat_template)
    model.config.image_token_id = processor.image_token_id
    return processor


def is_official_folder(path: str) -> bool:
    """A folder saved by the official Med-MoE / MoE-LLaVA code (its config.json: `is_official_config`)."""
    cfg = folder_config(path)
    return cfg is not None and is_official_config(cfg)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if isinstance(dtype, str):
        return None if dtype == "auto" else getattr(torch, dtype)
    return dtype


def load_official(path: str, vision_tower: str | None = None, dtype: torch.dtype | str | None = None,
                  device: str | torch.device | None = None, expect: str | None = None, with_report: bool = False,
                  vision_dtype: torch.dtype | str | None = None, drop_tokens_like_official: bool = False):
    """An official Med-MoE / MoE-LLaVA folder -> MedMoEForCausalLM (and the Report when with_report).
    `dtype` is the LLM's; the vision tower keeps its own precision unless `vision_dtype` is given."""
    cfg = read_config(path)
    conv = convert_checkpoint(cfg, load_folder(path), vision_tower=vision_tower, expect=expect,
                              drop_tokens_like_official=drop_tokens_like_official)
    for message in conv.report.warnings:
        warnings.warn(message, stacklevel=2)
    model = build_model(conv, as_dtype(dtype), as_dtype(vision_dtype))
    attach_tokenizer(model, path, conv.report)
    if device is not None:
        model.to(device)
    return (model, conv.report) if with_report else model


def report_lines(report: Report, model=None) -> list[str]:
    lines = [f"layout: {report.layout} ({report.llm}, {report.num_layers} layers)"]
    if report.layout != "dense":
        lines.append(f"MoE layers: {report.moe_layers} ({len(report.moe_layers)}), {report.num_experts} experts, "
                     f"top-{report.top_k}, meta expert {'yes' if report.meta_expert else 'no'}, router {report.router}")
    if model is not None:
        lines.append(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    lines.append("mapped tensors: " + ", ".join(f"{k} {v}" for k, v in sorted(report.mapped.items())))
    lines += [f"filled: {x}" for x in report.filled]
    lines += [f"dropped: {x}" for x in report.dropped]
    if report.ignored_config:
        lines.append("config keys with no meaning here (training-only): " + ", ".join(report.ignored_config))
    lines += [f"note: {x}" for x in report.notes]
    return lines


def as_dict(report: Report) -> dict:
    return dataclasses.asdict(report)
