"""Datasets: MVTec AD layout or a plain folder of good images. numpy + OpenCV only (no torch).

MVTec layout::

    <root>/train/good/*                     good parts (training)
    <root>/test/good/*                      good parts held out
    <root>/test/<defect>/*                  defective parts
    <root>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """Bad dataset input: the message names the path and what is wrong with it."""


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Any 8-bit camera image (H,W), (H,W,1), (H,W,3 BGR) or (H,W,4 BGRA) -> (H,W,3) RGB."""
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2RGB)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    msg = f"unsupported image shape {img.shape}"
    raise ValueError(msg)


def preprocess(img: np.ndarray, size: int) -> np.ndarray:
    """Camera image (grayscale or BGR, uint8) -> RGB uint8 (size, size, 3), the model's input.

    The same function serves training, evaluation and the line service, so they cannot drift.
    """
    if img.dtype != np.uint8:
        msg = f"expected a uint8 image, got {img.dtype}"
        raise ValueError(msg)
    rgb = to_rgb(img)
    if rgb.shape[:2] != (size, size):
        interp = cv2.INTER_AREA if min(rgb.shape[:2]) >= size else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    return np.ascontiguousarray(rgb)


def read_image(path: Path, size: int) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        msg = f"cannot read image {path} (missing, unreadable or not an image)"
        raise DatasetError(msg)
    if img.dtype != np.uint8:  # 16-bit TIFF/PNG: scale to 8 bit
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    return preprocess(img, size)


def read_mask(path: Path | None, size: int, like: Path | None = None) -> np.ndarray:
    """Ground-truth mask resized (nearest) to the model size; all-zero when ``path`` is None."""
    if path is None:
        return np.zeros((size, size), dtype=bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        msg = f"cannot read mask {path}" + (f" (for {like})" if like else "")
        raise DatasetError(msg)
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) > 127


def load_images(paths: Sequence[Path], size: int) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = read_image(p, size)
    return out


def good_training_images(root: Path) -> list[Path]:
    """MVTec ``<root>/train/good`` or, failing that, the images directly in ``root``."""
    root = Path(root)
    if not root.exists():
        msg = f"dataset folder not found: {root}"
        raise DatasetError(msg)
    if not root.is_dir():
        msg = f"dataset path is not a folder: {root}"
        raise DatasetError(msg)
    mvtec = root / "train" / "good"
    if mvtec.is_dir():
        imgs = list_images(mvtec)
        if not imgs:
            msg = f"no images ({', '.join(IMAGE_EXTS)}) in {mvtec}"
            raise DatasetError(msg)
        return imgs
    imgs = list_images(root)
    if not imgs:
        msg = (
            f"{root} is neither an MVTec-style dataset (no train/good/ folder) nor a folder of images "
            f"({', '.join(IMAGE_EXTS)})"
        )
        raise DatasetError(msg)
    return imgs


@dataclass(frozen=True)
class EvalItem:
    path: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # None on a good part (nothing defective) or a defect without a mask file
    mask_missing: bool = False  # a defect whose ground-truth mask file does not exist

    @property
    def is_defect(self) -> bool:
        return self.defect != "good"


def eval_items(root: Path, require_masks: bool = False) -> list[EvalItem]:
    """Every image under ``<root>/test/<type>/`` with its mask.

    Plants often label parts good / bad without pixel masks: a defect without its
    ``ground_truth/<type>/<stem>_mask.png`` is kept with ``mask_missing`` set (image metrics still
    count it; pixel metrics leave it out), unless ``require_masks`` makes that an error.
    """
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        msg = f"{root} has no test/ folder (expected MVTec layout: test/good, test/<defect>, ground_truth/)"
        raise DatasetError(msg)
    items: list[EvalItem] = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        for img in list_images(sub):
            mask, missing = None, False
            if sub.name != "good":
                mask = root / "ground_truth" / sub.name / f"{img.stem}_mask.png"
                if not mask.is_file():
                    if require_masks:
                        msg = f"missing ground-truth mask {mask} for {img}"
                        raise DatasetError(msg)
                    mask, missing = None, True
            items.append(EvalItem(img, sub.name, mask, missing))
    if not items:
        msg = f"no test images under {test}"
        raise DatasetError(msg)
    return items


def split_holdout(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Deterministic split of good images into (train, held-out validation)."""
    paths = list(paths)
    n_val = round(len(paths) * fraction)
    if fraction > 0:
        n_val = max(n_val, 1)
    if len(paths) - n_val < 1:
        msg = f"too few good images ({len(paths)}) to hold out {fraction:.0%} for validation"
        raise DatasetError(msg)
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val
