"""A lead for the map, measured (not in the product): a per-row Gaussian of the teacher's deepest tap.

    python benchmarks/region_map.py --bundle runs/accuracy/magnetic_tile-full-rd-l2-hq0.999-e20-s0 \\
                                    --data ../shared/data/magnetic_tile

magnetic_tile's ``uneven`` defects are bands across the whole width of the tile, at its top or
bottom: a texture or brightness that is normal somewhere else, so a distillation map (which asks
"can the student rebuild this patch?") barely marks them. Here each row of the teacher's deepest
tapped map is pooled over the width (channel means, smoothed over ``--rows`` rows), each row
position gets its own Gaussian (Ledoit-Wolf, ``engines.gaussian``) fitted on the bundle's own
training parts, and a part's row distances, standardised per row on the bundle's held-out good
parts, are spread back over the width: a "row map". It is scored alone and fused with the
bundle's map as ``max(ours, w * (row map - c))`` for a few fixed (w, c). The image score stays the
bundle's (only the pixel metrics move). The same for a per-position Gaussian (PaDiM's model on the
teacher's deepest tap averaged over N x N neighbours, ``--position-pools``; each position fitted on
its own and its 8 neighbours' training features, standardised per position on the held-out parts,
upsampled and smoothed as our map), also on several taps stacked on the first one's grid
(``--position-taps 4 10``, as PaDiM stacks its scales), fused by max and by sum. Prints pixel
AUROC / AU-PRO over all defects and per type, and the image AUROC of each map's maximum (the
image score a map alone would give); writes benchmarks/results/region_map.json.
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

from engines.data import hw  # noqa: E402

FUSIONS = [(0.5, 0.0), (1.0, 0.0), (0.5, 2.0), (1.0, 2.0)]
SUMS = [0.5, 1.0]  # ours + w x the per-position map


def tapped(model, images: np.ndarray, taps: tuple[int, ...] | None = None, batch_size: int = 16):
    """The teacher's features at ``taps`` (default: the deepest distillation tap) of ``images``: per
    batch, one (n, C, h, w) tensor per tap, in the order given."""
    import torch

    from engines.teacher import normalize_input
    from engines.train import to_tensor

    read = model.cfg.teacher_taps()
    taps = (model.cfg.taps[-1],) if taps is None else tuple(taps)
    missing = [t for t in taps if t not in read]
    if missing:
        msg = f"the bundle's teacher does not read blocks {missing} (it reads {list(read)})"
        raise ValueError(msg)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f = model.teacher(normalize_input(to_tensor(images[i : i + batch_size], torch.device("cpu"))))
            yield [f[read.index(t)] for t in taps]


def deepest_tap(model, images: np.ndarray, batch_size: int = 16):
    """The teacher's deepest distillation tap of ``images``, one (n, C, h, w) tensor per batch."""
    for f in tapped(model, images, None, batch_size):
        yield f[0]


def row_descriptors(model, images: np.ndarray, rows: int, batch_size: int = 16) -> np.ndarray:
    """(N, C, H) channel means over the width of the deepest distillation tap, smoothed over rows."""
    import torch.nn.functional as F

    out = []
    for f in deepest_tap(model, images, batch_size):
        r = f.mean(dim=3)
        if rows > 1:
            r = F.avg_pool1d(r, rows, 1, rows // 2, count_include_pad=False)
        out.append(r.double().numpy())
    return np.concatenate(out)


class RowGaussians:
    """One Gaussian per row position; distances standardised per row on held-out good parts."""

    def __init__(self, train: np.ndarray, held_out: np.ndarray):
        from engines.gaussian import fit_gaussian

        self.fits = [fit_gaussian(train[:, :, y]) for y in range(train.shape[2])]
        d = self.distances(held_out, standardise=False)
        self.mean, self.std = d.mean(axis=0), np.maximum(d.std(axis=0, ddof=1), 1e-12)

    def distances(self, x: np.ndarray, standardise: bool = True) -> np.ndarray:
        from engines.gaussian import mahalanobis

        d = np.stack([mahalanobis(f, x[:, :, y]) for y, f in enumerate(self.fits)], axis=1)
        return (d - self.mean) / self.std if standardise else d


def stack_scales(feats: list, pool: int):
    """Each (n, C_i, h_i, w_i) map averaged over ``pool`` x ``pool`` neighbours, resized (bilinear) to
    the first map's grid and stacked along the channels: (n, sum C_i, h_0, w_0)."""
    import torch
    import torch.nn.functional as F

    size = feats[0].shape[-2:]
    out = []
    for f in feats:
        if pool > 1:
            f = F.avg_pool2d(f, pool, 1, pool // 2, count_include_pad=False)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def position_features(model, images: np.ndarray, pool: int, taps: tuple[int, ...] | None = None,
                      batch_size: int = 16) -> np.ndarray:  # fmt: skip
    """(N, C, h, w) float32: the teacher's ``taps`` (default: the deepest distillation tap), each
    averaged over ``pool`` x ``pool`` neighbours, on the grid of the first tap given."""
    return np.concatenate([stack_scales(f, pool).float().numpy() for f in tapped(model, images, taps, batch_size)])


class PositionGaussians:
    """One Gaussian per map position (PaDiM's model, on the teacher's features), fitted on the
    training parts' features at that position and its 3 x 3 neighbours; distances standardised per
    position on the held-out good parts."""

    def __init__(self, train: np.ndarray, held_out: np.ndarray):
        from engines.gaussian import fit_gaussian

        c, h, w = train.shape[1:]
        self.fits = [
            [
                fit_gaussian(
                    train[:, :, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].transpose(0, 2, 3, 1).reshape(-1, c)
                )
                for x in range(w)
            ]
            for y in range(h)
        ]
        d = self.distances(held_out, standardise=False)
        self.mean, self.std = d.mean(axis=0), np.maximum(d.std(axis=0, ddof=1), 1e-12)

    def distances(self, x: np.ndarray, standardise: bool = True) -> np.ndarray:
        from engines.gaussian import mahalanobis

        d = np.stack(
            [
                np.stack([mahalanobis(f, x[:, :, y, i]) for i, f in enumerate(row)], axis=1)
                for y, row in enumerate(self.fits)
            ],
            axis=1,
        )
        return (d - self.mean) / self.std if standardise else d


def to_image(dist: np.ndarray, size: int | tuple[int, int], sigma: float) -> np.ndarray:
    """(N, h, w) -> (N, H, W): bilinear to the input size, Gaussian-smoothed (sigma input px, as our map)."""
    import cv2

    height, width = hw(size)
    out = np.empty((len(dist), height, width), np.float32)
    for i, d in enumerate(dist.astype(np.float32)):
        up = cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.GaussianBlur(up, (0, 0), sigma) if sigma > 0 else up
    return out


def to_map(rows: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N, R) row values -> (N, H, W) at the input ``size``: linear along the rows, constant along the width."""
    height, width = hw(size)
    r = rows.shape[1]
    centres = (np.arange(r) + 0.5) * height / r
    y = np.arange(height) + 0.5
    col = np.stack([np.interp(y, centres, v) for v in rows]).astype(np.float32)
    return np.repeat(col[:, :, None], width, axis=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=3, help="rows each row's descriptor is smoothed over")
    ap.add_argument(
        "--position-pools",
        type=int,
        nargs="*",
        default=[3, 7],
        help="also a per-position Gaussian of the teacher's features averaged over N x N neighbours, for each N",
    )
    ap.add_argument(
        "--position-taps",
        type=int,
        nargs="+",
        default=None,
        help="teacher blocks of the per-position Gaussian, stacked on the first one's grid (default: the deepest "
        "distillation tap); each must be one the bundle's teacher reads",
    )
    ap.add_argument("--results", type=Path, default=HERE / "results" / "region_map.json")
    args = ap.parse_args()

    from engines.bundle import read_meta
    from engines.data import eval_items, good_training_images, load_images, split_holdout
    from engines.evaluate import metric_rows, score_items
    from engines.metrics import auroc
    from engines.train import load_bundle_model, predict

    model = load_bundle_model(args.bundle, device="cpu")
    taps = tuple(args.position_taps or (model.cfg.taps[-1],))  # the per-position Gaussian's
    cfg = read_meta(args.bundle)["training"]["config"]
    size = model.cfg.input_hw()
    train_paths, held_out = split_holdout(good_training_images(args.data), cfg["val_fraction"], cfg["seed"])
    t0 = time.perf_counter()
    train_imgs, held_imgs = load_images(train_paths, size), load_images(held_out, size)
    gauss = RowGaussians(row_descriptors(model, train_imgs, args.rows), row_descriptors(model, held_imgs, args.rows))
    positions = {
        k: PositionGaussians(
            position_features(model, train_imgs, k, taps),
            position_features(model, held_imgs, k, taps),
        )
        for k in args.position_pools
    }
    del train_imgs, held_imgs
    fit_s = time.perf_counter() - t0
    items = eval_items(args.data)
    row_maps = []
    position_maps: dict[int, list[np.ndarray]] = {k: [] for k in positions}
    sigma = float(model.cfg.blur_sigma)

    def ours_and_rows(imgs):  # score_items calls it on each chunk in order
        row_maps.append(to_map(gauss.distances(row_descriptors(model, imgs, args.rows)), size))
        for k, g in positions.items():
            d = g.distances(position_features(model, imgs, k, taps))
            position_maps[k].append(to_image(d, size, sigma))
        return predict(model, imgs)

    ours, scores, masks = score_items(items, size, ours_and_rows)
    rowmap = np.concatenate(row_maps)

    variants = [("ours (the bundle's map)", ours), ("row map alone", rowmap)]
    variants += [(f"max(ours, {w:g} x (row map - {c:g}))", np.maximum(ours, w * (rowmap - c))) for w, c in FUSIONS]
    for k, parts in position_maps.items():
        pm = np.concatenate(parts)
        name = f"position Gaussian {k}x{k} of blocks {'+'.join(map(str, taps))}"
        variants += [(f"{name} alone", pm)]
        variants += [(f"max(ours, {w:g} x ({name} - {c:g}))", np.maximum(ours, w * (pm - c))) for w, c in FUSIONS]
        variants += [(f"ours + {w:g} x {name}", ours + w * pm) for w in SUMS]
    machine = machine_name()
    defective = np.array([it.defect != "good" for it in items])
    results = []
    print(f"\n{args.data.name}, {args.bundle.name} ({machine}; row Gaussians fitted in {fit_s:.0f} s)")
    print("variant | all: pixel AUROC / AU-PRO | image AUROC of the map's maximum | per type: pixel AUROC / AU-PRO")
    for name, m in variants:
        rows = {r["defect"]: r for r in metric_rows(items, m, scores, masks)}
        per = " ".join(f"{k} {r['pixel_auroc']:.3f}/{r['au_pro']:.3f}" for k, r in rows.items() if k != "all")
        peak = auroc(defective, m.reshape(len(m), -1).max(axis=1))
        every = f"{rows['all']['pixel_auroc']:.3f} / {rows['all']['au_pro']:.3f}"
        print(f"{name} | {every} | {peak:.3f} | {per}", flush=True)
        results.append(
            {
                "variant": name,
                "map_max_image_auroc": round(peak, 4),
                "pixel_auroc": round(rows["all"]["pixel_auroc"], 4),
                "au_pro": round(rows["all"]["au_pro"], 4),
                "per_defect": {
                    k: {"pixel_auroc": round(r["pixel_auroc"], 4), "au_pro": round(r["au_pro"], 4)}
                    for k, r in rows.items()
                    if k != "all"
                },
            }
        )
    out = {"machine": machine, "bundle": args.bundle.name, "data": args.data.name, "rows": args.rows,
           "position_pools": args.position_pools, "position_taps": list(taps),
           "variants": results}  # fmt: skip
    # one entry per bundle, data set and taps of the per-position Gaussian (entries from before
    # --position-taps read the deepest distillation tap, block 10 of every bundle so far)
    replace_result(args.results, out, key=lambda r: (r["bundle"], r["data"], r.get("position_taps", [10])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
