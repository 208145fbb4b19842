import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import bundle as bundle_mod
from engines.data import eval_items
from engines.evaluate import evaluate
from engines.train import TrainConfig, load_bundle_model, load_train_config, predict, train


def test_tiny_training_separates_defects_from_good_parts(trained_bundle: Path, synthetic_root: Path):
    meta = bundle_mod.read_meta(trained_bundle)
    assert meta["format_version"] == bundle_mod.FORMAT_VERSION
    assert meta["input"]["height"] == 128
    assert len(meta["teacher"]["weights_sha256"]) == 64
    assert meta["training"]["epochs_completed"] == 6
    assert (trained_bundle / "student.pt").is_file()
    model = load_bundle_model(trained_bundle)
    result = evaluate(synthetic_root, 128, lambda x: predict(model, x))
    overall = result["rows"][-1]
    assert overall["defect"] == "all"
    assert overall["image_auroc"] > 0.9
    assert overall["pixel_auroc"] > 0.9
    # the loss went down
    hist = meta["training"]["history"]
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]


def test_map_statistics_normalise_good_maps(trained_bundle: Path, synthetic_root: Path):
    meta = bundle_mod.read_meta(trained_bundle)
    stats = meta["map_stats"]
    assert len(stats["scale_mean"]) == 3 and all(s > 0 for s in stats["scale_std"])
    model = load_bundle_model(trained_bundle)
    goods = [it.path for it in eval_items(synthetic_root) if not it.is_defect]
    from engines.data import load_images

    maps, scores = predict(model, load_images(goods, 128))
    # normalised per scale by good statistics: good maps sit near 0, not at raw cosine distances
    assert abs(float(maps.mean())) < 1.0
    assert scores.shape == (len(goods),)


def test_training_is_deterministic_with_a_seed(tmp_path: Path, synthetic_root: Path):
    cfg = TrainConfig(image_size=64, epochs=1, batch_size=4, max_train_images=8, num_threads=1, device="cpu")
    train(synthetic_root, tmp_path / "a", cfg, quiet=True)
    train(synthetic_root, tmp_path / "b", cfg, quiet=True)
    a = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "student.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ctrl_c_leaves_a_usable_bundle_from_the_last_epoch(tmp_path: Path, synthetic_root: Path, monkeypatch):
    import engines.train as tr

    calls = {"n": 0}
    real = tr._val_loss

    def interrupt_in_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "_val_loss", interrupt_in_second_epoch)
    cfg = TrainConfig(image_size=64, epochs=3, batch_size=4, max_train_images=8, num_threads=1, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        train(synthetic_root, tmp_path / "b", cfg, quiet=True)
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["training"]["interrupted"] is True
    assert meta["training"]["epochs_completed"] == 1
    model = load_bundle_model(tmp_path / "b")
    maps, scores = predict(model, np.zeros((1, 64, 64, 3), np.uint8))
    assert maps.shape == (1, 64, 64) and np.isfinite(scores).all()


@pytest.mark.parametrize(
    ("variant", "has_simam", "has_sspcab"),
    [("plain", False, False), ("simam", True, False), ("sspcab", False, True)],
)
def test_ablation_switches(tmp_path: Path, synthetic_root: Path, variant, has_simam, has_sspcab):
    cfg = TrainConfig(
        image_size=64,
        epochs=1,
        max_train_images=4,
        num_threads=1,
        device="cpu",
        simam=has_simam,
        sspcab=has_sspcab,
    )
    train(synthetic_root, tmp_path / variant, cfg, quiet=True)
    model = load_bundle_model(tmp_path / variant)
    assert (model.student.simam is not None) == has_simam
    assert (model.student.sspcab is not None) == has_sspcab
    sd = torch.load(tmp_path / variant / "student.pt", weights_only=True)
    assert any(k.startswith("sspcab.") for k in sd) == has_sspcab


def test_train_config_rejects_unknown_keys_and_bad_values(tmp_path: Path):
    p = tmp_path / "train.yaml"
    p.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_train_config(p)
    p.write_text("epochs: 0\n")
    with pytest.raises(ValueError, match="epochs"):
        load_train_config(p)
    p.write_text("image_size: 100\n")
    cfg = load_train_config(p)
    with pytest.raises(ValueError, match="multiple of 16"):
        cfg.net_config()
    assert load_train_config(None, epochs=4).epochs == 4


def test_bundles_from_before_student_expand_still_load(tmp_path: Path, synthetic_root: Path):
    """A model.json without ``student_expand`` was written when the student had the teacher's
    shape: it must rebuild that shape (a narrower default would not load its student.pt)."""
    cfg = TrainConfig(
        image_size=64, epochs=1, max_train_images=4, num_threads=1, device="cpu", student="forward", student_expand=6
    )
    train(synthetic_root, tmp_path / "old", cfg, quiet=True)
    meta_path = tmp_path / "old" / "model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["net"].pop("student_expand") == 6
    meta_path.write_text(json.dumps(meta))
    model = load_bundle_model(tmp_path / "old")
    assert model.student.blocks[1]._expand_conv.out_channels == 16 * 6
    assert TrainConfig().student_expand == 6
    with pytest.raises(ValueError, match="student_expand"):
        TrainConfig(student_expand=7)


def test_the_default_network_standardises_the_teacher_and_mines_hard_features(trained_bundle: Path):
    meta = bundle_mod.read_meta(trained_bundle)
    assert meta["net"]["distance"] == "l2" and meta["training"]["config"]["hard_quantile"] == 0.999
    assert meta["net"]["student"] == "reverse" and TrainConfig().student == "reverse"
    stats = meta["map_stats"]
    assert [len(m) for m in stats["feature_mean"]] == [24, 40, 112]
    assert all(s > 0 for tap in stats["feature_std"] for s in tap)
    model = load_bundle_model(trained_bundle)
    assert float(model.feat_std_2.min()) > 0 and model.cfg.distance == "l2"


def test_bundles_from_before_the_l2_distance_load_as_cosine(tmp_path: Path, synthetic_root: Path):
    """A model.json without ``distance`` was trained with cosine maps: it must rebuild them."""
    cfg = TrainConfig(
        image_size=64, epochs=1, max_train_images=4, num_threads=1, device="cpu", distance="cosine", hard_quantile=None
    )
    train(synthetic_root, tmp_path / "old", cfg, quiet=True)
    meta_path = tmp_path / "old" / "model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["net"].pop("distance") == "cosine" and "feature_mean" not in meta["map_stats"]
    meta_path.write_text(json.dumps(meta))
    model = load_bundle_model(tmp_path / "old")
    assert model.cfg.distance == "cosine"
    # an l2 bundle that lost its feature statistics is refused with a clear message
    cfg = TrainConfig(image_size=64, epochs=1, max_train_images=4, num_threads=1, device="cpu")
    train(synthetic_root, tmp_path / "new", cfg, quiet=True)
    meta = json.loads((tmp_path / "new" / "model.json").read_text())
    del meta["map_stats"]["feature_mean"]
    (tmp_path / "new" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(bundle_mod.BundleError, match=r"distance l2 but has no map_stats\.feature_mean"):
        load_bundle_model(tmp_path / "new")


def test_the_maps_statistics_come_from_training_parts_so_the_held_out_ones_stay_unseen(tmp_path, synthetic_root):
    """map_stats_from training (the default): the map's per-scale statistics, per-position mean and
    spread do not depend on the held-out parts at all (their scores, and a threshold set on them,
    are those of new parts); held_out (bundles before stop 32) fits them on the held-out parts."""
    import numpy as np

    from engines.data import good_training_images, load_images, split_holdout
    from engines.train import map_statistics

    cfg = TrainConfig(image_size=64, epochs=1, max_train_images=12, num_threads=1, device="cpu")
    assert cfg.map_stats_from == "training"
    train(synthetic_root, tmp_path / "b", cfg, quiet=True)
    assert json.loads((tmp_path / "b" / "model.json").read_text())["map_stats"]["map_stats_from"] == "training"
    model = load_bundle_model(tmp_path / "b")
    tr, ho = split_holdout(good_training_images(synthetic_root)[:12], cfg.val_fraction, cfg.seed)
    train_imgs, held = load_images(tr, 64), load_images(ho, 64)
    other = load_images(sorted((synthetic_root / "test" / "good").iterdir())[:3], 64)

    def stats(c, val):
        s = map_statistics(model, c, train_imgs, val)
        return np.array(s["pos_mean"]), np.array(s["pos_std"]), s["n_images"]

    a, b = stats(cfg, held), stats(cfg, other)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] == len(train_imgs)
    assert a[1].ndim == 2  # per position
    old = cfg.model_copy(update={"map_stats_from": "held_out"})
    c, d = stats(old, held), stats(old, other)
    assert c[2] == len(held) and d[2] == len(other) and not np.allclose(c[0], d[0])
    one = stats(cfg.model_copy(update={"position_spread_images": 0}), held)
    assert one[1].ndim == 0 and one[2] == len(train_imgs)  # one spread, from every training part


def test_the_map_is_scaled_by_the_good_parts_per_position_spread(tmp_path, synthetic_root):
    """New bundles carry a per-position spread (fusion size); older ones one number, and both load."""
    import numpy as np

    from engines.data import load_images

    cfg = TrainConfig(image_size=64, epochs=1, max_train_images=12, num_threads=1, device="cpu")
    assert cfg.position_spread_images == 300
    train(synthetic_root, tmp_path / "pos", cfg, quiet=True)
    meta = json.loads((tmp_path / "pos" / "model.json").read_text())
    ps = np.array(meta["map_stats"]["pos_std"])
    model = load_bundle_model(tmp_path / "pos")
    assert ps.shape == tuple(model.pos_std.shape[-2:]) and (ps > 0).all()
    assert float(ps.min()) >= 0.1 * float(np.median(ps)) - 1e-6 and ps.std() > 0  # it varies by position
    assert np.allclose(model.pos_std[0, 0].numpy(), ps, atol=1e-5)
    # the same bundle with one spread (as bundles before) loads and scores with it
    meta["map_stats"]["pos_std"] = 1.5
    (tmp_path / "pos" / "model.json").write_text(json.dumps(meta))
    old = load_bundle_model(tmp_path / "pos")
    assert (old.pos_std == 1.5).all()
    imgs = load_images(sorted((synthetic_root / "test" / "good").iterdir())[:2], 64)
    assert not np.allclose(predict(model, imgs)[0], predict(old, imgs)[0])
    cfg0 = TrainConfig(
        image_size=64, epochs=1, max_train_images=12, num_threads=1, device="cpu", position_spread_images=0
    )
    train(synthetic_root, tmp_path / "global", cfg0, quiet=True)
    assert isinstance(json.loads((tmp_path / "global" / "model.json").read_text())["map_stats"]["pos_std"], float)
