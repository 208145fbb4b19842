"""The segmentation head (engines.model.SegHead, trained by engines.seghead): trained after the
student on synthetic defects, fused into the map, exported with the graph, refused when its
statistics are missing."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engines import bundle as bundle_mod
from engines.data import eval_items, load_images, read_mask
from engines.metrics import auroc
from engines.model import SEG_PREFIX, KDModel, NetConfig, bilinear_matrix, box_matrix, student_part
from engines.seghead import CLEAN_SHARE, seg_loss, synthetic_set
from engines.train import bundle_config, load_bundle_model, predict, to_tensor


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory, trained_bundle: Path) -> Path:
    """The session's tiny bundle given a segmentation head by ``lineinspect refit`` (the student is kept)."""
    from edge_app.cli import main

    out = tmp_path_factory.mktemp("seg") / "model"
    shutil.copytree(trained_bundle, out)
    assert main(["refit", "--bundle", str(out), "--seg-weight", "1", "--seg-steps", "80"]) == 0
    return out


def _test_set(root: Path):
    items = eval_items(root, require_masks=True)
    imgs = load_images([it.path for it in items], 128)
    masks = np.stack([read_mask(it.mask, (128, 128), like=it.path) for it in items])
    return items, imgs, masks


def test_train_ships_a_stride_16_head_at_weight_half_joined_by_max_and_refit_takes_it_off(trained_bundle, tmp_path):
    """The default since stop 38 (joined by its maximum since stop 40): ``lineinspect train`` trains
    the head; ``refit --seg-weight 0`` gives the same student without one (the network of stops 34-37)."""
    from edge_app.cli import main

    meta = bundle_mod.read_meta(trained_bundle)
    assert (meta["net"]["seg_weight"], meta["net"]["seg_stride"], meta["net"]["seg_fusion"]) == (0.5, 16, "max")
    assert meta["map_stats"]["seg_head"]["steps"] == 1500 and meta["map_stats"]["seg_head"]["seg_scale"] > 0
    # from 2 synthetic samples per training part (seg_samples, an option since stop 41), two
    # networks of width 48 averaged since stop 42, each from its own samples
    assert meta["training"]["config"]["seg_samples"] == 2
    assert meta["map_stats"]["seg_head"]["samples"] == 2 * meta["training"]["n_train"]
    assert (meta["net"]["seg_heads"], meta["net"]["seg_width"]) == (2, 48)
    assert meta["map_stats"]["seg_head"]["heads"] == 2
    assert load_bundle_model(trained_bundle).seg_head.grid == (8, 8)  # 128 x 128 input
    b = tmp_path / "model"
    shutil.copytree(trained_bundle, b)
    assert main(["refit", "--bundle", str(b), "--seg-weight", "0"]) == 0
    headless = bundle_mod.read_meta(b)
    assert headless["net"]["seg_weight"] == 0.0 and "seg_head" not in headless["map_stats"]
    assert load_bundle_model(b).seg_head is None
    sd = torch.load(bundle_mod.student_path(b, headless), weights_only=True)
    assert not any(k.startswith(SEG_PREFIX) for k in sd)


def test_the_head_is_trained_after_the_student_and_marks_defects(seg_bundle, trained_bundle, synthetic_root, tmp_path):
    meta = bundle_mod.read_meta(seg_bundle)
    assert meta["net"]["seg_weight"] == 1.0
    rec = meta["map_stats"]["seg_head"]
    assert rec["steps"] == 80 and rec["samples"] == 2 * meta["training"]["n_train"]  # the bundle's seg_samples
    assert rec["seg_scale"] > 0
    old = torch.load(bundle_mod.student_path(trained_bundle, bundle_mod.read_meta(trained_bundle)), weights_only=True)
    new = torch.load(bundle_mod.student_path(seg_bundle, meta), weights_only=True)
    assert any(k.startswith(SEG_PREFIX) for k in new)
    for k, v in student_part(old).items():  # the student is kept bit for bit
        torch.testing.assert_close(new[k], v, rtol=0, atol=0)
    model = load_bundle_model(seg_bundle)
    assert model.seg_head is not None
    _, imgs, masks = _test_set(synthetic_root)
    with torch.no_grad():
        t, s, _ = model.run_networks(to_tensor(imgs, torch.device("cpu")))
        logits = torch.nn.functional.interpolate(model.seg_logits(t, s), size=(128, 128), mode="bilinear")
    # trained on synthetic regions only, it marks the parts' scratches, spots and dents
    assert auroc(masks.ravel(), logits[:, 0].numpy().ravel()) > 0.85
    # and the fused map still separates them
    maps, _ = predict(model, imgs)
    assert auroc(masks.ravel(), maps.ravel()) > 0.95
    # the head changes the map: the same student without a head gives another one
    from edge_app.cli import main

    headless = tmp_path / "headless"
    shutil.copytree(trained_bundle, headless)
    assert main(["refit", "--bundle", str(headless), "--seg-weight", "0"]) == 0
    plain_maps, _ = predict(load_bundle_model(headless), imgs)
    assert not np.allclose(maps, plain_maps, atol=1e-3)


def test_the_head_exports_with_the_graph_and_passes_the_tensorrt_rule_check(seg_bundle, tmp_path):
    from engines.export import export_bundle
    from engines.trt_compat import tensorrt_problems

    b = tmp_path / "model"
    shutil.copytree(seg_bundle, b)
    onnx_path = export_bundle(b)  # checks parity with torch itself, raises on a mismatch
    graph = onnx.load(str(onnx_path))
    assert tensorrt_problems(graph) == []
    parity = bundle_mod.read_meta(b)["onnx"]["parity"]
    assert parity["max_abs_map"] <= parity["atol"]


def test_a_bundle_with_a_head_but_no_head_statistics_is_refused(seg_bundle, tmp_path):
    b = tmp_path / "model"
    shutil.copytree(seg_bundle, b)
    meta = json.loads((b / "model.json").read_text())
    del meta["map_stats"]["seg_head"]
    bundle_mod.write_meta(b, meta)
    with pytest.raises(bundle_mod.BundleError, match=r"seg_weight 1\.0 but no map_stats\.seg_head"):
        load_bundle_model(b)


def test_head_weights_are_refused_by_a_network_without_a_head(seg_bundle):
    meta = bundle_mod.read_meta(seg_bundle)
    sd = torch.load(bundle_mod.student_path(seg_bundle, meta), weights_only=True)
    model = load_bundle_model(seg_bundle)
    plain = KDModel(model.teacher, NetConfig.from_json(meta["net"] | {"seg_weight": 0.0}))
    with pytest.raises(ValueError, match="segmentation head but the network's config has seg_weight 0"):
        plain.load_fitted_state(sd)


def test_networks_from_before_the_head_have_none():
    net = NetConfig().to_json()
    del net["seg_weight"], net["seg_stride"]
    old = NetConfig.from_json(net)
    assert old.seg_weight == 0.0 and old.seg_stride == 8
    with pytest.raises(ValueError, match="seg_weight must be within"):
        NetConfig(seg_weight=-1.0).validate()
    with pytest.raises(ValueError, match="seg_stride must be one of 8, 16, got 12"):
        NetConfig(seg_weight=1.0, seg_stride=12).validate()


def test_a_stride_16_head_has_a_quarter_of_the_cells_exports_and_keeps_its_stride(trained_bundle, tmp_path):
    from edge_app.cli import main
    from engines.export import export_bundle
    from engines.trt_compat import tensorrt_problems

    b = tmp_path / "model"
    shutil.copytree(trained_bundle, b)
    assert main(["refit", "--bundle", str(b), "--seg-weight", "1", "--seg-steps", "30", "--seg-stride", "16"]) == 0
    meta = bundle_mod.read_meta(b)
    assert meta["net"]["seg_stride"] == 16
    model = load_bundle_model(b)
    assert model.seg_head.grid == (8, 8)  # 128 x 128 input
    dilations = [m.dilation[0] for m in model.seg_head.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert dilations == [1, 1, 1, 2, 4, 8, 1]  # the stride-8 head's 1, 2, 4, 8, 16 cells halved
    with torch.no_grad():
        t, s, _ = model.run_networks(to_tensor(np.zeros((2, 128, 128, 3), np.uint8), torch.device("cpu")))
        assert model.seg_head(t, s).shape == (2, 1, 8, 8)

    # a refit of something else keeps it, weights bit for bit (train would train the same head: it
    # depends on neither the map's settings nor its weight), its statistics fitted to the new map;
    # a bundle whose records predate the stride reads as 8
    def head_weights(bundle: Path) -> dict:
        sd = torch.load(bundle_mod.student_path(bundle, bundle_mod.read_meta(bundle)), weights_only=True)
        return {k: v for k, v in sd.items() if k.startswith(SEG_PREFIX)}

    before, before_stats = head_weights(b), meta["map_stats"]["seg_head"]
    assert main(["refit", "--bundle", str(b), "--blur-sigma", "3", "--seg-weight", "0.5"]) == 0
    meta = bundle_mod.read_meta(b)
    assert meta["net"]["seg_stride"] == 16 and bundle_config(meta).seg_stride == 16
    after = head_weights(b)
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    stats = meta["map_stats"]["seg_head"]
    assert stats["steps"] == 30 and stats["seg_scale"] != before_stats["seg_scale"]  # the blur changed the map
    # other steps train it again
    assert main(["refit", "--bundle", str(b), "--seg-steps", "20"]) == 0
    assert bundle_mod.read_meta(b)["map_stats"]["seg_head"]["steps"] == 20
    assert not torch.equal(head_weights(b)[f"{SEG_PREFIX}net.6.weight"], before[f"{SEG_PREFIX}net.6.weight"])
    # ... and so do other samples per part
    twenty = head_weights(b)
    assert main(["refit", "--bundle", str(b), "--seg-samples", "3"]) == 0
    meta = bundle_mod.read_meta(b)
    assert meta["map_stats"]["seg_head"]["samples"] == 3 * meta["training"]["n_train"]
    assert not torch.equal(head_weights(b)[f"{SEG_PREFIX}net.6.weight"], twenty[f"{SEG_PREFIX}net.6.weight"])
    older = json.loads(json.dumps(meta))
    del older["net"]["seg_stride"], older["training"]["config"]["seg_stride"]
    del older["training"]["config"]["seg_samples"]
    assert bundle_config(older).seg_stride == 8
    assert bundle_config(older).seg_samples == 2  # heads from before the setting: 2 samples per part
    graph = onnx.load(str(export_bundle(b)))  # parity with torch checked by the export itself
    assert tensorrt_problems(graph) == []


def test_finer_taps_are_averaged_over_each_head_cell():
    for n in (5, 13, 32):  # a halving: the same weights as the bilinear resize (older heads unchanged)
        torch.testing.assert_close(box_matrix(n, 2 * n), bilinear_matrix(n, 2 * n), rtol=0, atol=0)
    v = torch.arange(8.0)
    torch.testing.assert_close(box_matrix(2, 8) @ v, torch.tensor([1.5, 5.5]))
    with pytest.raises(ValueError, match="multiple"):
        box_matrix(3, 8)


def test_synthetic_set_leaves_a_share_clean_and_marks_the_rest():
    rng = np.random.default_rng(0)
    goods = rng.integers(90, 160, (6, 64, 64, 3), dtype=np.uint8)
    x, m = synthetic_set(goods, 200, np.random.default_rng(1))
    assert x.shape == (200, 64, 64, 3) and m.shape == (200, 64, 64)
    clean = ~(m > 0).any(axis=(1, 2))
    assert abs(clean.mean() - CLEAN_SHARE) < 0.1
    assert m.min() >= 0 and m.max() <= 1
    # the most marked sample equals its (flipped) good image outside its mask and differs inside
    i = int(np.argmax((m > 0.9).sum(axis=(1, 2))))
    g = goods[i % 6]
    diffs = [np.abs(x[i].astype(int) - f.astype(int)).sum(-1) for f in (g, g[:, ::-1], g[::-1], g[::-1, ::-1])]
    diff = min(diffs, key=lambda d: d[m[i] < 0.01].sum())
    assert diff[m[i] < 0.01].sum() == 0
    assert diff[m[i] > 0.9].mean() > 1


def test_seg_loss_prefers_the_right_region():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:5, 2:5] = 1.0
    right = torch.where(target > 0, 6.0, -6.0)
    wrong = torch.where(target > 0, -6.0, 6.0)
    assert float(seg_loss(right, target)) < 0.05 < 1.5 < float(seg_loss(wrong, target))


def test_train_says_what_the_head_took_and_seg_weight_0_trains_none(tmp_path, capsys, synthetic_root):
    from edge_app.cli import main

    for weight in (0.5, 0.0):
        cfg = tmp_path / f"train{weight}.yaml"
        cfg.write_text(f"image_size: 64\nepochs: 1\nbatch_size: 4\nmax_train_images: 8\nnum_threads: 1\n"
                       f"seg_steps: 40\nseg_weight: {weight}\n")  # fmt: skip
        out_dir = tmp_path / f"b{weight}"
        argv = ["train", "--data", str(synthetic_root), "--out", str(out_dir), "--config", str(cfg), "--quiet"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        meta = bundle_mod.read_meta(out_dir)
        assert "bundle written to" in out
        if weight:
            assert meta["map_stats"]["seg_head"]["steps"] == 40 and "(the segmentation head " in out
        else:
            assert "seg_head" not in meta["map_stats"] and "segmentation head" not in out
            assert load_bundle_model(out_dir).seg_head is None


def test_seg_fusion_max_takes_the_larger_map_and_refit_to_add_keeps_the_head_and_exports(seg_bundle, tmp_path):
    """The default ``seg_fusion: max``: the map is the larger of the fused map and the head's term,
    pixel by pixel (where the head's term is lower, the distillation map alone). ``refit
    --seg-fusion add`` (stops 38-39's fusion) keeps the head's weights bit for bit and gives their
    sum; that graph exports with parity and passes the TensorRT rule check (the max graph: the
    export test above); bundles from before the setting add."""
    from edge_app.cli import main
    from engines.export import export_bundle
    from engines.trt_compat import tensorrt_problems

    meta = bundle_mod.read_meta(seg_bundle)
    assert meta["net"]["seg_fusion"] == "max" and bundle_config(meta).seg_fusion == "max"
    x = to_tensor(np.random.default_rng(0).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8), torch.device("cpu"))

    def halves(model: KDModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t, s, _ = model.run_networks(x)
            maps, seg = model.scale_maps(t, s), model.seg_map(t, s)
            return model.fused_grid(maps), seg, model.fuse(maps, seg), model.fuse(maps, None)

    model = load_bundle_model(seg_bundle)
    fused, seg, joined, alone = halves(model)
    torch.testing.assert_close(joined, resize_bilinear_like(model, torch.maximum(fused, seg)), rtol=0, atol=1e-5)
    assert (seg < fused).any() and (seg > fused).any()  # both halves decide somewhere
    assert not torch.allclose(joined, alone)

    b = tmp_path / "model"
    shutil.copytree(seg_bundle, b)
    assert main(["refit", "--bundle", str(b), "--seg-fusion", "add"]) == 0
    added_meta = bundle_mod.read_meta(b)
    assert added_meta["net"]["seg_fusion"] == "add" and bundle_config(added_meta).seg_fusion == "add"
    before = torch.load(bundle_mod.student_path(seg_bundle, meta), weights_only=True)
    after = torch.load(bundle_mod.student_path(b, added_meta), weights_only=True)
    assert any(k.startswith(SEG_PREFIX) for k in after)
    kept = {**student_part(before), **{k: v for k, v in before.items() if k.startswith(SEG_PREFIX)}}
    for k, v in kept.items():  # the student and the head, bit for bit (the global term is refitted)
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    added = load_bundle_model(b)
    fused_a, seg_a, summed, _ = halves(added)
    torch.testing.assert_close(summed, resize_bilinear_like(added, fused_a + seg_a), rtol=0, atol=1e-5)
    assert not torch.allclose(summed, joined, atol=1e-3)
    graph = onnx.load(str(export_bundle(b)))  # parity with torch checked by the export itself
    assert tensorrt_problems(graph) == []
    older = json.loads(json.dumps(meta))
    del older["net"]["seg_fusion"], older["training"]["config"]["seg_fusion"]
    assert NetConfig.from_json(older["net"]).seg_fusion == "add" and bundle_config(older).seg_fusion == "add"
    with pytest.raises(ValueError, match="seg_fusion must be one of add, max, got 'mul'"):
        NetConfig(seg_weight=1.0, seg_fusion="mul").validate()


def resize_bilinear_like(model: KDModel, m: torch.Tensor) -> torch.Tensor:
    """``m`` at the fusion size upsampled to the input as ``KDModel.fuse`` does."""
    from engines.model import resize_bilinear

    return resize_bilinear(m, model.upsample_rows, model.upsample_cols)


def test_two_heads_average_their_logits_keep_the_first_bit_for_bit_and_export(trained_bundle, tmp_path, capsys):
    """``seg_heads: 2`` (an option since stop 42): the first network is the one-head bundle's head,
    bit for bit (network k is trained from seed + k); the head's logit is the mean of its networks';
    the graph exports (parity checked by the export) and passes the TensorRT rule check; a count of
    heads or samples out of bounds is refused with the bundle unchanged; bundles from before the setting have one."""
    from edge_app.cli import main
    from engines.export import export_bundle
    from engines.trt_compat import tensorrt_problems

    one, two = tmp_path / "one", tmp_path / "two"
    for b, heads in ((one, "1"), (two, "2")):
        shutil.copytree(trained_bundle, b)
        assert main(["refit", "--bundle", str(b), "--seg-steps", "30", "--seg-heads", heads]) == 0
    meta = bundle_mod.read_meta(two)
    assert meta["net"]["seg_heads"] == 2 and bundle_config(meta).seg_heads == 2
    rec = meta["map_stats"]["seg_head"]
    assert rec["heads"] == 2 and len(rec["head_losses"]) == 2 and len(rec["head_held_out_losses"]) == 2
    assert rec["samples"] == 2 * meta["training"]["n_train"]  # per network
    assert "heads" not in bundle_mod.read_meta(one)["map_stats"]["seg_head"]

    def head_weights(bundle: Path) -> dict:
        sd = torch.load(bundle_mod.student_path(bundle, bundle_mod.read_meta(bundle)), weights_only=True)
        return {k[len(SEG_PREFIX) :]: v for k, v in sd.items() if k.startswith(SEG_PREFIX)}

    w1, w2 = head_weights(one), head_weights(two)
    assert w1.keys() == {k for k in w2 if k.startswith("net.")}
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, rtol=0, atol=0)
    assert not torch.equal(w2["more.0.6.weight"], w2["net.6.weight"])  # its own seed
    model = load_bundle_model(two)
    assert len(model.seg_head.nets) == 2
    with torch.no_grad():
        t, s, _ = model.run_networks(to_tensor(np.full((2, 128, 128, 3), 90, np.uint8), torch.device("cpu")))
        x = model.seg_head.inputs(t, s)
        mean = (model.seg_head.net(x) + model.seg_head.more[0](x)) / 2
        torch.testing.assert_close(model.seg_head(t, s), mean, rtol=1e-6, atol=1e-6)
    graph = onnx.load(str(export_bundle(two)))
    assert tensorrt_problems(graph) == []

    capsys.readouterr()
    before = (two / "model.json").read_bytes()
    for flag, bad in (("--seg-heads", "0"), ("--seg-heads", "5"), ("--seg-samples", "0"), ("--seg-samples", "21")):
        assert main(["refit", "--bundle", str(two), flag, bad]) == 2
        assert flag[2:].replace("-", "_") in capsys.readouterr().err
    assert (two / "model.json").read_bytes() == before
    with pytest.raises(ValueError, match=r"seg_heads must be within 1\.\.4, got 0"):
        NetConfig(seg_weight=1.0, seg_heads=0).validate()
    older = json.loads(json.dumps(meta))
    del older["net"]["seg_heads"], older["training"]["config"]["seg_heads"]
    del older["net"]["seg_width"], older["training"]["config"]["seg_width"]
    assert NetConfig.from_json(older["net"]).seg_heads == 1 and bundle_config(older).seg_heads == 1
    assert NetConfig.from_json(older["net"]).seg_width == 96 and bundle_config(older).seg_width == 96


def test_a_narrower_head_has_the_width_asked_for_trains_again_and_exports(trained_bundle, tmp_path, capsys):
    """``seg_width`` (48 since stop 42, 96 before): the first two convolutions that wide, the later
    four two thirds of it; a refit with another width trains the head again; widths off the grid of
    8 or out of bounds are refused."""
    from edge_app.cli import main
    from engines.export import export_bundle
    from engines.trt_compat import tensorrt_problems

    b = tmp_path / "model"
    shutil.copytree(trained_bundle, b)

    def widths(bundle: Path) -> list[list[int]]:
        nets = load_bundle_model(bundle).seg_head.nets
        return [[m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] for net in nets]

    assert widths(trained_bundle) == [[48, 48, 32, 32, 32, 32, 1]] * 2  # what train ships
    assert main(["refit", "--bundle", str(b), "--seg-steps", "30", "--seg-heads", "1", "--seg-width", "96"]) == 0
    meta = bundle_mod.read_meta(b)
    assert meta["net"]["seg_width"] == 96 and bundle_config(meta).seg_width == 96
    assert widths(b) == [[96, 96, 64, 64, 64, 64, 1]]  # stops 40-41's head
    assert main(["refit", "--bundle", str(b), "--seg-steps", "30", "--seg-width", "64"]) == 0
    assert widths(b) == [[64, 64, 40, 40, 40, 40, 1]]  # two thirds of 64 to a multiple of 8
    assert tensorrt_problems(onnx.load(str(export_bundle(b)))) == []
    capsys.readouterr()
    for bad in ("50", "8", "200"):
        assert main(["refit", "--bundle", str(b), "--seg-width", bad]) == 2
        assert "seg_width" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"seg_width must be a multiple of 8 within 16\.\.192, got 52"):
        NetConfig(seg_weight=1.0, seg_width=52).validate()
