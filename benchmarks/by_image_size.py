"""Image AUROC per source image size: does a data set's defect score lean on how its images were cropped?

    python benchmarks/by_image_size.py --bundle runs/accuracy/<tag> --data ../shared/data/ball_screw_drive

Every image is resized to the model's input, so a defect photographed at another crop size than
the good parts reaches the network at another scale: a detector can then tell it apart by its
scale, not its defect. This scores the test split with the bundle (torch, as ``accuracy.py``) and
groups the parts by their file's width x height: for each size, how many good and defective parts
have it, and the image AUROC of that size's defective parts against *all* good parts (and against
the good parts of the same size, where there are any). Writes benchmarks/results/by_image_size.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402


def source_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        msg = f"cannot read image {path}"
        raise ValueError(msg)
    return int(img.shape[1]), int(img.shape[0])


def size_rows(
    sizes: list[tuple[int, int]], is_defect: np.ndarray, scores: np.ndarray, max_groups: int = 12
) -> list[dict]:
    """One row per source size with defective parts, largest group first; beyond ``max_groups``
    sizes, the rest pooled into one row of width and height 0 ("other sizes")."""
    from engines.metrics import auroc

    good = ~is_defect
    rows = []
    common = Counter(s for s, d in zip(sizes, is_defect, strict=True) if d).most_common()
    groups = [[size] for size, _ in common[:max_groups]]
    if len(common) > max_groups:
        groups.append([size for size, _ in common[max_groups:]])
    for group in groups:
        size = group[0] if len(group) == 1 else (0, 0)
        of_size = np.array([s in group for s in sizes])
        bad = of_size & is_defect
        same_good = of_size & good
        y_all = np.r_[np.zeros(good.sum()), np.ones(bad.sum())]
        rows.append(
            {
                "width": size[0],
                "height": size[1],
                "n_good": int(same_good.sum()),
                "n_defect": int(bad.sum()),
                "auroc_vs_all_good": round(auroc(y_all, np.r_[scores[good], scores[bad]]), 4),
                "auroc_vs_same_size_good": (
                    round(auroc(is_defect[of_size], scores[of_size]), 4) if same_good.any() else None
                ),
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "by_image_size.json")
    args = ap.parse_args()

    from engines.data import eval_items
    from engines.evaluate import score_items
    from engines.metrics import auroc
    from engines.train import load_bundle_model, predict

    model = load_bundle_model(args.bundle, device="cpu")
    items = eval_items(args.data)
    _, scores, _ = score_items(items, model.cfg.input_hw(), lambda x: predict(model, x))
    is_defect = np.array([it.is_defect for it in items])
    sizes = [source_size(it.path) for it in items]
    rows = size_rows(sizes, is_defect, scores)
    machine = machine_name()
    overall = auroc(is_defect, scores)
    print(f"\n{args.data.name}, {args.bundle.name} ({machine}): image AUROC {overall:.3f} over all parts")
    goods = Counter(f"{w}x{h}" for (w, h), d in zip(sizes, is_defect, strict=True) if not d)
    print(f"good parts: {len(goods)} sizes, the commonest {dict(goods.most_common(5))}")
    print("source size | good | defective | AUROC vs all good | vs good of the same size")
    for r in rows:
        same = "-" if r["auroc_vs_same_size_good"] is None else f"{r['auroc_vs_same_size_good']:.3f}"
        name = f"{r['width']}x{r['height']}" if r["width"] else "other sizes"
        print(f"{name} | {r['n_good']} | {r['n_defect']} | {r['auroc_vs_all_good']:.3f} | {same}")
    out = {"machine": machine, "bundle": args.bundle.name, "data": args.data.name,
           "image_auroc": round(overall, 4), "sizes": rows}  # fmt: skip
    replace_result(args.results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
