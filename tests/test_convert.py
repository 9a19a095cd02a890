"""Official Med-MoE / MoE-LLaVA checkpoints -> our model.

The real checkpoints cannot be downloaded here, so tiny ones are written with the official key names,
shapes and config schema (moellava/model/language_model/llava_{phi,stablelm}_moe.py, moe/layer.py,
moe/sharded_moe.py, multimodal_projector/builder.py, multimodal_encoder/clip_encoder.py). The
reference below re-implements the official forward independently of medmoe: a plain transformers
Phi / StableLM whose MoE layers are a hand-written DeepSpeed-style MoE (dense one-hot combine).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM, StableLmConfig,
                          StableLmForCausalLM)

from medmoe.errors import CheckpointError

VOCAB, D, F_DIM, LAYERS, HEADS, E = 96, 32, 64, 4, 4, 4
IMAGE_ID = VOCAB  # outside the vocabulary: our model fills those positions with image features
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=32,
            patch_size=8, hidden_act="quick_gelu")
N_IMG = (CLIP["image_size"] // CLIP["patch_size"]) ** 2
VISION = "model.image_tower.image_tower.vision_model."  # CLIPVisionModel of transformers 4.x, as saved
FFN = {"phi": ("fc1", "fc2"), "stablelm": ("gate_proj", "up_proj", "down_proj")}


# ----- the official config.json and state dict ------------------------------------------------------
def official_config(family: str, layout: str, tower: str = "/mnt/data/authors/checkpoints/tiny-clip") -> dict:
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F_DIM, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128,
                  initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                  torch_dtype="float32", transformers_version="4.37.0", use_cache=False)
    if family == "phi":
        cfg = dict(architectures=["MoELLaVAPhiForCausalLM"], model_type="moe_llava_phi", hidden_act="gelu_new",
                   layer_norm_eps=1e-5, partial_rotary_factor=0.5, qk_layernorm=False, resid_pdrop=0.1,
                   embd_pdrop=0.0, attention_dropout=0.0, rope_theta=10000.0, rope_scaling=None, **common)
    else:  # StableLM-2 remote-code (stablelm_epoch) names
        cfg = dict(architectures=["MoELLaVAStablelmForCausalLM"], model_type="moe_llava_stablelm", hidden_act="silu",
                   rope_pct=0.25, rope_theta=10000, norm_eps=1e-5, use_qkv_bias=True, **common)
    cfg.update(mm_image_tower=tower, mm_video_tower=None, mm_hidden_size=CLIP["hidden_size"],
               mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_projector_type="mlp2x_gelu",
               video_projector_type="linear", image_aspect_ratio="pad", mm_use_im_start_end=False,
               mm_use_im_patch_token=False, use_mm_proj=True, tune_mm_mlp_adapter=False,
               tokenizer_model_max_length=2048, tokenizer_padding_side="right")
    if layout != "dense":
        cfg["moe"] = dict(moe_enable=True, moe_mode="sparse", moe_layers_idx=[0, 2], ep_size=1,
                          top_k_experts=1 if layout == "medmoe" else 2, capacity_factor=1.5, eval_capacity_factor=2.0,
                          min_capacity=0, use_residual=False, router_aux_loss_coef=0.01, num_experts=[E, E],
                          train_modules=["fc1", "fc2", "wg"] if family == "phi" else ["gate_proj", "up_proj", "down_proj", "wg"])
    return cfg


def official_state(family: str, layout: str, vision: bool = True, seed: int = 0, clip: dict = CLIP) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, s=0.15: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {}

    def linear(name, out_f, in_f, bias=True):
        sd[name + ".weight"] = rand(out_f, in_f)
        if bias:
            sd[name + ".bias"] = rand(out_f, s=0.05)

    def norm(name):
        sd[name + ".weight"] = 1 + rand(D, s=0.1)
        sd[name + ".bias"] = rand(D, s=0.05)

    def ffn(prefix):
        if family == "phi":
            linear(prefix + "fc1", F_DIM, D)
            linear(prefix + "fc2", D, F_DIM)
        else:
            linear(prefix + "gate_proj", F_DIM, D, bias=False)
            linear(prefix + "up_proj", F_DIM, D, bias=False)
            linear(prefix + "down_proj", D, F_DIM, bias=False)

    sd["model.embed_tokens.weight"] = rand(VOCAB, D, s=0.5)
    moe_layers = [0, 2] if layout != "dense" else []
    shared_gate = (rand(E, D, s=1.0), rand(E, s=0.3))  # Med-MoE loads one router file into every MoE layer
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(p + "self_attn." + proj, D, D)
        if family == "phi":
            linear(p + "self_attn.dense", D, D)
            norm(p + "input_layernorm")
        else:
            linear(p + "self_attn.o_proj", D, D, bias=False)
            norm(p + "input_layernorm")
            norm(p + "post_attention_layernorm")
        if i not in moe_layers:
            ffn(p + "mlp.")
            continue
        if layout.startswith("medmoe"):
            sd[p + "mlp.deepspeed_moe.gate.wg.weight"], sd[p + "mlp.deepspeed_moe.gate.wg.bias"] = (t.clone() for t in shared_gate)
        else:  # DeepSpeed's own TopKGate: Linear(d, E, bias=False), one per layer
            sd[p + "mlp.deepspeed_moe.gate.wg.weight"] = rand(E, D, s=1.0)
        for j in range(E):
            ffn(p + f"mlp.deepspeed_moe.experts.deepspeed_experts.{j}.")
        if layout.startswith("medmoe"):
            ffn(p + "mlp.meta_moe.")
    norm("model.final_layernorm" if family == "phi" else "model.norm")
    sd["lm_head.weight"] = rand(VOCAB, D, s=0.5)  # the LLaVA wrappers build lm_head with bias=False
    linear("model.mm_projector.image_spatial_proj.0", D, clip["hidden_size"])
    linear("model.mm_projector.image_spatial_proj.2", D, D)
    if vision:
        torch.manual_seed(seed + 1)
        tower = CLIPVisionModel(CLIPVisionConfig(**clip))
        for k, v in tower.state_dict().items():
            sd["model.image_tower.image_tower.vision_model." + k.removeprefix("vision_model.")] = v.clone()
    return sd


def write_clip_folder(folder, clip_config=None, state=None):
    """A local CLIP folder, as `CLIPVisionModel.save_pretrained` writes it: config.json, and the
    weights when `state` (the checkpoint's) is given."""
    config = CLIPVisionConfig(**(clip_config or CLIP))
    if state is None:
        config.save_pretrained(folder)
    else:
        clip = CLIPVisionModel(config)
        clip.load_state_dict({k[len(VISION):]: v for k, v in state.items() if k.startswith(VISION)})
        clip.save_pretrained(folder)
    return str(folder)


def write_official(folder, family, layout, vision=True, fmt="safetensors", state=None, tower="config", cfg=None):
    """tower: "config": config.json's mm_image_tower names a local folder holding the CLIP's
    config.json (its weights are the checkpoint's); "absent": it names a folder that is not here."""
    os.makedirs(folder, exist_ok=True)
    cfg = official_config(family, layout) if cfg is None else cfg
    if tower == "config":
        cfg["mm_image_tower"] = write_clip_folder(os.path.join(f"{folder}-clip", "tiny-clip"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = official_state(family, layout, vision) if state is None else state
    if fmt == "safetensors":
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(dict(state), os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


# ----- an independent re-implementation of the official forward --------------------------------------
class OfficialMoE(nn.Module):
    """deepspeed_moe (gate.wg + experts.deepspeed_experts) + meta_moe, combined the GShard way (no capacity limit)."""

    def __init__(self, mlp, top_k, meta, gate_bias, capacity_factor=None, min_capacity=0):
        super().__init__()
        self.top_k = top_k
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity  # None: DeepSpeed drop_tokens=False
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.gate = nn.Module()
        self.deepspeed_moe.gate.wg = nn.Linear(D, E, bias=gate_bias)
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(E))
        self.meta_moe = copy.deepcopy(mlp) if meta else None

    def forward(self, hidden):
        x = hidden.reshape(-1, D)
        logits = self.deepspeed_moe.gate.wg.float()(x.float())
        gates = F.softmax(logits, dim=1)
        idx1 = gates.argmax(dim=1)
        mask1 = F.one_hot(idx1, E).float()
        if self.top_k == 2:
            idx2 = logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1)
            mask2 = F.one_hot(idx2, E).float()
        if self.capacity_factor is not None:  # DeepSpeed's _capacity and its locations in the capacity buffers
            cap = torch.ceil((x.shape[0] / E) * torch.tensor(self.capacity_factor * self.top_k)).to(torch.int64)
            cap = max(int(cap), self.min_capacity)
            locations1 = torch.cumsum(mask1, dim=0) - 1
            if self.top_k == 2:  # second choices queue behind every first choice
                locations2 = torch.cumsum(mask2, dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
                mask2 = mask2 * (locations2 < cap)
            mask1 = mask1 * (locations1 < cap)
        if self.top_k == 1:  # top1gating: gates * mask1, no renormalisation
            combine = gates * mask1
        else:  # top2gating with the noise-free second choice, normalised by g1 + g2
            g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
            denom = (g1 + g2).clamp(min=torch.finfo(g1.dtype).eps)
            combine = (g1 / denom)[:, None] * mask1 + (g2 / denom)[:, None] * mask2
        experts = torch.stack([e(x) for e in self.deepspeed_moe.experts.deepspeed_experts], dim=1)  # [S, E, d]
        out = torch.einsum("se,sed->sd", combine.to(x.dtype), experts)
        if self.meta_moe is not None:
            out = out + self.meta_moe(x)
        return out.reshape(hidden.shape)


def reference_lm(family, layout, state, capacity_factor=None, min_capacity=0):
    """A plain transformers LM with the official weights and official MoE layers, loaded strictly."""
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F_DIM, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128,
                  tie_word_embeddings=False, layer_norm_eps=1e-5, rope_theta=10000.0)
    if family == "phi":
        lm = PhiForCausalLM(PhiConfig(hidden_act="gelu_new", partial_rotary_factor=0.5, **common))
        lm.lm_head = nn.Linear(D, VOCAB, bias=False)
    else:
        lm = StableLmForCausalLM(StableLmConfig(hidden_act="silu", partial_rotary_factor=0.25, use_qkv_bias=True, **common))
    if layout != "dense":
        for i in (0, 2):
            layer = lm.model.layers[i]
            medmoe = layout.startswith("medmoe")
            layer.mlp = OfficialMoE(layer.mlp, 1 if layout == "medmoe" else 2, medmoe, medmoe, capacity_factor, min_capacity)
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector.", "model.image_tower."))}
    lm.load_state_dict(llm_state, strict=True)
    return lm.eval()


def reference_logits(family, layout, state, input_ids, pixel_values, clip_config=CLIP, **capacity):
    """LLaVA's prepare_inputs_labels_for_multimodal, reduced: image features replace the image positions."""
    lm = reference_lm(family, layout, state, **capacity)
    clip = CLIPVisionModel(CLIPVisionConfig(**clip_config)).eval()
    clip.load_state_dict({k[len(VISION):]: v for k, v in state.items() if k.startswith(VISION)})
    proj = nn.Sequential(nn.Linear(clip_config["hidden_size"], D), nn.GELU(), nn.Linear(D, D))
    proj.load_state_dict({k[len("model.mm_projector.image_spatial_proj."):]: v for k, v in state.items()
                          if k.startswith("model.mm_projector.")})
    with torch.no_grad():
        feats = proj(clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:])
        is_image = input_ids == IMAGE_ID
        embeds = lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = feats.reshape(-1, D)
        return lm(inputs_embeds=embeds).logits


def random_inputs(n=2, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    ids[:, 3:3 + N_IMG] = IMAGE_ID
    pixels = torch.randn(n, 3, CLIP["image_size"], CLIP["image_size"], generator=g)
    return ids, pixels


# ----- our side ----------------------------------------------------------------------------------------
@pytest.fixture
def clip_tower(monkeypatch):
    """Our HF vision tower when it exists; otherwise a stand-in with the same contract (CLIP inside,
    hidden state `feature_layer`, CLS dropped), so conversion is tested either way."""
    try:
        from medmoe.vision import hf  # noqa: F401
        return "real"
    except ImportError:
        pass
    from medmoe.vision.base import VisionTower
    from medmoe.vision.tower import TinyVisionTower

    class StandIn(VisionTower):
        def __init__(self, cfg):
            super().__init__(cfg)
            conf = {k: v for k, v in cfg.model_config.items() if k != "model_type"}
            self.model = CLIPVisionModel(CLIPVisionConfig(**conf))
            self.hidden_size = conf["hidden_size"]
            self.num_tokens = (conf["image_size"] // conf["patch_size"]) ** 2 + (cfg.select == "all")

        def features(self, pixel_values):
            hidden = self.model(pixel_values, output_hidden_states=True).hidden_states[self.cfg.feature_layer]
            return hidden[:, 1:] if self.cfg.select == "patch" else hidden

    def build(cfg, load_weights=True):
        tower = StandIn(cfg) if cfg.kind == "hf" else TinyVisionTower(cfg)
        tower.freeze(cfg.frozen)
        return tower

    monkeypatch.setattr("medmoe.model.modeling.build_vision_tower", build)
    return "stand-in"


def our_logits(model, input_ids, pixel_values):
    model.config.image_token_id = IMAGE_ID
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values).logits


# medmoe: top-1 + meta (the paper); medmoe-top2: the older top-2 + meta; moe-llava: top-2, no meta, per-layer routers
CASES = [("phi", "medmoe"), ("stablelm", "medmoe"), ("phi", "moe-llava"), ("stablelm", "moe-llava"),
         ("phi", "medmoe-top2")]


@pytest.mark.parametrize("family,layout", CASES)
def test_moe_layer_equals_official(tmp_path, clip_tower, family, layout):
    from medmoe.conversion import load_official

    folder = write_official(tmp_path / "ckpt", family, layout)
    model = load_official(folder)
    state = official_state(family, layout)
    ref = reference_lm(family, layout, state)
    x = torch.randn(3, 7, D)
    for i in (0, 2):
        with torch.no_grad():
            ours = model.language_model.model.layers[i].mlp(x)
            theirs = ref.model.layers[i].mlp(x)
        assert torch.allclose(ours, theirs, atol=1e-5), (i, (ours - theirs).abs().max())
    block = model.language_model.model.layers[0].mlp
    assert block.cfg.top_k == (1 if layout == "medmoe" else 2)
    assert (block.meta is not None) == layout.startswith("medmoe")
    assert block.cfg.renormalize == (block.cfg.top_k == 2)
    assert (model.router is not None) == layout.startswith("medmoe")  # one shared router vs one per layer


@pytest.mark.parametrize("family,layout", CASES + [("phi", "dense"), ("stablelm", "dense")])
def test_full_model_logits_equal_official(tmp_path, clip_tower, family, layout):
    from medmoe.conversion import load_official

    folder = write_official(tmp_path / "ckpt", family, layout)
    model, report = load_official(folder, with_report=True)
    ids, pixels = random_inputs()
    ours = our_logits(model, ids, pixels)
    theirs = reference_logits(family, layout, official_state(family, layout), ids, pixels)
    assert ours.shape == theirs.shape == (2, ids.shape[1], VOCAB)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert report.layout == layout.removesuffix("-top2")
    if family == "phi":
        assert any("lm_head.bias" in f for f in report.filled)
    # the logits depend on the routing: a perturbed router changes them (the test can fail)
    if layout == "medmoe":
        with torch.no_grad():
            model.router.weight.mul_(-1)
        assert not torch.allclose(our_logits(model, ids, pixels), theirs, atol=1e-3)


def test_config_mapping(tmp_path, clip_tower):
    from medmoe.conversion import load_official
    from medmoe.conversion.official import tower_name

    folder = write_official(tmp_path / "ckpt", "stablelm", "medmoe")
    model, report = load_official(folder, with_report=True)
    cfg = model.config
    assert cfg.text_config["model_type"] == "stablelm"
    assert cfg.text_config["partial_rotary_factor"] == 0.25 and cfg.text_config["layer_norm_eps"] == 1e-5
    moe = cfg.moe_config
    assert (moe.layers, moe.num_experts, moe.top_k, moe.meta_expert, moe.renormalize, moe.router_sharing) == (
        [0, 2], 4, 1, True, False, "shared")
    assert cfg.vision["name_or_path"] == "tiny-clip" and cfg.vision["feature_layer"] == -2
    assert cfg.vision["select"] == "patch" and cfg.projector == "mlp2x_gelu" and cfg.chat_template == "medmoe"
    assert "moe.capacity_factor" in report.ignored_config
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)  # built on the meta device, every tensor filled
    assert not any(p.requires_grad for p in model.vision_tower.parameters())  # frozen, as in the official code
    assert model.router.weight.dtype == torch.float32
    assert tower_name("/mnt/user/ckpt/openai/clip-vit-large-patch14-336") == "openai/clip-vit-large-patch14-336"
    llava = load_official(write_official(tmp_path / "llava", "phi", "moe-llava"))
    assert llava.config.moe_config.renormalize and llava.config.moe_config.router_sharing == "per_layer"


def test_bin_loads_with_weights_only_and_sharded_index(tmp_path, clip_tower):
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    ids, pixels = random_inputs()
    ref = our_logits(load_official(write_official(tmp_path / "st", "phi", "medmoe", state=state)), ids, pixels)
    binary = load_official(write_official(tmp_path / "bin", "phi", "medmoe", fmt="bin", state=state))
    assert torch.equal(our_logits(binary, ids, pixels), ref)
    # two shards + model.safetensors.index.json, as save_pretrained writes large models
    folder = tmp_path / "sharded"
    write_official(folder, "phi", "medmoe", state={"lm_head.weight": state["lm_head.weight"]})
    os.remove(folder / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}, f)
    assert torch.equal(our_logits(load_official(str(folder)), ids, pixels), ref)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path, clip_tower):
    from medmoe.conversion import load_official, read_router

    _Evil.marker = str(tmp_path / "pwned")
    folder = tmp_path / "ckpt"
    write_official(folder, "phi", "medmoe", fmt="bin")
    torch.save({"lm_head.weight": torch.zeros(1), "payload": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        load_official(str(folder))
    torch.save({"fc1.weight": torch.zeros(4, D), "fc1.bias": _Evil()}, tmp_path / "phi_router.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_router(str(tmp_path / "phi_router.pth"))
    assert not os.path.exists(_Evil.marker)


def test_unknown_and_missing_keys_are_named(tmp_path, clip_tower):
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    state["model.layers.1.mlp.extra_adapter.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.extra_adapter\.weight"):
        load_official(write_official(tmp_path / "a", "phi", "medmoe", state=state))
    state = official_state("phi", "medmoe")
    del state["model.layers.3.self_attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.3\.self_attn\.q_proj\.weight"):
        load_official(write_official(tmp_path / "b", "phi", "medmoe", state=state))
    state = official_state("stablelm", "medmoe")
    del state["model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"]
    with pytest.raises(CheckpointError, match="layer 2 expert 3"):
        load_official(write_official(tmp_path / "c", "stablelm", "medmoe", state=state))


def test_vision_tower_missing_or_from_local_folder(tmp_path, clip_tower):
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    folder = write_official(tmp_path / "ckpt", "phi", "medmoe", vision=False)
    with pytest.raises(CheckpointError, match="--vision-tower"):
        load_official(folder)
    # the CLIP weights as a local Hugging Face folder, as users have them
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    clip.load_state_dict({k[len(VISION):]: v for k, v in state.items() if k.startswith(VISION)})
    clip.save_pretrained(tmp_path / "clip")
    model = load_official(folder, vision_tower=str(tmp_path / "clip"))
    ids, pixels = random_inputs()
    theirs = reference_logits("phi", "medmoe", state, ids, pixels)
    assert torch.allclose(our_logits(model, ids, pixels), theirs, atol=1e-4)


def test_router_pth(tmp_path):
    from medmoe.conversion import convert_router, load_router
    from medmoe.model.modeling import MedMoEForCausalLM
    from medmoe.model.presets import preset

    router = {"fc1.weight": torch.randn(4, 64), "fc1.bias": torch.randn(4)}
    torch.save(router, tmp_path / "phi_router.pth")
    path, state = convert_router(str(tmp_path / "phi_router.pth"), str(tmp_path / "out"))
    assert path.endswith("router.safetensors") and set(state) == {"router.weight", "router.bias"}
    model = MedMoEForCausalLM(preset("tiny-phi")).upcycle()
    load_router(model, path)
    assert torch.equal(model.router.weight, router["fc1.weight"]) and torch.equal(model.router.bias, router["fc1.bias"])
    torch.save({"fc1.weight": torch.randn(4, 65), "fc1.bias": torch.randn(4)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_router(model, str(tmp_path / "wrong.pth"))
    torch.save({"fc2.weight": torch.randn(4, 64)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="fc2.weight"):
        convert_router(str(tmp_path / "odd.pth"), str(tmp_path / "odd.safetensors"))


def test_from_pretrained_loads_official_folder_directly(tmp_path, clip_tower):
    from medmoe.model.modeling import MedMoEForCausalLM

    folder = write_official(tmp_path / "ckpt", "stablelm", "moe-llava")
    model = MedMoEForCausalLM.from_pretrained(folder)
    ids, pixels = random_inputs()
    theirs = reference_logits("stablelm", "moe-llava", official_state("stablelm", "moe-llava"), ids, pixels)
    assert torch.allclose(our_logits(model, ids, pixels), theirs, atol=1e-4)


def test_cli_convert_writes_our_format(tmp_path, clip_tower, capsys):
    from medmoe.cli import main
    from medmoe.data.processor import MedMoEProcessor
    from medmoe.model.modeling import MedMoEForCausalLM
    from medmoe.model.tokenizer import tiny_tokenizer

    folder = write_official(tmp_path / "ckpt", "phi", "medmoe")
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "converted"
    assert main(["convert", "--from", "official-medmoe", folder, str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MoE layers: [0, 2]" in printed and "meta expert yes" in printed and "experts 16" in printed
    model = MedMoEForCausalLM.from_pretrained(str(out))
    processor = MedMoEProcessor.from_pretrained(str(out), model.config.vision_config)
    assert model.config.image_token_id == processor.image_token_id
    ids, pixels = random_inputs()
    theirs = reference_logits("phi", "medmoe", official_state("phi", "medmoe"), ids, pixels)
    assert torch.allclose(our_logits(model, ids, pixels), theirs, atol=1e-4)
    assert main(["convert", "--from", "official-medmoe", folder, str(out)]) == 2  # exists: refuses without --overwrite


def test_unsupported_layouts_are_refused_with_a_reason(tmp_path, clip_tower):
    from medmoe.conversion import load_official
    from medmoe.errors import ConfigError

    folder = write_official(tmp_path / "residual", "phi", "medmoe")
    cfg = official_config("phi", "medmoe")
    cfg["moe"]["use_residual"] = True
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="use_residual"):
        load_official(folder)
    state = official_state("phi", "dense")
    state["transformer.h.0.mixer.Wqkv.weight"] = torch.zeros(3 * D, D)
    with pytest.raises(CheckpointError, match="phi-msft"):
        load_official(write_official(tmp_path / "msft", "phi", "dense", state=state))
    cfg = official_config("phi", "medmoe")
    cfg["moe"]["num_experts"] = [4, 2]
    folder = write_official(tmp_path / "uneven", "phi", "medmoe")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match="same number of experts"):
        load_official(folder)


def test_fp16_checkpoint_with_fp32_gate(tmp_path, clip_tower):
    """As saved by the official training: fp16 weights, the gate kept in fp32 (TopKGate calls wg.float())."""
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    half = {k: (v if ".gate.wg." in k else v.half()) for k, v in state.items()}
    model = load_official(write_official(tmp_path / "ckpt", "phi", "medmoe", state=half))
    assert model.language_model.lm_head.weight.dtype == torch.float16
    assert model.router.weight.dtype == torch.float32
    assert torch.equal(model.router.weight, state["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"])
    ids, pixels = random_inputs()
    theirs = reference_logits("phi", "medmoe", {k: v.float() for k, v in half.items()}, ids, pixels)
    ours = our_logits(model, ids, pixels.half()).float()
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()


# ----- towers, dtypes, bad tensors, capacity ----------------------------------------------------------
CLIP_32 = {**CLIP, "num_attention_heads": 2}  # 32-wide heads: hidden // 64 would say 1 head
CLIP_NARROW = {**CLIP, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2}  # hidden // 64 = 0


@pytest.mark.parametrize("clip_config", [CLIP_32, CLIP_NARROW], ids=["32-wide-heads", "narrow"])
def test_unknown_tower_read_from_its_local_folder(tmp_path, clip_tower, clip_config):
    """config.json's mm_image_tower exists here: config and weights come from exactly that folder."""
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe", clip=clip_config)
    cfg = official_config("phi", "medmoe")
    cfg["mm_image_tower"] = write_clip_folder(tmp_path / "models" / "my-clip", clip_config, state)
    model, report = load_official(write_official(tmp_path / "ckpt", "phi", "medmoe", state=state, tower="here", cfg=cfg),
                                  with_report=True)
    assert model.config.vision["model_config"]["num_attention_heads"] == 2
    assert any("my-clip" in d for d in report.dropped)  # the checkpoint's copy is replaced, as the official code does
    ids, pixels = random_inputs()
    theirs = reference_logits("phi", "medmoe", state, ids, pixels, clip_config=clip_config)
    assert torch.allclose(our_logits(model, ids, pixels), theirs, atol=1e-4)


def test_unknown_tower_not_here_is_refused(tmp_path, clip_tower, capsys):
    from medmoe.cli import main
    from medmoe.conversion import load_official

    folder = write_official(tmp_path / "ckpt", "phi", "medmoe", state=official_state("phi", "medmoe", clip=CLIP_32),
                            tower="absent")
    with pytest.raises(CheckpointError, match="--vision-tower") as err:
        load_official(folder)
    assert "tiny-clip" in str(err.value) and "\n" not in str(err.value)
    assert main(["convert", "--from", "official-medmoe", folder, str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().err.strip()
    assert "--vision-tower" in printed and len(printed.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_text_only_refusal_wording(tmp_path, clip_tower):
    from medmoe.conversion import load_official

    cfg = official_config("phi", "medmoe")
    cfg["mm_image_tower"] = None
    with pytest.raises(CheckpointError, match="names no vision tower") as err:
        load_official(write_official(tmp_path / "ckpt", "phi", "medmoe", vision=False, tower="none", cfg=cfg))
    assert "None" not in str(err.value) and "--vision-tower" in str(err.value)


def test_vision_tower_keeps_its_precision(tmp_path, clip_tower):
    """A bf16 checkpoint converted with an fp32 CLIP folder: the tower stays fp32 unless asked."""
    from safetensors import safe_open

    from medmoe.cli import main
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    clip = write_clip_folder(tmp_path / "clip", CLIP, state)
    half = {k: (v if ".gate.wg." in k else v.bfloat16()) for k, v in state.items() if not k.startswith(VISION)}
    folder = write_official(tmp_path / "ckpt", "phi", "medmoe", state=half, tower="absent")
    model = load_official(folder, vision_tower=clip)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.float32}
    ids, pixels = random_inputs()
    reference = load_official(folder, vision_tower=clip, dtype="bfloat16", vision_dtype="float32")
    assert torch.equal(our_logits(model, ids, pixels), our_logits(reference, ids, pixels))
    assert main(["convert", "--from", "official-medmoe", folder, str(tmp_path / "out"), "--vision-tower", clip]) == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {k.split(".")[0]: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["vision_tower"] == "F32" and dtypes["language_model"] == "BF16"
    assert main(["convert", "--from", "official-medmoe", folder, str(tmp_path / "out16"), "--vision-tower", clip,
                 "--vision-dtype", "bfloat16"]) == 0
    with safe_open(str(tmp_path / "out16" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("vision_tower.")} == {"BF16"}


def test_top_k_beyond_two_is_refused(tmp_path, clip_tower):
    from medmoe.conversion import load_official
    from medmoe.errors import ConfigError

    cfg = official_config("phi", "moe-llava")
    cfg["moe"]["top_k_experts"] = 3
    with pytest.raises(ConfigError, match=r"top_k_experts=3.*1 or 2"):
        load_official(write_official(tmp_path / "ckpt", "phi", "moe-llava", cfg=cfg))


def test_bad_expert_tensors_and_truncated_shards_are_named(tmp_path, clip_tower, capsys):
    from medmoe.cli import main
    from medmoe.conversion import load_official

    key = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1."
    state = official_state("phi", "medmoe")
    state[key + "fc1.weight"] = state[key + "fc1.weight"].T.contiguous()  # transposed
    with pytest.raises(CheckpointError, match=r"deepspeed_experts\.1\.fc1\.weight has shape \(32, 64\)"):
        load_official(write_official(tmp_path / "t", "phi", "medmoe", state=state))
    state = official_state("stablelm", "medmoe")
    state[key + "down_proj.weight"] = torch.zeros(D, F_DIM + 1)
    with pytest.raises(CheckpointError, match=r"deepspeed_experts\.1\.down_proj\.weight has shape"):
        load_official(write_official(tmp_path / "w", "stablelm", "medmoe", state=state))
    # a shard cut off in the middle, as an interrupted download leaves it
    folder = write_official(tmp_path / "cut", "phi", "medmoe")
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_official(folder)
    assert main(["convert", "--from", "official-medmoe", folder, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and len(err.splitlines()) == 1
    binary = write_official(tmp_path / "bin", "phi", "medmoe", fmt="bin")
    path = os.path.join(binary, "pytorch_model.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*truncated"):
        load_official(binary)


def _capacity_config(factor, min_capacity=0):
    cfg = official_config("phi", "moe-llava")
    cfg["moe"].update(eval_capacity_factor=factor, min_capacity=min_capacity)
    return cfg


def test_moe_llava_capacity_warned_and_reproduced(tmp_path, clip_tower, capsys):
    """eval_capacity_factor 1.0 with 4 experts at top-2: DeepSpeed drops tokens at inference."""
    from medmoe.cli import main
    from medmoe.conversion import load_official

    state = official_state("phi", "moe-llava")
    folder = write_official(tmp_path / "ckpt", "phi", "moe-llava", state=state, cfg=_capacity_config(1.0))
    with pytest.warns(UserWarning, match="drops tokens at inference"):
        dropless = load_official(folder)
    model, report = load_official(folder, drop_tokens_like_official=True, with_report=True)
    assert not report.warnings and model.config.moe_config.capacity_factor_at_inference == 1.0
    ids, pixels = random_inputs()
    official = reference_logits("phi", "moe-llava", state, ids, pixels, capacity_factor=1.0)
    assert not torch.allclose(official, reference_logits("phi", "moe-llava", state, ids, pixels), atol=1e-3)  # drops
    assert torch.allclose(our_logits(model, ids, pixels), official, atol=1e-4)
    assert not torch.allclose(our_logits(dropless, ids, pixels), official, atol=1e-3)
    ref = reference_lm("phi", "moe-llava", state, capacity_factor=1.0)
    x = torch.randn(3, 7, D)
    with torch.no_grad():  # 21 tokens: capacity ceil(21 / 4 * 2) = 11 slots per expert
        assert torch.allclose(model.language_model.model.layers[2].mlp(x), ref.model.layers[2].mlp(x), atol=1e-5)
    # the CLI warns on stderr without the option and says what it reproduces with it
    assert main(["convert", "--from", "moe-llava", folder, str(tmp_path / "a")]) == 0
    assert "warning: the official gate drops tokens" in capsys.readouterr().err
    assert main(["convert", "--from", "moe-llava", folder, str(tmp_path / "b"), "--drop-tokens-like-official"]) == 0
    assert "dropped as in the official gate" in capsys.readouterr().out
    from medmoe.model.modeling import MedMoEForCausalLM

    assert torch.allclose(our_logits(MedMoEForCausalLM.from_pretrained(str(tmp_path / "b")), ids, pixels), official, atol=1e-4)


def test_no_capacity_warning_where_nothing_drops(tmp_path, clip_tower):
    from medmoe.conversion import load_official

    # top-2 x 2.0 = 4 experts: never drops; Med-MoE's code hard-codes factor 4 and drop_tokens=False
    _, report = load_official(write_official(tmp_path / "a", "phi", "moe-llava", cfg=_capacity_config(2.0)), with_report=True)
    cfg = official_config("phi", "medmoe")
    cfg["moe"]["eval_capacity_factor"] = 0.5
    _, medmoe = load_official(write_official(tmp_path / "b", "phi", "medmoe", cfg=cfg), with_report=True,
                              drop_tokens_like_official=True)
    assert not report.warnings and not medmoe.warnings
    assert any("never drops tokens" in n for n in medmoe.notes)


@pytest.mark.parametrize("min_capacity", [0, 12])
def test_capacity_top1_with_meta_keeps_meta_only(tmp_path, clip_tower, min_capacity):
    """The block's capacity on a top-1 + meta layer: tokens past capacity (in position order) get the
    meta expert alone, as top1gating's cumsum locations give; min_capacity raises the limit."""
    from medmoe.conversion import load_official

    state = official_state("phi", "medmoe")
    model = load_official(write_official(tmp_path / "ckpt", "phi", "medmoe", state=state))
    block = model.language_model.model.layers[0].mlp
    block.cfg.capacity_factor_at_inference, block.cfg.min_capacity_at_inference = 1.0, min_capacity
    official = OfficialMoE(nn.Linear(D, F_DIM), 1, True, True, capacity_factor=1.0, min_capacity=min_capacity)
    official.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(_phi_mlp() for _ in range(E))
    official.meta_moe = _phi_mlp()
    prefix = "model.layers.0.mlp."
    official.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    x = torch.randn(2, 9, D)  # 18 tokens, capacity ceil(18 / 4) = 5 per expert (or 12)
    with torch.no_grad():
        ours, theirs = block(x), official(x)
        dropless = OfficialMoE.forward(_without_capacity(official), x)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours, dropless, atol=1e-5) == (min_capacity == 12)  # 12 >= the busiest expert's count here


def _phi_mlp():
    from transformers.models.phi.modeling_phi import PhiMLP

    return PhiMLP(PhiConfig(hidden_size=D, intermediate_size=F_DIM, hidden_act="gelu_new"))


def _without_capacity(moe):
    moe = copy.deepcopy(moe)
    moe.capacity_factor = None
    return moe
