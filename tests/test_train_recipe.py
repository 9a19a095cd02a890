"""Recipes: bundled files load, overrides are typed, bad keys and values get clear errors;
`medmoe train` runs every phase of the tiny recipe end to end."""

from __future__ import annotations

import json

import pytest
from conftest import require_efficientnet
from train_helpers import one_thread

from medmoe.errors import CheckpointError, ConfigError
from medmoe.training.recipe import bundled_recipes, load_recipe


def test_bundled_recipes_load():
    assert {"tiny", "nano", "phi2", "stablelm"} <= set(bundled_recipes())
    for name in bundled_recipes():
        recipe = load_recipe(name)
        assert recipe.phase1.template == "plain" and recipe.phase2.template == "medmoe"
    paper = load_recipe("phi2")
    assert (paper.phase1.lr, paper.phase2.lr, paper.phase3.lr) == (1e-3, 2e-5, 2e-5)
    assert (paper.phase1.epochs, paper.phase2.epochs, paper.phase3.epochs) == (1, 3, 9)
    assert paper.phase2.batch_size * paper.phase2.grad_accum == 64


def test_overrides_are_typed():
    r = load_recipe("tiny", ["phase2.lr=1e-4", "phase3.moe.expert_type=lora", "phase3.train_router=true",
                             "phase1.data=[\"sample\"]", "output_dir=/tmp/x", "phase2.epochs=3"])
    assert r.phase2.lr == 1e-4 and r.phase3.moe["expert_type"] == "lora" and r.phase3.train_router is True
    assert r.phase1.data == ["sample"] and r.output_dir == "/tmp/x" and r.phase2.epochs == 3.0
    r = load_recipe("tiny", ["phase2.grad_checkpointing=full", "phase3.grad_checkpointing=full",
                             "phase3.grad_checkpointing_every=2", "phase1.grad_checkpointing=selective"])
    assert (r.phase2.grad_checkpointing, r.phase2.grad_checkpointing_every) == ("full", 1)
    assert (r.phase3.grad_checkpointing, r.phase3.grad_checkpointing_every) == ("full", 2)
    assert r.phase1.grad_checkpointing == "selective"
    assert load_recipe("tiny", ["phase3.grad_checkpointing=activations"]).phase3.grad_checkpointing == "activations"
    r = load_recipe("tiny", ["phase2.llm_lora={\"rank\": 4}", "phase3.moe.expert_lora.rank=8"])
    assert (r.phase2.llm_lora.rank, r.phase2.llm_lora.alpha) == (4, 8.0)  # alpha unset: 2 x rank
    assert r.phase3.moe["expert_lora"] == {"rank": 8}
    r = load_recipe("tiny", ["phase2.augment_images=true"])
    assert r.phase2.augment_images is True and r.phase3.augment_images is False


@pytest.mark.parametrize("override,message", [
    ("phase2.lrr=1", "unknown key 'phase2.lrr'; valid keys: phase2.data"),
    ("phase2.lr=fast", "phase2.lr='fast': expected float"),
    ("phase9.lr=1", "unknown key 'phase9'"),
    ("seed=1.5", "seed=1.5: expected int"),
    ("phase2.batch_size=0", "phase2.batch_size=0: must be at least 1"),
    ("phase3.moe.experts=4", "unknown key 'phase3.moe.experts'; valid keys"),
    ("phase3.moe.expert_type=big", "moe.expert_type='big'"),
    ("phase3.trainable=all", "phase3.trainable='all'"),
    ("phase2.lr", "write key=value"),
    ("distributed=horovod", "distributed='horovod'"),
    ("phase3.grad_checkpointing=some", "phase3.grad_checkpointing='some': use one of off, full, selective, "
                                       "activations"),
    ("phase3.grad_checkpointing=-1", "phase3.grad_checkpointing=-1: use one of off, full"),
    ("phase3.grad_checkpointing_every=0", "phase3.grad_checkpointing_every=0: must be at least 1"),
    ("phase3.moe.router_sharing=each", "phase3.moe.router_sharing='each': use one of shared, per_layer"),
    ("phase3.moe.routing=image", "phase3.moe.routing='image': use one of token, sample, pooled"),
    ("phase3.moe.expert_lora.rank=0", "phase3.moe.expert_lora.rank=0: must be at least 1"),
    ("phase2.llm_lora.alpha=2", "phase2.llm_lora.rank is required"),
    ("phase2.llm_lora.size=2", "unknown key 'phase2.llm_lora.size'"),
    ("router.train_per_layer=maybe", "router.train_per_layer='maybe': expected bool"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny", [override])
    assert message in str(err.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_recipe(str(bad))
    bad.write_text(json.dumps({"phase2": {"learning_rate": 1}}))
    with pytest.raises(ConfigError, match="unknown key 'phase2.learning_rate'"):
        load_recipe(str(bad))


def test_cli_runs_every_phase_of_the_tiny_recipe(tmp_path, capsys):
    from medmoe.cli import main

    out = tmp_path / "run"
    quick = [f"output_dir={out}", "phase1.max_steps=2", "phase2.max_steps=2", "phase3.max_steps=2",
             "phase1.batch_size=2", "phase2.batch_size=2", "phase3.batch_size=2", "router.epochs=2",
             "phase2.max_samples=8", "phase3.max_samples=8"]
    with one_thread():
        assert main(["train", "--recipe", "tiny", "--phase", "1", *quick]) == 0
        assert main(["train", "--recipe", "tiny", "--phase", "2", *quick]) == 0
        assert main(["train", "--recipe", "tiny", "--phase", "3", *quick]) == 2  # the router is not trained yet
        assert "--phase router" in capsys.readouterr().err
        assert main(["train", "--recipe", "tiny", "--phase", "router", *quick]) == 0
        assert main(["train", "--recipe", "tiny", "--phase", "3", *quick]) == 0
        # A second run into the same folder must not silently overwrite: it asks for --resume.
        assert main(["train", "--recipe", "tiny", "--phase", "3", *quick]) == 2
        assert "--resume" in capsys.readouterr().err
        assert main(["train", "--recipe", "tiny", "--phase", "3", "--resume", *quick]) == 0
        before = (out / "phase3" / "model" / "model.safetensors").stat().st_mtime_ns
        # Resuming a finished run (every phase) skips what is done instead of training it again.
        capsys.readouterr()
        assert main(["train", "--recipe", "tiny", "--resume", *quick]) == 0
        assert capsys.readouterr().out.count("already finished") == 4
        assert (out / "phase3" / "model" / "model.safetensors").stat().st_mtime_ns == before
    for phase in ("phase1", "phase2", "phase3"):
        assert (out / phase / "model" / "model.safetensors").exists()
        assert (out / phase / "loss.png").exists()
    assert json.load(open(out / "router" / "router_metrics.json"))["label_order"] == ["CT", "MRI", "X-Ray", "Pathology"]
    from medmoe.training.phases import load_model

    model, _ = load_model(str(out / "phase3" / "model"))
    assert model.is_moe


def test_phase2_needs_phase1(tmp_path):
    from medmoe.training.phases import run_phase

    with pytest.raises(CheckpointError, match="--phase 1"):
        run_phase(load_recipe("tiny", [f"output_dir={tmp_path}"]), "2")


def test_a_source_can_repeat_its_records():
    from medmoe.errors import DataError
    from medmoe.training.data import load_records, split_repeat

    once = load_records(["sample"])
    thrice = load_records(["sample*3"])
    assert [r.id for r in thrice] == [r.id for r in once] * 3
    captions = load_records(["captions:sample*2"])
    assert len(captions) == 2 * len(load_records(["captions:sample"]))
    assert split_repeat("data/vqa-rad") == ("data/vqa-rad", 1)
    assert split_repeat("data/vqa-rad*12") == ("data/vqa-rad", 12)
    for bad in ("sample*0", "sample*two", "sample*1.5"):
        with pytest.raises(DataError, match="repeat"):
            load_records([bad])


def test_nano_mix_repeats_the_small_benchmarks_and_changes_nothing_else():
    """The data-mix lever: VQA-RAD three times and SLAKE twice an epoch in phases 2 and 3, every
    other setting nano's (the router and the captions see each image once)."""
    nano, mix = load_recipe("nano").to_dict(), load_recipe("nano-mix").to_dict()
    for phase in ("phase2", "phase3"):
        assert mix[phase].pop("data") == ["data/vqa-rad*3", "data/slake*2", "data/pathvqa", "data/pneumoniamnist"]
        nano[phase].pop("data")
    drop = ("description", "output_dir")
    assert {k: v for k, v in mix.items() if k not in drop} == {k: v for k, v in nano.items() if k not in drop}


def test_nano_mix_320_changes_only_the_image_size():
    """The resolution lever: the shipped recipe with 320-px images (100 image tokens), nothing else."""
    mix, big = load_recipe("nano-mix").to_dict(), load_recipe("nano-mix-320").to_dict()
    assert (mix.pop("vision"), big.pop("vision")) == ({}, {"image_size": 320})
    drop = ("description", "output_dir")
    assert {k: v for k, v in big.items() if k not in drop} == {k: v for k, v in mix.items() if k not in drop}


def test_recipe_vision_kind_swaps_in_a_larger_efficientnet(tmp_path):
    """`vision.kind=efficientnet_lite2` (the lever for a stronger tower): ImageNet weights from its
    package, 1280-wide tokens, and a saved model that reloads with the same tower."""
    require_efficientnet("lite2")
    import torch

    from medmoe.training.phases import load_model, run_phase
    from medmoe.vision.efficientnet import load_efficientnet_lite

    quick = [f"output_dir={tmp_path}", "phase1.max_steps=1", "phase1.batch_size=2", "pretrained=true",
             "vision.kind=efficientnet_lite2", "vision.image_size=64"]  # tiny's LLM stays random
    with one_thread():
        run_phase(load_recipe("tiny", quick), "1")
    model, processor = load_model(str(tmp_path / "phase1" / "model"))
    assert model.config.vision["kind"] == "efficientnet_lite2"
    assert (model.config.vision["num_tokens"], model.config.vision["hidden_size"]) == (4, 1280)
    assert processor.num_image_tokens == 4
    reference = load_efficientnet_lite("lite2").state_dict()
    tower = model.vision_tower.model.state_dict()  # phase 1 trains the projector only
    assert all(torch.equal(tower[k], reference[k]) for k in reference)


def test_recipe_vision_changes_the_presets_tower(tmp_path):
    from medmoe.training.phases import load_model, run_phase

    quick = [f"output_dir={tmp_path}", "phase1.max_steps=1", "phase1.batch_size=2", "vision.image_size=64"]
    with one_thread():
        run_phase(load_recipe("tiny", quick), "1")
    model, processor = load_model(str(tmp_path / "phase1" / "model"))
    assert model.config.vision["image_size"] == 64
    assert model.config.vision["num_tokens"] == (64 // 8) ** 2  # the tiny tower: one 8-px patch per token
    assert processor.num_image_tokens == 64
    with pytest.raises(ConfigError, match="unknown key vision.size"):
        load_recipe("tiny", ["vision.size=64"])
    with pytest.raises(ConfigError, match="trained model folder"):
        run_phase(load_recipe("tiny", [f"output_dir={tmp_path}/again", f"model={tmp_path}/phase1/model",
                                       "vision.image_size=32"]), "1")


# ----- older setting names keep loading ------------------------------------------------------------

OLD_OVERRIDES = [  # (old override, new override) of the same setting
    ("phase3.moe.router=per_layer", "phase3.moe.router_sharing=per_layer"),
    ("phase3.moe.lora_rank=8", "phase3.moe.expert_lora={\"rank\": 8, \"alpha\": 256}"),
    ("phase3.moe.dispatch=loop", None),  # a runtime option now: dropped
    ("router.per_layer=true", "router.train_per_layer=true"),
    ("phase2.grad_checkpointing=true", "phase2.grad_checkpointing=full"),
    ("phase2.grad_checkpointing=false", None),
    ("phase3.grad_checkpointing=3", "phase3.grad_checkpointing=full"),
    ("phase2.llm_lora={}", None),  # None: the same as the recipe without it
]


@pytest.mark.parametrize("old,new", OLD_OVERRIDES)
def test_old_override_names_map_to_the_new_ones(old, new):
    with pytest.warns(FutureWarning, match="old setting names"):
        mapped = load_recipe("tiny", [old])
    if new is None:
        assert mapped == load_recipe("tiny")
        return
    expected = load_recipe("tiny", [new] + (["phase3.grad_checkpointing_every=3"] if old.endswith("=3") else []))
    assert mapped == expected and mapped != load_recipe("tiny")


def _old_names(data: dict) -> dict:
    """A recipe as today's files were written before the renames."""
    data = json.loads(json.dumps(data))
    for phase in ("phase1", "phase2", "phase3"):
        section = data.get(phase, {})
        if section.get("grad_checkpointing") == "full":
            section["grad_checkpointing"] = True
        lora = section.get("moe", {}).pop("expert_lora", None)
        if lora:
            section["moe"].update(lora_rank=lora["rank"], lora_alpha=lora["alpha"])
    data.setdefault("phase2", {}).setdefault("llm_lora", {})
    data.setdefault("router", {})["per_layer"] = False
    return data


@pytest.mark.parametrize("name", ["tiny", "nano", "phi2", "stablelm"])
def test_bundled_recipes_written_with_old_names_load_the_same(name, tmp_path):
    from medmoe.training.recipe import recipe_path

    data = json.load(open(recipe_path(name)))
    old = tmp_path / f"{name}.json"
    old.write_text(json.dumps(_old_names(data)))
    with pytest.warns(FutureWarning):
        assert load_recipe(str(old)) == load_recipe(name)
    if name == "nano":
        recipe = load_recipe(str(old))
        assert recipe.phase3.moe["expert_lora"] == {"rank": 16, "alpha": 32}
        from medmoe.config import MoEConfig

        assert MoEConfig.from_dict(recipe.phase3.moe).expert_lora.alpha == 32.0
    if name == "phi2":
        assert load_recipe(str(old)).phase3.grad_checkpointing == "full"


def test_printed_recipes_load_again(tmp_path):
    """`medmoe train --print-recipe` output (and the recipe saved in checkpoints) is a recipe file."""
    recipe = load_recipe("nano", ["phase2.grad_checkpointing=selective"])
    path = tmp_path / "printed.json"
    path.write_text(json.dumps(recipe.to_dict()))
    assert load_recipe(str(path)) == recipe
