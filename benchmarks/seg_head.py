"""The segmentation head measured on trained bundles: strides, head seeds and weights from one run.

    python benchmarks/seg_head.py --bundle runs/accuracy/magnetic_tile-full-rd-l2-hq0.999-e20-statstraining-blur2-s0 \\
                                  --data ../shared/data/magnetic_tile [--strides 8 16] [--seeds 0 1] \\
                                  [--weights 0.5 1] [--fusion max] [--samples-per-image 5] \\
                                  [--fills tone texture blur noise shade]

The product's head (``engines.model.SegHead``, trained by ``engines.seghead.train_seg_head``
exactly as ``lineinspect train`` / ``refit --seg-weight`` does) is put on a bundle trained without
one, once per grid stride and head seed; the student, its statistics and the global term's
Gaussian are the bundle's. For each weight w the score statistics are fitted again on the
held-out good parts (as a refit does) and the test split is scored by the product's own fused
map and image score. So a row is what a bundle refitted with ``--seg-weight w --seg-stride s``
would score, without a bundle per w. Prints image / pixel AUROC / AU-PRO, the plant metric at
1 % (threshold from the project's calibration rule on the held-out good parts) and per type;
writes benchmarks/results/seg_head.json (entries with ``"head": "product"``; the older entries,
with ``"context"`` in their settings, came from stop 36's version of this script, which had its
own copy of the head). The head's map joins ours by ``--fusion`` (default: train's, max since
stop 40; entries without ``"fusion"`` in their settings added it), and it learns from
``--samples-per-image`` synthetic samples per training part (default: train's ``seg_samples``;
entries without it in their settings had 2) with the ``--fills`` of ``engines.corrupt``.
``--ensemble`` also scores the mean of the ``--seeds`` heads' logits (``MeanHead``, benchmark code;
entries with ``"ensemble": true``); with ``--reuse`` the kept heads' own entries stand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name, replace_result  # noqa: E402

from engines.corrupt import DEFAULT_FILLS, FILLS  # noqa: E402


def scored(model, data: Path, held_out: list[Path], good, alpha: float) -> dict:
    """``engines.evaluate.evaluate`` of the product's map and image score on the test split, the
    plant metric's threshold from the held-out good parts, after the score statistics are fitted
    on them (as a refit does)."""
    from engines.evaluate import evaluate
    from engines.train import fit_score_stats, predict

    if model.global_term is not None:
        fit_score_stats(model, good)
    return evaluate(data, model.cfg.input_hw(), lambda im: predict(model, im), calibration_images=held_out, alpha=alpha)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle trained without a head")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--strides", type=int, nargs="+", default=[8], choices=[8, 16], help="the head's grids")
    ap.add_argument("--seeds", type=int, nargs="+", help="head seeds (default: the bundle's, as train uses)")
    ap.add_argument("--steps", type=int, help="optimiser steps (default: lineinspect train's)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0], help="the head's weight w")
    ap.add_argument(
        "--fusion", choices=["add", "max"], help="how the head's map joins ours (default: lineinspect train's)"
    )
    ap.add_argument(
        "--fills", nargs="+", choices=FILLS, help="synthetic defects the head learns (default: engines.corrupt's)"
    )
    ap.add_argument(
        "--samples-per-image", type=int, help="synthetic samples per training part (default: lineinspect train's)"
    )
    ap.add_argument(
        "--ensemble",
        action="store_true",
        help="also score the mean of the --seeds heads' logits (one head in the graph)",
    )
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--results", type=Path, default=HERE / "results" / "seg_head.json")
    ap.add_argument("--heads", type=Path, default=HERE.parent / "runs" / "seg_heads", help="trained heads kept here")
    ap.add_argument("--reuse", action="store_true", help="load a head kept in --heads instead of training it")
    args = ap.parse_args()

    import dataclasses
    import json

    import torch

    from engines import bundle as bundle_mod
    from engines.data import load_images
    from engines.model import KDModel
    from engines.seghead import MAX_SAMPLES, fit_seg_stats, train_seg_head
    from engines.train import TrainConfig, bundle_split, load_bundle_model

    base = load_bundle_model(args.bundle, device="cpu")
    if base.seg_head is not None:
        ap.error(
            f"{args.bundle} already has a segmentation head (the default since stop 38): give one without "
            "(lineinspect refit --bundle COPY --seg-weight 0 takes it off a copy)"
        )
    meta = bundle_mod.read_meta(args.bundle)
    cfg, train_paths, held_out = bundle_split(meta)
    size = base.cfg.input_hw()
    train_imgs, good = load_images(train_paths, size), load_images(held_out, size)
    steps = args.steps or TrainConfig.model_fields["seg_steps"].default
    fusion = args.fusion or TrainConfig.model_fields["seg_fusion"].default
    fills = tuple(args.fills or DEFAULT_FILLS)
    per_image = args.samples_per_image or TrainConfig.model_fields["seg_samples"].default
    machine = machine_name()
    head_line = "map | image AUROC / pixel AUROC / AU-PRO | FRR / caught | per type pixel AUROC / AU-PRO"

    def row(name: str, res: dict) -> dict:
        rows = {r["defect"]: r for r in res["rows"]}
        plant = res["plant"]
        a = rows["all"]
        per = ", ".join(f"{k} {r['pixel_auroc']:.3f} / {r['au_pro']:.3f}" for k, r in rows.items() if k != "all")
        print(
            f"{name} | {a['image_auroc']:.3f} / {a['pixel_auroc']:.3f} / {a['au_pro']:.3f} | "
            f"{plant['frr']:.1%} / {plant['caught']:.1%} | {per}",
            flush=True,
        )
        metrics = ("image_auroc", "pixel_auroc", "au_pro")
        per_defect = {k: {m: round(r[m], 4) for m in metrics} for k, r in rows.items() if k != "all"}
        return {
            "variant": name,
            **{m: round(a[m], 4) for m in metrics},
            "frr_at_1pct": round(plant["frr"], 4),
            "caught_at_1pct": round(plant["caught"], 4),
            "per_defect": per_defect,
        }

    print(f"{args.data.name}, {args.bundle.name} ({machine})\n{head_line} (at {args.alpha:.0%})", flush=True)
    ours = row("ours (the bundle)", scored(base, args.data, held_out, good, args.alpha))
    seeds = args.seeds if args.seeds is not None else [cfg.seed]
    if args.ensemble and len(seeds) < 2:
        ap.error("--ensemble needs two or more --seeds")

    class MeanHead(torch.nn.Module):
        """The mean of trained heads' logits (benchmark code: the ensemble lead, not a product head)."""

        def __init__(self, heads: list) -> None:
            super().__init__()
            self.heads = torch.nn.ModuleList(heads)
            self.grid = heads[0].grid

        def forward(self, t_feats, s_feats):
            return torch.stack([h(t_feats, s_feats) for h in self.heads]).mean(dim=0)

    def with_head(stride: int) -> KDModel:
        """The bundle's network given an untrained head on the ``stride`` grid (its own config: the
        rows below set its weight)."""
        net = dataclasses.replace(base.cfg, seg_weight=1.0, seg_stride=stride, seg_fusion=fusion)
        model = KDModel(base.teacher, net).eval()
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("seg_", "seg_head.")) for k in missing), (missing, unexpected)
        return model

    recipe = ("" if fills == DEFAULT_FILLS else "-" + "+".join(fills)) + f"-x{per_image}"  # a kept head's name

    def scored_rows(model, label: str) -> list[dict]:
        out = [ours]
        for w in args.weights:
            model.cfg.seg_weight = w
            join = f"ours + {w:g} x head" if fusion == "add" else f"max(ours, {w:g} x head)"
            out.append(
                row(f"{join} ({label}, {'+'.join(fills)})", scored(model, args.data, held_out, good, args.alpha))
            )
        return out

    def record(settings: dict, fit: dict, rows_out: list[dict]) -> None:
        settings |= {"head": "product", "steps": steps, "fusion": fusion, "samples_per_image": per_image}
        if fills != DEFAULT_FILLS:
            settings["fills"] = "+".join(fills)
        out = {"machine": machine, "bundle": args.bundle.name, "data": args.data.name, "settings": settings,
               "fit": fit, "variants": rows_out}  # fmt: skip
        replace_result(args.results, out, key=lambda r: (r["bundle"], r["data"], tuple(sorted(r["settings"].items()))))

    for stride in args.strides:
        trained = []
        for seed in seeds:
            model = with_head(stride)
            saved = args.heads / f"{args.bundle.name}-stride{stride}-seed{seed}-steps{steps}{recipe}.pt"
            loaded = args.reuse and saved.is_file()
            if loaded:  # a head this script trained before, with its statistics
                state = torch.load(saved, weights_only=True)
                model.seg_head.load_state_dict(state["head"])
                model.seg_stats.copy_(state["seg_stats"])
                fit = json.loads(state["fit"])
            else:
                # as many samples as asked for (the product's cap bounds its own count only)
                cap = max(MAX_SAMPLES, per_image * len(train_imgs))
                fit = train_seg_head(
                    model, train_imgs, good, steps, seed, fills, samples_per_image=per_image, max_samples=cap
                )
                saved.parent.mkdir(parents=True, exist_ok=True)
                state = {"head": model.seg_head.state_dict(), "seg_stats": model.seg_stats, "fit": json.dumps(fit)}
                torch.save(state, saved)
            print(f"stride {stride}, head seed {seed}: {fit}", flush=True)
            trained.append(model.seg_head)
            if not (loaded and args.ensemble):  # a kept head's entry stands: only the mean is scored
                record({"stride": stride, "seed": seed}, fit, scored_rows(model, f"stride {stride}, seed {seed}"))
        if args.ensemble:
            model = with_head(stride)
            model.seg_head = MeanHead(trained)
            fit = fit_seg_stats(model, good)
            label = f"stride {stride}, mean of seeds {'+'.join(map(str, seeds))}"
            print(f"{label}: {fit}", flush=True)
            record({"stride": stride, "seed": "+".join(map(str, seeds)), "ensemble": True}, fit,
                   scored_rows(model, label))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
