"""Training the segmentation head (``engines.model.SegHead``) once the student is trained.

A distillation map asks "can the student rebuild this patch?", so a region whose texture the good
parts show elsewhere (magnetic_tile's ``uneven`` bands) is marked at its edge at most. The head is
trained to *segment* synthetic defects (``engines.corrupt``: thresholded smooth random regions
filled by a tone change, a turned texture, blur or noise; nothing of a data set's defects) painted
on the training parts, a share of the samples left clean, from the frozen teacher's and student's
features of them (computed once). Its logits are then put on the fused map's scale with the
held-out good parts (``KDModel.seg_stats``). README, "Accuracy".
"""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from engines.corrupt import DEFAULT_FILLS, corrupt
from engines.model import KDModel

MAX_SAMPLES = 2000  # bounds the cached features (at 256 x 256 about 0.18 MB each on the stride-16 grid, 0.7 MB on 8)
CLEAN_SHARE = 0.25  # samples left without a defect
BATCH = 16
LR = 2e-3  # one-cycle peak
SEG_STATS = ("seg_mean", "seg_scale", "n_held_out")  # what fit_seg_stats records (a refit fits them again)


def synthetic_sample(
    img: np.ndarray,
    rng: np.random.Generator,
    pool: np.ndarray,
    clean: float = CLEAN_SHARE,
    fills: tuple[str, ...] = DEFAULT_FILLS,
) -> tuple[np.ndarray, np.ndarray]:
    """One sample from a good uint8 image (H, W, 3): randomly flipped, then given one synthetic
    defect (``engines.corrupt``, textures borrowed from ``pool``) or, with probability ``clean``,
    left as is; (image, soft mask (H, W))."""
    img = img[:, ::-1] if rng.random() < 0.5 else img
    img = np.ascontiguousarray(img[::-1] if rng.random() < 0.5 else img)
    if rng.random() < clean:
        return img, np.zeros(img.shape[:2], np.float32)
    return corrupt(img, rng, pool, fills)


def synthetic_set(
    images: np.ndarray, n: int, rng: np.random.Generator, fills: tuple[str, ...] = DEFAULT_FILLS
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples (``synthetic_sample``) cycling through good uint8 images (N, H, W, 3):
    (images, soft masks (n, H, W))."""
    samples = (synthetic_sample(images[k % len(images)], rng, images, fills=fills) for k in range(n))
    xs, ms = zip(*samples, strict=True)
    return np.stack(xs), np.stack(ms)


def grid_targets(masks: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Soft masks (n, H, W) -> the share of each head cell that is defective, (n, 1, h, w)."""
    gh, gw = grid
    return torch.from_numpy(np.stack([cv2.resize(m, (gw, gh), interpolation=cv2.INTER_AREA) for m in masks]))[:, None]


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per cell plus a soft Dice over the batch (a region counts as a whole,
    whatever its size)."""
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice


@torch.no_grad()
def head_inputs(model: KDModel, images: np.ndarray, batch_size: int = 16) -> torch.Tensor:
    """The head's inputs (``SegHead.inputs``) of uint8 images, float16 on the CPU."""
    from engines.train import to_tensor

    device = next(model.student.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        t_feats, s_feats, _ = model.run_networks(to_tensor(images[i : i + batch_size], device))
        out.append(model.seg_head.inputs(t_feats, s_feats).half().cpu())
    return torch.cat(out)


def train_seg_head(
    model: KDModel,
    train_imgs: np.ndarray,
    held_out: np.ndarray,
    steps: int,
    seed: int,
    fills: tuple[str, ...] = DEFAULT_FILLS,
    *,
    samples_per_image: int,
    max_samples: int = MAX_SAMPLES,
) -> dict[str, Any]:
    """Train ``model.seg_head`` (the student and teacher stay frozen) on ``samples_per_image``
    synthetic samples per training part (``TrainConfig.seg_samples``; at most ``max_samples``),
    then set its statistics on the held-out good parts (``fit_seg_stats``). Its networks
    (``NetConfig.seg_heads``) are trained one after the other, network k from seed ``seed + k``
    (its own samples, initialisation and batch order: the first is the one-head bundle's head, bit
    for bit). Returns what model.json records."""
    if model.seg_head is None:
        msg = "this network has no segmentation head (seg_weight is 0)"
        raise ValueError(msg)
    device = next(model.student.parameters()).device
    head = model.seg_head
    model.eval()
    t0 = time.perf_counter()
    xv, mv = synthetic_set(held_out, len(held_out), np.random.default_rng(seed + 104729), fills)
    feats_v, targets_v = head_inputs(model, xv).float().to(device), grid_targets(mv, head.grid).to(device)
    feature_s, train_s = time.perf_counter() - t0, 0.0
    n = min(samples_per_image * len(train_imgs), max_samples)
    losses, held_out_losses = [], []
    for k, net in enumerate(head.nets):
        with torch.random.fork_rng():  # a fresh network from its seed each time (a refit trains it again)
            torch.manual_seed(seed + k)
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        t0 = time.perf_counter()
        x, masks = synthetic_set(train_imgs, n, np.random.default_rng(seed + k + 7919), fills)
        feats, targets = head_inputs(model, x), grid_targets(masks, head.grid)
        del x
        feature_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        losses.append(_train_network(net, feats, targets, steps, torch.Generator().manual_seed(seed + k), device))
        train_s += time.perf_counter() - t0
        del feats, targets
        with torch.no_grad():
            held_out_losses.append(round(float(seg_loss(net(feats_v), targets_v)), 4))
    with torch.no_grad():  # of the mean of the networks: what the map uses
        val = float(seg_loss(head.logits(feats_v), targets_v))
    record = {
        "samples": n,
        "steps": steps,
        "loss": round(float(np.mean(losses)), 4),
        "synthetic_held_out_loss": round(val, 4),
        "feature_seconds": round(feature_s, 1),
        "train_seconds": round(train_s, 1),
    }
    if len(head.nets) > 1:  # each network's own (one head: the two above)
        record |= {"heads": len(head.nets), "head_losses": [round(v, 4) for v in losses]}
        record["head_held_out_losses"] = held_out_losses
    return record | fit_seg_stats(model, held_out)


def _train_network(
    net: torch.nn.Module,
    feats: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    gen: torch.Generator,
    device: torch.device,
) -> float:
    """``steps`` one-cycle Adam steps of one head network on cached inputs; its last batch's loss."""
    opt = torch.optim.Adam(net.parameters(), LR / 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps)
    net.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(0, len(feats), (BATCH,), generator=gen)
        loss = seg_loss(net(feats[idx].float().to(device)), targets[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    return float(loss.detach())


@torch.no_grad()
def fit_seg_stats(model: KDModel, held_out: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Centre the head's logits on their mean over the held-out good parts' pixels and scale their
    spread there to the fused map's (so ``seg_weight`` 1 weighs the two alike); sets and returns them."""
    from engines.train import to_tensor

    device = next(model.student.parameters()).device
    s1 = s2 = f1 = f2 = 0.0
    count = 0
    for i in range(0, len(held_out), batch_size):
        t_feats, s_feats, _ = model.run_networks(to_tensor(held_out[i : i + batch_size], device))
        seg = model.seg_logits(t_feats, s_feats).double()
        ours = model.fused_grid(model.scale_maps(t_feats, s_feats)).double()
        s1, s2 = s1 + seg.sum().item(), s2 + (seg * seg).sum().item()
        f1, f2 = f1 + ours.sum().item(), f2 + (ours * ours).sum().item()
        count += seg.numel()
    mean = s1 / count
    seg_std = max(s2 / count - mean * mean, 1e-12) ** 0.5
    ours_std = max(f2 / count - (f1 / count) ** 2, 1e-12) ** 0.5
    model.set_seg_stats(mean, ours_std / seg_std)
    return {"seg_mean": mean, "seg_scale": ours_std / seg_std, "n_held_out": len(held_out)}
