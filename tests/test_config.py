"""Settings: one name per idea, typed, checked with errors naming the field and the accepted values,
documented in docs/settings.md (generated; this test fails when it drifts); older names still load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import load_script

from medmoe.config import LoRAConfig, MedMoEConfig, ModelSettings, MoEConfig, RuntimeOptions, VisionConfig
from medmoe.errors import ConfigError
from medmoe.training.recipe import Phase2Recipe, Phase3Recipe, PhaseRecipe, Recipe, RouterRecipe

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (VisionConfig, LoRAConfig, MoEConfig, ModelSettings, RuntimeOptions, PhaseRecipe, Phase2Recipe,
            Phase3Recipe, RouterRecipe, Recipe)


def settings_table():
    module = load_script("scripts/settings_table.py")
    return module


def test_docs_settings_md_is_the_generated_table():
    table = settings_table()
    assert (ROOT / "docs" / "settings.md").read_text() == table.page(), \
        "docs/settings.md is out of date: python scripts/settings_table.py > docs/settings.md"
    assert table.main(["--check"]) == 0
    for cls in SETTINGS:  # every setting is in it, under its own name
        for f in dataclasses.fields(cls):
            assert f"{f.name}` |" in table.page(), f"{cls.__name__}.{f.name} is missing from docs/settings.md"


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_setting_has_a_doc_and_a_valid_default(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
        choices = f.metadata.get("choices")
        if choices and f.default is not dataclasses.MISSING:
            assert f.default in choices, f"{cls.__name__}.{f.name}: default {f.default!r} not among {choices}"


@pytest.mark.parametrize("make,message", [
    (lambda: MoEConfig(router_sharing="each"), "moe.router_sharing='each': use one of shared, per_layer"),
    (lambda: MoEConfig(routing="image"), "moe.routing='image': use one of token, sample, pooled"),
    (lambda: MoEConfig(expert_type="tiny"), "moe.expert_type='tiny': use one of full, lora"),
    (lambda: MoEConfig(routing="pooled", router_sharing="per_layer"), "needs moe.router_sharing='shared'"),
    (lambda: MoEConfig(expert_lora={"rank": 4, "targets": ["q_proj"]}), "moe.expert_lora.targets"),
    (lambda: VisionConfig(select="cls"), "vision.select='cls': use one of patch, all"),
    (lambda: MedMoEConfig(projector="conv"), "projector='conv': use one of linear, mlp2x_gelu"),
    (lambda: MedMoEConfig(moe={"top_k": "one"}), "moe.top_k='one': expected int"),
    (lambda: MedMoEConfig(moe={"expertz": 4}), "unknown key 'moe.expertz'; valid keys: moe.enabled"),
    (lambda: MedMoEConfig(moe={"expert_lora": {"rank": 0}}), "moe.expert_lora.rank=0: must be at least 1"),
    (lambda: MedMoEConfig(llm_lora={"rank": 0}), "llm_lora.rank=0: must be at least 1"),
    (lambda: MedMoEConfig(llm_lora={"alpha": 2.0}), "llm_lora.rank is required"),
    (lambda: MedMoEConfig(vision={"image_size": "big"}), "vision.image_size='big': expected int"),
    (lambda: RuntimeOptions(dispatch="fast"), "dispatch='fast': use one of auto, loop, grouped"),
])
def test_errors_name_the_field_and_the_accepted_values(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert message in str(err.value)


def test_lora_alpha_defaults_to_twice_the_rank_and_is_written_down():
    assert LoRAConfig(rank=8).alpha == 16.0 and LoRAConfig(rank=8, alpha=4).alpha == 4.0
    config = MedMoEConfig(llm_lora={"rank": 8})
    assert config.llm_lora == {"rank": 8, "alpha": 16.0}  # add_lora's arguments, the alpha explicit
    assert MoEConfig().expert_lora == LoRAConfig(rank=128, alpha=256.0)


def test_a_nano_config_with_the_old_names_loads_and_saves_the_new_ones(tmp_path):
    """The config of Med-MoE-Nano v1 (shipped until run 15, written before the renames): models saved
    then still load, and save under the new names."""
    raw = json.loads((ROOT / "tests" / "fixtures" / "nano-v1-config.json").read_text())
    assert {"router", "lora_rank", "lora_alpha", "dispatch"} <= set(raw["moe"])  # written before the renames
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text(json.dumps(raw))
    config = MedMoEConfig.from_pretrained(str(tmp_path / "v1"))
    moe = config.moe_config
    assert (moe.router_sharing, moe.routing, moe.expert_type) == ("shared", "token", "lora")
    assert moe.expert_lora == LoRAConfig(rank=raw["moe"]["lora_rank"], alpha=raw["moe"]["lora_alpha"])
    assert (moe.expert_lora.rank, moe.expert_lora.alpha) == (16, 32.0)
    assert config.llm_lora == raw["llm_lora"] and {k: config.vision[k] for k in raw["vision"]} == {
        **raw["vision"], "image_mean": tuple(raw["vision"]["image_mean"]), "image_std": tuple(raw["vision"]["image_std"])}
    added = {k: v for k, v in config.vision.items() if k not in raw["vision"]}  # settings newer than the file
    assert added == {k: getattr(VisionConfig(), k) for k in added}
    config.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())["moe"]
    assert not {"router", "lora_rank", "lora_alpha", "dispatch"} & set(saved)
    assert saved["router_sharing"] == "shared" and saved["expert_lora"]["rank"] == 16
    assert MedMoEConfig.from_pretrained(str(tmp_path)).moe_config == moe


def test_old_moe_names_build_the_same_model():
    from medmoe.model.pretrained import build_model

    old, _ = build_model("tiny", seed=0)
    old.upcycle({"router": "per_layer", "expert_type": "lora", "lora_rank": 4, "lora_alpha": 8, "dispatch": "loop"})
    new, _ = build_model("tiny", seed=0)
    new.upcycle({"router_sharing": "per_layer", "expert_type": "lora", "expert_lora": {"rank": 4, "alpha": 8}})
    assert old.config.moe == new.config.moe and "dispatch" not in new.config.moe
    assert old.router is None and all(b.router is not None for b in old.moe_blocks)  # per-layer routers
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    assert {(b.experts.a_in.shape[-1], b.experts.scale) for b in old.moe_blocks} == {(4, 2.0)}  # rank 4, alpha 8


def test_dispatch_is_a_runtime_choice_with_the_same_result():
    import torch

    from medmoe.model.pretrained import build_model

    model, _ = build_model("tiny", seed=0)
    model.upcycle()
    ids = torch.randint(3, 100, (2, 7))
    outputs = {}
    for mode in ("loop", "grouped", "auto"):
        model.set_dispatch(mode)
        assert {b.experts.dispatch_mode for b in model.moe_blocks} == {mode}
        with torch.no_grad():
            outputs[mode] = model(input_ids=ids).logits
    torch.testing.assert_close(outputs["loop"], outputs["grouped"], rtol=1e-4, atol=1e-5)
    assert "dispatch" not in model.config.moe
    with pytest.raises(ConfigError, match="dispatch='fast'"):
        model.set_dispatch("fast")
