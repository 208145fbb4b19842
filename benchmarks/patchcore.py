"""The memory-bank peer for benchmarks/accuracy.py: PatchCore (Roth et al., CVPR 2022), written here.

Benchmark code only, not a product backend. It runs on the same offline EfficientNet-Lite0 teacher
the product distils from, so the comparison is about the method, not the backbone:

1. locally aware patch features: each tapped map is averaged over its 3x3 neighbourhood (stride 1),
   the coarser maps are upsampled (bilinear) to the finest used map, and all are concatenated;
2. the memory bank is every patch of the good training images, reduced by greedy k-center
   selection (the farthest point from the centres chosen so far, distances measured after a
   random projection to ``proj_dim`` dimensions, as the paper does) to ``coreset_ratio`` of it;
3. a test patch scores its Euclidean distance to the nearest centre; the image score is the
   largest patch score, reweighted by the paper's softmax over that centre's ``reweight_k``
   nearest centres; the patch map is upsampled to the input size and smoothed with the same
   Gaussian (sigma in input pixels) as the product's map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engines.model import bilinear_matrix, gaussian_kernel1d, resize_bilinear
from engines.teacher import Teacher, build_teacher, normalize_input


def greedy_coreset(features: torch.Tensor, n_select: int, proj_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Indices of ``n_select`` rows of ``features`` (N, D) chosen by greedy k-center selection.

    The first centre is a seeded random row; each next one is the row farthest from all centres so
    far. With ``proj_dim`` below D, distances are measured after a seeded Gaussian random projection.
    """
    n = features.shape[0]
    n_select = max(1, min(int(n_select), n))
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], proj_dim, generator=g) / math.sqrt(proj_dim)
        x = x @ proj
    first = int(torch.randint(n, (1,), generator=g))
    chosen = torch.empty(n_select, dtype=torch.long)
    chosen[0] = first
    min_d = ((x - x[first]) ** 2).sum(1)
    for i in range(1, n_select):
        nxt = int(torch.argmax(min_d))
        chosen[i] = nxt
        torch.minimum(min_d, ((x - x[nxt]) ** 2).sum(1), out=min_d)
    return chosen


def nearest(
    queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of the k nearest rows of ``bank``."""
    bank_sq = (bank * bank).sum(1)
    dists, idx = [], []
    for i in range(0, len(queries), chunk):
        q = queries[i : i + chunk]
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ bank.T + bank_sq
        v, j = d2.clamp_min(0).topk(k, dim=1, largest=False)
        dists.append(v.sqrt())
        idx.append(j)
    return torch.cat(dists), torch.cat(idx)


def local_patches(feats: list[torch.Tensor]) -> torch.Tensor:
    """Locally aware patch features (N, D, h, w): each tapped map averaged over its 3x3 neighbourhood
    (stride 1), the coarser maps upsampled (bilinear) to the first (finest) one, concatenated."""
    feats = [F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False) for f in feats]
    h, w = feats[0].shape[-2:]
    up = [feats[0]]
    for f in feats[1:]:
        if f.shape[-2:] != (h, w):
            f = resize_bilinear(f, bilinear_matrix(h, f.shape[-2]), bilinear_matrix(w, f.shape[-1]))
        up.append(f)
    return torch.cat(up, dim=1)


def smooth(m: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) maps smoothed with a Gaussian of ``sigma`` pixels, borders renormalised (as the
    product's map: the zero-padded blur divided by the blur of ones)."""
    if sigma <= 0:
        return m
    kern = gaussian_kernel1d(sigma)
    r = (kern.numel() - 1) // 2
    ones = torch.ones_like(m[:1])

    def blur(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, kern.view(1, 1, 1, -1), padding=(0, r))
        return F.conv2d(x, kern.view(1, 1, -1, 1), padding=(r, 0))

    return blur(m) / blur(ones)


@dataclass
class PatchCoreConfig:
    taps: tuple[int, ...] = (4, 10)  # stride 8 and 16: the mid-level maps, as PatchCore's layer2 + layer3
    coreset_ratio: float = 0.01
    proj_dim: int = 128
    reweight_k: int = 9
    # the greedy selection runs over at most this many patches drawn at random (seeded) from the bank
    # (the selection is memory-bound: 2 CPU cores scan ~100 MB per chosen centre at this size);
    # the number of centres is still coreset_ratio of ALL patches
    max_candidates: int | None = 150_000
    blur_sigma: float = 4.0  # input pixels, the product's default
    batch_size: int = 16


class PatchCore:
    """Fit on good images, then ``predict(images) -> (maps (N, H, W), scores (N,))`` like the product."""

    def __init__(self, cfg: PatchCoreConfig | None = None, teacher: Teacher | None = None, seed: int = 0):
        self.cfg = cfg or PatchCoreConfig()
        self.seed = seed
        self.teacher = teacher if teacher is not None else build_teacher(None, tuple(self.cfg.taps))[0]
        self.teacher.eval()
        self.bank: torch.Tensor | None = None
        self.n_patches = 0

    @torch.no_grad()
    def patch_features(self, images: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N*h*w, D) locally aware patch features and the patch grid (h, w)."""
        out, grid = [], (0, 0)
        for i in range(0, len(images), self.cfg.batch_size):
            x = torch.from_numpy(images[i : i + self.cfg.batch_size]).permute(0, 3, 1, 2).float()
            cat = local_patches(self.teacher(normalize_input(x)))
            grid = tuple(cat.shape[-2:])
            out.append(cat.permute(0, 2, 3, 1).reshape(-1, cat.shape[1]))
        return torch.cat(out), grid

    def fit(self, images: np.ndarray) -> PatchCore:
        feats, _ = self.patch_features(images)
        self.n_patches = len(feats)
        n_select = max(1, round(self.cfg.coreset_ratio * len(feats)))
        if self.cfg.max_candidates is not None and len(feats) > self.cfg.max_candidates:
            g = torch.Generator().manual_seed(self.seed)
            feats = feats[torch.randperm(len(feats), generator=g)[: self.cfg.max_candidates]]
        idx = greedy_coreset(feats, n_select, self.cfg.proj_dim, self.seed)
        self.bank = feats[idx].contiguous()
        return self

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.bank is None:
            msg = "PatchCore.predict before fit"
            raise RuntimeError(msg)
        maps, scores = [], []
        k = min(self.cfg.reweight_k, len(self.bank))
        for i in range(0, len(images), self.cfg.batch_size):
            part = images[i : i + self.cfg.batch_size]
            feats, (h, w) = self.patch_features(part)
            d, j = nearest(feats, self.bank, 1)
            patch = d[:, 0].view(len(part), h * w)
            scores.append(self._reweighted_max(feats.view(len(part), h * w, -1), patch, j[:, 0].view(len(part), -1), k))
            m = patch.view(len(part), 1, h, w)
            rows, cols = part.shape[1:3]  # the input's size (square or not)
            m = resize_bilinear(m, bilinear_matrix(rows, h), bilinear_matrix(cols, w))
            maps.append(smooth(m, self.cfg.blur_sigma)[:, 0])
        return torch.cat(maps).numpy(), torch.cat(scores).numpy()

    def _reweighted_max(self, feats: torch.Tensor, patch: torch.Tensor, nn_idx: torch.Tensor, k: int) -> torch.Tensor:
        """The paper's image score: s* = max patch distance, times 1 - softmax weight of its own centre
        among that centre's k nearest centres (a patch whose centre sits in a dense region scores less)."""
        out = torch.empty(len(patch))
        for n in range(len(patch)):
            p = int(torch.argmax(patch[n]))
            s_star = patch[n, p]
            centre = self.bank[nn_idx[n, p]]
            _, neigh = nearest(centre[None], self.bank, k)
            dq = torch.linalg.vector_norm(self.bank[neigh[0]] - feats[n, p], dim=1)
            w = 1.0 - torch.exp(dq[0] - torch.logsumexp(dq, 0)) if k > 1 else torch.tensor(1.0)
            out[n] = w * s_star
        return out
