"""The student/teacher network. Pure: train mode returns losses, eval mode returns (map, score).

Training orchestration lives in ``engines.train``; export in ``engines.export``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from engines.blocks import SSPCAB, SimAM
from engines.teacher import (
    BN_EPS,
    DEFAULT_TAPS,
    LITE0_BLOCKS,
    MBConv,
    SameConv2d,
    Teacher,
    normalize_input,
    tap_channels,
    tap_strides,
)


@dataclass
class NetConfig:
    """Architecture and map settings (stored in model.json, used to rebuild the module)."""

    image_size: int = 256  # the input's height (and its width unless image_width is set)
    # the input's width when it is not square (parts whose images are long: keep their aspect
    # instead of squashing them); None for a square input, as in bundles from before it
    image_width: int | None = None
    taps: tuple[int, ...] = DEFAULT_TAPS
    simam: bool = True
    simam_lambda: float = 1e-4
    sspcab: bool = True
    # SSPCAB sits on the output of this block (default: the block before the deepest tap,
    # so the deepest block can still map its output back to the teacher's linear features).
    sspcab_after_block: int | None = None
    sspcab_k: int = 1
    sspcab_d: int = 1
    # Expansion ratio of the student's MBConv blocks (the teacher's is 6; block 0 has none). 3 halves
    # the student's inverted bottlenecks: -24 % ONNX Runtime latency for the whole graph and the
    # same accuracy over two seeds on both real data sets, but clearly worse on the demo's synthetic
    # parts (README, "The method"), so it is a speed setting, not the default.
    student_expand: int = 6
    # Student shape: "forward" (the teacher's topology from the image, STPM / EfficientAD) or
    # "reverse" (reverse distillation, RD4AD: the teacher's tapped features squeezed through a
    # one-class bottleneck with SSPCAB in it, then a decoder that rebuilds each tap, SimAM on its
    # outputs). The reverse student never sees the image, only what the bottleneck lets through.
    # Reverse is the default since stop 15 (README, "Accuracy"): better on magnetic_tile over two
    # seeds, the same on ball_screw_drive, no slower.
    student: str = "reverse"
    # width of the reverse student's bottleneck embedding (its decoder halves it per stage)
    reverse_width: int = 192
    # Per-scale discrepancy: "cosine" (1 - cosine similarity over channels: direction only) or "l2"
    # (mean squared difference over channels of the teacher's features standardised per channel with
    # training-set statistics, as EfficientAD: sees a change of magnitude too).
    distance: str = "l2"
    blur_sigma: float = 4.0  # in input pixels
    # Maps are fused and smoothed at 1/fuse_stride of the input size, then upsampled once
    # (4: the finest tap's resolution; 1: everything at full size, slower on CPUs).
    fuse_stride: int = 4
    score: str = "max"  # "max" or "topk"
    topk_fraction: float = 0.001
    scale_weights: tuple[float, ...] = field(default_factory=lambda: (1.0, 1.0, 1.0))
    # Teacher blocks whose features, pooled over the image (mean and spread per channel), feed the
    # image-level Gaussian term (GlobalTerm); () for none, as in bundles from before it. With it the
    # image score is the larger of the map's score and the term's distance, each standardised on
    # the held-out good parts. The term sees what a map maximum cannot: a part whose texture or
    # brightness is off as a whole (magnetic_tile's "uneven"); README, "Accuracy".
    global_taps: tuple[int, ...] = ()
    # ... and per tap also the channel means over each cell of a global_grid x global_grid grid of
    # the image (adaptive-pooling cells), so the term sees a region that is off, not only the whole
    # part; 0 for none, as in bundles from before it
    global_grid: int = 0
    # Weight of the segmentation head's map in the fused map (SegHead: a small convolutional network
    # on the teacher's taps and the teacher-student differences, trained after the student to
    # segment synthetic defects, engines.seghead); 0 for none, as in bundles from before it
    seg_weight: float = 0.0
    # the head's grid, input pixels per cell: 8, or 16 (a quarter of the cells: a quarter of the
    # head's multiply-adds, its dilations halved so that it sees as far in pixels)
    seg_stride: int = 8
    # how the head's map joins the fused map: "add" (every pixel moves with the head, good ones too;
    # as in bundles from before the setting) or "max" (the larger of the two, pixel by pixel: where
    # the head sees a good part the distillation map's small spots stay as they are)
    seg_fusion: str = "add"
    # how many heads of that shape, each trained on its own synthetic samples from its own seed; the
    # map is the mean of their logits (it takes out much of one head's seed: README, accuracy); 1,
    # as in bundles from before the setting
    seg_heads: int = 1
    # the width of each head network's first two convolutions (the later four are two thirds of it,
    # a multiple of 8): a narrower head costs about the square of the ratio in multiply-adds; 96, as
    # in bundles from before the setting
    seg_width: int = 96

    def input_hw(self) -> tuple[int, int]:
        """The input's (height, width) in pixels."""
        return self.image_size, self.image_size if self.image_width is None else self.image_width

    def teacher_taps(self) -> tuple[int, ...]:
        """The teacher blocks the network reads: the distillation taps and the global term's."""
        return tuple(sorted(set(self.taps) | set(self.global_taps)))

    def sspcab_block(self) -> int:
        return self.taps[-1] - 1 if self.sspcab_after_block is None else self.sspcab_after_block

    def validate(self) -> None:
        if self.distance not in ("cosine", "l2"):
            msg = f"distance must be 'cosine' or 'l2', got {self.distance!r}"
            raise ValueError(msg)
        if self.score not in ("max", "topk"):
            msg = f"score must be 'max' or 'topk', got {self.score!r}"
            raise ValueError(msg)
        if len(self.scale_weights) != len(self.taps):
            msg = f"scale_weights has {len(self.scale_weights)} entries for {len(self.taps)} taps"
            raise ValueError(msg)
        if self.image_size % 16 or (self.image_width is not None and self.image_width % 16):
            msg = f"image_size and image_width must each be a multiple of 16, got {self.image_size}, {self.image_width}"
            raise ValueError(msg)
        if self.student not in ("forward", "reverse"):
            msg = f"student must be 'forward' or 'reverse', got {self.student!r}"
            raise ValueError(msg)
        if self.student == "reverse" and (self.reverse_width < 16 or self.reverse_width % 8):
            msg = f"reverse_width must be a multiple of 8, at least 16, got {self.reverse_width}"
            raise ValueError(msg)
        strides = tap_strides(self.taps)
        if self.student == "reverse" and (
            any(strides[-1] % s for s in strides) or any(n % (2 * strides[-1]) for n in self.input_hw())
        ):
            msg = (
                f"the reverse student needs tap strides that divide the deepest one ({strides}) and an image_size "
                f"(and image_width) that is a multiple of twice it, got {' x '.join(map(str, self.input_hw()))}"
            )
            raise ValueError(msg)
        if self.student == "forward" and self.sspcab and not 0 <= self.sspcab_block() <= self.taps[-1]:
            msg = f"sspcab_after_block must be within 0..{self.taps[-1]}, got {self.sspcab_block()}"
            raise ValueError(msg)
        if not 1 <= self.student_expand <= 6:
            msg = f"student_expand must be within 1..6, got {self.student_expand}"
            raise ValueError(msg)
        if self.fuse_stride not in (1, 2, 4):
            msg = f"fuse_stride must be 1, 2 or 4, got {self.fuse_stride}"
            raise ValueError(msg)
        if any(not 0 <= t < len(LITE0_BLOCKS) for t in self.global_taps) or len(set(self.global_taps)) != len(
            self.global_taps
        ):
            last = len(LITE0_BLOCKS) - 1
            msg = f"global_taps must be distinct teacher blocks in 0..{last}, got {list(self.global_taps)}"
            raise ValueError(msg)
        if not 0 <= self.seg_weight <= 10 or not math.isfinite(self.seg_weight):
            msg = f"seg_weight must be within 0..10, got {self.seg_weight}"
            raise ValueError(msg)
        if self.seg_fusion not in SEG_FUSIONS:
            msg = unknown_fusion(self.seg_fusion)
            raise ValueError(msg)
        if not 1 <= self.seg_heads <= MAX_SEG_HEADS:
            msg = f"seg_heads must be within 1..{MAX_SEG_HEADS}, got {self.seg_heads}"
            raise ValueError(msg)
        if not SEG_MIN_WIDTH <= self.seg_width <= SEG_MAX_WIDTH or self.seg_width % 8:
            msg = f"seg_width must be a multiple of 8 within {SEG_MIN_WIDTH}..{SEG_MAX_WIDTH}, got {self.seg_width}"
            raise ValueError(msg)
        if self.seg_stride not in SEG_STRIDES:
            msg = f"seg_stride must be one of {', '.join(map(str, SEG_STRIDES))}, got {self.seg_stride}"
            raise ValueError(msg)
        smallest = min(self.input_hw()) // max(tap_strides(self.global_taps), default=1)
        if not 0 <= self.global_grid <= smallest:
            msg = f"global_grid must be within 0..{smallest} (the global taps' feature size), got {self.global_grid}"
            raise ValueError(msg)

    def to_json(self) -> dict:
        d = asdict(self)
        d["taps"] = list(self.taps)
        d["scale_weights"] = list(self.scale_weights)
        d["global_taps"] = list(self.global_taps)
        return d

    @classmethod
    def from_json(cls, d: dict) -> NetConfig:
        d = dict(d)
        d["taps"] = tuple(d["taps"])
        d["scale_weights"] = tuple(d["scale_weights"])
        d.setdefault("fuse_stride", 1)  # bundles written before fuse_stride existed fused at full size
        d.setdefault("student_expand", 6)  # ... and before student_expand existed, the student was the teacher's shape
        d.setdefault("distance", "cosine")  # ... and before distance existed, maps were cosine distances
        d.setdefault("student", "forward")  # ... and before student existed, it was the teacher's topology
        d.setdefault("reverse_width", 192)
        d["global_taps"] = tuple(d.get("global_taps", ()))  # ... and before the global term, none
        d.setdefault("global_grid", 0)  # ... and before its grid, the whole image's statistics only
        d.setdefault("image_width", None)  # ... and before image_width, every input was square
        d.setdefault("seg_weight", 0.0)  # ... and before the segmentation head, none
        d.setdefault("seg_stride", 8)  # ... and before its stride could be chosen, 8
        d.setdefault("seg_fusion", "add")  # ... and before its fusion could be chosen, added
        d.setdefault("seg_heads", 1)  # ... and before several heads, one
        d.setdefault("seg_width", 96)  # ... and before its width could be chosen, 96
        return cls(**d)


class Student(nn.Module):
    """The truncated teacher's topology (its expansion ratio optionally narrower), randomly
    initialised, plus SimAM and SSPCAB."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.taps = tuple(cfg.taps)
        self.stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(32, eps=BN_EPS)
        self.blocks = nn.ModuleList(
            MBConv(replace(s, expand=min(s.expand, cfg.student_expand))) for s in LITE0_BLOCKS[: self.taps[-1] + 1]
        )
        self.simam = SimAM(cfg.simam_lambda) if cfg.simam else None
        self.sspcab_at = cfg.sspcab_block() if cfg.sspcab else None
        self.sspcab = SSPCAB(LITE0_BLOCKS[self.sspcab_at].c_out, cfg.sspcab_k, cfg.sspcab_d) if cfg.sspcab else None

    def forward(
        self, x: torch.Tensor, t_feats: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Tapped features and SSPCAB's reconstruction loss from the normalised image (``t_feats`` unused)."""
        h = F.relu6(self.stem_bn(self.stem(x)))
        feats = []
        rec_loss = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.sspcab_at:
                out = self.sspcab(h)
                rec_loss = SSPCAB.reconstruction_loss(out, h)
                h = out
            if i in self.taps:
                feats.append(self.simam(h) if self.simam is not None else h)
        return feats, rec_loss


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ReverseStudent(nn.Module):
    """Reverse distillation (Deng & Li, CVPR 2022), sized for the Lite0 taps.

    Encoder side ("one-class bottleneck"): each tapped teacher map is brought to the deepest tap's
    resolution by stride-2 convolutions, the maps are concatenated, mixed by a 1x1 convolution and
    squeezed once more by a stride-2 convolution into a low-resolution embedding; SSPCAB sits on
    that embedding (it must predict each position from its surroundings, which is what lets the
    bottleneck drop what good parts never show). Decoder side: per tap, deepest first, a 2x
    bilinear upsampling (as fixed matrix products, like the map's resizes) and two 3x3
    convolutions, then a 1x1 head to the tap's channels, SimAM on the head's output. The decoder's
    channel width halves at each stage.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        taps = tuple(cfg.taps)
        chans = tap_channels(taps)
        strides = tap_strides(taps)
        deep = strides[-1]
        w = cfg.reverse_width
        self.squeeze = nn.ModuleList()
        for c, s in zip(chans, strides, strict=True):
            layers: list[nn.Module] = []
            c_cur = c
            while s < deep:
                layers.append(_conv_bn_relu(c_cur, w // 2, stride=2))
                c_cur, s = w // 2, s * 2
            if not layers:
                layers.append(_conv_bn_relu(c, w // 2, k=1))
            self.squeeze.append(nn.Sequential(*layers))
        self.mix = _conv_bn_relu(len(taps) * (w // 2), w, k=1)
        self.embed = _conv_bn_relu(w, w, stride=2)
        self.sspcab = SSPCAB(w, cfg.sspcab_k, cfg.sspcab_d) if cfg.sspcab else None
        self.simam = SimAM(cfg.simam_lambda) if cfg.simam else None
        # decoder stages from the deepest tap to the finest; stage i upsamples 2x per octave
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        height, width = cfg.input_hw()
        c_cur, at = w, deep * 2  # the embedding's stride
        for stage, (c, s) in enumerate(zip(reversed(chans), reversed(strides), strict=True)):
            c_out = max(w // 2 ** (stage + 1), 16)
            layers = []
            while at > s:
                at //= 2
                layers.append(_Upsample2x(height // at, width // at))
            layers += [_conv_bn_relu(c_cur, c_out), _conv_bn_relu(c_out, c_out)]
            self.stages.append(nn.Sequential(*layers))
            self.heads.append(nn.Conv2d(c_out, c, 1))
            c_cur = c_out

    def forward(
        self, x: torch.Tensor, t_feats: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Rebuilt tap features (finest first, like the teacher's) and SSPCAB's loss from the teacher's taps."""
        if t_feats is None:
            msg = "the reverse student rebuilds the teacher's features: pass them"
            raise ValueError(msg)
        h = self.mix(torch.cat([sq(t) for sq, t in zip(self.squeeze, t_feats, strict=True)], dim=1))
        h = self.embed(h)
        rec_loss = h.new_zeros(())
        if self.sspcab is not None:
            out = self.sspcab(h)
            rec_loss = SSPCAB.reconstruction_loss(out, h)
            h = out
        feats = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            f = head(h)
            feats.append(self.simam(f) if self.simam is not None else f)
        return feats[::-1], rec_loss


class _Upsample2x(nn.Module):
    """2x bilinear upsampling to ``h_out`` x ``w_out`` as two products with fixed matrices (TensorRT-friendly)."""

    def __init__(self, h_out: int, w_out: int):
        super().__init__()
        self.register_buffer("rows", bilinear_matrix(h_out, h_out // 2), persistent=False)
        self.register_buffer("cols", bilinear_matrix(w_out, w_out // 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_bilinear(x, self.rows, self.cols)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(math.ceil(3 * sigma), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def bilinear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) matrix A with A @ v == 1-D bilinear resize of v (align_corners=False, edges clamped).

    ``A @ M @ B.T`` is then exactly ``F.interpolate(M, mode="bilinear", align_corners=False)``: two
    small matrix products, which every runtime runs fast (OpenVINO's Interpolate took 0.44 ms for the
    final 64 -> 256 upsampling on the 2-core benchmark machine; the products take a fraction of that).
    """
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        w1 = src - i0
        a[o, i0] += 1.0 - w1
        a[o, i1] += w1
    return a.float()


def resize_bilinear(m: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) with the matrices of ``bilinear_matrix`` (H x h and W x w)."""
    return torch.matmul(torch.matmul(rows, m), cols.t())


def cosine_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity over channels: (N, C, H, W) x2 -> (N, H, W).

    Written as one dot product over the product of the norms (not as two normalised tensors):
    three passes over the features instead of six, which is measurable in the exported graph.
    """
    dot = (t * s).sum(dim=1)
    norms = t.norm(dim=1).clamp_min(1e-6) * s.norm(dim=1).clamp_min(1e-6)
    return 1.0 - dot / norms


def l2_distance(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over channels: (N, C, H, W) x2 -> (N, H, W)."""
    d = t - s
    return (d * d).mean(dim=1)


def hard_mean(d: torch.Tensor, q: float | None) -> torch.Tensor:
    """Mean of the values at or above the ``q`` quantile of ``d`` (EfficientAD's hard-feature loss); all when None."""
    if q is None:
        return d.mean()
    flat = d.flatten()
    k = max(1, math.ceil((1.0 - q) * flat.numel() - 1e-6))  # 1 - 0.99 is 0.01000...009 in floating point
    return flat.topk(k).values.mean()


def pooled_stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over the image of (N, C, h, w) features: (N, C) each
    (two passes, so bf16 / fp16 runtimes do not lose the spread to cancellation)."""
    m = f.mean(dim=(2, 3), keepdim=True)
    d = f - m
    return m.flatten(1), ((d * d).mean(dim=(2, 3)) + 1e-12).sqrt()


SEG_PREFIX = "seg_head."
SEG_STRIDES = (8, 16)  # the segmentation head's grids: one cell per 8 x 8 or 16 x 16 input pixels
SEG_FUSIONS = ("add", "max")  # how the head's map joins the fused map (NetConfig.seg_fusion)
SEG_BLUR_SIGMA = 4.0  # smoothing of its map, input pixels
MAX_SEG_HEADS = 4  # NetConfig.seg_heads: heads averaged
SEG_MIN_WIDTH, SEG_MAX_WIDTH = 16, 192  # NetConfig.seg_width's bounds


def unknown_fusion(fusion: str) -> str:
    """The refusal of a ``seg_fusion`` outside ``SEG_FUSIONS`` (NetConfig.validate, join_seg)."""
    return f"seg_fusion must be one of {', '.join(SEG_FUSIONS)}, got {fusion!r}"


def seg_term(
    logits: torch.Tensor, mean: torch.Tensor | float, scale: torch.Tensor | float, weight: float
) -> torch.Tensor:
    """The segmentation head's logits as the term joined with the fused map: centred on their mean
    over the held-out good pixels, put on the fused map's spread there (``scale``), times ``weight``."""
    return (logits - mean) * (scale * weight)


def join_seg(fused: torch.Tensor, seg: torch.Tensor, fusion: str) -> torch.Tensor:
    """The fused map joined with the head's term by ``fusion`` (``NetConfig.seg_fusion``; the one
    place that decides it): ``add`` their sum, ``max`` the larger of the two per pixel."""
    if fusion == "max":
        return fused + F.relu(seg - fused)  # max(fused, seg) in operators TensorRT's parser is checked for
    if fusion == "add":
        return fused + seg
    raise ValueError(unknown_fusion(fusion))


def box_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) matrix whose row o averages inputs o f .. o f + f - 1 (f = n_in / n_out, a whole
    number): an f-fold downsampling by the mean, without aliasing. For f = 2 it is ``bilinear_matrix``."""
    f = n_in // n_out
    if f * n_out != n_in:
        msg = f"box_matrix needs n_in a multiple of n_out, got {n_in} and {n_out}"
        raise ValueError(msg)
    return torch.kron(torch.eye(n_out), torch.full((1, f), 1.0 / f))


class SegHead(nn.Module):
    """Segmentation head (DeSTSeg's idea): reads, per distillation tap, the standardised teacher
    features and the per-channel squared teacher-student difference, all resized onto one grid of
    ``stride`` input pixels per cell (``SEG_STRIDES``), and returns a defect logit per cell (N, 1,
    h / stride, w / stride). A 1x1 squeeze, five 3x3 convolutions dilated 1, 2, 4, 8, 16 cells at
    stride 8 (1, 1, 2, 4, 8 at 16: the same reach in pixels; a receptive field that spans a region,
    not a spot), a 1x1 logit; convolutions, batch norm and ReLU only. With ``heads`` > 1 that many
    such networks read the same inputs and the logit is the mean of theirs (``net`` the first, as in
    one-head bundles; ``more`` the others). ``width`` is the first two convolutions' (the later
    four two thirds of it, a multiple of 8: 96 and 64 by default). Trained on synthetic defects after the student
    (``engines.seghead``)."""

    def __init__(
        self,
        channels: list[int],
        strides: list[int],
        input_hw: tuple[int, int],
        stride: int = 8,
        heads: int = 1,
        width: int = 96,
    ):
        super().__init__()
        h, w = input_hw
        self.stride = stride
        self.grid = (h // stride, w // stride)
        for i, tap_stride in enumerate(strides):
            if tap_stride != stride:  # finer taps: the mean over each cell; coarser: bilinear
                resize = box_matrix if tap_stride < stride else bilinear_matrix
                self.register_buffer(f"rows_{i}", resize(self.grid[0], h // tap_stride), persistent=False)
                self.register_buffer(f"cols_{i}", resize(self.grid[1], w // tap_stride), persistent=False)
        self.strides = list(strides)

        def block(c_in: int, c_out: int, k: int = 3, d: int = 1) -> nn.Sequential:
            d = max(1, d * SEG_STRIDES[0] // stride)  # the dilations below are written for the finest grid
            conv = nn.Conv2d(c_in, c_out, k, padding=d * (k // 2), dilation=d, bias=False)
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

        c, a = 2 * sum(channels), width
        b = max(8, round(width * 2 / 3 / 8) * 8)

        def network() -> nn.Sequential:
            return nn.Sequential(
                block(c, a, k=1), block(a, a), block(a, b, d=2), block(b, b, d=4), block(b, b, d=8),
                block(b, b, d=16), nn.Conv2d(b, 1, 1),
            )  # fmt: skip

        self.net = network()
        self.more = nn.ModuleList(network() for _ in range(heads - 1))

    @property
    def nets(self) -> list[nn.Sequential]:
        """The averaged networks, the first (``net``) first."""
        return [self.net, *self.more]

    def inputs(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, 2 * sum(channels), h / stride, w / stride): per tap the teacher's features and (t - s)^2."""
        parts = []
        for i, (t, s) in enumerate(zip(t_feats, s_feats, strict=True)):
            z = torch.cat([t, (t - s) * (t - s)], dim=1)
            if self.strides[i] != self.stride:
                z = resize_bilinear(z, getattr(self, f"rows_{i}"), getattr(self, f"cols_{i}"))
            parts.append(z)
        return torch.cat(parts, dim=1)

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The mean of the networks' logits on ``inputs`` (``inputs``)."""
        out = self.net(inputs)
        for net in self.more:
            out = out + net(inputs)
        return out * (1.0 / len(self.nets)) if self.more else out

    def forward(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        return self.logits(self.inputs(t_feats, s_feats))


GLOBAL_PREFIX = "global_term."


def student_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's own entries of a ``KDModel.fitted_state`` (without the global term's and the
    segmentation head's)."""
    return {k: v for k, v in sd.items() if not k.startswith((GLOBAL_PREFIX, SEG_PREFIX))}


def seg_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The segmentation head's entries of a ``KDModel.fitted_state``, as its own state_dict."""
    return {k[len(SEG_PREFIX) :]: v for k, v in sd.items() if k.startswith(SEG_PREFIX)}


def grid_matrix(h: int, w: int, g: int) -> torch.Tensor:
    """(h * w, g * g) weights that average an (h, w) map over each cell of a g x g grid, cells in
    row-major order: the cells of ``F.adaptive_avg_pool2d`` (rows floor(i h / g) .. ceil((i + 1) h / g)),
    as one matrix product (no pooling operator in the exported graph)."""

    def cells(n: int) -> torch.Tensor:
        m = torch.zeros(g, n)
        for i in range(g):
            lo, hi = (i * n) // g, -((-(i + 1) * n) // g)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    return torch.einsum("ay,bx->yxab", cells(h), cells(w)).reshape(h * w, g * g)


class GlobalTerm(nn.Module):
    """Image-level term: Mahalanobis distance of a part's pooled teacher features (per tap, the
    per-channel mean and spread over the image and, with ``grid``, the per-channel mean over each
    cell of a grid x grid grid of the image) to the Gaussian of the good training parts.

    The whitening matrix is kept as one block of rows per tap and statistic, so the graph is
    matrix products and sums (no concatenation or slicing): ``||sum_b (x_b - mean_b) @ W_b||``.
    """

    def __init__(self, channels: list[int], grid: int = 0):
        super().__init__()
        self.channels = list(channels)
        self.grid = grid
        self._grid_at: dict[tuple, torch.Tensor] = {}
        for i, c in enumerate(self.channels):
            for stat, n in self._blocks(c):
                self.register_buffer(f"center_{stat}_{i}", torch.zeros(n))
                self.register_buffer(f"whiten_{stat}_{i}", torch.zeros(n, self.dim))

    def _blocks(self, c: int) -> list[tuple[str, int]]:
        """(statistic, length) of one tap's blocks of the descriptor, in order."""
        return [("mean", c), ("std", c)] + ([("grid", c * self.grid * self.grid)] if self.grid else [])

    @property
    def dim(self) -> int:
        return (2 + self.grid * self.grid) * sum(self.channels)

    def _stats(self, f: torch.Tensor) -> list[torch.Tensor]:
        """One tap's statistics, (N, length) each in ``_blocks`` order; a grid's per channel, cells row-major."""
        out = list(pooled_stats(f))
        if self.grid:
            n, c, h, w = f.shape
            key = (h, w, f.device, f.dtype)
            if key not in self._grid_at:  # a constant of the exported graph
                self._grid_at[key] = grid_matrix(h, w, self.grid).to(f.device, f.dtype)
            out.append((f.reshape(n, c, h * w) @ self._grid_at[key]).reshape(n, c * self.grid * self.grid))
        return out

    def descriptor(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, D): per tap its pooled means, then its pooled spreads, then its grid means (the order of the blocks)."""
        return torch.cat([x for f in feats for x in self._stats(f)], dim=1)

    def set_gaussian(self, mean: torch.Tensor | list, whiten: torch.Tensor | list) -> None:
        """Centre (D,) and whitening (D, D) in ``descriptor``'s order."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        whiten = torch.as_tensor(whiten, dtype=torch.float32)
        if mean.shape != (self.dim,) or whiten.shape != (self.dim, self.dim):
            msg = (
                f"global term of dimension {self.dim} got a mean {tuple(mean.shape)} "
                f"and whitening {tuple(whiten.shape)}"
            )
            raise ValueError(msg)
        at = 0
        for i, c in enumerate(self.channels):
            for stat, n in self._blocks(c):
                getattr(self, f"center_{stat}_{i}").copy_(mean[at : at + n])
                getattr(self, f"whiten_{stat}_{i}").copy_(whiten[at : at + n])
                at += n

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = 0
        for i, f in enumerate(feats):
            for (stat, _), x in zip(self._blocks(self.channels[i]), self._stats(f), strict=True):
                y = y + (x - getattr(self, f"center_{stat}_{i}")) @ getattr(self, f"whiten_{stat}_{i}")
        return (y * y).sum(dim=1).sqrt()


class KDModel(nn.Module):
    """Frozen teacher + student. Input: float RGB 0..255, NCHW, at ``cfg.input_hw()``."""

    def __init__(
        self, teacher: Teacher, cfg: NetConfig, sspcab_lambda: float = 0.1, hard_quantile: float | None = None
    ):
        super().__init__()
        cfg.validate()
        if tuple(teacher.taps) != cfg.teacher_taps():
            msg = f"the teacher taps blocks {list(teacher.taps)}, this network reads {list(cfg.teacher_taps())}"
            raise ValueError(msg)
        self.cfg = cfg
        self.teacher = teacher
        self._kd_at = [cfg.teacher_taps().index(t) for t in cfg.taps]
        self._global_at = [cfg.teacher_taps().index(t) for t in cfg.global_taps]
        self.global_term = GlobalTerm(tap_channels(cfg.global_taps), cfg.global_grid) if cfg.global_taps else None
        # mean / std on the held-out good parts of the map's image score and of the global term's
        # distance: the image score is the larger of the two standardised (with a global term)
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))
        self.student = ReverseStudent(cfg) if cfg.student == "reverse" else Student(cfg)
        self.sspcab_lambda = sspcab_lambda
        self.hard_quantile = hard_quantile
        n = len(cfg.taps)
        # per-channel mean / std of the teacher's features on the training images (distance "l2")
        for i, c in enumerate(tap_channels(cfg.taps)):
            self.register_buffer(f"feat_mean_{i}", torch.zeros(1, c, 1, 1))
            self.register_buffer(f"feat_std_{i}", torch.ones(1, c, 1, 1))
        self.register_buffer("scale_mean", torch.zeros(n))
        self.register_buffer("scale_std", torch.ones(n))
        self.register_buffer("scale_weights", torch.tensor(cfg.scale_weights, dtype=torch.float32))
        sigma = cfg.blur_sigma / cfg.fuse_stride
        k = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("blur_k", k)
        # Zero-padded blur divided by the blur of ones: exact border handling with plain convolutions
        # (every runtime, TensorRT included, supports it).
        height, width = cfg.input_hw()
        self.fuse_size = (height // cfg.fuse_stride, width // cfg.fuse_stride)  # (h, w) of the fused map
        self.register_buffer("blur_norm", self._blur_raw(torch.ones(1, 1, *self.fuse_size)))
        # Per-position mean of the fused map on good images (removes systematic hot spots such as
        # the border rows that TF SAME padding makes) and the spread left after it.
        self.register_buffer("pos_mean", torch.zeros(1, 1, *self.fuse_size))
        # per-position spread of good maps (one value everywhere for bundles from before it)
        self.register_buffer("pos_std", torch.ones(1, 1, *self.fuse_size))
        # bilinear resizes as matrix products, rows and columns (not persistent: rebuilt from the config)
        fh, fw = self.fuse_size
        for i, stride in enumerate(tap_strides(cfg.taps)):
            if stride != cfg.fuse_stride:
                self.register_buffer(f"resize_rows_{i}", bilinear_matrix(fh, height // stride), persistent=False)
                self.register_buffer(f"resize_cols_{i}", bilinear_matrix(fw, width // stride), persistent=False)
        if cfg.fuse_stride != 1:
            self.register_buffer("upsample_rows", bilinear_matrix(height, fh), persistent=False)
            self.register_buffer("upsample_cols", bilinear_matrix(width, fw), persistent=False)
        # the segmentation head (cfg.seg_weight > 0): its logits resized to the fusion size and
        # smoothed, then (x - seg_stats[0]) * seg_stats[1] * seg_weight is joined with the fused map
        # (added, or the larger of the two: cfg.seg_fusion);
        # seg_stats[1] puts its spread on held-out good parts to the fused map's there
        self.seg_head = None
        if cfg.seg_weight:
            self.seg_head = SegHead(
                tap_channels(cfg.taps),
                tap_strides(cfg.taps),
                (height, width),
                cfg.seg_stride,
                cfg.seg_heads,
                cfg.seg_width,
            )
        self.register_buffer("seg_stats", torch.tensor([0.0, 1.0]))
        if self.seg_head is not None:
            gh, gw = self.seg_head.grid
            self.register_buffer("seg_rows", bilinear_matrix(fh, gh), persistent=False)
            self.register_buffer("seg_cols", bilinear_matrix(fw, gw), persistent=False)
            self.register_buffer("seg_blur_k", gaussian_kernel1d(SEG_BLUR_SIGMA / cfg.fuse_stride), persistent=False)
            self.register_buffer(
                "seg_blur_norm", self._blur_raw(torch.ones(1, 1, fh, fw), self.seg_blur_k), persistent=False
            )

    # --- map pieces -------------------------------------------------------------------------
    def _blur_raw(self, m: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        k = self.blur_k if k is None else k
        r = (k.numel() - 1) // 2
        if r == 0:
            return m
        m = F.conv2d(m, k.view(1, 1, 1, -1), padding=(0, r))
        return F.conv2d(m, k.view(1, 1, -1, 1), padding=(r, 0))

    def features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        xn = normalize_input(x)
        t_feats = self.teacher_features(xn)
        s_feats, rec = self.student(xn, t_feats)
        return t_feats, s_feats, rec

    def split_taps(self, raw: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The teacher's outputs (``cfg.teacher_taps()`` order) -> (distillation taps, global term's taps)."""
        return [raw[i] for i in self._kd_at], [raw[i] for i in self._global_at]

    @torch.no_grad()
    def teacher_features(self, xn: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's distillation taps, standardised per channel when the distance is "l2"."""
        return self.standardise(self.split_taps(self.teacher(xn))[0])

    def run_networks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student on float RGB 0..255: (standardised teacher taps, student taps, the raw
        teacher features of the global term's taps)."""
        xn = normalize_input(x)
        kd_raw, global_raw = self.split_taps(self.teacher(xn))
        t_feats = self.standardise(kd_raw)
        return t_feats, self.student(xn, t_feats)[0], global_raw

    def head(
        self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor], global_raw: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the networks' features become: (map (N, H, W), image score (N,))."""
        amap = self.fuse(self.scale_maps(t_feats, s_feats), self.seg_map(t_feats, s_feats))
        score = self.image_score(amap)
        if self.global_term is not None:
            score = self.fused_score(score, self.global_term(global_raw))
        return amap[:, 0], score

    def score_halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves of the image score before standardisation: the map's score and the
        global term's distance, (N,) each (needs a global term)."""
        if self.global_term is None:
            msg = "this network has no global term (global_taps is empty)"
            raise ValueError(msg)
        t_feats, s_feats, global_raw = self.run_networks(x)
        amap = self.fuse(self.scale_maps(t_feats, s_feats), self.seg_map(t_feats, s_feats))
        return self.image_score(amap), self.global_term(global_raw)

    def fused_score(self, map_score: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """max(map score, global distance), each standardised on the held-out good parts; written
        b + relu(a - b) (operators TensorRT's parser is checked for)."""
        st = self.score_stats
        a = (map_score - st[0]) / st[1]
        b = (distance - st[2]) / st[3]
        return b + F.relu(a - b)

    def set_score_stats(self, map_mean: float, map_std: float, global_mean: float, global_std: float) -> None:
        self.score_stats.copy_(
            torch.tensor([map_mean, max(map_std, 1e-8), global_mean, max(global_std, 1e-8)], dtype=torch.float32)
        )

    def standardise(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.cfg.distance == "cosine":
            return feats
        return [(f - getattr(self, f"feat_mean_{i}")) / getattr(self, f"feat_std_{i}") for i, f in enumerate(feats)]

    def distance(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return cosine_distance(t, s) if self.cfg.distance == "cosine" else l2_distance(t, s)

    def scale_maps(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw per-scale discrepancy maps at the fusion size: list of (N, 1, h, w)."""
        out = []
        for i, (t, s) in enumerate(zip(t_feats, s_feats, strict=True)):
            d = self.distance(t, s).unsqueeze(1)
            if tuple(d.shape[-2:]) != self.fuse_size:
                d = resize_bilinear(d, getattr(self, f"resize_rows_{i}"), getattr(self, f"resize_cols_{i}"))
            out.append(d)
        return out

    def fuse_raw(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Normalise each scale by its good-image statistics, weight, sum, smooth (at the fusion size)."""
        total = 0
        for i, m in enumerate(maps):
            total = total + self.scale_weights[i] * (m - self.scale_mean[i]) / self.scale_std[i]
        return self._blur_raw(total / self.scale_weights.sum()) / self.blur_norm

    def seg_logits(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        """The segmentation head's logits resized to the fusion size and smoothed, (N, 1, h, w)."""
        m = resize_bilinear(self.seg_head(t_feats, s_feats), self.seg_rows, self.seg_cols)
        return self._blur_raw(m, self.seg_blur_k) / self.seg_blur_norm

    def seg_map(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor | None:
        """What the segmentation head adds to the fused map at the fusion size (None without one)."""
        if self.seg_head is None:
            return None
        return seg_term(self.seg_logits(t_feats, s_feats), self.seg_stats[0], self.seg_stats[1], self.cfg.seg_weight)

    def set_seg_stats(self, mean: float, scale: float) -> None:
        self.seg_stats.copy_(torch.tensor([mean, max(scale, 1e-8)], dtype=torch.float32))

    def fused_grid(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """``fuse_raw`` minus the good images' per-position mean, scaled: the fused map at the fusion size."""
        return (self.fuse_raw(maps) - self.pos_mean) / self.pos_std

    def fuse(self, maps: list[torch.Tensor], seg: torch.Tensor | None = None) -> torch.Tensor:
        """``fused_grid`` joined with the segmentation head's ``seg_map`` (when given) by
        ``cfg.seg_fusion``, upsampled to the input size."""
        fused = self.fused_grid(maps)
        if seg is not None:
            fused = join_seg(fused, seg, self.cfg.seg_fusion)
        if self.cfg.fuse_stride == 1:
            return fused
        return resize_bilinear(fused, self.upsample_rows, self.upsample_cols)

    def image_score(self, amap: torch.Tensor) -> torch.Tensor:
        flat = amap.flatten(1)
        if self.cfg.score == "max":
            return flat.amax(dim=1)
        k = max(1, round(self.cfg.topk_fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)

    # --- forward ----------------------------------------------------------------------------
    def kd_loss(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        loss = 0
        for t, s in zip(t_feats, s_feats, strict=True):
            if self.cfg.distance == "cosine":
                loss = loss + hard_mean(cosine_distance(t, s), self.hard_quantile)
            else:
                d = t - s
                loss = loss + hard_mean(d * d, self.hard_quantile)
        return loss

    def training_losses(self, xn: torch.Tensor | None, t_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training losses from the (standardised) teacher features, e.g. cached ones. ``xn`` (the
        normalised image) is what the forward student reads; the reverse student reads only ``t_feats``."""
        if xn is None and self.cfg.student != "reverse":
            msg = "the forward student needs the images"
            raise ValueError(msg)
        s_feats, rec = self.student(xn, t_feats)
        kd = self.kd_loss(t_feats, s_feats)
        total = kd + self.sspcab_lambda * rec
        return {"loss": total, "kd_loss": kd.detach(), "sspcab_loss": rec.detach()}

    def synthetic_loss(
        self, xn_bad: torch.Tensor, t_bad: list[torch.Tensor], t_clean: list[torch.Tensor]
    ) -> torch.Tensor:
        """The distillation loss of the student fed a synthetically defective image (``xn_bad``, the
        teacher's features of it ``t_bad``) against the teacher's features of the clean image: the
        student learns to rebuild a good part whatever region is off (``engines.corrupt``)."""
        s_feats, _ = self.student(xn_bad if self.cfg.student != "reverse" else None, t_bad)
        return self.kd_loss(t_clean, s_feats)

    def forward(self, x: torch.Tensor):
        if self.training:
            xn = normalize_input(x)
            return self.training_losses(xn, self.teacher_features(xn))
        return self.head(*self.run_networks(x))

    def train(self, mode: bool = True) -> KDModel:
        super().train(mode)
        self.teacher.train(False)
        return self

    # --- what a bundle's student.pt holds ----------------------------------------------------------
    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The student's state_dict, and the global term's Gaussian under ``global_term.``."""
        sd = dict(self.student.state_dict())
        if self.global_term is not None:
            sd.update({f"{GLOBAL_PREFIX}{k}": v for k, v in self.global_term.state_dict().items()})
        if self.seg_head is not None:
            sd.update({f"{SEG_PREFIX}{k}": v for k, v in self.seg_head.state_dict().items()})
        return sd

    def load_fitted_state(self, sd: dict[str, torch.Tensor]) -> None:
        """Strict inverse of ``fitted_state`` (a missing or unexpected key raises)."""
        glob = {k[len(GLOBAL_PREFIX) :]: v for k, v in sd.items() if k.startswith(GLOBAL_PREFIX)}
        if glob and self.global_term is None:
            msg = "the weights carry a global term but the network's config has no global_taps"
            raise ValueError(msg)
        seg = seg_part(sd)
        if seg and self.seg_head is None:
            msg = "the weights carry a segmentation head but the network's config has seg_weight 0"
            raise ValueError(msg)
        self.student.load_state_dict(student_part(sd), strict=True)
        if self.global_term is not None:
            self.global_term.load_state_dict(glob, strict=True)
        if self.seg_head is not None:
            self.seg_head.load_state_dict(seg, strict=True)

    def set_scale_stats(
        self, mean: list[float], std: list[float], pos_mean: list | None = None, pos_std: float | list | None = None
    ) -> None:
        """``pos_std``: one spread for the whole map (bundles before per-position statistics) or a
        per-position map at the fusion size."""
        self.scale_mean.copy_(torch.tensor(mean, dtype=torch.float32))
        self.scale_std.copy_(torch.tensor(std, dtype=torch.float32).clamp_min(1e-8))
        if pos_mean is None:
            self.pos_mean.zero_()
        else:
            pm = torch.tensor(pos_mean, dtype=torch.float32)
            if pm.shape != self.pos_mean.shape[-2:]:
                msg = f"pos_mean has shape {tuple(pm.shape)}, expected {tuple(self.pos_mean.shape[-2:])}"
                raise ValueError(msg)
            self.pos_mean.copy_(pm.view_as(self.pos_mean))
        if isinstance(pos_std, list):
            ps = torch.tensor(pos_std, dtype=torch.float32)
            if ps.shape != self.pos_std.shape[-2:]:
                msg = f"pos_std has shape {tuple(ps.shape)}, expected {tuple(self.pos_std.shape[-2:])}"
                raise ValueError(msg)
            self.pos_std.copy_(ps.clamp_min(1e-8).view_as(self.pos_std))
        else:
            self.pos_std.fill_(1.0 if pos_std is None else max(float(pos_std), 1e-8))

    def set_feature_stats(self, mean: list[list[float]], std: list[list[float]]) -> None:
        """Per-tap, per-channel mean / std of the teacher's features (distance "l2")."""
        for i, (m, sd) in enumerate(zip(mean, std, strict=True)):
            buf_m, buf_s = getattr(self, f"feat_mean_{i}"), getattr(self, f"feat_std_{i}")
            if len(m) != buf_m.shape[1] or len(sd) != buf_s.shape[1]:
                msg = f"feature statistics for tap {i} have {len(m)} channels, expected {buf_m.shape[1]}"
                raise ValueError(msg)
            buf_m.copy_(torch.tensor(m, dtype=torch.float32).view_as(buf_m))
            buf_s.copy_(torch.tensor(sd, dtype=torch.float32).clamp_min(1e-6).view_as(buf_s))
