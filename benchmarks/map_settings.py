"""The map's post-training settings, measured on a trained bundle (the student is not retrained).

    python benchmarks/map_settings.py \\
        --bundle runs/accuracy/ball_screw_drive-full-rd-l2-hq0.999-e20-160x416-statstraining-s0 \\
        --data ../shared/data/ball_screw_drive --blur-sigmas 2 4 8 --scores max topk

``blur_sigma`` (the Gaussian smoothing of the fused map), ``score`` (the map's image score: its
maximum or the mean of its top ``topk_fraction``) and ``scale_weights`` (the weight of each tap's
map in the fusion) act only after the student: for each combination the bundle's student and
global term are loaded into a network with that setting, the map's statistics and the two score
statistics are computed again exactly as ``lineinspect train`` computes them (the bundle's own
split and ``map_stats_from``), and the test split is scored like ``accuracy.py`` scores a row
(image / pixel AUROC, AU-PRO, the plant metric at the 1 % threshold from the held-out good parts).
The bundle's own setting is one of the rows, so its row must equal the bundle's ``accuracy.py``
row. Writes benchmarks/results/map_settings.json (one entry per bundle, data set and grid; a later
run on the same bundle keeps the rows of the settings it did not measure).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "au_pro")


def bundle_parts(bundle: Path):
    """The bundle's training settings and its training and held-out good parts as ``train`` split
    them, read once for every setting: (cfg, training images, held-out images, held-out paths)."""
    from engines import bundle as bundle_mod
    from engines.data import load_images
    from engines.train import bundle_split

    meta = bundle_mod.read_meta(bundle)
    cfg, train_paths, val_paths = bundle_split(meta)
    size = bundle_mod.input_hw(meta)
    return cfg, load_images(train_paths, size), load_images(val_paths or train_paths, size), val_paths


def with_settings(bundle: Path, parts, **changes):
    """The bundle's network rebuilt with ``changes`` to its NetConfig (map settings only): its
    student, global term, segmentation head and feature statistics loaded, the map's statistics,
    the head's scale and the two score statistics computed again as ``lineinspect train`` does, on
    ``parts`` (``bundle_parts``)."""
    from engines import bundle as bundle_mod
    from engines.model import KDModel, NetConfig
    from engines.train import bundle_teacher, fit_score_stats, load_student_pt, map_statistics

    cfg, train_imgs, val_imgs, _ = parts
    meta = bundle_mod.read_meta(bundle)
    net_cfg = dataclasses.replace(NetConfig.from_json(meta["net"]), **changes)
    net_cfg.validate()
    model = KDModel(bundle_teacher(meta, net_cfg.teacher_taps()), net_cfg).eval()
    load_student_pt(bundle, model.load_fitted_state)  # the student and the term's Gaussian
    stats = meta["map_stats"]
    if net_cfg.distance == "l2":
        model.set_feature_stats(stats["feature_mean"], stats["feature_std"])
    map_statistics(model, cfg, train_imgs, val_imgs)
    if model.seg_head is not None:  # its weights are the bundle's; its scale follows the fused map's spread
        from engines.seghead import fit_seg_stats

        fit_seg_stats(model, val_imgs)
    if net_cfg.global_taps:
        fit_score_stats(model, val_imgs)
    return model


def entry_key(entry: dict) -> tuple:
    """One entry per bundle, data set and scoring grid."""
    return entry["bundle"], entry["data"], entry.get("eval_size")


def setting_key(row: dict) -> tuple:
    """The settings a row measured (rows of the same settings replace each other)."""
    return (row["blur_sigma"], row["score"], row.get("topk_fraction"), tuple(row["scale_weights"]))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old``'s rows of settings ``new`` did not measure, then ``new``'s, sorted by setting."""
    fresh = {setting_key(r) for r in new}
    rows = [r for r in old if setting_key(r) not in fresh] + list(new)
    return sorted(rows, key=lambda r: (r["blur_sigma"], r["score"], tuple(r["scale_weights"])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout data set (its test split is scored)")
    ap.add_argument("--blur-sigmas", type=float, nargs="+", help="input pixels (default: the bundle's)")
    ap.add_argument("--scores", nargs="+", choices=["max", "topk"], help="map image score (default: the bundle's)")
    ap.add_argument("--topk-fraction", type=float, help="with score topk (default: the bundle's)")
    ap.add_argument(
        "--scale-weights",
        nargs="+",
        action="append",
        type=float,
        help="one weight per tap; repeat the option for several (default: the bundle's)",
    )
    ap.add_argument(
        "--eval-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="score the maps and masks on this grid (default: the bundle's input), to compare inputs",
    )
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "map_settings.json")
    args = ap.parse_args()

    from engines import bundle as bundle_mod
    from engines.evaluate import evaluate
    from engines.model import NetConfig
    from engines.train import predict

    own = NetConfig.from_json(bundle_mod.read_meta(args.bundle)["net"])
    grid = list(
        itertools.product(
            args.blur_sigmas or [own.blur_sigma],
            args.scores or [own.score],
            [tuple(w) for w in args.scale_weights] if args.scale_weights else [own.scale_weights],
        )
    )
    topk = args.topk_fraction or own.topk_fraction
    machine = machine_name()
    rows = []
    where = (
        f"maps and masks scored at {args.eval_size[0]} x {args.eval_size[1]}"
        if args.eval_size
        else "scored at its input"
    )
    print(f"machine: {machine}\nbundle: {args.bundle} ({where})\n")
    head = (
        f"{'blur':>5} {'score':>10} {'weights':>14}  {'img AUROC':>9} {'px AUROC':>8} {'AU-PRO':>7} "
        f"{'FRR@1%':>7} {'caught':>7}  {'s':>4}"
    )
    print(head)
    print("-" * len(head))
    parts = bundle_parts(args.bundle)
    for sigma, score, weights in grid:
        t0 = time.perf_counter()
        model = with_settings(
            args.bundle, parts, blur_sigma=sigma, score=score, topk_fraction=topk, scale_weights=weights
        )
        res = evaluate(
            args.data,
            model.cfg.input_hw(),
            lambda x, m=model: predict(m, x),
            calibration_images=parts[3],
            alpha=args.alpha,
            grid=tuple(args.eval_size) if args.eval_size else None,
        )
        allrow = res["rows"][-1]
        plant = res["plant"] or {}
        row = {
            "blur_sigma": sigma,
            "score": score,
            "topk_fraction": topk if score == "topk" else None,
            "scale_weights": list(weights),
            "bundle_setting": (sigma, score, tuple(weights)) == (own.blur_sigma, own.score, tuple(own.scale_weights))
            and (score == "max" or topk == own.topk_fraction),
            "image_auroc": round(allrow["image_auroc"], 4),
            "pixel_auroc": round(allrow["pixel_auroc"], 4) if allrow.get("pixel_auroc") is not None else None,
            "au_pro": round(allrow["au_pro"], 4) if allrow.get("au_pro") is not None else None,
            "frr_at_1pct": round(plant["frr"], 4) if plant else None,
            "caught_at_1pct": round(plant["caught"], 4) if plant else None,
            "per_defect": {
                r["defect"]: {k: round(r[k], 4) for k in METRICS if r.get(k) is not None} for r in res["rows"][:-1]
            },
        }
        rows.append(row)
        label = f"topk {topk:g}" if score == "topk" else score
        mark = " (bundle's)" if row["bundle_setting"] else ""
        print(
            f"{sigma:>5g} {label:>10} {'/'.join(f'{w:g}' for w in weights):>14}  {row['image_auroc']:>9.3f} "
            f"{row['pixel_auroc'] or float('nan'):>8.3f} {row['au_pro'] or float('nan'):>7.3f} "
            f"{plant.get('frr', float('nan')):>7.1%} {plant.get('caught', float('nan')):>7.1%}  "
            f"{time.perf_counter() - t0:>4.0f}{mark}",
            flush=True,
        )
    out = {
        "bundle": str(args.bundle),
        "data": str(args.data.resolve()),
        "eval_size": args.eval_size,
        "machine": machine,
        "rows": rows,
    }
    old = json.loads(args.results.read_text()) if args.results.is_file() else []
    earlier = next((r for r in old if entry_key(r) == entry_key(out) and r.get("machine") == machine), None)
    if earlier:  # the same bundle measured before with other settings on this machine: keep those rows
        out["rows"] = merge_rows(earlier["rows"], rows)
    replace_result(args.results, out, key=entry_key)
    print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
