"""How the segmentation head's map joins the distillation map, measured on a bundle with a head.

    python benchmarks/seg_fusion.py \\
        --bundle runs/accuracy/ball_screw_drive-full-rd-l2-hq0.999-e20-160x416-statstraining-blur2-seg0.5s16-s0 \\
        --data ../shared/data/ball_screw_drive

The head's term is its logits centred on the held-out good parts' mean and put on the fused map's
spread there, times ``seg_weight`` (``engines.model.seg_term``). This script scores ways to join it
with the fused map, with the bundle's own student, head and statistics (``add`` and ``max`` are
the product's, ``NetConfig.seg_fusion``, built through it; ``floor`` is benchmark code; the row of
the bundle's own fusion and weight must equal the bundle's ``accuracy.py`` row):

- ``add`` w: the head's term added at weight w (stops 38-39's default): every pixel of the map
  moves with the head, good pixels too;
- ``floor`` w q: the head adds only where its logit is above its q-quantile on the held-out good
  pixels, ``relu(logit - floor) * scale * w``, so that the map of a part the head sees as good is
  the distillation map alone (its small spots untouched);
- ``max`` w: the larger of the fused map and the head's term, pixel by pixel (the default since
  stop 40).

For each form the score statistics are fitted again on the held-out good parts (as a refit does)
and the test split is scored by ``engines.evaluate`` like ``accuracy.py`` (image / pixel AUROC,
AU-PRO, the plant metric at 1 %, per type). Writes benchmarks/results/seg_fusion.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402

# (form, weight, quantile of the held-out good pixels' logits for "floor")
DEFAULT_FORMS = (
    ("add", 0.5, None),
    ("floor", 0.5, 0.5),
    ("floor", 0.5, 0.9),
    ("floor", 0.5, 0.99),
    ("max", 0.5, None),
    ("max", 1.0, None),
)


def parse_form(text: str) -> tuple[str, float, float | None]:
    """``add:0.5``, ``max:1`` or ``floor:0.5:0.99`` -> (form, weight, quantile)."""
    parts = text.split(":")
    if parts[0] in ("add", "max") and len(parts) == 2:
        return parts[0], float(parts[1]), None
    if parts[0] == "floor" and len(parts) == 3:
        return "floor", float(parts[1]), float(parts[2])
    msg = f"{text!r}: give add:W, max:W or floor:W:Q"
    raise argparse.ArgumentTypeError(msg)


def floored(fused, logits, floor: float, scale: float, weight: float):
    """The ``floor`` form (benchmark only): the fused map (N, 1, h, w) plus the head's logits at the
    same size above ``floor``, ``relu(logit - floor) * scale * weight``."""
    import torch

    return fused + torch.relu(logits - floor) * (scale * weight)


def held_out_logits(model, images):
    """The head's logits on the held-out good parts, all pixels at the fusion size, float64 numpy."""
    import torch

    from engines.train import to_tensor

    out = []
    with torch.no_grad():
        for i in range(0, len(images), 16):
            t_feats, s_feats, _ = model.run_networks(to_tensor(images[i : i + 16], "cpu"))
            out.append(model.seg_logits(t_feats, s_feats).flatten().double())
    return torch.cat(out).numpy()


def use_floor(model, weight: float, floor: float) -> None:
    """Make ``model``'s map the ``floor`` form (instance attributes only; ``add`` and ``max`` are the
    product's own, ``form_model``)."""
    from engines.model import resize_bilinear

    scale = float(model.seg_stats[1])
    model.seg_map = model.seg_logits  # what fuse receives: the head's raw logits at the fusion size

    def fuse(maps, logits):
        out = floored(model.fused_grid(maps), logits, floor, scale, weight)
        if model.cfg.fuse_stride == 1:
            return out
        return resize_bilinear(out, model.upsample_rows, model.upsample_cols)

    model.fuse = fuse


def form_model(bundle: Path, parts, form: str, weight: float, floor: float | None):
    """The bundle's network with its head joined by ``form`` at ``weight``, statistics fitted again:
    ``add`` and ``max`` through the product's own ``NetConfig.seg_fusion`` (``engines.model.join_seg``),
    ``floor`` patched in by ``use_floor``."""
    from map_settings import with_settings

    from engines.train import fit_score_stats

    if form != "floor":
        return with_settings(bundle, parts, seg_weight=weight, seg_fusion=form)
    model = with_settings(bundle, parts)
    use_floor(model, weight, floor)
    if model.global_term is not None:  # the score statistics of the floored map
        fit_score_stats(model, parts[2])
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle with a segmentation head")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument(
        "--forms",
        nargs="+",
        type=parse_form,
        help="FORM:W or floor:W:Q, e.g. add:0.5 max:0.5 floor:0.5:0.99 (default: add 0.5, floor 0.5 at "
        "q 0.5 / 0.9 / 0.99, max 0.5 and 1)",
    )
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "seg_fusion.json")
    args = ap.parse_args()

    import numpy as np
    from map_settings import bundle_parts, with_settings

    from engines.evaluate import evaluate
    from engines.train import predict

    parts = bundle_parts(args.bundle)
    _, _, held_out, held_out_paths = parts
    probe = with_settings(args.bundle, parts)
    if probe.seg_head is None:
        print(f"error: {args.bundle} has no segmentation head (seg_weight 0)", file=sys.stderr)
        return 2
    logits = held_out_logits(probe, held_out)
    machine = machine_name()
    print(f"machine: {machine}\nbundle: {args.bundle} (its seg_weight {probe.cfg.seg_weight:g})\n")
    head = (
        f"{'form':>6} {'w':>4} {'q':>5}  {'img AUROC':>9} {'px AUROC':>8} {'AU-PRO':>7} "
        f"{'FRR@1%':>7} {'caught':>7}  per type pixel AUROC"
    )
    print(head)
    print("-" * (len(head) + 30))
    rows = []
    for form, weight, q in args.forms or DEFAULT_FORMS:
        t0 = time.perf_counter()
        floor = float(np.quantile(logits, q)) if q is not None else None
        model = form_model(args.bundle, parts, form, weight, floor)
        res = evaluate(
            args.data,
            model.cfg.input_hw(),
            lambda x, m=model: predict(m, x),
            calibration_images=held_out_paths,
            alpha=args.alpha,
        )
        overall, plant = res["rows"][-1], res["plant"]
        per = {r["defect"]: round(r["pixel_auroc"], 4) for r in res["rows"][:-1] if r.get("pixel_auroc") is not None}
        row = {
            "form": form,
            "weight": weight,
            "quantile": q,
            "floor_logit": floor,
            "product": form == probe.cfg.seg_fusion and weight == probe.cfg.seg_weight,  # the bundle's own
            "image_auroc": round(overall["image_auroc"], 4),
            "pixel_auroc": round(overall["pixel_auroc"], 4),
            "au_pro": round(overall["au_pro"], 4),
            "frr_at_1pct": round(plant["frr"], 4),
            "caught_at_1pct": round(plant["caught"], 4),
            "per_defect_pixel_auroc": per,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        mark = " (the bundle's)" if row["product"] else ""
        print(
            f"{form:>6} {weight:>4g} {'' if q is None else f'{q:g}':>5}  {row['image_auroc']:>9.3f} "
            f"{row['pixel_auroc']:>8.3f} {row['au_pro']:>7.3f} {plant['frr']:>7.1%} {plant['caught']:>7.1%}  "
            f"{' '.join(f'{k} {v:.3f}' for k, v in per.items()) if len(per) > 1 else ''}{mark}",
            flush=True,
        )
    out = {"bundle": args.bundle.name, "data": args.data.name, "machine": machine, "rows": rows}
    replace_result(args.results, out, key=lambda e: (e["bundle"], e["data"], e["machine"]))
    print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
