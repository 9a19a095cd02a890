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
    r = load_recipe("tiny", ["phase2.grad_checkpointing=true", "phase3.grad_checkpointing=2",
                             "phase1.grad_checkpointing=selective"])
    assert r.phase2.grad_checkpointing is True and r.phase3.grad_checkpointing == 2
    assert r.phase1.grad_checkpointing == "selective"
    assert load_recipe("tiny", ["phase3.grad_checkpointing=activations"]).phase3.grad_checkpointing == "activations"
    r = load_recipe("tiny", ["phase2.augment_images=true"])
    assert r.phase2.augment_images is True and r.phase3.augment_images is False


@pytest.mark.parametrize("override,message", [
    ("phase2.lrr=1", "unknown key 'phase2.lrr'; valid keys: phase2.data"),
    ("phase2.lr=fast", "phase2.lr='fast': expected float"),
    ("phase9.lr=1", "unknown key 'phase9'"),
    ("seed=1.5", "seed=1.5: expected int"),
    ("phase2.batch_size=0", "phase2.batch_size=0: must be at least 1"),
    ("phase3.moe.experts=4", "unknown key phase3.moe.experts; valid keys"),
    ("phase3.moe.expert_type=big", "moe.expert_type='big'"),
    ("phase3.trainable=all", "phase3.trainable='all'"),
    ("phase2.lr", "write key=value"),
    ("distributed=horovod", "distributed='horovod'"),
    ("phase3.grad_checkpointing=some", "phase3.grad_checkpointing='some'"),
    ("phase3.grad_checkpointing=-1", "phase3.grad_checkpointing=-1: must be at least 0"),
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
    with pytest.raises(ConfigError, match="unknown recipe key 'phase2.learning_rate'"):
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
