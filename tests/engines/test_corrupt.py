"""Synthetic defects for training (engines.corrupt) and the training option that uses them."""

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.corrupt import DEFAULT_FILLS, FILLS, _fill, corrupt, region_mask
from engines.evaluate import evaluate
from engines.train import TrainConfig, load_bundle_model, predict, train


def _parts(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    base = rng.integers(60, 120, (n, 1, 1, 1))
    return np.clip(base + rng.normal(0, 12, (n, h, w, 3)), 0, 255).astype(np.uint8)


def test_regions_cover_a_share_of_the_image_and_are_reproducible():
    areas = []
    for seed in range(40):
        m = region_mask(np.random.default_rng(seed), 96, 160)
        assert m.shape == (96, 160) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0
        areas.append(float(m.mean()))  # the soft area (blurring keeps it)
        np.testing.assert_array_equal(m, region_mask(np.random.default_rng(seed), 96, 160))
    # drawn between 2 % and 40 % of the image (the soft edge moves it a little)
    assert min(areas) > 0.01 and max(areas) < 0.45
    assert np.std(areas) > 0.05  # small and large regions alike


@pytest.mark.parametrize("shape", [(64, 64), (48, 112)])
def test_a_defect_changes_the_image_inside_its_region_only(shape):
    pool = _parts(6, *shape)
    changes = []
    for seed in range(20):
        img = pool[seed % 6]
        out, mask = corrupt(img, np.random.default_rng(seed), pool)
        assert out.shape == img.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(float) - img.astype(float))
        # a pixel changes at most by its weight in the soft mask (plus rounding): nothing outside it
        assert (diff <= mask[..., None] * 255.0 + 1.0).all()
        assert (diff[mask < 1e-3] <= 1.0).all()
        changes.append(float((diff.mean(axis=2) * mask).sum() / mask.sum()))  # weighted by the soft mask
    # a small region on a small image may come out faint (its soft edge is wide), most do not
    assert np.median(changes) > 5.0 and sum(c > 2.0 for c in changes) >= 17, changes


def test_every_fill_is_different_from_the_part_and_a_bad_name_is_refused():
    pool = _parts(4, 64, 96)
    img = pool[0]
    for kind in FILLS:
        f = _fill(img, kind, np.random.default_rng(0), pool)
        assert f.shape == (64, 96, 3)
        assert np.abs(f - img.astype(np.float32)).mean() > 2.0, kind
    with pytest.raises(ValueError, match="unknown fill 'paint'"):
        _fill(img, "paint", np.random.default_rng(0), pool)


def test_a_shade_is_a_faint_brightness_change_that_fades_in_over_a_wide_edge():
    pool = _parts(4, 96, 160)
    img = pool[0].astype(np.float64)
    assert "shade" in FILLS and "shade" not in DEFAULT_FILLS  # drawn only when asked for
    for seed in range(12):
        out, mask = corrupt(pool[0], np.random.default_rng(seed), pool, fills=("shade",))
        diff = np.abs(out - img)
        assert (diff <= mask[..., None] * 255.0 + 1.0).all() and (diff[mask < 1e-3] <= 1.0).all()
        core = mask > 0.99
        if core.sum() > 50:  # inside, one gain for every pixel: 0.75-0.92 or 1.08-1.3
            gain = np.median(out[core] / img[core])
            assert 0.74 < gain < 0.93 or 1.07 < gain < 1.31, gain
        # the region the other fills draw (the generator's first draws), faded in: a Gaussian edge
        # of sigma >= 3 % of the shorter side (2.9 px) rises at most 1 / (2.5 x 2.9) per pixel
        plain = region_mask(np.random.default_rng(seed), 96, 160)
        steepest = max(np.abs(g).max() for g in np.gradient(mask))
        assert steepest < min(0.15, max(np.abs(g).max() for g in np.gradient(plain))), seed


def test_training_with_synthetic_defects_records_its_loss_and_separates_defects(tmp_path: Path, synthetic_root: Path):
    cfg = TrainConfig(
        image_size=128, epochs=6, batch_size=8, seed=0, num_threads=2, device="cpu", synthetic_defects=0.5
    )
    meta = train(synthetic_root, tmp_path / "syn", cfg, quiet=True)
    hist = meta["training"]["history"]
    assert all("synthetic_loss" in h for h in hist)
    assert hist[-1]["synthetic_loss"] < hist[0]["synthetic_loss"]
    assert meta["training"]["config"]["synthetic_defects"] == 0.5
    model = load_bundle_model(tmp_path / "syn")
    overall = evaluate(synthetic_root, 128, lambda x: predict(model, x))["rows"][-1]
    assert overall["image_auroc"] > 0.9
    assert overall["pixel_auroc"] > 0.9


def test_synthetic_defects_change_the_weights_but_not_the_batches(tmp_path: Path, synthetic_root: Path):
    """The option draws from its own generator: off, training is what it was; on, the student differs."""
    base = {"image_size": 64, "epochs": 1, "batch_size": 4, "max_train_images": 8, "num_threads": 1, "device": "cpu"}
    train(synthetic_root, tmp_path / "off", TrainConfig(**base), quiet=True)
    train(synthetic_root, tmp_path / "zero", TrainConfig(**base, synthetic_defects=0.0), quiet=True)
    train(synthetic_root, tmp_path / "on", TrainConfig(**base, synthetic_defects=0.25), quiet=True)
    off, zero, on = (torch.load(tmp_path / n / "student.pt", weights_only=True) for n in ("off", "zero", "on"))
    for k in off:
        torch.testing.assert_close(off[k], zero[k], rtol=0, atol=0)
    assert any(not torch.equal(off[k], on[k]) for k in off if off[k].is_floating_point())


def test_a_synthetic_defect_moves_the_untrained_students_input():
    """The loss compares the student fed the defective image's features with the clean teacher
    features: it is zero only when the student rebuilds the clean part."""
    from engines.model import KDModel, NetConfig
    from engines.teacher import build_teacher, default_weights_path, normalize_input
    from engines.train import to_tensor

    cfg = NetConfig(image_size=64)
    teacher, _ = build_teacher(default_weights_path(), cfg.teacher_taps())
    model = KDModel(teacher, cfg).eval()
    pool = _parts(2, 64, 64)
    bad = corrupt(pool[0], np.random.default_rng(1), pool)[0][None]
    xn_bad = normalize_input(to_tensor(bad, torch.device("cpu")))
    t_clean = model.teacher_features(normalize_input(to_tensor(pool[:1], torch.device("cpu"))))
    t_bad = model.teacher_features(xn_bad)
    loss = model.synthetic_loss(xn_bad, t_bad, t_clean)
    assert loss.ndim == 0 and float(loss) > 0
    s_bad, _ = model.student(None, t_bad)
    assert float(model.kd_loss(t_clean, s_bad)) == pytest.approx(float(loss))
    assert float(model.kd_loss(t_bad, s_bad)) != pytest.approx(float(loss))  # the target is the clean part
