"""Evaluation on an MVTec-layout test split: image/pixel AUROC, AU-PRO, F1-max, overlays.

The scoring function is passed in, so the same evaluation serves torch and every runtime.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.data import EvalItem, eval_items, load_images, read_mask
from engines.metrics import au_pro, auroc, f1_max

ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 (N,H,W,3) -> maps, scores


def score_items(items: list[EvalItem], size: int, score_fn: ScoreFn, chunk: int = 64):
    """Run ``score_fn`` over the items in chunks (bounded memory): images, maps, scores, masks."""
    maps = np.empty((len(items), size, size), np.float32)
    scores = np.empty(len(items), np.float32)
    masks = np.empty((len(items), size, size), bool)
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        imgs = load_images([it.path for it in part], size)
        m, s = score_fn(imgs)
        maps[i : i + len(part)] = m
        scores[i : i + len(part)] = s
        for j, it in enumerate(part):
            masks[i + j] = read_mask(it.mask, size, like=it.path)
    return maps, scores, masks


def metric_rows(items: list[EvalItem], maps: np.ndarray, scores: np.ndarray, masks: np.ndarray) -> list[dict]:
    """One row per defect type (good images + that type) and one 'all' row."""
    defect = np.array([it.defect for it in items])
    labels = defect != "good"
    types = sorted(set(defect[labels].tolist()))
    rows = []
    for name in [*types, "all"]:
        sel = (defect == "good") | (defect == name) if name != "all" else np.ones(len(items), bool)
        y = labels[sel]
        f1, _ = f1_max(y, scores[sel])
        rows.append(
            {
                "defect": name,
                "n_good": int((~y).sum()),
                "n_defect": int(y.sum()),
                "image_auroc": auroc(y, scores[sel]),
                "pixel_auroc": auroc(masks[sel], maps[sel]) if masks[sel].any() else float("nan"),
                "au_pro": au_pro(masks[sel], maps[sel]),
                "f1_max": f1,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'defect':<14}{'good':>6}{'ng':>6}{'img AUROC':>11}{'px AUROC':>10}{'AU-PRO':>9}{'F1max':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:

        def f(v: float) -> str:
            return "   -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

        lines.append(
            f"{r['defect']:<14}{r['n_good']:>6}{r['n_defect']:>6}{f(r['image_auroc']):>11}"
            f"{f(r['pixel_auroc']):>10}{f(r['au_pro']):>9}{f(r['f1_max']):>8}"
        )
    return "\n".join(lines)


def heat_overlay(img_rgb: np.ndarray, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """BGR image: the part with a JET heatmap blended on top, map scaled from lo..hi."""
    norm = np.clip((amap - lo) / max(hi - lo, 1e-6), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), 0.55, heat, 0.45, 0)


def save_overlays(
    items: list[EvalItem],
    maps: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    size: int,
    out: Path,
    n: int,
) -> list[Path]:
    """PNG strips image | heatmap overlay | ground-truth mask for a sample of test images."""
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = float(np.quantile(maps, 0.5)), float(np.quantile(maps, 0.999))
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(items), size=min(n, len(items)), replace=False).tolist())
    written = []
    for i in pick:
        img = load_images([items[i].path], size)[0]
        mask = cv2.cvtColor(masks[i].astype(np.uint8) * 255, cv2.COLOR_GRAY2BGR)
        strip = np.concatenate([cv2.cvtColor(img, cv2.COLOR_RGB2BGR), heat_overlay(img, maps[i], lo, hi), mask], 1)
        cv2.putText(strip, f"{items[i].defect} score {scores[i]:.2f}", (4, 14), 0, 0.45, (255, 255, 255), 1)
        p = out / f"{i:04d}_{items[i].defect}_{items[i].path.stem}.png"
        cv2.imwrite(str(p), strip)
        written.append(p)
    return written


def evaluate(data: Path, size: int, score_fn: ScoreFn, out: Path | None = None, n_overlays: int = 12) -> dict[str, Any]:
    items = eval_items(Path(data))
    maps, scores, masks = score_items(items, size, score_fn)
    rows = metric_rows(items, maps, scores, masks)
    result = {"data": str(Path(data).resolve()), "n_images": len(items), "rows": rows}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if n_overlays:
            save_overlays(items, maps, scores, masks, size, out / "overlays", n_overlays)
    return result


def main_evaluate(args) -> int:
    """Entry point used by the CLI (``lineinspect evaluate``)."""
    from engines import bundle as bundle_mod
    from engines.data import DatasetError

    try:
        meta = bundle_mod.read_meta(Path(args.bundle))
        size = bundle_mod.input_size(meta)
        score_fn = _score_fn(args, meta)
        out = Path(args.out) if args.out else Path(args.bundle) / "eval"
        result = evaluate(Path(args.data), size, score_fn, out, n_overlays=args.overlays)
    except (DatasetError, bundle_mod.BundleError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result["rows"]))
    print(f"metrics written to {out / 'metrics.json'}")
    return 0


def _score_fn(args, meta: dict) -> ScoreFn:
    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        from engines.train import load_bundle_model, predict

        model = load_bundle_model(Path(args.bundle), device=getattr(args, "device", "cpu") or "cpu")
        return lambda imgs: predict(model, imgs)
    from engines.runtime import load_runtime

    rt = load_runtime(backend, Path(args.bundle))
    return rt.predict
