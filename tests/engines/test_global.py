"""The image-level Gaussian term: Ledoit-Wolf fit, the graph's distance, the fused score, bundles."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import bundle as bundle_mod
from engines.data import eval_items, load_images
from engines.gaussian import fit_gaussian, ledoit_wolf, mahalanobis
from engines.metrics import auroc
from engines.model import GlobalTerm, KDModel, NetConfig
from engines.teacher import EfficientNetLite0, Teacher
from engines.train import TrainConfig, load_bundle_model, predict, refit_global_term, score_halves, train


def test_ledoit_wolf_against_the_textbook_formula():
    """Shrinkage by the paper's sums, written out per sample (no vectorised shortcut)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + 4.0
    mean, cov, shrink = ledoit_wolf(x)
    xc = x - x.mean(0)
    s = sum(np.outer(v, v) for v in xc) / len(x)
    mu = np.trace(s) / 5
    d2 = np.sum((s - mu * np.eye(5)) ** 2) / 5
    b2 = sum(np.sum((np.outer(v, v) - s) ** 2) for v in xc) / len(x) ** 2 / 5
    want = min(b2, d2) / d2
    assert 0 < want < 1
    assert shrink == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(cov, (1 - want) * s + want * mu * np.eye(5), rtol=1e-12)
    sklearn = pytest.importorskip("sklearn.covariance")
    ref = sklearn.LedoitWolf().fit(x)
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-9)


def test_whitening_gives_the_mahalanobis_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    fit = fit_gaussian(x)
    _, cov, _ = ledoit_wolf(x)
    q = rng.normal(size=(3, 6))
    d = q - fit.mean
    want = np.sqrt(np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d))
    np.testing.assert_allclose(mahalanobis(fit, q), want, rtol=1e-9)


def test_identical_images_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="at least 2 samples"):
        ledoit_wolf(np.ones((1, 4)))


def test_the_graph_term_is_the_distance_of_the_pooled_features():
    """GlobalTerm (block-wise matrix products, as exported) against numpy on its own descriptor."""
    torch.manual_seed(0)
    term = GlobalTerm([3, 2])
    feats = [torch.randn(20, 3, 4, 4) * 2 + 1, torch.randn(20, 2, 2, 2)]
    desc = GlobalTerm.descriptor(feats).double().numpy()
    # the descriptor: per tap the means over the image, then the standard deviations
    np.testing.assert_allclose(desc[:, :3], feats[0].mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(desc[:, 3:6], feats[0].std((2, 3), unbiased=False).numpy(), rtol=1e-4, atol=1e-5)
    fit = fit_gaussian(desc)
    term.set_gaussian(torch.from_numpy(fit.mean), torch.from_numpy(fit.whiten))
    got = term(feats).double().numpy()
    np.testing.assert_allclose(got, mahalanobis(fit, desc), rtol=1e-4)
    with pytest.raises(ValueError, match="dimension 10"):
        term.set_gaussian(torch.zeros(9), torch.zeros(9, 9))


def test_the_image_score_is_the_larger_standardised_half():
    cfg = NetConfig(image_size=64, student="reverse", reverse_width=32, global_taps=(9, 10))
    model = KDModel(Teacher(EfficientNetLite0(num_blocks=11, with_head=False), cfg.teacher_taps()), cfg).eval()
    model.set_score_stats(map_mean=2.0, map_std=0.5, global_mean=10.0, global_std=4.0)
    got = model.fused_score(torch.tensor([2.0, 3.5, 2.0, 1.0]), torch.tensor([18.0, 10.0, 6.0, 30.0]))
    # map z: 0, 3, 0, -2; global z: 2, 0, -1, 5
    torch.testing.assert_close(got, torch.tensor([2.0, 3.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="the teacher taps blocks"):
        KDModel(Teacher(EfficientNetLite0(num_blocks=11, with_head=False), (2, 4, 10)), cfg)


def test_a_trained_bundle_carries_the_term_and_catches_a_whole_part_change(trained_bundle: Path, synthetic_root):
    """The shipped default fits the term; a part whose brightness is off as a whole scores far
    higher on it than the good parts, and the bundle round-trips exactly."""
    meta = bundle_mod.read_meta(trained_bundle)
    assert meta["net"]["global_taps"] == [9, 10]
    info = meta["map_stats"]["global_term"]
    assert info["dim"] == 2 * (112 + 112) and info["n_fit"] == meta["training"]["n_train"]
    assert 0 < info["shrinkage"] <= 1
    stats = meta["map_stats"]["score_stats"]
    assert stats["global_std"] > 0 and stats["map_std"] > 0
    model = load_bundle_model(trained_bundle)
    assert model.global_term is not None
    goods = load_images([it.path for it in eval_items(synthetic_root) if not it.is_defect], 128)
    dark = (goods.astype(np.float32) * 0.6).astype(np.uint8)  # the whole part darker: no local defect
    m_good, d_good = score_halves(model, goods)
    _, d_dark = score_halves(model, dark)
    assert auroc(np.r_[np.zeros(len(goods)), np.ones(len(dark))], np.r_[d_good, d_dark]) > 0.95
    # the score is what the graph computes: max of the standardised halves
    _, s = predict(model, goods)
    want = np.maximum(
        (m_good - stats["map_mean"]) / stats["map_std"], (d_good - stats["global_mean"]) / stats["global_std"]
    )
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-4)


def test_weights_without_their_term_are_refused(tmp_path: Path, trained_bundle: Path):
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    sd = torch.load(bad / "student.pt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("global_term.")}, bad / "student.pt")
    with pytest.raises(bundle_mod.BundleError, match="student weights"):
        load_bundle_model(bad)
    meta = json.loads((trained_bundle / "model.json").read_text())
    del meta["map_stats"]["score_stats"]
    (bad / "model.json").write_text(json.dumps(meta))
    shutil.copy(trained_bundle / "student.pt", bad / "student.pt")
    with pytest.raises(bundle_mod.BundleError, match="score_stats"):
        load_bundle_model(bad)


def test_refitting_the_term_onto_a_bundle_equals_training_with_it(tmp_path: Path, synthetic_root: Path):
    """refit_global_term (what accuracy.py --reuse does) gives exactly what train gives, and
    takes the term off again: the student is untouched by it."""
    base = dict(image_size=64, epochs=1, batch_size=4, max_train_images=12, num_threads=1, device="cpu")
    train(synthetic_root, tmp_path / "with", TrainConfig(**base), quiet=True)
    train(synthetic_root, tmp_path / "without", TrainConfig(**base, global_taps=[]), quiet=True)
    imgs = load_images([it.path for it in eval_items(synthetic_root)][:8], 64)
    m_without, s_without = predict(load_bundle_model(tmp_path / "without"), imgs)
    assert load_bundle_model(tmp_path / "without").global_term is None
    refit_global_term(tmp_path / "without", [9, 10])
    m_with, s_with = predict(load_bundle_model(tmp_path / "with"), imgs)
    m_refit, s_refit = predict(load_bundle_model(tmp_path / "without"), imgs)
    np.testing.assert_allclose(m_refit, m_with, atol=1e-5)
    np.testing.assert_allclose(s_refit, s_with, atol=1e-4)
    assert not np.allclose(s_refit, s_without)
    refit_global_term(tmp_path / "without", [])
    m_back, s_back = predict(load_bundle_model(tmp_path / "without"), imgs)
    np.testing.assert_allclose(s_back, s_without, atol=1e-5)
    np.testing.assert_allclose(m_back, m_without, atol=1e-5)


@pytest.mark.parametrize("fault", ["truncated", "missing", "other_teacher"])
def test_refitting_refuses_a_broken_bundle_and_leaves_it(tmp_path: Path, trained_bundle: Path, fault: str):
    """refit_global_term reads the bundle through the same checks as load_bundle_model: a
    half-written or missing student.pt, or a bundle of another teacher, is a BundleError naming
    it, and nothing in the bundle is rewritten."""
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    pt = bad / "student.pt"
    if fault == "truncated":
        pt.write_bytes(pt.read_bytes()[:1000])
        match = "student.pt could not be loaded"
    elif fault == "missing":
        pt.unlink()
        match = "student.pt is missing"
    else:
        meta = json.loads((bad / "model.json").read_text())
        meta["teacher"]["weights_sha256"] = "0" * 64
        (bad / "model.json").write_text(json.dumps(meta))
        match = "teacher weights sha256"
    before = {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()}
    for load in (lambda: load_bundle_model(bad), lambda: refit_global_term(bad, [])):
        with pytest.raises(bundle_mod.BundleError, match=match):
            load()
    assert {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()} == before
