"""Does a runtime change the verdicts? Each CPU backend scored on a real test split against torch fp32.

    python benchmarks/backend_accuracy.py --bundle BUNDLE --data ../shared/data/magnetic_tile
                                          [--backends torch onnxruntime openvino:f32 openvino:bf16]

For every backend (``openvino:bf16`` selects a precision) it scores the whole test split and prints
image AUROC, pixel AUROC, AU-PRO and the largest |map| and |score| difference from torch fp32 on the
same images. The reduced-precision backends are opt-in because of this table: a faster backend is
only worth it when these numbers stay put. Writes benchmarks/results/backend_accuracy.json: rows of
other bundles, datasets or backends already in the file are kept, rows of this bundle measured on
another ONNX graph (a retrained bundle of the same name) are dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402

DEFAULT_BACKENDS = ["torch", "onnxruntime", "openvino:f32", "openvino:bf16"]


def score_fn(spec: str, bundle: Path, threads: int):
    if spec == "torch":
        from engines.train import load_bundle_model, predict

        model = load_bundle_model(bundle, device="cpu")
        return lambda imgs: predict(model, imgs), "cpu (fp32)"
    from engines.runtime import load_runtime

    name, _, precision = spec.partition(":")
    opts: dict = {"threads": threads}
    if precision:
        opts["precision"] = precision
    rt = load_runtime(name, bundle, **opts)
    return rt.predict, rt.device


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset folder (its test split is used)")
    ap.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "backend_accuracy.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from engines import bundle as bundle_mod
    from engines.data import eval_items
    from engines.evaluate import metric_rows, score_items

    meta = bundle_mod.read_meta(args.bundle)
    try:  # the rows are keyed by the export's sha256: no export (or a broken one), no rows
        bundle_mod.artifact_files(args.bundle, meta, "onnx")
    except bundle_mod.ArtifactError as exc:
        print(exc, file=sys.stderr)
        return 2
    onnx_sha = meta["onnx"]["sha256"]
    size = bundle_mod.input_hw(meta)
    items = eval_items(args.data)
    machine = machine_name()
    ref = None
    rows = []
    for spec in args.backends:
        try:
            fn, device = score_fn(spec, args.bundle, args.threads)
        except Exception as exc:  # report and go on: one missing backend must not hide the others
            print(f"skip {spec}: {exc}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        maps, scores, masks = score_items(items, size, fn)
        seconds = time.perf_counter() - t0
        overall = metric_rows(items, maps, scores, masks)[-1]
        if spec == "torch":
            ref = (maps, scores)
        d_map = float(np.abs(maps - ref[0]).max()) if ref is not None else None
        d_score = float(np.abs(scores - ref[1]).max()) if ref is not None else None
        row = {
            "bundle": args.bundle.name,
            "taps": meta["net"]["taps"],
            "student_expand": meta["net"].get("student_expand", 6),
            "onnx_sha256": onnx_sha,
            "dataset": args.data.name,
            "backend": spec,
            "device": device,
            "n_images": len(items),
            "image_auroc": round(overall["image_auroc"], 4),
            "pixel_auroc": round(overall["pixel_auroc"], 4),
            "au_pro": round(overall["au_pro"], 4),
            "max_abs_map_diff_vs_torch": d_map,
            "max_abs_score_diff_vs_torch": d_score,
            "seconds": round(seconds, 1),
            "machine": machine,
        }
        rows.append(row)
        print(f"  {spec:<16} img {row['image_auroc']:.4f} px {row['pixel_auroc']:.4f} pro {row['au_pro']:.4f}")

    print(f"\nmachine: {machine}; bundle {args.bundle}; {len(items)} test images of {args.data}")
    print(f"{'backend':<16}{'img AUROC':>10}{'px AUROC':>10}{'AU-PRO':>8}{'max|dmap|':>11}{'max|dscore|':>12}")
    for r in rows:

        def f(v):
            return f"{v:.2e}" if v is not None else "-"

        print(
            f"{r['backend']:<16}{r['image_auroc']:>10.4f}{r['pixel_auroc']:>10.4f}{r['au_pro']:>8.4f}"
            f"{f(r['max_abs_map_diff_vs_torch']):>11}{f(r['max_abs_score_diff_vs_torch']):>12}"
        )
    old = json.loads(args.results.read_text()) if args.results.is_file() else []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(merge_rows(old, rows), indent=2) + "\n")
    return 0


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """The results file after a run: the new rows replace the rows of the same bundle, dataset and
    backend, and every row of that bundle and dataset measured on another graph goes too.

    A bundle is named by its directory, and a retrained bundle keeps the name: its ONNX sha256 is
    what tells the graphs apart, so a row without it (older runs) or with another one describes a
    network that is no longer there and must not stand beside the new rows."""
    ran = {(r["bundle"], r["dataset"]): r["onnx_sha256"] for r in new}
    backends = {(r["bundle"], r["dataset"], r["backend"]) for r in new}

    def stale(r: dict) -> bool:
        key = (r.get("bundle"), r.get("dataset"))
        if key not in ran:
            return False
        return r.get("onnx_sha256") != ran[key] or (*key, r.get("backend")) in backends

    return [r for r in old if not stale(r)] + list(new)


if __name__ == "__main__":
    sys.exit(main())
