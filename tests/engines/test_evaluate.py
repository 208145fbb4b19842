"""The plant metric, evaluation without masks, and the PatchCore peer, each on a hand-checked case."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.data import eval_items
from engines.evaluate import evaluate, mask_notes, metric_rows, plant_metric

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))


def test_plant_metric_by_hand():
    # 300 held-out good scores 0..299: the order-statistic rule at alpha 1 % (95 %) needs >= 299
    cal = np.arange(300, dtype=float)
    from calibration.stats import image_threshold

    thr = image_threshold(cal, 0.01, 0.95).threshold
    assert thr == 299.0  # k = 1: the largest good score is the threshold
    test = np.array([10, 299, 300, 5, 298.9, 1000, 299.5])
    kinds = ["good", "good", "good", "crack", "crack", "blowhole", "blowhole"]
    pm = plant_metric(cal, test, kinds, alpha=0.01)
    assert pm.method == "order_statistic" and pm.threshold == 299.0 and pm.n_calibration == 300
    assert pm.frr == pytest.approx(2 / 3), "score >= threshold is a reject, as the service decides"
    assert pm.caught == pytest.approx(2 / 4)
    assert pm.caught_per_defect == {"blowhole": 1.0, "crack": 0.0}
    with pytest.raises(ValueError, match="good and defective"):
        plant_metric(cal, test[:3], kinds[:3])


def test_evaluation_without_masks_reports_image_metrics_and_says_what_is_missing(tmp_path, synthetic_root):
    root = tmp_path / "parts"
    shutil.copytree(synthetic_root, root)
    masks = sorted((root / "ground_truth").rglob("*_mask.png"))
    masks[0].unlink()
    items = eval_items(root)
    assert sum(it.mask_missing for it in items) == 1
    assert "1 of" in mask_notes(items)[0] and masks[0].stem.replace("_mask", "") in mask_notes(items)[0]

    def score(imgs):  # a perfect detector: brightness of the defect is not needed, the label is
        return np.zeros((len(imgs), 64, 64), np.float32), np.zeros(len(imgs), np.float32)

    shutil.rmtree(root / "ground_truth")
    items = eval_items(root)
    assert all(it.mask_missing for it in items if it.is_defect)
    with pytest.raises(ValueError, match="missing ground-truth mask"):
        eval_items(root, require_masks=True)
    res = evaluate(root, 64, score)
    overall = res["rows"][-1]
    assert np.isnan(overall["pixel_auroc"]) and np.isnan(overall["au_pro"]) and overall["n_masked"] == 0
    assert overall["image_auroc"] == 0.5
    assert "pixel AUROC and AU-PRO are not available" in res["notes"][0]


def test_metric_rows_count_only_masked_defects_in_pixel_metrics():
    from engines.data import EvalItem

    items = [
        EvalItem(Path("g"), "good", None),
        EvalItem(Path("a"), "hole", Path("m")),
        EvalItem(Path("b"), "hole", None, True),
    ]
    maps = np.zeros((3, 2, 2), np.float32)
    maps[1, 0, 0] = 5.0  # the masked defect's pixel is found
    maps[2] = 9.0  # an unmasked defect: its hot pixels must not count as false positives
    masks = np.zeros((3, 2, 2), bool)
    masks[1, 0, 0] = True
    rows = metric_rows(items, maps, np.array([0.0, 1.0, 2.0]), masks)
    assert rows[-1]["pixel_auroc"] == 1.0 and rows[-1]["n_masked"] == 1 and rows[-1]["image_auroc"] == 1.0


def test_patchcore_peer_by_hand():
    from patchcore import PatchCore, PatchCoreConfig, greedy_coreset, nearest

    # k-center greedy on 5 points on a line, from the seeded first point: each next is the farthest
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    idx = greedy_coreset(pts, 3, proj_dim=None, seed=0)
    first = int(idx[0])
    far = 0 if first >= 3 else 4  # the farthest from the first
    assert int(idx[1]) == far and len(set(idx.tolist())) == 3
    d, j = nearest(torch.tensor([[1.4], [10.2]]), pts, k=2)
    torch.testing.assert_close(d, torch.tensor([[0.4, 0.6], [0.2, 0.8]]), atol=1e-4, rtol=0)
    assert j.tolist() == [[1, 2], [3, 4]]
    # on synthetic parts it separates the defects
    from engines.synthetic import render

    rng = np.random.default_rng(0)
    good = np.stack([render(rng, 64, None)[0] for _ in range(8)])
    bad = np.stack([render(rng, 64, d)[0] for d in ("scratch", "spot", "dent", "scratch")])
    pc = PatchCore(PatchCoreConfig(coreset_ratio=0.25, batch_size=4)).fit(good)
    assert pc.bank.shape[1] == 40 + 112 and len(pc.bank) == round(0.25 * 8 * 8 * 8)
    maps, scores = pc.predict(np.concatenate([good[:4], bad]))
    assert maps.shape == (8, 64, 64)
    assert scores[4:].min() > scores[:4].max()


def test_accuracy_rows_are_marked_default_only_for_the_network_train_ships():
    """accuracy.py re-marks every row of its results file against TrainConfig(): the rows of a
    previous default lose the mark, older rows without a setting read it as its old default."""
    import accuracy

    from engines.train import TrainConfig

    shipped = TrainConfig()
    row = {
        "dataset": "magnetic_tile",
        "variant": "full",
        "image_size": 256,
        "taps": list(shipped.taps),
        "student": shipped.student,
        "student_expand": shipped.student_expand,
        "distance": shipped.distance,
        "hard_quantile": shipped.hard_quantile,
        "epochs": shipped.epochs,
        "crop_size": shipped.crop_size,
        "lr": shipped.lr,
        "position_spread_images": shipped.position_spread_images,
        "global_taps": list(shipped.global_taps),
        "global_grid": shipped.global_grid,
        "map_stats_from": shipped.map_stats_from,
        "blur_sigma": shipped.blur_sigma,
        "seg_weight": shipped.seg_weight,
        "seg_stride": shipped.seg_stride,
        "seg_fusion": shipped.seg_fusion,
        "seg_samples": shipped.seg_samples,
        "seg_heads": shipped.seg_heads,
        "seg_width": shipped.seg_width,
    }
    assert accuracy.is_default(row, shipped)
    for key, other in [
        ("variant", "plain"),
        ("epochs", 6),
        ("student", "forward"),
        ("hard_quantile", None),
        ("global_taps", []),
        ("reverse_width", 96),
        ("global_grid", 0),
        ("map_stats_from", "held_out"),
        ("blur_sigma", 4.0),
        ("seg_weight", 0.0),
        ("seg_stride", 8),
        ("seg_fusion", "add"),
        ("seg_samples", 5),
        ("seg_heads", 1),
        ("seg_width", 96),
    ]:
        assert not accuracy.is_default({**row, key: other}, shipped), key
    # a row from before the global term is a network without it
    no_term = {k: v for k, v in row.items() if k not in ("global_taps", "global_grid")}
    assert not accuracy.is_default(no_term, shipped)
    assert accuracy.is_default(no_term, TrainConfig(global_taps=[]))  # whatever its grid setting says
    # ... and a row from before the term's grid, a term of the image's statistics alone
    no_grid = {k: v for k, v in row.items() if k != "global_grid"}
    assert not accuracy.is_default(no_grid, shipped)
    assert accuracy.is_default(no_grid, TrainConfig(global_grid=0))
    old = {k: v for k, v in row.items() if k != "student"}  # a row from before the setting: forward
    assert not accuracy.is_default(old, shipped)
    assert accuracy.is_default(old, TrainConfig(student="forward"))
    # a row from before map_stats_from: its map's statistics came from the held-out parts
    before = {k: v for k, v in row.items() if k != "map_stats_from"}
    assert not accuracy.is_default(before, shipped)
    assert accuracy.is_default(before, TrainConfig(map_stats_from="held_out"))
    # a row from before stop 34 has no blur_sigma: its map was smoothed with sigma 4
    unblurred = {k: v for k, v in row.items() if k != "blur_sigma"}
    assert not accuracy.is_default(unblurred, shipped)
    assert accuracy.is_default(unblurred, TrainConfig(blur_sigma=4.0))
    # a row from before stop 36 has no seg_weight: no head; one from before stop 37 a stride-8 head
    headless = {k: v for k, v in row.items() if k not in ("seg_weight", "seg_stride")}
    assert not accuracy.is_default(headless, shipped)
    assert accuracy.is_default(headless, TrainConfig(seg_weight=0.0))
    # without a head its stride is no setting: a row of stop 36 (stride 8 recorded) is the same network
    recorded8 = {**row, "seg_weight": 0.0, "seg_stride": 8}
    assert accuracy.is_default(recorded8, TrainConfig(seg_weight=0.0))
    assert accuracy._key(recorded8) == accuracy._key({**recorded8, "seg_stride": 16})
    stride8 = {k: v for k, v in row.items() if k != "seg_stride"}
    assert not accuracy.is_default(stride8, shipped)
    assert accuracy.is_default(stride8, TrainConfig(seg_stride=8))
    # a row from before stop 39 has no seg_fusion: the head's map was added (stops 38-39's default)
    added = {k: v for k, v in row.items() if k != "seg_fusion"}
    assert not accuracy.is_default(added, shipped)
    assert accuracy.is_default(added, TrainConfig(seg_fusion="add"))
    # without a head the fusion is no setting either
    assert accuracy.is_default({**added, "seg_weight": 0.0}, TrainConfig(seg_weight=0.0))
    assert accuracy._key({**recorded8, "seg_fusion": "max"}) == accuracy._key({**recorded8, "seg_fusion": "add"})
    # a row from before stop 41 has no seg_samples: its head learnt from 2 samples per part
    fewer = {k: v for k, v in row.items() if k != "seg_samples"}
    assert accuracy.is_default(fewer, TrainConfig(seg_samples=2))
    assert not accuracy.is_default(fewer, TrainConfig(seg_samples=5))
    assert accuracy._key({**recorded8, "seg_samples": 5}) == accuracy._key({**recorded8, "seg_samples": 2})
    # ... and one from before stop 42 has no seg_heads: one head
    one = {k: v for k, v in row.items() if k != "seg_heads"}
    assert accuracy.is_default(one, TrainConfig(seg_heads=1))
    assert not accuracy.is_default(one, TrainConfig(seg_heads=2))
    assert accuracy._key({**one, "seg_heads": 2}) != accuracy._key(one)
    assert accuracy._key({**recorded8, "seg_heads": 2}) == accuracy._key(recorded8)
    narrow = {k: v for k, v in row.items() if k != "seg_width"}  # ... of width 96
    assert accuracy.is_default(narrow, TrainConfig(seg_width=96))
    assert not accuracy.is_default(narrow, TrainConfig(seg_width=48))


def test_accuracy_mark_only_sets_every_rows_default_again_and_measures_nothing(tmp_path, monkeypatch, capsys):
    """``accuracy.py --mark-only`` after a default change: the row of the shipped network gains the
    mark, a stale mark is taken off, every other field is kept."""
    import accuracy

    from engines.train import TrainConfig

    shipped = TrainConfig()
    row = {"dataset": "none_here", "variant": "full", "image_size": 256, "train_seconds": 1.0, "default": False}
    row |= {k: accuracy.setting(shipped, k) for k in accuracy.NET_KEYS}
    stale = {**row, "seg_fusion": "add", "default": True, "image_auroc": 0.5}
    results = tmp_path / "accuracy.json"
    results.write_text(json.dumps([row, stale]))
    monkeypatch.setattr(
        sys, "argv", ["accuracy.py", "--mark-only", "--results", str(results), "--data-root", str(tmp_path)]
    )
    assert accuracy.main() == 0
    marked = json.loads(results.read_text())
    assert [r["default"] for r in marked] == [True, False]
    assert marked[1] == {**stale, "default": False}
    assert "none_here" in capsys.readouterr().out  # the default's row printed
    # a results file in a folder not made yet: made, with no rows
    fresh = tmp_path / "not_yet" / "accuracy.json"
    monkeypatch.setattr(
        sys, "argv", ["accuracy.py", "--mark-only", "--results", str(fresh), "--data-root", str(tmp_path)]
    )
    assert accuracy.main() == 0
    assert json.loads(fresh.read_text()) == []


def test_fused_map_standardises_each_map_on_its_own_good_statistics():
    """accuracy.py --fuse: by hand, a map of mean 10 / std 2 and one of mean 0 / std 0.5."""
    import accuracy

    a = np.array([[[10.0, 14.0], [12.0, 10.0]]])  # z: 0, 2, 1, 0
    b = np.array([[[0.0, 0.0], [1.5, -0.5]]])  # z: 0, 0, 3, -1
    fused, score = accuracy.fuse_maps([a, b], [(10.0, 2.0), (0.0, 0.5)])
    np.testing.assert_allclose(fused, [[[0.0, 1.0], [2.0, -0.5]]])
    np.testing.assert_allclose(score, [2.0])


def test_memo_scores_each_batch_once():
    import accuracy

    calls = []

    def fn(x):
        calls.append(x.copy())
        return x.sum(axis=(1, 2, 3)), None

    memo = accuracy.Memo(fn)
    x, y = np.zeros((2, 4, 4, 3), np.uint8), np.ones((2, 4, 4, 3), np.uint8)
    assert memo(x)[0].tolist() == [0, 0]
    assert memo(y)[0].tolist() == [48, 48]
    assert memo(x.copy())[0].tolist() == [0, 0]
    assert len(calls) == 2


def test_accuracy_reuses_only_a_completed_bundle_of_the_same_settings(tmp_path):
    import json

    import accuracy

    from engines.train import TrainConfig

    cfg = TrainConfig(seed=3)
    assert accuracy._reused_seconds(tmp_path, cfg) is None  # no model.json
    training = {"config": cfg.model_dump(mode="json"), "seconds": 123.4, "interrupted": False}
    (tmp_path / "model.json").write_text(json.dumps({"training": training}))
    assert accuracy._reused_seconds(tmp_path, cfg) == 123.4
    assert accuracy._reused_seconds(tmp_path, TrainConfig(seed=4)) is None
    (tmp_path / "model.json").write_text(json.dumps({"training": {**training, "interrupted": True}}))
    assert accuracy._reused_seconds(tmp_path, cfg) is None
    (tmp_path / "model.json").write_text("{not json")
    assert accuracy._reused_seconds(tmp_path, cfg) is None


def test_bank_latency_graph_fuses_a_nearest_neighbour_map_by_hand(trained_bundle):
    """bank_latency.py's fused graph, on a bank of exactly one image's patches: that image's
    nearest distances are 0, so its fused map is (ours + (0 - 1) / 0.5) / 2 = ours / 2 - 1 and its
    score the larger of that map's maximum and the shipped score; a far-off bank raises the map."""
    from bank_latency import FusedBankGraph
    from patchcore import local_patches

    from engines.teacher import normalize_input
    from engines.train import load_bundle_model, predict

    model = load_bundle_model(trained_bundle)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    ours, shipped = predict(model, image)
    graph = FusedBankGraph(model, bank_rows=4).eval()
    with torch.no_grad():
        x = torch.from_numpy(image).permute(0, 3, 1, 2).float()
        raw = model.teacher(normalize_input(x))
        bank = local_patches([raw[i] for i in graph.idx])[0].flatten(1).T.contiguous()
        graph.bank_t = bank.T.contiguous()
        graph.bank_sq = (bank * bank).sum(1)
        fused, score = graph(torch.from_numpy(image))
    # a patch's squared distance to itself is a small difference of large float32 sums, whose
    # square root is up to ~0.1 (against the 20 that the far bank below adds)
    np.testing.assert_allclose(fused.numpy(), ours / 2 - 1, atol=0.1)
    assert float(score) == pytest.approx(max(float(fused.max()), float(shipped[0])), abs=1e-5)
    with torch.no_grad():
        graph.bank_sq = graph.bank_sq + 400.0  # every bank row 20 further away: the map rises
        far, _ = graph(torch.from_numpy(image))
    assert float((far - fused).min()) > 15.0  # sqrt(d2 + 400) - sqrt(d2) ~ 20, over 0.5, halved


def test_region_map_rows_by_hand():
    """region_map.py's row map: row values interpolated down the image, constant across it; each
    row's distance standardised on the held-out parts (mean 0, spread 1 there); a row that is off
    scores high in its own row only."""
    from region_map import RowGaussians, to_map

    m = to_map(np.array([[0.0, 1.0]]), 4)  # row centres at y = 1 and 3
    expected_column = np.array([0.0, 0.25, 0.75, 1.0], np.float32)
    assert np.allclose(m[0], expected_column[:, None].repeat(4, axis=1))
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 3, 5))  # (parts, channels, rows)
    held = rng.normal(size=(60, 3, 5))
    g = RowGaussians(train, held)
    d = g.distances(held)
    assert np.allclose(d.mean(axis=0), 0, atol=1e-9) and np.allclose(d.std(axis=0, ddof=1), 1)
    part = rng.normal(size=(1, 3, 5))
    part[0, :, 2] += 6.0  # row 2 is off in every channel
    row = g.distances(part)[0]
    assert row.argmax() == 2 and row[2] > 5 and np.all(np.delete(row, 2) < 4)


def test_region_map_position_gaussians_by_hand():
    """region_map.py's per-position Gaussian: each position standardised on the held-out parts; a
    part off at one position scores high there and near it only; the map upsampled to the input."""
    from region_map import PositionGaussians, to_image

    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 4, 6, 5))  # (parts, channels, h, w)
    held = rng.normal(size=(50, 4, 6, 5))
    g = PositionGaussians(train, held)
    d = g.distances(held)
    assert d.shape == (50, 6, 5)
    assert np.allclose(d.mean(axis=0), 0, atol=1e-9) and np.allclose(d.std(axis=0, ddof=1), 1)
    part = rng.normal(size=(1, 4, 6, 5))
    part[0, :, 4, 1] += 6.0
    m = g.distances(part)[0]
    assert np.unravel_index(m.argmax(), m.shape) == (4, 1) and m[4, 1] > 5
    assert np.all(np.delete(m.ravel(), 4 * 5 + 1) < 4)
    # positions fitted apart: a channel that is normally high at one position only is normal there
    shifted = train.copy()
    shifted[:, 0, 0, 0] += 5.0
    held2 = held.copy()
    held2[:, 0, 0, 0] += 5.0
    g2 = PositionGaussians(shifted, held2)
    probe = rng.normal(size=(1, 4, 6, 5))
    probe[0, 0, 0, 0] += 5.0
    assert g2.distances(probe)[0, 0, 0] < 4
    up = to_image(np.arange(6.0).reshape(1, 2, 3), (4, 6), sigma=0)
    assert up.shape == (1, 4, 6) and up[0, 0, 0] == 0.0 and up[0, -1, -1] == 5.0


def test_region_map_stacks_teacher_scales_on_the_first_taps_grid():
    """region_map.py's multi-scale per-position features: each tap averaged over its neighbours
    (edges over the cells that exist), the deeper one resized onto the first one's grid, channels
    in the order given; the features read from a real teacher are the tapped blocks' own; a block
    the bundle's teacher does not read is refused by name."""
    from region_map import position_features, stack_scales, tapped

    from engines.model import KDModel, NetConfig
    from engines.teacher import EfficientNetLite0, Teacher

    fine = torch.zeros(1, 2, 4, 4)
    fine[0, 1, 0, 0] = 9.0
    coarse = torch.full((1, 3, 2, 2), 7.0)
    s = stack_scales([fine, coarse], pool=3)
    assert s.shape == (1, 5, 4, 4)
    assert torch.all(s[0, 0] == 0) and torch.all(s[0, 2:] == 7.0)  # a constant stays constant when resized
    assert s[0, 1, 0, 0] == pytest.approx(9.0 / 4)  # corner: mean of the 2 x 2 cells that exist
    assert s[0, 1, 1, 1] == pytest.approx(9.0 / 9) and s[0, 1, 3, 3] == 0.0
    ramp = torch.tensor([[0.0, 4.0]]).expand(2, 2).reshape(1, 1, 2, 2)
    up = stack_scales([fine[:, :1], ramp], pool=1)[0, 1]
    assert torch.allclose(up[0], torch.tensor([0.0, 1.0, 3.0, 4.0]))  # bilinear, half-pixel centres

    cfg = NetConfig(image_size=64)
    torch.manual_seed(0)
    model = KDModel(Teacher(EfficientNetLite0(num_blocks=11, with_head=False), cfg.teacher_taps()), cfg).eval()
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    (four, ten), *_ = list(tapped(model, images, (4, 10)))
    assert four.shape == (3, 40, 8, 8) and ten.shape == (3, 112, 4, 4)
    f = position_features(model, images, 1, (4, 10), batch_size=2)
    assert f.shape == (3, 152, 8, 8) and np.allclose(f[:, :40], four.numpy(), atol=1e-6)
    assert position_features(model, images, 1).shape == (3, 112, 4, 4)  # default: the deepest tap alone
    with pytest.raises(ValueError, match=r"does not read blocks \[7\]"):
        next(tapped(model, images, (4, 7)))


def test_replace_result_keeps_entries_of_another_key(tmp_path):
    """_machine.replace_result replaces the entry of the same bundle and data set, or of the same
    key when one is given (region_map.py keeps one entry per set of taps)."""
    import json

    from _machine import replace_result

    path = tmp_path / "r.json"
    old = {"bundle": "b", "data": "d", "v": 0}  # an entry from before position_taps
    replace_result(path, old)
    replace_result(path, {"bundle": "b", "data": "d", "v": 1})
    assert [r["v"] for r in json.loads(path.read_text())] == [1]
    taps = lambda r: (r["bundle"], r["data"], r.get("position_taps", [10]))  # noqa: E731
    replace_result(path, {"bundle": "b", "data": "d", "position_taps": [4, 10], "v": 2}, key=taps)
    replace_result(path, {"bundle": "b", "data": "d", "position_taps": [10], "v": 3}, key=taps)
    assert sorted(r["v"] for r in json.loads(path.read_text())) == [2, 3]


def test_by_image_size_rows_by_hand(tmp_path):
    """by_image_size.py: defective parts grouped by their file's size, each group's AUROC against all
    good parts and against the good parts of its own size (None where it has none)."""
    import cv2
    from by_image_size import size_rows, source_size

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((5, 9), np.uint8))
    assert source_size(tmp_path / "a.png") == (9, 5)
    with pytest.raises(ValueError, match="cannot read image"):
        source_size(tmp_path / "missing.png")
    small, big = (10, 4), (20, 8)
    sizes = [small, small, small, big, small, small, big, big]
    is_defect = np.array([False, False, False, False, True, True, True, True])
    scores = np.array([0.0, 1.0, 2.0, 5.0, 1.5, 3.0, 9.0, 9.5])
    rows = {(r["width"], r["height"]): r for r in size_rows(sizes, is_defect, scores)}
    assert list(rows) == [small, big] or list(rows) == [big, small]
    # small defects 1.5 and 3.0 against goods 0, 1, 2, 5: (2 + 3) / 8 pairs won
    assert rows[small]["auroc_vs_all_good"] == pytest.approx(5 / 8, abs=1e-4)
    assert rows[small]["auroc_vs_same_size_good"] == pytest.approx(5 / 6, abs=1e-4)  # against 0, 1, 2
    assert rows[big]["auroc_vs_all_good"] == 1.0 and rows[big]["auroc_vs_same_size_good"] == 1.0
    assert rows[big]["n_good"] == 1 and rows[big]["n_defect"] == 2
    only_bad = size_rows([small, big], np.array([False, True]), np.array([0.0, 1.0]))
    assert only_bad[0]["auroc_vs_same_size_good"] is None
    odd = (30, 12)
    sizes3 = [*sizes[:7], odd, small]  # one more defect, of a third size (score 0.5)
    capped = size_rows(sizes3, np.r_[is_defect, True], np.r_[scores, 0.5], max_groups=1)
    assert [(r["width"], r["n_defect"]) for r in capped] == [(10, 3), (0, 2)]  # big and odd: "other sizes"
    # other sizes: big's 9.0 and odd's 9.5, above every good part (and above big's own good, 5.0)
    assert capped[1]["auroc_vs_all_good"] == 1.0 and capped[1]["auroc_vs_same_size_good"] == 1.0


def test_e2e_keeps_the_rows_of_other_networks():
    from e2e import merge_rows

    old = [
        {"model": "square", "camera": "folder", "machine": "AMD EPYC, 2 cores", "verdicts_per_s": 80.0},
        {"model": "wide", "camera": "folder", "machine": "AMD EPYC, 2 cores", "verdicts_per_s": 70.0},
    ]
    new = [{"model": "wide", "camera": "folder", "machine": "Intel", "verdicts_per_s": 75.0}]
    merged = merge_rows(old, new)
    assert [(r["model"], r["verdicts_per_s"]) for r in merged] == [("square", 80.0), ("wide", 75.0)]


def test_backend_accuracy_drops_rows_of_a_retrained_bundle_of_the_same_name():
    from backend_accuracy import merge_rows

    def row(bundle, dataset, backend, sha, img):
        return {"bundle": bundle, "dataset": dataset, "backend": backend, "onnx_sha256": sha, "image_auroc": img}

    old = [
        row("mt-s0", "magnetic_tile", "torch", "a" * 64, 0.90),
        row("mt-s0", "magnetic_tile", "openvino:int8", "a" * 64, 0.96),  # the old graph, not re-run
        {"bundle": "mt-s0", "dataset": "magnetic_tile", "backend": "openvino:bf16", "image_auroc": 0.95},  # no sha
        row("mt-s0", "other_set", "torch", "a" * 64, 0.80),  # another dataset: kept
        row("bsd-s0", "ball_screw_drive", "torch", "c" * 64, 0.95),  # another bundle: kept
    ]
    new = [row("mt-s0", "magnetic_tile", "torch", "b" * 64, 0.98)]
    merged = merge_rows(old, new)
    assert [(r["bundle"], r["dataset"], r["backend"], r["image_auroc"]) for r in merged] == [
        ("mt-s0", "other_set", "torch", 0.80),
        ("bsd-s0", "ball_screw_drive", "torch", 0.95),
        ("mt-s0", "magnetic_tile", "torch", 0.98),
    ]
    # the same graph measured again on one backend keeps its other backends' rows
    again = merge_rows([*merged, row("mt-s0", "magnetic_tile", "onnxruntime", "b" * 64, 0.98)], new)
    assert [(r["backend"], r["image_auroc"]) for r in again if r["dataset"] == "magnetic_tile"] == [
        ("onnxruntime", 0.98),
        ("torch", 0.98),
    ]


def test_map_settings_rebuild_reproduces_the_bundle_and_applies_a_new_setting(trained_bundle, synthetic_root):
    """map_settings.py: the bundle's student with its own settings and statistics computed again
    scores exactly as the bundle; another blur changes the maps (and so the scores) while the held-out
    parts stay the bundle's."""
    from map_settings import bundle_parts, with_settings

    from engines.data import good_training_images, load_images, split_holdout
    from engines.train import load_bundle_model, predict

    bundle_model = load_bundle_model(trained_bundle)
    size = bundle_model.cfg.input_hw()
    imgs = load_images(sorted((synthetic_root / "test").rglob("*.png"))[:8], size)
    want_maps, want_scores = predict(bundle_model, imgs)

    parts = bundle_parts(trained_bundle)
    held_out = parts[3]
    same = with_settings(trained_bundle, parts)
    _, expect_held_out = split_holdout(good_training_images(synthetic_root), 0.1, 0)
    assert held_out == expect_held_out and len(held_out) > 0
    maps, scores = predict(same, imgs)
    np.testing.assert_allclose(maps, want_maps, atol=1e-4)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)

    sharper = with_settings(trained_bundle, parts, blur_sigma=1.0)
    assert sharper.cfg.blur_sigma == 1.0
    maps2, _ = predict(sharper, imgs)
    assert np.abs(maps2 - want_maps).max() > 1e-2


def test_map_settings_merge_keeps_rows_of_settings_not_measured_again():
    """A later map_settings.py run on the same bundle replaces the rows of the settings it measured
    and keeps the others."""
    from map_settings import merge_rows

    def row(sigma, score, auc):
        return {"blur_sigma": sigma, "score": score, "topk_fraction": None, "scale_weights": [1, 1, 1], "au_pro": auc}

    old = [row(4.0, "max", 0.1), row(2.0, "max", 0.2)]
    merged = merge_rows(old, [row(2.0, "max", 0.9), row(1.0, "max", 0.5)])
    assert [(r["blur_sigma"], r["au_pro"]) for r in merged] == [(1.0, 0.5), (2.0, 0.9), (4.0, 0.1)]


def test_score_items_scores_maps_and_masks_on_another_grid(synthetic_root):
    """``grid``: the maps are resized (bilinear) and the masks read at the grid, not at the input."""
    from engines.data import read_mask
    from engines.evaluate import score_items

    items = eval_items(synthetic_root)[:6]

    def ramp(imgs):  # a left-to-right ramp at the input size, a score per image
        n, h, w = imgs.shape[:3]
        return np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32), (n, h, w)).copy(), np.arange(n, dtype=np.float32)

    maps, scores, masks = score_items(items, 64, ramp, grid=(32, 48))
    assert np.array_equal(scores, np.arange(6))
    assert maps.shape == masks.shape == (6, 32, 48)
    assert np.allclose(maps[:, :, 0], 0, atol=0.02) and np.allclose(maps[:, :, -1], 1, atol=0.02)
    assert np.all(np.diff(maps[0, 0]) > 0)
    for it, m in zip(items, masks, strict=True):
        assert np.array_equal(m, read_mask(it.mask, (32, 48)))
    same, _, at_input = score_items(items, 64, ramp)
    assert same.shape == at_input.shape == (6, 64, 64)


def test_held_out_goods_are_the_split_train_made_of_at_most_max_train_images(synthetic_root):
    """The plant metric's calibration parts are the ones training held out: with max_train_images
    the split is made of the first that many good images, as train makes it."""
    from engines.data import good_training_images, split_holdout
    from engines.evaluate import held_out_goods
    from engines.train import TrainConfig

    cfg = TrainConfig(max_train_images=12, val_fraction=0.25, seed=1)
    meta = {"training": {"data": str(synthetic_root), "config": cfg.model_dump(mode="json")}}
    paths = good_training_images(synthetic_root)
    assert len(paths) > 12
    want = split_holdout(paths[:12], 0.25, 1)[1]
    assert held_out_goods(meta) == want
    assert len(want) == 3 and set(want) <= set(paths[:12])
    no_split = {"training": {**meta["training"], "config": {**meta["training"]["config"], "val_fraction": 0.0}}}
    assert held_out_goods(no_split) is None


def test_accuracy_reuse_refits_another_folders_student_for_a_setting_after_training(
    tmp_path, trained_bundle, synthetic_root
):
    """--reuse with a setting that acts only after training (the map's blur) finds the bundle of
    the same student in another work folder, copies it and refits it there; the source stays as
    it was, a bundle of other data or of another training setting is not taken."""
    import json
    import shutil

    import accuracy

    from engines.train import TrainConfig

    work = tmp_path / "work"
    shutil.copytree(trained_bundle, work / "a", ignore=shutil.ignore_patterns("eval", "*.onnx"))
    meta = json.loads((work / "a" / "model.json").read_text())
    trained = TrainConfig(**meta["training"]["config"])
    before = (work / "a" / "model.json").read_bytes()
    sharper = TrainConfig(**(trained.model_dump() | {"blur_sigma": 1.0}))
    assert accuracy._reused_seconds(work / "b", sharper, work, tmp_path / "elsewhere") is None
    longer = TrainConfig(**(sharper.model_dump() | {"epochs": trained.epochs + 1}))
    assert accuracy._reused_seconds(work / "b", longer, work, synthetic_root) is None
    assert not (work / "b").exists()
    seconds = accuracy._reused_seconds(work / "b", sharper, work, synthetic_root)
    assert seconds == meta["training"]["seconds"]
    assert (work / "a" / "model.json").read_bytes() == before
    refit = json.loads((work / "b" / "model.json").read_text())
    assert refit["net"]["blur_sigma"] == 1.0 and meta["net"]["blur_sigma"] == trained.blur_sigma != 1.0
    assert refit["training"]["refitted"]["settings"] == ["blur_sigma"]
    # the refitted folder itself is now the bundle of those settings: reused as it is
    stamp = (work / "b" / "model.json").read_bytes()
    assert accuracy._reused_seconds(work / "b", sharper, work, synthetic_root) == seconds
    assert (work / "b" / "model.json").read_bytes() == stamp


def test_benchmark_rows_are_marked_default_from_their_network_record(trained_bundle):
    """latency / e2e / calibration rows carry the bundle's network record; one rule
    (``is_shipped``) re-marks every row of a results file: a bundle of the shipped settings is the
    default, the same bundle with the previous blur or statistics is not, and an old row without a
    record loses its mark."""
    import copy

    from _machine import mark_defaults
    from latency import network

    from engines.train import is_shipped

    record = network(trained_bundle)
    assert is_shipped(record)
    blur4 = copy.deepcopy(record)
    blur4["net"]["blur_sigma"] = 4.0
    held = {**record, "map_stats_from": "held_out"}
    assert not is_shipped(blur4) and not is_shipped(held) and not is_shipped(None)
    rows = [{"network": record, "default": False}, {"network": blur4, "default": True}, {"default": True}]
    assert [r["default"] for r in mark_defaults(rows)] == [True, False, False]


def test_latency_extra_takes_a_name_and_a_json_object_of_settings():
    """latency.py --extra NAME=JSON (a lead timed beside the default): parsed, or refused clearly."""
    from latency import parse_extra

    assert parse_extra('h2w48={"seg_heads": 2, "seg_width": 48}') == ("h2w48", {"seg_heads": 2, "seg_width": 48})
    for bad in ("h2w48", "h2w48=[2]", "2heads={}", "h2={seg_heads: 2}"):
        with pytest.raises(SystemExit, match="--extra wants NAME="):
            parse_extra(bad)
