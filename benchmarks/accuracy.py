"""Accuracy + ablation on the real data sets (../shared/data): trains each variant, evaluates, prints a table.

    python benchmarks/accuracy.py [--epochs 6] [--datasets magnetic_tile ball_screw_drive]
                                  [--variants full plain simam sspcab] [--device cpu]
                                  [--taps 2 4 10] [--student-expand 6] [--seed 0]

Writes benchmarks/results/accuracy.json (rows: dataset, variant, image_auroc, pixel_auroc, au_pro,
epochs, taps, student_expand, seed, train_seconds, machine); a row replaces an older one only for
the same dataset, variant, taps, student_expand and seed. Rows are written as each run finishes,
so a long run that is stopped keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402

VARIANTS = {
    "plain": {"simam": False, "sspcab": False},
    "simam": {"simam": True, "sspcab": False},
    "sspcab": {"simam": False, "sspcab": True},
    "full": {"simam": True, "sspcab": True},
}


def _key(row: dict) -> tuple:
    """Rows replace each other only when they measured the same setting."""
    return (row["dataset"], row["variant"], row.get("taps"), row.get("student_expand", 6), row.get("seed", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--datasets", nargs="+", default=["magnetic_tile", "ball_screw_drive"])
    ap.add_argument("--variants", nargs="+", default=["full", "plain", "simam", "sspcab"], choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--taps", type=int, nargs="+", help="teacher blocks to tap (default: the model's default)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (split, initialisation, batch order)")
    ap.add_argument("--student-expand", type=int, help="student MBConv expansion ratio (default: the model's)")
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "accuracy")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "accuracy.json")
    ap.add_argument("--append", action="store_true", help="keep existing rows of other (dataset, variant) pairs")
    args = ap.parse_args()

    from engines.evaluate import evaluate, format_table
    from engines.train import TrainConfig, load_bundle_model, predict, train

    machine = machine_name()
    rows: list[dict] = []
    if args.append and args.results.is_file():
        rows = json.loads(args.results.read_text())
    for ds in args.datasets:
        for variant in args.variants:
            data = args.data_root / ds
            bundle = args.work / f"{ds}-{variant}"
            extra = {"taps": args.taps} if args.taps else {}
            if args.student_expand:
                extra["student_expand"] = args.student_expand
            cfg = TrainConfig(
                epochs=args.epochs,
                image_size=args.image_size,
                device=args.device,
                seed=args.seed,
                **VARIANTS[variant],
                **extra,
            )
            t0 = time.perf_counter()
            train(data, bundle, cfg, quiet=True)
            train_s = time.perf_counter() - t0
            model = load_bundle_model(bundle, device=args.device)
            res = evaluate(data, args.image_size, lambda x, m=model: predict(m, x), bundle / "eval", n_overlays=8)
            overall = res["rows"][-1]
            print(f"\n== {ds} / {variant} ({args.epochs} epochs, trained in {train_s:.0f} s)")
            print(format_table(res["rows"]), flush=True)
            row = {
                "dataset": ds,
                "variant": variant,
                "image_auroc": round(overall["image_auroc"], 4),
                "pixel_auroc": round(overall["pixel_auroc"], 4),
                "au_pro": round(overall["au_pro"], 4),
                "f1_max": round(overall["f1_max"], 4),
                "epochs": args.epochs,
                "taps": list(cfg.taps),
                "student_expand": cfg.student_expand,
                "seed": cfg.seed,
                "image_size": args.image_size,
                "train_seconds": round(train_s, 1),
                "machine": machine,
                "per_defect": res["rows"][:-1],
            }
            rows = [r for r in rows if _key(r) != _key(row)]
            rows.append(row)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(rows, indent=2) + "\n")

    print(f"\nmachine: {machine}")
    print(
        f"{'dataset':<18}{'variant':<8}{'taps':<10}{'expand':>7}{'seed':>5}{'img AUROC':>10}{'px AUROC':>10}"
        f"{'AU-PRO':>8}{'epochs':>7}{'train s':>9}"
    )
    for r in rows:
        taps = ",".join(str(t) for t in r.get("taps") or [])
        print(
            f"{r['dataset']:<18}{r['variant']:<8}{taps:<10}{r.get('student_expand', 6):>7}{r.get('seed', 0):>5}"
            f"{r['image_auroc']:>10.3f}{r['pixel_auroc']:>10.3f}{r['au_pro']:>8.3f}{r['epochs']:>7}"
            f"{r['train_seconds']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
