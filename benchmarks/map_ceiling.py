"""What the pixel metrics can reach if one defect type were found perfectly (an analysis, not a detector).

    python benchmarks/map_ceiling.py \\
        --bundle runs/accuracy/magnetic_tile-full-rd-l2-hq0.999-e20-statstraining-blur2-s0 \\
        --data ../shared/data/magnetic_tile --defect uneven

The bundle's map on the test split, and the same map with the images of ``--defect`` changed by an
oracle that reads their ground-truth masks: (a) every defective pixel of that type set above the
map's maximum (the type found perfectly, region and all), (b) only a band of +-d pixels around the
region's outline inside the image set so (a detector that finds the region's edge perfectly but
not its inside), for each d of ``--bands``. Every other image keeps the bundle's map. Prints pixel
AUROC / AU-PRO over all defects and for the type; writes benchmarks/results/map_ceiling.json.
It answers whether a target on the pixel metrics needs a map that fills a region or one that
finds its edges (magnetic_tile's ``uneven``: bands across the tile whose inside is a texture the
good tiles show elsewhere, and 72 % of the set's defective pixels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402


def outline_band(mask: np.ndarray, d: int) -> np.ndarray:
    """bool (H, W): the pixels within ``d`` px of the mask region's outline, not within ``d`` px of
    the image border (where a region that reaches the border ends without an edge)."""
    import cv2

    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    m = (mask > 0).astype(np.uint8)
    band = cv2.dilate(m, kernel) > cv2.erode(m, kernel)
    band[:d, :] = band[-d:, :] = False
    band[:, :d] = band[:, -d:] = False
    return band


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--defect", required=True, help="the defect type the oracle finds")
    ap.add_argument("--bands", type=int, nargs="+", default=[8, 16, 32], help="outline half-widths in input px")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "map_ceiling.json")
    args = ap.parse_args()

    from engines.data import eval_items
    from engines.evaluate import metric_rows, score_items
    from engines.train import load_bundle_model, predict

    model = load_bundle_model(args.bundle, device="cpu")
    items = eval_items(args.data, require_masks=True)
    of_type = np.array([it.defect == args.defect for it in items])
    if not of_type.any():
        ap.error(f"{args.data} has no test images of defect type {args.defect!r}")
    ours, scores, masks = score_items(items, model.cfg.input_hw(), lambda imgs: predict(model, imgs))
    top = float(ours.max()) + 1.0
    variants = [("ours (the bundle's map)", ours)]
    perfect = ours.copy()
    perfect[of_type] = np.where(masks[of_type] > 0, top, ours[of_type])
    variants.append((f"{args.defect} regions found perfectly", perfect))
    for d in args.bands:
        m = ours.copy()
        for i in np.flatnonzero(of_type):
            m[i] = np.where(outline_band(masks[i], d), top, ours[i])
        variants.append((f"{args.defect} outline +-{d} px found perfectly", m))
    share = float((masks[of_type] > 0).sum() / max((masks > 0).sum(), 1))
    machine = machine_name()
    print(f"\n{args.data.name}, {args.bundle.name} ({machine}); {args.defect}: {share:.0%} of the defective pixels")
    print(f"map | all: pixel AUROC / AU-PRO | {args.defect}: pixel AUROC / AU-PRO")
    results = []
    for name, m in variants:
        rows = {r["defect"]: r for r in metric_rows(items, m, scores, masks)}
        a, t = rows["all"], rows[args.defect]
        every = f"{a['pixel_auroc']:.3f} / {a['au_pro']:.3f}"
        print(f"{name} | {every} | {t['pixel_auroc']:.3f} / {t['au_pro']:.3f}", flush=True)
        results.append(
            {
                "variant": name,
                "pixel_auroc": round(a["pixel_auroc"], 4),
                "au_pro": round(a["au_pro"], 4),
                "defect_pixel_auroc": round(t["pixel_auroc"], 4),
                "defect_au_pro": round(t["au_pro"], 4),
            }
        )
    out = {"machine": machine, "bundle": args.bundle.name, "data": args.data.name, "defect": args.defect,
           "defect_pixel_share": round(share, 4), "variants": results}  # fmt: skip
    replace_result(args.results, out, key=lambda r: (r["bundle"], r["data"], r["defect"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
