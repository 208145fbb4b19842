"""Evaluation on an MVTec-layout test split: image/pixel AUROC, AU-PRO, F1-max, overlays.

The scoring function is passed in, so the same evaluation serves torch and every runtime.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from engines.data import EvalItem, Size, eval_items, hw, load_images, read_mask
from engines.metrics import au_pro, auroc, f1_max

ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 (N,H,W,3) -> maps, scores


def score_items(items: list[EvalItem], size: Size, score_fn: ScoreFn, chunk: int = 64, grid: Size | None = None):
    """Run ``score_fn`` over the items in chunks (bounded memory): maps, scores, masks. The maps
    (bilinear) and masks are at ``grid`` when given (networks of different inputs scored on one
    grid), else at the input ``size``."""
    gh, gw = hw(grid or size)
    resize = (gh, gw) != hw(size)
    maps = np.empty((len(items), gh, gw), np.float32)
    scores = np.empty(len(items), np.float32)
    masks = np.empty((len(items), gh, gw), bool)
    for i in range(0, len(items), chunk):
        part = items[i : i + chunk]
        imgs = load_images([it.path for it in part], size)
        m, s = score_fn(imgs)
        if resize:
            m = [cv2.resize(one, (gw, gh), interpolation=cv2.INTER_LINEAR) for one in m]
        maps[i : i + len(part)] = m
        scores[i : i + len(part)] = s
        for j, it in enumerate(part):
            masks[i + j] = read_mask(it.mask, (gh, gw), like=it.path)
    return maps, scores, masks


def metric_rows(items: list[EvalItem], maps: np.ndarray, scores: np.ndarray, masks: np.ndarray) -> list[dict]:
    """One row per defect type (good images + that type) and one 'all' row.

    Pixel metrics use the good images and the defects that have a mask; a row none of whose defects
    has one gets NaN pixel metrics (``n_masked`` says how many counted).
    """
    defect = np.array([it.defect for it in items])
    labels = defect != "good"
    masked = np.array([not it.mask_missing for it in items])
    types = sorted(set(defect[labels].tolist()))
    rows = []
    for name in [*types, "all"]:
        sel = (defect == "good") | (defect == name) if name != "all" else np.ones(len(items), bool)
        y = labels[sel]
        f1, _ = f1_max(y, scores[sel])
        px = sel & masked
        has_pixels = bool((px & labels).any()) and bool(masks[px].any())
        rows.append(
            {
                "defect": name,
                "n_good": int((~y).sum()),
                "n_defect": int(y.sum()),
                "n_masked": int((px & labels).sum()),
                "image_auroc": auroc(y, scores[sel]),
                "pixel_auroc": auroc(masks[px], maps[px]) if has_pixels else float("nan"),
                "au_pro": au_pro(masks[px], maps[px]) if has_pixels else float("nan"),
                "f1_max": f1,
            }
        )
    return rows


@dataclass(frozen=True)
class PlantMetric:
    """What a plant sees at a calibrated threshold: false rejects on good parts, share of defects caught."""

    alpha: float
    threshold: float
    method: str  # the calibration rule that chose the threshold (order_statistic | gpd)
    n_calibration: int  # held-out good parts of the training split the threshold came from
    frr: float  # observed on the test split's good parts
    caught: float  # share of defective test parts with score >= threshold
    caught_per_defect: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plant_metric(
    calibration_scores: np.ndarray,
    test_scores: np.ndarray,
    defects: list[str],
    alpha: float = 0.01,
    confidence: float = 0.95,
) -> PlantMetric:
    """The project's calibration rule (``calibration.stats.image_threshold``) on held-out good scores,
    then the observed false-reject rate and catch rate on the test split ("score >= threshold" is ng,
    as the service decides)."""
    from calibration.stats import image_threshold

    thr = image_threshold(np.asarray(calibration_scores), alpha, confidence)
    defect = np.asarray(defects)
    s = np.asarray(test_scores, dtype=np.float64)
    good = defect == "good"
    if not good.any() or good.all():
        msg = "the plant metric needs good and defective test parts"
        raise ValueError(msg)
    ng = s >= thr.threshold
    return PlantMetric(
        alpha=alpha,
        threshold=float(thr.threshold),
        method=thr.method,
        n_calibration=len(calibration_scores),
        frr=float(ng[good].mean()),
        caught=float(ng[~good].mean()),
        caught_per_defect={d: float(ng[defect == d].mean()) for d in sorted(set(defect[~good].tolist()))},
    )


def mask_notes(items: list[EvalItem]) -> list[str]:
    """Human-readable lines on missing ground-truth masks (empty when every defect has one)."""
    missing = [it for it in items if it.mask_missing]
    n_defect = sum(it.is_defect for it in items)
    if not missing:
        return []
    if len(missing) == n_defect:
        return ["no defect image has a ground-truth mask: pixel AUROC and AU-PRO are not available"]
    shown = ", ".join(str(it.path) for it in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return [
        f"{len(missing)} of {n_defect} defect images have no ground-truth mask and are left out of the pixel "
        f"metrics: {shown}"
    ]


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
    size: Size,
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


def evaluate(
    data: Path,
    size: Size,
    score_fn: ScoreFn,
    out: Path | None = None,
    n_overlays: int = 12,
    calibration_images: list[Path] | None = None,
    alpha: float = 0.01,
    grid: Size | None = None,
) -> dict[str, Any]:
    """Metrics on ``data``'s test split; with ``calibration_images`` (held-out good parts, never the
    test split) also the plant metric at false-reject target ``alpha``; pixel metrics on ``grid``
    (``score_items``)."""
    items = eval_items(Path(data))
    maps, scores, masks = score_items(items, size, score_fn, grid=grid)
    rows = metric_rows(items, maps, scores, masks)
    result: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "n_images": len(items),
        "rows": rows,
        "notes": mask_notes(items),
        "plant": None,
        "scores": scores.tolist(),
        "defects": [it.defect for it in items],
    }
    if calibration_images:
        cal_scores = np.concatenate(
            [
                score_fn(load_images(calibration_images[i : i + 64], size))[1]
                for i in range(0, len(calibration_images), 64)
            ]
        )
        from calibration.stats import CalibrationStatsError

        try:
            result["plant"] = plant_metric(cal_scores, scores, result["defects"], alpha).to_dict()
        except CalibrationStatsError as exc:
            result["notes"].append(f"plant metric not available: {exc}")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        if n_overlays:
            save_overlays(items, maps, scores, masks, grid or size, out / "overlays", n_overlays)
    return result


def main_evaluate(args) -> int:
    """Entry point used by the CLI (``lineinspect evaluate``)."""
    from engines import bundle as bundle_mod
    from engines.data import DatasetError

    try:
        meta = bundle_mod.read_meta(Path(args.bundle))
        size = bundle_mod.input_hw(meta)
        score_fn = _score_fn(args, meta)
        out = Path(args.out) if args.out else Path(args.bundle) / "eval"
        held_out = held_out_goods(meta)
        result = evaluate(Path(args.data), size, score_fn, out, n_overlays=args.overlays, calibration_images=held_out)
        if held_out is None:
            result["notes"].append(
                "plant metric not available: the good images this bundle's training held out are not on disk "
                f"(training data: {meta.get('training', {}).get('data')})"
            )
    except (DatasetError, bundle_mod.BundleError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result["rows"]))
    for note in result["notes"]:
        print(f"note: {note}")
    print(format_plant(result["plant"]))
    print(f"metrics written to {out / 'metrics.json'}")
    return 0


def held_out_goods(meta: dict) -> list[Path] | None:
    """The good images ``lineinspect train`` held out of training (its split: ``bundle_split``), if
    still on disk."""
    from engines.data import DatasetError
    from engines.train import bundle_split

    training = meta.get("training") or {}
    cfg = training.get("config") or {}
    data = training.get("data")
    if not data or not Path(data).exists() or not cfg.get("val_fraction"):
        return None
    try:
        return bundle_split(meta)[2]
    except (DatasetError, ValueError):  # the folder no longer holds good images; a config this version cannot read
        return None


def format_plant(plant: dict | None) -> str:
    if plant is None:
        return "plant metric: not available"
    per = ", ".join(f"{k} {v:.1%}" for k, v in plant["caught_per_defect"].items())
    return (
        f"at a {plant['alpha']:.0%} false-reject target (threshold {plant['threshold']:.4g} from "
        f"{plant['n_calibration']} held-out good parts, {plant['method']}): observed false rejects "
        f"{plant['frr']:.1%}, defective parts caught {plant['caught']:.1%} ({per})"
    )


def _score_fn(args, meta: dict) -> ScoreFn:
    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        from engines.train import load_bundle_model, predict

        model = load_bundle_model(Path(args.bundle), device=getattr(args, "device", "cpu") or "cpu")
        return lambda imgs: predict(model, imgs)
    from engines.runtime import load_runtime

    rt = load_runtime(backend, Path(args.bundle))
    return rt.predict
