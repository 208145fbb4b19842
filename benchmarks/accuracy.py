"""Accuracy + ablation on the real data sets (../shared/data), side by side with a memory-bank peer.

    python benchmarks/accuracy.py [--epochs 6] [--datasets magnetic_tile ball_screw_drive]
                                  [--variants full plain simam sspcab] [--device cpu]
                                  [--taps 2 4 10] [--student-expand 6] [--distance l2]
                                  [--hard-quantile 0.999] [--seed 0] [--no-peer] [--fuse] [--reuse]
    python benchmarks/accuracy.py --mark-only   # the rows' "default" set again, nothing measured

For each data set, in one run: each variant of our network is trained on the good training images
(minus the held-out validation split that ``lineinspect train`` makes) and the PatchCore peer
(benchmarks/patchcore.py, on the same teacher) is fitted on the same images. Both are evaluated on
the full test split: image AUROC, pixel AUROC, AU-PRO, and the plant metric: the threshold from the
project's calibration rule at alpha = 1 % on the held-out good images of the TRAINING split, then
the observed false-reject rate on test/good and the share of defective parts caught (per type too).

Writes benchmarks/results/accuracy.json: one row per (dataset, network setting, seed) with the
peer's numbers from the same run under "peer", "default": true on rows of the network that
``lineinspect train`` ships. A row replaces an older one only for the same dataset and setting.
Data sets without masks for some defects are scored too; the pixel metrics say what they cover.
Rows of a network with a global term also get "map_only" and "global_only": the image metrics of
each half of its image score alone, from the same network and run.

``--fuse`` (an experiment, the issue's "memory-bank term fused into the map" lead; not a product
path): rows also get "fused", the same metrics for our map and the peer's map each standardised
with the mean / std of its map pixels on the held-out good images and averaged (image score: the
fused map's maximum), scored on the same test images from the same run. ``--reuse`` skips training where the work folder
already holds a completed bundle of exactly these settings (its row keeps that bundle's recorded
training time), e.g. to fit the peer again with another ``--peer-coreset``; a bundle there or in another
work folder that differs only in settings that act after training (``global_taps``, ``global_grid``,
``blur_sigma``, ``map_stats_from``, ...: ``engines.train.AFTER_TRAINING``) is copied and refitted
first (``engines.train.refit_after_training``: the student is the same, so the result is what ``train``
would have written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402

from engines.data import parse_image_width  # noqa: E402

if TYPE_CHECKING:
    from engines.train import TrainConfig

VARIANTS = {
    "plain": {"simam": False, "sspcab": False},
    "simam": {"simam": True, "sspcab": False},
    "sspcab": {"simam": False, "sspcab": True},
    "full": {"simam": True, "sspcab": True},
}
# the settings that make a row's network (with dataset and seed: a row's identity)
NET_KEYS = (
    "taps",
    "student_expand",
    "distance",
    "hard_quantile",
    "epochs",
    "crop_size",
    "lr",
    "position_spread_images",
    "student",
    "global_taps",
    "reverse_width",
    "global_grid",
    "synthetic_defects",
    "synthetic_lambda",
    "val_fraction",
    "map_stats_from",
    "blur_sigma",
    "seg_weight",
    "seg_stride",
    "seg_fusion",
    "seg_samples",
    "seg_heads",
    "seg_width",
)
OLD_DEFAULTS = {
    "global_taps": [],  # rows from before the global term: the map's score alone
    "student": "forward",  # rows from before the reverse student existed
    "student_expand": 6,
    "reverse_width": 192,  # rows from before the width was a benchmark option
    "global_grid": 0,  # rows from before the global term's grid: the whole image's statistics
    "distance": "cosine",
    "hard_quantile": None,
    "crop_size": None,
    "lr": 1e-3,
    "position_spread_images": 0,  # rows from before the per-position spread: one spread for the map
    "synthetic_defects": 0.0,  # rows from before synthetic defects: none
    "synthetic_lambda": 1.0,
    "val_fraction": 0.1,  # rows from before it was a benchmark option
    "map_stats_from": "held_out",  # rows from before stop 32: the map's statistics from the held-out parts
    "blur_sigma": 4.0,  # rows from before stop 34: the map smoothed with sigma 4
    "seg_weight": 0.0,  # rows from before the segmentation head: none
    "seg_stride": 8,  # rows from before its stride could be chosen
    "seg_fusion": "add",  # rows from before its fusion could be chosen: added
    "seg_samples": 2,  # rows from before stop 41: 2 synthetic samples per training part
    "seg_heads": 1,  # rows from before stop 42: one head
    "seg_width": 96,  # ... of width 96
}


# TrainConfig settings accuracy.py takes from its command line
OPTIONS = (
    "student",
    "student_expand",
    "distance",
    "hard_quantile",
    "crop_size",
    "lr",
    "epochs",
    "position_spread_images",
    "global_taps",
    "reverse_width",
    "global_grid",
    "image_width",
    "synthetic_defects",
    "synthetic_lambda",
    "val_fraction",
    "map_stats_from",
    "blur_sigma",
    "seg_weight",
    "seg_stride",
    "seg_fusion",
    "seg_samples",
    "seg_heads",
    "seg_width",
)


# settings of the segmentation head (no settings of a network without one)
HEAD_KEYS = ("seg_stride", "seg_fusion", "seg_samples", "seg_heads", "seg_width")


def _key(row: dict) -> tuple:
    """Rows replace each other only when they measured the same setting."""
    net = tuple(json.dumps(row_setting(row, k)) for k in NET_KEYS)
    return (row["dataset"], row["variant"], row.get("seed", 0), row_input(row), *net)


def row_setting(row: dict, key: str):
    """A network setting of a row: rows from before a setting existed read its old default; the
    head's settings (``HEAD_KEYS``) of a network without a head are no settings (None), whatever the row
    recorded."""
    if key in HEAD_KEYS and not row.get("seg_weight", OLD_DEFAULTS["seg_weight"]):
        return None
    return row.get(key, OLD_DEFAULTS.get(key))


def row_input(row: dict) -> tuple[int, int]:
    """A row's model input (height, width); rows from before non-square inputs were square."""
    side = row.get("image_size", 256)
    return side, row.get("image_width") or side


def is_default(row: dict, shipped: TrainConfig, shipped_input: tuple[int, int] | None = None) -> bool:
    """Whether a row measured the network `lineinspect train` ships now (all its settings, the
    full variant, the input it chooses for that data set: ``shipped_input``, from ``resolve_input``
    on the set's training images; None: its square); rows of earlier defaults lose the mark when it
    changes."""
    want = shipped_input or (shipped.image_size, shipped.image_size)
    return (
        row["variant"] == "full"
        and row_input(row) == want
        and all(json.dumps(row_setting(row, k)) == json.dumps(setting(shipped, k)) for k in NET_KEYS)
    )


def setting(cfg: TrainConfig, key: str):
    """A TrainConfig setting as a row records it: the grid the network gets (``net_config`` decides
    that a network without a global term has none), and ``row_setting``'s rule for the rest."""
    if key == "global_grid":
        return cfg.net_config().global_grid
    return row_setting(cfg.model_dump(), key)


def _r(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def _summary(res: dict) -> dict:
    overall = res["rows"][-1]
    plant = res["plant"]
    return {
        "image_auroc": _r(overall["image_auroc"]),
        "pixel_auroc": _r(overall["pixel_auroc"]),
        "au_pro": _r(overall["au_pro"]),
        "frr_at_1pct": _r(plant["frr"]) if plant else None,
        "caught_at_1pct": _r(plant["caught"]) if plant else None,
        "caught_at_1pct_per_defect": {k: _r(v) for k, v in plant["caught_per_defect"].items()} if plant else None,
    }


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--datasets", nargs="+", default=["magnetic_tile", "ball_screw_drive"])
    ap.add_argument("--variants", nargs="+", default=["full", "plain", "simam", "sspcab"], choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, help="training epochs (default: lineinspect train's)")
    ap.add_argument("--image-size", type=int, default=256, help="as TrainConfig.image_size")
    ap.add_argument(
        "--image-width", type=parse_image_width, help="pixels, auto or square (default: lineinspect train's)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--taps", type=int, nargs="+", help="teacher blocks to tap (default: the model's default)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (split, initialisation, batch order)")
    ap.add_argument("--student", choices=["forward", "reverse"], help="student shape (default: the model's)")
    ap.add_argument("--student-expand", type=int, help="student MBConv expansion ratio (default: the model's)")
    ap.add_argument("--reverse-width", type=int, help="reverse student's bottleneck width (default: the model's)")
    ap.add_argument("--distance", choices=["cosine", "l2"], help="per-scale discrepancy (default: the model's)")
    ap.add_argument("--hard-quantile", type=float, help="hard-feature mining quantile (default: the model's)")
    ap.add_argument("--no-hard-quantile", action="store_true", help="train without hard-feature mining")
    ap.add_argument("--crop-size", type=int, help="train on random crops of this size (default: the model's)")
    ap.add_argument("--lr", type=float, help="learning rate (default: the model's)")
    ap.add_argument(
        "--position-spread-images",
        type=int,
        help="training images for the per-position spread of good maps (0: one spread, the previous default)",
    )
    ap.add_argument(
        "--global-taps",
        type=int,
        nargs="*",
        help="teacher blocks of the image-level Gaussian term (none given: no term; default: the model's)",
    )
    ap.add_argument(
        "--global-grid",
        type=int,
        help="cells per side of the global term's grid of channel means (0: none, as before; default: the model's)",
    )
    ap.add_argument(
        "--synthetic-defects", type=float, help="fraction of each batch shown again with a synthetic defect"
    )
    ap.add_argument("--synthetic-lambda", type=float, help="weight of the synthetic-defect loss")
    ap.add_argument(
        "--val-fraction", type=float, help="share of the good images held out (calibration, score statistics)"
    )
    ap.add_argument(
        "--map-stats-from",
        choices=["training", "held_out"],
        help="parts whose maps give the map's statistics (default: lineinspect train's)",
    )
    ap.add_argument(
        "--blur-sigma", type=float, help="Gaussian smoothing of the map, input pixels (default: lineinspect train's)"
    )
    ap.add_argument(
        "--seg-weight",
        type=float,
        help="weight of the segmentation head's map (trained after the student; 0: none; default: lineinspect train's)",
    )
    ap.add_argument(
        "--seg-stride", type=int, choices=[8, 16], help="the segmentation head's grid (default: lineinspect train's)"
    )
    ap.add_argument(
        "--seg-fusion", choices=["add", "max"], help="how the head's map joins ours (default: lineinspect train's)"
    )
    ap.add_argument(
        "--seg-samples", type=int, help="synthetic samples per part for the head (default: lineinspect train's)"
    )
    ap.add_argument("--seg-heads", type=int, help="segmentation heads averaged (default: lineinspect train's)")
    ap.add_argument("--seg-width", type=int, help="the head networks' width (default: lineinspect train's)")
    ap.add_argument("--alpha", type=float, default=0.01, help="false-reject target of the plant metric")
    ap.add_argument("--no-peer", action="store_true", help="skip the PatchCore peer (rows then carry none)")
    ap.add_argument("--peer-coreset", type=float, default=0.01, help="PatchCore coreset ratio")
    ap.add_argument("--fuse", action="store_true", help="also score our map fused with the peer's (an experiment)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a bundle this script trained before with exactly these settings (train s: its recorded time)",
    )
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "accuracy")
    ap.add_argument("--results", type=Path, default=HERE / "results" / "accuracy.json")
    ap.add_argument(
        "--mark-only",
        action="store_true",
        help='set every row\'s "default" against what lineinspect train ships now and stop (no training, no '
        "scoring: after the default changed to a network whose rows are already measured)",
    )
    args = ap.parse_args()

    from engines.data import good_training_images, split_holdout
    from engines.evaluate import evaluate, format_plant, format_table
    from engines.train import TrainConfig, load_bundle_model, predict, resolve_input, train

    machine = machine_name()
    rows: list[dict] = json.loads(args.results.read_text()) if args.results.is_file() else []
    shipped = TrainConfig()
    if args.mark_only:
        mark_rows(rows, shipped, args.data_root)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(rows, indent=2) + "\n")
        print_table([r for r in rows if r["default"]], machine)
        return 0
    for ds in args.datasets:
        data = args.data_root / ds
        peer, peer_score = None, None
        for variant in args.variants:
            extra = {"taps": args.taps} if args.taps else {}
            for name in OPTIONS:
                if getattr(args, name) is not None:
                    extra[name] = getattr(args, name)
            if args.no_hard_quantile:
                extra["hard_quantile"] = None
            cfg = TrainConfig(
                image_size=args.image_size, device=args.device, seed=args.seed, **VARIANTS[variant], **extra
            )
            cfg, input_note = resolve_input(cfg, good_training_images(data))  # as train decides it
            size = cfg.net_config().input_hw()
            train_paths, held_out = split_holdout(good_training_images(data), cfg.val_fraction, cfg.seed)
            hq = f"-hq{cfg.hard_quantile:g}" if cfg.hard_quantile is not None else ""
            rev = "-rd" if cfg.student == "reverse" else ""
            if rev and cfg.reverse_width != OLD_DEFAULTS["reverse_width"]:  # tags from before the option: 192 wide
                rev += f"-w{cfg.reverse_width}"
            more = f"-{size[0]}x{size[1]}" if cfg.image_width is not None else ""  # then the settings added later
            if cfg.synthetic_defects:
                more += f"-syn{cfg.synthetic_defects:g}x{cfg.synthetic_lambda:g}"
            if cfg.val_fraction != OLD_DEFAULTS["val_fraction"]:
                more += f"-vf{cfg.val_fraction:g}"
            if cfg.map_stats_from != OLD_DEFAULTS["map_stats_from"]:
                more += f"-stats{cfg.map_stats_from.replace('_', '')}"
            if cfg.blur_sigma != OLD_DEFAULTS["blur_sigma"]:
                more += f"-blur{cfg.blur_sigma:g}"
            if cfg.seg_weight != OLD_DEFAULTS["seg_weight"]:
                more += f"-seg{cfg.seg_weight:g}"
                if cfg.seg_stride != OLD_DEFAULTS["seg_stride"]:
                    more += f"s{cfg.seg_stride}"
                if cfg.seg_fusion != OLD_DEFAULTS["seg_fusion"]:
                    more += cfg.seg_fusion
                if cfg.seg_samples != OLD_DEFAULTS["seg_samples"]:
                    more += f"n{cfg.seg_samples}"
                if cfg.seg_heads != OLD_DEFAULTS["seg_heads"]:
                    more += f"h{cfg.seg_heads}"
                if cfg.seg_width != OLD_DEFAULTS["seg_width"]:
                    more += f"w{cfg.seg_width}"
            tag = f"{ds}-{variant}{rev}-{cfg.distance}{hq}-e{cfg.epochs}{more}-s{cfg.seed}"
            bundle = args.work / tag
            train_s = _reused_seconds(bundle, cfg, args.work, data) if args.reuse else None
            if train_s is None:
                t0 = time.perf_counter()
                train(data, bundle, cfg, quiet=True)
                train_s = time.perf_counter() - t0
            model = load_bundle_model(bundle, device=args.device)
            res = evaluate(
                data,
                size,
                lambda x, m=model: predict(m, x),
                bundle / "eval",
                n_overlays=8,
                calibration_images=held_out,
                alpha=args.alpha,
            )
            print(f"\n== {ds} / {variant} / {cfg.distance} ({cfg.epochs} epochs, trained in {train_s:.0f} s)")
            print(f"input {size[0]} x {size[1]}: {input_note}")
            print(format_table(res["rows"]))
            for note in res["notes"]:
                print(f"note: {note}")
            print(format_plant(res["plant"]), flush=True)
            components = _run_components(data, args, size, model, held_out) if model.global_term is not None else None
            if peer is None and not args.no_peer:
                peer, peer_score = _run_peer(data, args, size, train_paths, held_out, cfg.blur_sigma)
            fused = None
            if args.fuse and peer_score is not None:
                fused = _run_fused(data, args, size, model, peer_score, held_out)
            row = {
                "dataset": ds,
                "variant": variant,
                **_summary(res),
                "f1_max": _r(res["rows"][-1]["f1_max"]),
                "epochs": cfg.epochs,
                "taps": list(cfg.taps),
                "student": cfg.student,
                "student_expand": cfg.student_expand,
                "reverse_width": cfg.reverse_width,
                "distance": cfg.distance,
                "hard_quantile": cfg.hard_quantile,
                "global_taps": list(cfg.global_taps),
                "global_grid": setting(cfg, "global_grid"),
                "position_spread_images": cfg.position_spread_images,
                "crop_size": cfg.crop_size,
                "synthetic_defects": cfg.synthetic_defects,
                "synthetic_lambda": cfg.synthetic_lambda,
                "val_fraction": cfg.val_fraction,
                "map_stats_from": cfg.map_stats_from,
                "blur_sigma": cfg.blur_sigma,
                "seg_weight": cfg.seg_weight,
                "seg_stride": cfg.seg_stride,
                "seg_fusion": cfg.seg_fusion,
                "seg_samples": cfg.seg_samples,
                "seg_heads": cfg.seg_heads,
                "seg_width": cfg.seg_width,
                "lr": cfg.lr,
                "seed": cfg.seed,
                "image_size": size[0],  # the input's height and width (image_width None: a square)
                "image_width": cfg.image_width,
                "image_width_setting": args.image_width or shipped.image_width,
                "train_seconds": round(train_s, 1),
                "default": False,  # set for every row below, against what lineinspect train ships now
                "peer": peer,
                **({"fused": fused} if fused else {}),
                **(components or {}),
                "notes": res["notes"],
                "machine": machine,
                "per_defect": res["rows"][:-1],
            }
            rows = [r for r in rows if _key(r) != _key(row)]
            rows.append(row)
            mark_rows(rows, shipped, args.data_root)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(rows, indent=2) + "\n")
            print_table([row], machine)
    print_table([r for r in rows if r.get("peer")], machine)
    return 0


def mark_rows(rows: list[dict], shipped: TrainConfig, data_root: Path) -> None:
    """Every row's ``"default"`` set again (``is_default``) against ``shipped``, at the input it
    chooses for the row's data set under ``data_root``."""
    for r in rows:
        r["default"] = is_default(r, shipped, shipped_inputs(data_root, r["dataset"], shipped))


_SHIPPED_INPUTS: dict[Path, tuple[int, int] | None] = {}


def shipped_inputs(root: Path, dataset: str, shipped: TrainConfig) -> tuple[int, int] | None:
    """The input ``lineinspect train`` chooses for a data set under ``root`` (None when it is not here)."""
    from engines.data import good_training_images
    from engines.train import resolve_input

    where = root / dataset
    if where not in _SHIPPED_INPUTS:
        try:
            _SHIPPED_INPUTS[where] = resolve_input(shipped, good_training_images(where))[0].net_config().input_hw()
        except ValueError:
            _SHIPPED_INPUTS[where] = None
    return _SHIPPED_INPUTS[where]


def _trained_with(bundle: Path) -> dict | None:
    """The training record of a bundle trained to completion (None: not one), its config as the
    bundle was written (``engines.train.bundle_config``: settings added since take its values)."""
    from engines.train import bundle_config

    try:
        meta = json.loads((bundle / "model.json").read_text())
        training = meta["training"]
        if training.get("interrupted") or not isinstance(training.get("config"), dict):
            return None
        config = bundle_config(meta).model_dump(mode="json")
    except (OSError, ValueError, KeyError, TypeError):  # ValueError: not JSON, or a config this version rejects
        return None
    return {**training, "config": config}


def _reused_seconds(bundle: Path, cfg: TrainConfig, work: Path | None = None, data: Path | None = None) -> float | None:
    """The recorded training time of ``bundle`` if it holds a bundle trained to completion with
    ``cfg`` (on ``data``, when given), else None. A bundle (there, or elsewhere in ``work``) whose
    settings differ only in what acts after training (``engines.train.AFTER_TRAINING``) is copied
    there and given ``cfg``'s values of them (``refit_after_training``: what train would have
    written); its recorded time stands, since training is the same."""
    import shutil

    from engines.bundle import read_meta, student_path
    from engines.train import AFTER_TRAINING, refit_after_training

    want = cfg.model_dump(mode="json")

    def student_of(record: dict | None) -> bool:
        return (
            record is not None
            and (data is None or record.get("data") == str(Path(data).resolve()))
            and all(record["config"].get(k) == v for k, v in want.items() if k not in AFTER_TRAINING)
        )

    def changes_for(record: dict) -> dict:
        return {k: v for k, v in want.items() if k in AFTER_TRAINING and record["config"].get(k) != v}

    own = _trained_with(bundle)
    source = bundle if student_of(own) else None
    if source is None and work is not None and work.is_dir():
        found = [(p, _trained_with(p)) for p in sorted(work.iterdir()) if p.is_dir() and p != bundle]
        found = [(p, r) for p, r in found if student_of(r)]
        if found:  # the one needing the fewest changes
            source, own = min(found, key=lambda f: len(changes_for(f[1])))
    if source is None:
        return None
    changes = changes_for(own)
    if source != bundle:
        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(parents=True)
        for path in (source / "model.json", student_path(source, read_meta(source))):
            shutil.copy2(path, bundle / path.name)
    if changes:
        print(f"refitting {', '.join(sorted(changes))} of {source} after training, into {bundle}")
        refit_after_training(bundle, **changes)
    print(f"reusing the student of {source} (trained in {own['seconds']:.0f} s)")
    return float(own["seconds"])


class Memo:
    """A score function that remembers its answers per batch of images (the peer's test maps are
    computed once and reused by the fused score)."""

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict[bytes, tuple] = {}

    def __call__(self, images):
        key = hashlib.sha1(images.tobytes()).digest() + repr(images.shape).encode()
        if key not in self.cache:
            self.cache[key] = self.fn(images)
        return self.cache[key]


def fuse_maps(maps: list, stats: list[tuple[float, float]]):
    """The maps each standardised with its (mean, std) and averaged; image score = the maximum."""
    fused = sum((m - mu) / max(sd, 1e-12) for m, (mu, sd) in zip(maps, stats, strict=True)) / len(maps)
    return fused, fused.reshape(len(fused), -1).max(1)


def _run_fused(data: Path, args, size: tuple[int, int], model, peer_fn, held_out: list[Path]) -> dict:
    """Our map and the peer's fused, standardised on the held-out good images (an experiment).
    Image score: the fused map's maximum; with a global term, the larger of that and the term's
    distance, each standardised on the held-out good images (the product's rule for its own score)."""
    import numpy as np

    from engines.data import load_images
    from engines.evaluate import evaluate, format_plant, format_table
    from engines.train import predict, score_halves

    ours = Memo(lambda x: predict(model, x))  # the held-out maps are needed twice below
    good = load_images(held_out, size)
    stats = []
    for fn in (ours, peer_fn):
        m = fn(good)[0]
        stats.append((float(m.mean()), float(m.std())))
    with_term = model.global_term is not None
    if with_term:
        top = fuse_maps([ours(good)[0], peer_fn(good)[0]], stats)[1]
        dist = score_halves(model, good)[1]
        score_stats = [(float(v.mean()), max(float(v.std(ddof=1)), 1e-12)) for v in (top, dist)]

    def fused(x):
        amap, top = fuse_maps([ours(x)[0], peer_fn(x)[0]], stats)
        if not with_term:
            return amap, top
        (mt, st), (mg, sg) = score_stats
        return amap, np.maximum((top - mt) / st, (score_halves(model, x)[1] - mg) / sg)

    res = evaluate(data, size, fused, calibration_images=held_out, alpha=args.alpha)
    term = " (image score with the global term)" if with_term else ""
    print(f"\n== {data.name} / ours + PatchCore peer, fused{term}")
    print(format_table(res["rows"]))
    print(format_plant(res["plant"]), flush=True)
    method = "ours + peer maps, each standardised on the held-out good images, averaged"
    if with_term:
        method += "; image score the larger of its maximum and the global term, each standardised on them"
    return {"method": method, **_summary(res)}


def _run_peer(
    data: Path, args, size: tuple[int, int], train_paths: list[Path], held_out: list[Path], blur_sigma: float
) -> tuple[dict, Memo]:
    """PatchCore fitted on exactly the images our network trained on, its map smoothed as ours
    (``blur_sigma``), scored like ours; also its (remembering) score function."""
    from patchcore import PatchCore, PatchCoreConfig

    from engines.data import load_images
    from engines.evaluate import evaluate, format_plant, format_table

    t0 = time.perf_counter()
    pc = PatchCore(PatchCoreConfig(coreset_ratio=args.peer_coreset, blur_sigma=blur_sigma), seed=args.seed)
    pc.fit(load_images(train_paths, size))
    fit_s = time.perf_counter() - t0
    score = Memo(pc.predict)
    res = evaluate(data, size, score, calibration_images=held_out, alpha=args.alpha)
    print(
        f"\n== {data.name} / PatchCore peer (coreset {args.peer_coreset:.1%} of {pc.n_patches} patches, "
        f"fit {fit_s:.0f} s)"
    )
    print(format_table(res["rows"]))
    print(format_plant(res["plant"]), flush=True)
    return {
        "method": f"patchcore (teacher taps {','.join(map(str, pc.cfg.taps))}, coreset {args.peer_coreset:g})",
        "blur_sigma": blur_sigma,
        **_summary(res),
        "fit_seconds": round(fit_s, 1),
    }, score


def _run_components(data: Path, args, size: tuple[int, int], model, held_out: list[Path]) -> dict:
    """Image metrics of each half of the image score alone, from the same network and run: how much
    the map (the distillation) and the global term each carry."""
    import numpy as np

    from engines.data import eval_items, load_images
    from engines.evaluate import plant_metric
    from engines.metrics import auroc
    from engines.train import score_halves

    items = eval_items(data)
    parts = [score_halves(model, load_images([it.path for it in items[i : i + 64]], size))
             for i in range(0, len(items), 64)]  # fmt: skip
    test = [np.concatenate([p[j] for p in parts]) for j in (0, 1)]
    cal = score_halves(model, load_images(held_out, size))
    defects = [it.defect for it in items]
    y = np.array([d != "good" for d in defects])
    out = {}
    for j, name in enumerate(("map_only", "global_only")):
        p = plant_metric(cal[j], test[j], defects, args.alpha)
        out[name] = {
            "image_auroc": _r(auroc(y, test[j])),
            "frr_at_1pct": _r(p.frr),
            "caught_at_1pct": _r(p.caught),
            "caught_at_1pct_per_defect": {k: _r(v) for k, v in p.caught_per_defect.items()},
        }
        print(
            f"{name}: image AUROC {out[name]['image_auroc']:.3f}, at 1 %: false rejects {p.frr:.1%}, "
            f"caught {p.caught:.1%}",
            flush=True,
        )
    return out


def ratio(r: dict, p: dict) -> str:
    """Our image AUROC over the peer's."""
    if r.get("image_auroc") is None or not p.get("image_auroc"):
        return "-"
    return f"{r['image_auroc'] / p['image_auroc']:.3f}"


def print_table(rows: list[dict], machine: str) -> None:
    print(f"\nmachine: {machine}")
    head = (
        f"{'dataset':<17}{'variant':<11}{'dist':<7}{'ep':>3}{'seed':>5}  {'img AUROC':<16}{'px AUROC':<16}"
        f"{'AU-PRO':<16}{'FRR@1%':<15}{'caught@1%':<15}{'train s':>8}{'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        p = r.get("peer") or {}

        def pair(k: str, r=r, p=p) -> str:
            return f"{_fmt(r.get(k))}/{_fmt(p.get(k))}"

        print(
            f"{r['dataset']:<17}{r['variant'] + ('/rd' if r.get('student') == 'reverse' else ''):<11}"
            f"{r.get('distance', 'cosine'):<7}{r['epochs']:>3}"
            f"{r.get('seed', 0):>5}  "
            f"{pair('image_auroc'):<16}{pair('pixel_auroc'):<16}{pair('au_pro'):<16}{pair('frr_at_1pct'):<15}"
            f"{pair('caught_at_1pct'):<15}{r['train_seconds']:>8.0f}{ratio(r, p):>7}"
        )
    print("(ours / PatchCore peer from the same run)")


if __name__ == "__main__":
    sys.exit(main())
