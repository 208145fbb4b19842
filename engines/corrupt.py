"""Synthetic defects for training: a random region of a good image made different.

Training option ``synthetic_defects`` (``engines.train``): the student is also shown the teacher's
features of good images with such a region and must still rebuild the *clean* image's features
(as RD++ / DRAEM do with Perlin-noise regions), so at test time a region the good parts never show
comes out rebuilt as a good part, and the map marks it. Nothing here knows a data set's defects:
the regions are thresholded smooth random fields whose grid is drawn per axis (round blobs,
streaks and bands alike, 2-40 % of the image), filled by one of a tone change (gain and offset),
another training image's texture turned by 90 degrees (a direction the parts never show), or a
loss / excess of fine texture (blur, noise). numpy + OpenCV, deterministic for a given generator.
"""

from __future__ import annotations

import cv2
import numpy as np

FILLS = ("tone", "texture", "blur", "noise", "shade")
DEFAULT_FILLS = ("tone", "texture", "blur", "noise")  # what corrupt draws from unless told


def region_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) float32 in 0..1: a soft-edged region covering about 2-40 % of the image."""
    gy, gx = (int(2 ** rng.integers(1, 5)) for _ in range(2))  # 2..16 cells per axis, drawn apart
    field = cv2.resize(rng.standard_normal((gy + 1, gx + 1)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    area = rng.uniform(0.02, 0.4)
    mask = (field >= np.quantile(field, 1.0 - area)).astype(np.float32)
    sigma = rng.uniform(0.5, 3.0)
    return np.clip(cv2.GaussianBlur(mask, (0, 0), sigma), 0.0, 1.0)


def _gain(rng: np.random.Generator) -> float:
    return float(rng.uniform(0.5, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.8))


def _fill(img: np.ndarray, kind: str, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
    """What the region shows: float32 (h, w, 3)."""
    f = img.astype(np.float32)
    h, w = img.shape[:2]
    if kind == "tone":
        return f * _gain(rng) + rng.uniform(-30, 30)
    if kind == "texture":
        src = pool[int(rng.integers(len(pool)))].astype(np.float32)
        src = np.ascontiguousarray(np.rot90(src, k=1 if rng.random() < 0.5 else 3))
        scale = rng.uniform(0.5, 2.0)
        src = cv2.resize(src, (max(8, round(src.shape[1] * scale)), max(8, round(src.shape[0] * scale))))
        reps = (-(-h // src.shape[0]), -(-w // src.shape[1]), 1)
        src = np.tile(src, reps)[:h, :w]
        return src - src.mean() + f.mean() * rng.uniform(0.8, 1.2)
    if kind == "blur":
        return cv2.GaussianBlur(f, (0, 0), rng.uniform(2.0, 6.0))
    if kind == "noise":
        return f + rng.normal(0.0, rng.uniform(10.0, 30.0), (h, w, 1)).astype(np.float32)
    if kind == "shade":  # a faint brightness change (uneven lighting, a discoloured patch)
        return f * float(rng.uniform(0.75, 0.92) if rng.random() < 0.5 else rng.uniform(1.08, 1.3))
    msg = f"unknown fill {kind!r} (one of {FILLS})"
    raise ValueError(msg)


def corrupt(
    img: np.ndarray, rng: np.random.Generator, pool: np.ndarray, fills: tuple[str, ...] = DEFAULT_FILLS
) -> tuple[np.ndarray, np.ndarray]:
    """A good uint8 RGB image (h, w, 3) with one synthetic defect, and its soft mask (h, w).

    ``pool``: good images of the same size (N, h, w, 3) whose texture a ``texture`` fill borrows;
    ``fills``: the kinds of fill drawn from (``FILLS``). A ``shade`` region fades in over a wide
    edge (3-10 % of the image's shorter side), as a lighting or colour change does.
    """
    h, w = img.shape[:2]
    mask = region_mask(rng, h, w)
    kind = fills[int(rng.integers(len(fills)))]
    if kind == "shade":
        mask = np.clip(cv2.GaussianBlur(mask, (0, 0), rng.uniform(0.03, 0.1) * min(h, w)), 0.0, 1.0)
    out = img.astype(np.float32) * (1.0 - mask[..., None]) + _fill(img, kind, rng, pool) * mask[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), mask


def corrupt_batch(batch: np.ndarray, rng: np.random.Generator, pool: np.ndarray) -> np.ndarray:
    """``corrupt`` for each image of a (N, h, w, 3) uint8 batch."""
    return np.stack([corrupt(img, rng, pool)[0] for img in batch])
