"""A lead for the map, measured (not in the product): a segmentation head trained on synthetic defects.

    python benchmarks/seg_head.py --bundle runs/accuracy/magnetic_tile-full-rd-l2-hq0.999-e20-statstraining-blur2-s0 \\
                                  --data ../shared/data/magnetic_tile

DeSTSeg's idea on a trained bundle: a distillation map asks "can the student rebuild this patch?",
so a region whose texture the good parts show elsewhere (magnetic_tile's ``uneven`` bands) is
marked at its edge at most. A small convolutional head that reads the frozen teacher's
standardised taps and the per-channel squared teacher-student differences (all taps on the
stride-8 grid) is trained to *segment* synthetic defects (``engines.corrupt``: thresholded smooth
random regions filled by a tone change, a turned texture, blur or noise; nothing of a data set's
defects) painted on the bundle's own training parts, with a quarter of the samples left clean.
The teacher and the student stay frozen; their features of the synthetic samples are computed once.
Its logit map (upsampled, smoothed as our map) is standardised by its pixels on the bundle's
held-out good parts, as is ours, and the two are summed: ``ours + w x head`` for fixed w. The
image score of a fused map is the product's rule on it: the larger of its maximum and the global
term, each standardised on the held-out good parts. Prints image / pixel AUROC / AU-PRO, the
plant metric at 1 % (threshold from the project's calibration rule on the held-out good parts)
and per type; writes benchmarks/results/seg_head.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402

GRID_STRIDE = 8  # the head's grid (input px per cell)
CHOICES = (0.0, 0.25, 0.5, 1.0, 2.0)  # the weights w the synthetic held-out defects choose from


def head_features(model, images: np.ndarray, batch_size: int = 16):
    """(N, C, H/8, W/8) float16: per distillation tap its standardised teacher features and the
    squared teacher-student difference per channel, every tap resized to the stride-8 grid."""
    import torch
    import torch.nn.functional as F

    from engines.train import to_tensor

    h, w = model.cfg.input_hw()
    gh, gw = h // GRID_STRIDE, w // GRID_STRIDE
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            t_feats, s_feats, _ = model.run_networks(to_tensor(images[i : i + batch_size], torch.device("cpu")))
            parts = []
            for t, s in zip(t_feats, s_feats, strict=True):
                z = torch.cat([t, (t - s) ** 2], dim=1)
                if z.shape[-1] > gw:
                    z = F.adaptive_avg_pool2d(z, (gh, gw))
                elif z.shape[-1] < gw:
                    z = F.interpolate(z, size=(gh, gw), mode="bilinear", align_corners=False)
                parts.append(z)
            out.append(torch.cat(parts, dim=1).half())
    return torch.cat(out)


def build_head(channels: int, context: bool):
    """1x1 squeeze, then 3x3 convolutions dilated 1, 2, 4 (and 8, 16 with ``context``), a 1x1 logit."""
    from torch import nn

    def block(c_in: int, c_out: int, k: int = 3, d: int = 1):
        pad = d * (k // 2)
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, k, padding=pad, dilation=d, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )

    layers = [block(channels, 96, k=1), block(96, 96), block(96, 64, d=2), block(64, 64, d=4)]
    if context:
        layers += [block(64, 64, d=8), block(64, 64, d=16)]
    return nn.Sequential(*layers, nn.Conv2d(64, 1, 1))


def synthetic_set(images: np.ndarray, copies: int, clean: float, rng: np.random.Generator):
    """``copies`` samples of each good image in turn (``engines.seghead.synthetic_sample``, a share
    ``clean`` left without a defect): (images, soft masks)."""
    from engines.seghead import synthetic_sample

    xs, ms = zip(*(synthetic_sample(img, rng, images, clean) for img in images for _ in range(copies)), strict=True)
    return np.stack(xs), np.stack(ms)


def train_head(model, train_imgs, val_imgs, args) -> tuple[object, dict, tuple[np.ndarray, np.ndarray]]:
    import torch

    from engines.seghead import grid_targets, seg_loss

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    h, w = model.cfg.input_hw()
    gh, gw = h // GRID_STRIDE, w // GRID_STRIDE
    t0 = time.perf_counter()
    x, m = synthetic_set(train_imgs, args.copies, args.clean, rng)
    feats, targets = head_features(model, x), grid_targets(m, (gh, gw))
    xv, mv = synthetic_set(val_imgs, 2, args.clean, np.random.default_rng(args.seed + 1000))
    feats_v, targets_v = head_features(model, xv), grid_targets(mv, (gh, gw))
    t_feats = time.perf_counter() - t0
    head = build_head(feats.shape[1], args.context)
    opt = torch.optim.Adam(head.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.steps)
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = torch.from_numpy(rng.integers(0, len(feats), args.batch))
        head.train()
        loss = seg_loss(head(feats[idx].float()), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            head.eval()
            with torch.no_grad():
                val = float(seg_loss(head(feats_v.float()), targets_v))
            print(f"  step {step}: loss {float(loss.detach()):.3f}, synthetic held-out {val:.3f}", flush=True)
    head.eval()
    return (
        head,
        {
            "n_samples": len(x),
            "feature_seconds": round(t_feats, 1),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "synthetic_val_loss": round(val, 4),
        },
        (xv, mv),
    )


def head_maps(model, head, images: np.ndarray, blur_sigma: float) -> np.ndarray:
    """The head's logit map of ``images`` at the input size, smoothed with ``blur_sigma`` input px."""
    import cv2
    import torch
    import torch.nn.functional as F

    h, w = model.cfg.input_hw()
    with torch.no_grad():
        logit = head(head_features(model, images).float())
    up = F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([cv2.GaussianBlur(u, (0, 0), blur_sigma) for u in up]) if blur_sigma > 0 else up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=2, help="synthetic samples per training image")
    ap.add_argument("--clean", type=float, default=0.25, help="share of samples left without a defect")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", action="store_true", help="two more 3x3 layers, dilated 8 and 16")
    ap.add_argument("--blur", type=float, default=4.0, help="smoothing of the head's map, input px")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0], help="w in ours + w x head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "seg_head.json")
    args = ap.parse_args()

    import torch

    from engines import bundle as bundle_mod
    from engines.data import eval_items, load_images
    from engines.evaluate import metric_rows, plant_metric, score_items
    from engines.train import bundle_split, load_bundle_model, predict, score_halves

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = load_bundle_model(args.bundle, device="cpu")
    meta = bundle_mod.read_meta(args.bundle)
    size = model.cfg.input_hw()
    _, train_paths, held_out = bundle_split(meta)
    train_imgs, good = load_images(train_paths, size), load_images(held_out, size)
    machine = machine_name()
    print(f"{args.data.name}, {args.bundle.name} ({machine}): training the head ...", flush=True)
    head, fit, (syn_x, syn_m) = train_head(model, train_imgs, good, args)
    print(f"  {fit}", flush=True)

    items = eval_items(args.data, require_masks=True)
    defects = [it.defect for it in items]
    ours, scores, masks = score_items(items, size, lambda im: predict(model, im))
    seg, _, _ = score_items(items, size, lambda im: (head_maps(model, head, im, args.blur), np.zeros(len(im))))
    ours_good, score_good = predict(model, good)
    seg_good = head_maps(model, head, good, args.blur)
    z_ours = (ours - ours_good.mean()) / ours_good.std()
    z_seg = (seg - seg_good.mean()) / seg_good.std()
    zg_ours = (ours_good - ours_good.mean()) / ours_good.std()
    zg_seg = (seg_good - seg_good.mean()) / seg_good.std()
    # w chosen without test defects: the one of CHOICES whose fused map best marks the synthetic
    # defects painted on the held-out good parts (pixel AUROC + AU-PRO there)
    from engines.metrics import au_pro, auroc

    syn_ours = (predict(model, syn_x)[0] - ours_good.mean()) / ours_good.std()
    syn_seg = (head_maps(model, head, syn_x, args.blur) - seg_good.mean()) / seg_good.std()
    syn_masks = syn_m > 0.5
    chosen = {}
    for w in CHOICES:
        f = syn_ours + w * syn_seg
        chosen[w] = auroc(syn_masks.ravel(), f.ravel()) + au_pro(syn_masks, f)
    w_val = max(chosen, key=chosen.get)
    print("  synthetic held-out, pixel AUROC + AU-PRO by w: " + ", ".join(f"{w:g} {v:.3f}" for w, v in chosen.items()))
    fit["w_chosen_on_synthetic"] = w_val
    fit["synthetic_score_by_w"] = {f"{w:g}": round(v, 4) for w, v in chosen.items()}
    st = model.score_stats.tolist()
    dist_test = dist_good = None
    if model.global_term is not None:
        chunks = [items[i : i + 64] for i in range(0, len(items), 64)]
        dist_test = np.concatenate([score_halves(model, load_images([it.path for it in c], size))[1] for c in chunks])
        dist_good = score_halves(model, good)[1]

    def product_score(m: np.ndarray, m_good: np.ndarray, dist: np.ndarray | None, d_good: np.ndarray | None):
        """The product's image-score rule on a map: max(map max, global term), each standardised on the
        held-out good parts (test scores, held-out scores)."""
        top, top_good = m.reshape(len(m), -1).max(1), m_good.reshape(len(m_good), -1).max(1)
        a, a_good = (top - top_good.mean()) / top_good.std(), (top_good - top_good.mean()) / top_good.std()
        if dist is None:
            return a, a_good
        b, b_good = (dist - st[2]) / st[3], (d_good - st[2]) / st[3]
        return np.maximum(a, b), np.maximum(a_good, b_good)

    variants = [("ours (the bundle)", ours, scores, score_good)]
    variants.append(("head alone (map max)", seg, *product_score(seg, seg_good, None, None)))
    for w in sorted({*args.weights, w_val}):
        fused, fused_good = z_ours + w * z_seg, zg_ours + w * zg_seg
        name = f"ours + {w:g} x head" + (" (w chosen on synthetic)" if w == w_val else "")
        variants.append((name, fused, *product_score(fused, fused_good, dist_test, dist_good)))
    head_line = "map | image AUROC / pixel AUROC / AU-PRO | FRR / caught | per type pixel AUROC / AU-PRO"
    print(f"\n{head_line} (at {args.alpha:.0%})")
    rows_out = []
    for name, m, sc, sc_good in variants:
        rows = {r["defect"]: r for r in metric_rows(items, m, sc, masks)}
        plant = plant_metric(sc_good, sc, defects, args.alpha)
        a = rows["all"]
        per = ", ".join(f"{k} {r['pixel_auroc']:.3f} / {r['au_pro']:.3f}" for k, r in rows.items() if k != "all")
        print(
            f"{name} | {a['image_auroc']:.3f} / {a['pixel_auroc']:.3f} / {a['au_pro']:.3f} | "
            f"{plant.frr:.1%} / {plant.caught:.1%} | {per}",
            flush=True,
        )
        rows_out.append(
            {
                "variant": name,
                "image_auroc": round(a["image_auroc"], 4),
                "pixel_auroc": round(a["pixel_auroc"], 4),
                "au_pro": round(a["au_pro"], 4),
                "frr_at_1pct": round(plant.frr, 4),
                "caught_at_1pct": round(plant.caught, 4),
                "per_defect": {
                    k: {
                        "image_auroc": round(r["image_auroc"], 4),
                        "pixel_auroc": round(r["pixel_auroc"], 4),
                        "au_pro": round(r["au_pro"], 4),
                    }
                    for k, r in rows.items()
                    if k != "all"
                },
            }
        )
    settings = {k: getattr(args, k) for k in ("copies", "clean", "steps", "batch", "context", "blur", "seed")}
    out = {"machine": machine, "bundle": args.bundle.name, "data": args.data.name, "settings": settings,
           "fit": fit, "variants": rows_out}  # fmt: skip
    replace_result(args.results, out, key=lambda r: (r["bundle"], r["data"], tuple(sorted(r["settings"].items()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
