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
from engines.model import GlobalTerm, KDModel, NetConfig, grid_matrix
from engines.teacher import EfficientNetLite0, Teacher
from engines.train import TrainConfig, load_bundle_model, predict, refit_after_training, score_halves, train


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
    desc = term.descriptor(feats).double().numpy()
    # the descriptor: per tap the means over the image, then the standard deviations
    np.testing.assert_allclose(desc[:, :3], feats[0].mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(desc[:, 3:6], feats[0].std((2, 3), unbiased=False).numpy(), rtol=1e-4, atol=1e-5)
    fit = fit_gaussian(desc)
    term.set_gaussian(torch.from_numpy(fit.mean), torch.from_numpy(fit.whiten))
    got = term(feats).double().numpy()
    np.testing.assert_allclose(got, mahalanobis(fit, desc), rtol=1e-4)
    with pytest.raises(ValueError, match="dimension 10"):
        term.set_gaussian(torch.zeros(9), torch.zeros(9, 9))


def test_the_grid_cells_are_adaptive_pooling_cells():
    """grid_matrix's cells are F.adaptive_avg_pool2d's (overlapping where the size does not divide)."""
    f = torch.randn(2, 3, 16, 12)
    for g in (1, 2, 3, 5):
        got = (f.reshape(2, 3, 16 * 12) @ grid_matrix(16, 12, g)).reshape(2, 3, g, g)
        torch.testing.assert_close(got, torch.nn.functional.adaptive_avg_pool2d(f, g))
    # by hand: 4 rows in 3 cells are rows 0-1, 1-2, 2-3 (a 1-wide map: its one column in every column cell)
    m = grid_matrix(4, 1, 3).reshape(4, 3, 3)
    rows = torch.tensor([[0.5, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 0.5]])
    for col in range(3):
        torch.testing.assert_close(m[:, :, col], rows)


def test_the_graph_term_with_a_grid_sees_a_region_the_image_statistics_miss():
    """With a grid the descriptor adds each cell's channel means; the term is still the Mahalanobis
    distance of its descriptor, and a part whose values sit elsewhere (the same mean and spread over
    the image) is far only for the term with the grid."""
    torch.manual_seed(0)
    term = GlobalTerm([3, 2], grid=2)
    assert term.dim == (2 + 4) * 5
    feats = [torch.randn(200, 3, 8, 8) * 2 + 1, torch.randn(200, 2, 4, 4)]
    desc = term.descriptor(feats).double().numpy()
    # tap 0's blocks: 3 means, 3 spreads, then 3 channels x 4 cells (channel-major, cells row-major)
    cells = torch.nn.functional.adaptive_avg_pool2d(feats[0], 2).flatten(1)
    np.testing.assert_allclose(desc[:, 6:18], cells.numpy(), rtol=1e-5, atol=1e-6)
    fit = fit_gaussian(desc)
    term.set_gaussian(torch.from_numpy(fit.mean), torch.from_numpy(fit.whiten))
    np.testing.assert_allclose(term(feats).double().numpy(), mahalanobis(fit, desc), rtol=1e-4)
    plain = GlobalTerm([3, 2])
    pfit = fit_gaussian(plain.descriptor(feats).double().numpy())
    plain.set_gaussian(torch.from_numpy(pfit.mean), torch.from_numpy(pfit.whiten))
    # a part's own values rearranged, each channel's largest on the left: the image's mean and
    # spread per channel are exactly the same, only where they sit differs
    odd = [f[:1].clone() for f in feats]
    flat = odd[0].reshape(1, 3, 64).sort(dim=2, descending=True).values
    odd[0] = flat.reshape(1, 3, 8, 8).transpose(2, 3).contiguous()  # column-major: the largest values left
    torch.testing.assert_close(plain(odd), plain([f[:1] for f in feats]))
    assert float(term(odd)) > 1.5 * float(term(feats).max())  # 12.6 against at most 6.5


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
    assert meta["net"]["global_taps"] == [10] and meta["net"]["global_grid"] == 3
    info = meta["map_stats"]["global_term"]
    # per channel of block 10: the image's mean and spread, and the means of the 3 x 3 cells
    assert info["dim"] == (2 + 3 * 3) * 112 and info["n_fit"] == meta["training"]["n_train"]
    assert 0 < info["shrinkage"] <= 1
    stats = meta["map_stats"]["score_stats"]
    assert stats["global_std"] > 0 and stats["map_std"] > 0
    model = load_bundle_model(trained_bundle)
    assert model.global_term is not None
    goods = load_images([it.path for it in eval_items(synthetic_root) if not it.is_defect], 128)
    dark = (goods.astype(np.float32) * 0.6).astype(np.uint8)  # the whole part darker: no local defect
    m_good, d_good = score_halves(model, goods)
    _, d_dark = score_halves(model, dark)
    # 0.94 with the grid's 1232 dimensions fitted on these 36 parts (1.0 with the image's 224 alone;
    # on magnetic_tile's ~690 training parts the grid raised the term's image AUROC 0.96 -> 0.985)
    assert auroc(np.r_[np.zeros(len(goods)), np.ones(len(dark))], np.r_[d_good, d_dark]) > 0.9
    # the score is what the graph computes: max of the standardised halves
    _, s = predict(model, goods)
    want = np.maximum(
        (m_good - stats["map_mean"]) / stats["map_std"], (d_good - stats["global_mean"]) / stats["global_std"]
    )
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-4)


def test_a_bundle_from_before_the_grid_reads_as_the_image_statistics_alone(trained_bundle: Path):
    """model.json written before global_grid existed: the term of the whole image's mean and
    spread only (its weights carry no grid blocks), not today's default grid."""
    net = dict(bundle_mod.read_meta(trained_bundle)["net"])
    del net["global_grid"]
    cfg = NetConfig.from_json(net)
    assert cfg.global_grid == 0
    model = KDModel(Teacher(EfficientNetLite0(num_blocks=11, with_head=False), cfg.teacher_taps()), cfg)
    assert model.global_term.dim == 2 * 112
    assert not any("grid" in k for k in model.global_term.state_dict())
    with pytest.raises(ValueError, match=r"global_grid must be within 0\.\.8"):
        NetConfig.from_json({**net, "global_grid": 9}).validate()  # 128 px: block 10's map is 8 x 8


def test_weights_without_their_term_are_refused(tmp_path: Path, trained_bundle: Path):
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    meta = json.loads((trained_bundle / "model.json").read_text())
    del meta["student"]  # as a bundle from before the weights' sha256 was recorded: the load itself must refuse
    (bad / "model.json").write_text(json.dumps(meta))
    sd = torch.load(bad / "student.pt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("global_term.")}, bad / "student.pt")
    with pytest.raises(bundle_mod.BundleError, match="could not be loaded as this bundle's student weights"):
        load_bundle_model(bad)
    del meta["map_stats"]["score_stats"]
    (bad / "model.json").write_text(json.dumps(meta))
    shutil.copy(trained_bundle / "student.pt", bad / "student.pt")
    with pytest.raises(bundle_mod.BundleError, match="score_stats"):
        load_bundle_model(bad)


def test_refitting_the_term_onto_a_bundle_equals_training_with_it(tmp_path: Path, synthetic_root: Path):
    """refit_after_training (what accuracy.py --reuse does) gives exactly what train gives, and
    takes the term off again: the student is untouched by it."""
    base = dict(image_size=64, epochs=1, batch_size=4, max_train_images=12, num_threads=1, device="cpu")
    train(synthetic_root, tmp_path / "with", TrainConfig(**base), quiet=True)
    train(synthetic_root, tmp_path / "without", TrainConfig(**base, global_taps=[]), quiet=True)
    imgs = load_images([it.path for it in eval_items(synthetic_root)][:8], 64)
    m_without, s_without = predict(load_bundle_model(tmp_path / "without"), imgs)
    assert load_bundle_model(tmp_path / "without").global_term is None
    refit_after_training(tmp_path / "without", global_taps=TrainConfig().global_taps)
    m_with, s_with = predict(load_bundle_model(tmp_path / "with"), imgs)
    m_refit, s_refit = predict(load_bundle_model(tmp_path / "without"), imgs)
    np.testing.assert_allclose(m_refit, m_with, atol=1e-5)
    np.testing.assert_allclose(s_refit, s_with, atol=1e-4)
    assert not np.allclose(s_refit, s_without)
    refit_after_training(tmp_path / "without", global_taps=[])
    m_back, s_back = predict(load_bundle_model(tmp_path / "without"), imgs)
    np.testing.assert_allclose(s_back, s_without, atol=1e-5)
    np.testing.assert_allclose(m_back, m_without, atol=1e-5)


def test_refitting_the_map_settings_equals_training_with_them(tmp_path: Path, synthetic_root: Path):
    """A bundle trained with one blur and map statistics, refitted with others
    (``refit_after_training``), scores exactly like a bundle trained with those; a setting that
    changes the training itself is refused and the bundle is left as it was."""
    base = dict(image_size=64, epochs=1, batch_size=4, max_train_images=12, num_threads=1, device="cpu")
    other = dict(blur_sigma=1.0, map_stats_from="held_out", position_spread_images=4)
    train(synthetic_root, tmp_path / "wanted", TrainConfig(**base, **other), quiet=True)
    train(synthetic_root, tmp_path / "refit", TrainConfig(**base), quiet=True)
    imgs = load_images([it.path for it in eval_items(synthetic_root)][:8], 64)
    m_before, _ = predict(load_bundle_model(tmp_path / "refit"), imgs)
    before = (tmp_path / "refit" / "model.json").read_bytes()
    with pytest.raises(ValueError, match="epochs change"):
        refit_after_training(tmp_path / "refit", epochs=3, blur_sigma=1.0)
    assert (tmp_path / "refit" / "model.json").read_bytes() == before
    meta = refit_after_training(tmp_path / "refit", **other)
    assert meta["net"]["blur_sigma"] == 1.0 and meta["map_stats"]["map_stats_from"] == "held_out"
    assert meta["training"]["config"]["blur_sigma"] == 1.0
    m_want, s_want = predict(load_bundle_model(tmp_path / "wanted"), imgs)
    m_refit, s_refit = predict(load_bundle_model(tmp_path / "refit"), imgs)
    np.testing.assert_allclose(m_refit, m_want, atol=1e-5)
    np.testing.assert_allclose(s_refit, s_want, atol=1e-4)
    assert not np.allclose(m_refit, m_before, atol=1e-3)


@pytest.mark.parametrize("fault", ["truncated", "truncated_unrecorded", "missing", "other_teacher"])
def test_refitting_refuses_a_broken_bundle_and_leaves_it(tmp_path: Path, trained_bundle: Path, fault: str):
    """refit_after_training reads the bundle through the same checks as load_bundle_model: a
    half-written or missing student.pt (caught by its sha256 in model.json, or by the load in a
    bundle from before the record), or a bundle of another teacher, is a BundleError naming it,
    and nothing in the bundle is rewritten."""
    bad = tmp_path / "bad"
    shutil.copytree(trained_bundle, bad)
    pt = bad / "student.pt"
    if fault == "truncated":
        pt.write_bytes(pt.read_bytes()[:1000])
        match = "student.pt is not the student weights model.json records"
    elif fault == "truncated_unrecorded":
        meta = json.loads((bad / "model.json").read_text())
        del meta["student"]
        (bad / "model.json").write_text(json.dumps(meta))
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
    for load in (lambda: load_bundle_model(bad), lambda: refit_after_training(bad, global_taps=[])):
        with pytest.raises(bundle_mod.BundleError, match=match):
            load()
    assert {p.name: p.read_bytes() for p in bad.iterdir() if p.is_file()} == before


def test_a_bundle_from_before_a_setting_is_refitted_with_the_value_it_was_written_with(trained_bundle: Path):
    """``bundle_split`` (what refit and the plant metric read) fills a setting the bundle's
    training record lacks with the value the bundle was written with, not today's default: an
    old bundle refitted with another blur keeps its map statistics' source, its blur and its term."""
    from engines.train import bundle_split

    meta = json.loads((trained_bundle / "model.json").read_text())
    old = json.loads(json.dumps(meta))
    for key in ("map_stats_from", "blur_sigma", "global_taps", "global_grid", "position_spread_images"):
        old["training"]["config"].pop(key)
    old["map_stats"].pop("map_stats_from")
    old["net"]["blur_sigma"] = 4.0
    old["net"]["global_taps"] = []
    cfg, train_paths, val_paths = bundle_split(old)
    assert cfg.map_stats_from == "held_out" and cfg.blur_sigma == 4.0 and cfg.global_taps == []
    assert cfg.position_spread_images == 300  # its spread is per position
    old["map_stats"]["pos_std"] = 1.5  # one spread for the whole map: trained before the per-position one
    assert bundle_split(old)[0].position_spread_images == 0
    assert (train_paths, val_paths) == bundle_split(meta)[1:]
    cfg_now = bundle_split(meta)[0]
    assert cfg_now.map_stats_from == meta["training"]["config"]["map_stats_from"]
    assert cfg_now.blur_sigma == meta["net"]["blur_sigma"]
