"""Datasets: MVTec AD layout or a plain folder of good images. numpy + OpenCV only (no torch).

MVTec layout::

    <root>/train/good/*                     good parts (training)
    <root>/test/good/*                      good parts held out
    <root>/test/<defect>/*                  defective parts
    <root>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# The model's input size: one side (a square) or (height, width).
Size = int | tuple[int, int]


def hw(size: Size) -> tuple[int, int]:
    """(height, width) of a model input size given as one side (a square) or as (height, width)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


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


def preprocess(img: np.ndarray, size: Size) -> np.ndarray:
    """Camera image (grayscale or BGR, uint8) -> RGB uint8 (height, width, 3), the model's input
    (``size`` one side of a square or (height, width)).

    The same function serves training, evaluation and the line service, so they cannot drift.
    """
    if img.dtype != np.uint8:
        msg = f"expected a uint8 image, got {img.dtype}"
        raise ValueError(msg)
    rgb = to_rgb(img)
    h, w = hw(size)
    if rgb.shape[:2] != (h, w):
        interp = cv2.INTER_AREA if rgb.shape[0] >= h and rgb.shape[1] >= w else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (w, h), interpolation=interp)
    return np.ascontiguousarray(rgb)


def read_image(path: Path, size: Size) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        msg = f"cannot read image {path} (missing, unreadable or not an image)"
        raise DatasetError(msg)
    if img.dtype != np.uint8:  # 16-bit TIFF/PNG: scale to 8 bit
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(float(img.max()), 1.0))
    return preprocess(img, size)


def read_mask(path: Path | None, size: Size, like: Path | None = None) -> np.ndarray:
    """Ground-truth mask resized (nearest) to the model size; all-zero when ``path`` is None."""
    h, w = hw(size)
    if path is None:
        return np.zeros((h, w), dtype=bool)
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        msg = f"cannot read mask {path}" + (f" (for {like})" if like else "")
        raise DatasetError(msg)
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) > 127


# image_width "auto": the training images share one aspect ratio when this share of them lies within
# ASPECT_SPREAD of their median; it is kept when it is at least ASPECT_KEPT : 1 (else: a square input)
ASPECT_SHARE = 0.9
ASPECT_SPREAD = 0.10
ASPECT_KEPT = 1.25


def parse_image_width(text: str) -> int | str:
    """A command line's ``--image-width``: a number of pixels, ``auto`` or ``square``."""
    if text in ("auto", "square"):
        return text
    try:
        return int(text)
    except ValueError:
        msg = f"--image-width takes a number of pixels, auto or square, got {text!r}"
        raise ValueError(msg) from None


def image_aspects(paths: Sequence[Path]) -> np.ndarray:
    """Width / height of each image, from its header (Pillow, which matplotlib brings; nothing decoded)."""
    from PIL import Image

    out = np.empty(len(paths))
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                w, h = im.size
        except OSError as exc:
            msg = f"cannot read image {p} ({exc})"
            raise DatasetError(msg) from exc
        out[i] = w / h
    return out


def keep_aspect_input(aspects: np.ndarray, side: int, multiple: int) -> tuple[tuple[int, int] | None, str]:
    """The input ``image_width: auto`` chooses: (height, width) of about ``side`` x ``side`` pixels at
    the images' shared aspect ratio, both sides multiples of ``multiple``, or None (a square input)
    when they do not share one or it is near square; and why, in words."""
    if len(aspects) == 0:
        return None, "square (no images)"
    median = float(np.median(aspects))
    share = float(np.mean(np.abs(aspects / median - 1.0) <= ASPECT_SPREAD))
    if share < ASPECT_SHARE:
        return None, f"square (the images' aspects differ: {share:.0%} within {ASPECT_SPREAD:.0%} of {median:.2f})"
    if max(median, 1.0 / median) < ASPECT_KEPT:
        return None, f"square (the images' aspect {median:.2f} is near square)"
    h = max(multiple, round(side / math.sqrt(median) / multiple) * multiple)
    w = max(multiple, round(side * side / h / multiple) * multiple)
    return (h, w), f"{h} x {w} (the images' aspect {median:.2f}, {share:.0%} of them within {ASPECT_SPREAD:.0%})"


def load_images(paths: Sequence[Path], size: Size) -> np.ndarray:
    out = np.empty((len(paths), *hw(size), 3), dtype=np.uint8)
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
