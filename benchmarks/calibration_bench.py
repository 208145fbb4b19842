"""Calibration on real data: thresholds from held-out good parts only, checked on the test split.

    python benchmarks/calibration_bench.py --bundle runs/accuracy/magnetic_tile-full [--alpha 0.01]

The good parts used are the training set's held-out validation split (the same seeded split
`lineinspect train` made, never trained on). The test split then gives the observed
false-reject rate on test/good and the miss rate per defect type. Writes
benchmarks/results/calibration.json: one row per data set (a new run of a set replaces its row),
with the bundle's network and "default": true when it is the one `lineinspect train` ships.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, mark_defaults  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="dataset (default: the bundle's training data)")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "calibration.json")
    args = ap.parse_args()

    from latency import model_label

    from calibration.stats import image_threshold
    from engines.bundle import read_meta
    from engines.data import eval_items, load_images
    from engines.evaluate import held_out_goods
    from engines.runtime import load_runtime
    from engines.train import network_record

    meta = read_meta(args.bundle)
    network = network_record(meta)
    if not meta.get("onnx"):
        from engines.export import export_bundle

        export_bundle(args.bundle)
    data = args.data or Path(meta["training"]["data"])
    held_out = held_out_goods(meta)  # the split train made (never trained on)
    if not held_out:
        print(f"error: the good parts {args.bundle} held out of training are not on disk", file=sys.stderr)
        return 2
    rt = load_runtime("onnxruntime", args.bundle)
    size = rt.size
    _, good_scores = rt.predict(load_images(held_out, size))
    thr = image_threshold(good_scores, args.alpha, args.confidence)

    items = eval_items(data)
    _, test_scores = rt.predict(load_images([it.path for it in items], size))
    defect = np.array([it.defect for it in items])
    good_test = test_scores[defect == "good"]
    observed = float(np.mean(good_test >= thr.threshold))
    miss = {
        d: round(float(np.mean(test_scores[defect == d] < thr.threshold)), 4)
        for d in sorted(set(defect.tolist()) - {"good"})
    }
    miss_all = float(np.mean(test_scores[defect != "good"] < thr.threshold))
    row = {
        "dataset": data.name,
        "alpha": args.alpha,
        "method": thr.method,
        "n_good": len(good_scores),
        "threshold": round(thr.threshold, 5),
        "expected_frr": {"estimate": thr.expected_frr, "lower": thr.frr_lower, "upper": thr.frr_upper},
        "observed_frr": round(observed, 4),
        "n_test_good": len(good_test),
        "miss_rate": miss,
        "miss_rate_all": round(miss_all, 4),
        "machine": machine_name(),
        "model": model_label(args.bundle),
        "map_stats_from": network["map_stats_from"],
        # the network and its map statistics (the threshold depends on both): "default" is decided
        # from it when the file is written (mark_defaults)
        "network": network,
    }
    print(f"machine: {row['machine']}")
    print(f"{data.name}: {len(good_scores)} held-out good parts -> threshold {thr.threshold:.4f} ({thr.method})")
    print(
        f"  expected false-reject rate {thr.expected_frr:.2%} [{thr.frr_lower:.2%} .. {thr.frr_upper:.2%}], "
        f"target {args.alpha:.2%}"
    )
    print(f"  observed on test/good ({len(good_test)} parts): {observed:.2%}")
    print(
        "  miss rate per defect type: " + ", ".join(f"{k} {v:.1%}" for k, v in miss.items()) + f"; all {miss_all:.1%}"
    )
    for note in thr.notes:
        print(f"  note: {note}")
    rows = []
    if args.results.is_file():
        old = json.loads(args.results.read_text())
        rows = [r for r in (old if isinstance(old, list) else [old]) if r["dataset"] != row["dataset"]]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(mark_defaults([*rows, row]), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
