"""Synthetic textured parts with scratches, spots and dents, written in the MVTec AD layout.

For tests and the demo only (real benchmarks use ../shared/data). numpy + OpenCV, deterministic.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "spot", "dent")


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed-metal-like texture, float32 (size, size, 3) in 0..255."""
    base = rng.uniform(110, 140)
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    brushed = cv2.GaussianBlur(noise, (0, 0), sigmaX=6.0, sigmaY=0.6) * 40
    grain = cv2.GaussianBlur(noise, (0, 0), 1.0) * 10
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shading = 12 * (xx - 0.5) + rng.uniform(-6, 6) * (yy - 0.5)
    g = base + brushed + grain + shading
    tint = np.array([1.0, 0.98, 0.94], dtype=np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    return g[..., None] * tint[None, None, :]


def _scratch(rng, img, mask):
    size = img.shape[0]
    p = rng.uniform(0.15, 0.85, 2) * size
    n = rng.integers(3, 6)
    ang = rng.uniform(0, np.pi)
    pts = [p]
    for _ in range(n):
        ang += rng.normal(0, 0.25)
        p = p + np.array([np.cos(ang), np.sin(ang)]) * rng.uniform(0.05, 0.1) * size
        pts.append(p)
    pts = np.clip(np.array(pts), 2, size - 3).astype(np.int32)
    width = int(rng.integers(2, 4))
    layer = np.zeros(mask.shape, np.uint8)
    cv2.polylines(layer, [pts], False, 255, width)
    sign = 1 if rng.random() < 0.5 else -1
    img += sign * rng.uniform(60, 90) * (layer[..., None] / 255.0)
    mask |= layer > 0


def _spot(rng, img, mask):
    size = img.shape[0]
    c = tuple(int(v) for v in rng.uniform(0.15, 0.85, 2) * size)
    axes = tuple(int(v) for v in rng.uniform(0.025, 0.06, 2) * size)
    layer = np.zeros(mask.shape, np.uint8)
    cv2.ellipse(layer, c, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    soft = cv2.GaussianBlur(layer.astype(np.float32) / 255.0, (0, 0), 1.5)
    img -= rng.uniform(60, 90) * soft[..., None]
    img[..., 0] += 15 * soft  # a rusty tint
    mask |= layer > 0


def _dent(rng, img, mask):
    size = img.shape[0]
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(0.05, 0.09) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    rr = dx**2 + dy**2
    inside = rr < 1
    # Shading of a shallow crater lit from the top-left: bright rim on one side, dark on the other.
    shade = np.where(inside, (dx + dy) * (1 - rr), 0).astype(np.float32)
    img += rng.uniform(80, 110) * shade[..., None]
    mask |= inside


_DEFECTS = {"scratch": _scratch, "spot": _spot, "dent": _dent}


def render(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One part image (uint8 RGB) and its defect mask (bool)."""
    img = _surface(rng, size)
    mask = np.zeros((size, size), dtype=bool)
    if defect is not None:
        _DEFECTS[defect](rng, img, mask)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_dataset(
    root: Path,
    n_train: int = 60,
    n_test_good: int = 12,
    n_test_per_defect: int = 8,
    size: int = 256,
    seed: int = 0,
    defects: tuple[str, ...] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic MVTec-layout dataset to ``root`` and return it."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for d in defects:
        if d not in _DEFECTS:
            msg = f"unknown synthetic defect {d!r}; choose from {', '.join(DEFECT_TYPES)}"
            raise ValueError(msg)

    def save(path: Path, rgb: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            msg = f"could not write {path}"
            raise OSError(msg)

    for i in range(n_train):
        save(root / "train" / "good" / f"{i:04d}.png", render(rng, size, None)[0])
    for i in range(n_test_good):
        save(root / "test" / "good" / f"{i:04d}.png", render(rng, size, None)[0])
    for d in defects:
        for i in range(n_test_per_defect):
            img, mask = render(rng, size, d)
            save(root / "test" / d / f"{i:04d}.png", img)
            mpath = root / "ground_truth" / d / f"{i:04d}_mask.png"
            mpath.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mpath), mask.astype(np.uint8) * 255)
    return root
