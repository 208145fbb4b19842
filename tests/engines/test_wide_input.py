"""A non-square model input (``image_width``): trained, exported, served and mapped back to the camera."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from engines import bundle as bundle_mod
from engines.data import eval_items, load_images, preprocess
from engines.runtime import InputError, load_runtime

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

H, W = 64, 160


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory, synthetic_root: Path) -> Path:
    from engines.export import export_bundle
    from engines.train import TrainConfig, train

    out = tmp_path_factory.mktemp("wide") / "model"
    cfg = TrainConfig(
        image_size=H, image_width=W, epochs=2, batch_size=4, max_train_images=16, num_threads=2, device="cpu"
    )
    train(synthetic_root, out, cfg, quiet=True)
    export_bundle(out)
    return out


def test_preprocess_resizes_to_height_and_width():
    img = np.zeros((300, 500), np.uint8)
    img[:, 250:] = 255  # right half white
    out = preprocess(img, (H, W))
    assert out.shape == (H, W, 3)
    assert out[:, : W // 2 - 1].max() == 0 and out[:, W // 2 + 1 :].min() == 255
    assert preprocess(img, 32).shape == (32, 32, 3)  # one side: a square, as before


def test_wide_bundle_records_its_input_and_exports_it(wide_bundle: Path):
    meta = bundle_mod.read_meta(wide_bundle)
    assert (meta["input"]["height"], meta["input"]["width"]) == (H, W)
    assert meta["net"]["image_width"] == W and meta["net"]["global_taps"] == [10]
    model = onnx.load(str(wide_bundle / "model.onnx"))
    dims = [d.dim_value or d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", H, W, 3]
    assert meta["onnx"]["parity"]["max_abs_map"] <= 1e-3


def test_wide_runtimes_agree_and_refuse_a_square_batch(wide_bundle: Path, synthetic_root: Path):
    items = eval_items(synthetic_root)
    images = load_images([it.path for it in items[::3]], (H, W))
    ref_maps, ref_scores = load_runtime("torch", wide_bundle, device="cpu").predict(images)
    rt = load_runtime("onnxruntime", wide_bundle)
    assert rt.size == (H, W) and rt.input_shape == ("batch", H, W, 3)
    maps, scores = rt.predict(images, batch_size=4)
    assert maps.shape == (len(images), H, W)
    np.testing.assert_allclose(maps, ref_maps, atol=1e-3, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-3, rtol=0)
    labels = np.array([it.defect != "good" for it in items[::3]])
    assert scores[labels].mean() > scores[~labels].mean()  # it still tells defects from good parts
    with pytest.raises(InputError, match=rf"expected shape \(N, {H}, {W}, 3\)"):
        rt(np.zeros((1, H, H, 3), np.uint8))


def test_the_inspector_maps_regions_back_to_the_cameras_pixels(wide_bundle: Path, synthetic_root: Path):
    from calibration.calibfile import Calibration
    from edge_app.decide import Inspected
    from edge_app.frame import Frame
    from edge_app.inspect import Inspector

    rt = load_runtime("onnxruntime", wide_bundle)
    defect = next(it for it in eval_items(synthetic_root) if it.defect != "good")
    camera = cv2.resize(cv2.imread(str(defect.path)), (4 * W, 2 * H))  # a 640 x 128 camera frame: sx 4, sy 2
    amap = rt(preprocess(camera, rt.size)[None])["anomaly_map"][0]
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    cal = Calibration(
        model_onnx_sha256=rt.model_sha256,
        image_threshold=1e9,
        pixel_threshold=float(amap.max()) - 1e-3,
        min_defect_area_px=1,
    )
    out = Inspector(rt, cal, "S1").inspect(Frame("cam1", 1, "p1", 0.0, image=camera), 0.0)
    assert isinstance(out, Inspected) and out.amap.shape == (H, W)
    bx, by, bw, bh = out.regions[0]["bbox"]
    # the hottest model pixel (x, y) is camera pixels 4x .. 4x + 4 across and 2y .. 2y + 2 down
    assert bx <= 4 * x < 4 * (x + 1) <= bx + bw
    assert by <= 2 * y < 2 * (y + 1) <= by + bh


def test_a_width_that_does_not_fit_the_network_is_refused():
    from engines.train import TrainConfig

    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(image_size=64, image_width=100).net_config().validate()
    with pytest.raises(ValueError, match="multiple of twice"):
        TrainConfig(image_size=64, image_width=80).net_config().validate()  # the reverse student: 32


def test_auto_keeps_a_shared_aspect_and_squares_mixed_ones():
    from engines.data import keep_aspect_input

    # 256 / sqrt(2.4565) = 163.3 -> 160 (5 x 32); 256 * 256 / 160 = 409.6 -> 416 (13 x 32)
    assert keep_aspect_input(np.full(10, 1130 / 460), 256, 32)[0] == (160, 416)
    # tall parts: 256 / sqrt(0.4) = 404.8 -> 416; 65536 / 416 = 157.5 -> 160
    assert keep_aspect_input(np.full(10, 0.4), 256, 32)[0] == (416, 160)
    mixed, why = keep_aspect_input(np.array([0.5] * 5 + [2.0] * 5), 256, 32)
    assert mixed is None and "differ" in why
    near, why = keep_aspect_input(np.full(10, 1.2), 256, 32)
    assert near is None and "near square" in why
    # one image in ten off the shared ratio still keeps it; two do not
    assert keep_aspect_input(np.array([2.5] * 9 + [1.0]), 256, 32)[0] is not None
    assert keep_aspect_input(np.array([2.5] * 8 + [1.0] * 2), 256, 32)[0] is None


def test_train_chooses_the_input_from_the_training_images(tmp_path: Path):
    from engines.train import TrainConfig, train

    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(90, 110, (100, 250), dtype=np.uint8))
    base = dict(image_size=96, epochs=1, batch_size=4, num_threads=2, device="cpu", val_fraction=0.25)
    # 96 / sqrt(2.5) = 60.7 -> 64; 96 * 96 / 64 = 144 -> 128 (4.5 rounds to even)
    meta = train(tmp_path, tmp_path / "auto", TrainConfig(**base), quiet=True)
    assert (meta["input"]["height"], meta["input"]["width"]) == (64, 128)
    assert "auto" in meta["input"]["chosen_by"] and meta["net"]["image_width"] == 128
    assert meta["training"]["config"]["image_width"] == 128  # the resolved setting, as trained
    meta = train(tmp_path, tmp_path / "square", TrainConfig(**base, image_width="square"), quiet=True)
    assert (meta["input"]["height"], meta["input"]["width"]) == (96, 96) and meta["net"]["image_width"] is None


def test_accuracy_rows_are_default_only_at_the_input_train_chooses_for_their_set():
    import accuracy

    from engines.train import TrainConfig

    shipped = TrainConfig()
    keys = ("taps", "student", "student_expand", "distance", "hard_quantile", "epochs", "crop_size", "lr")
    row = {"dataset": "ball_screw_drive", "variant": "full", **{k: getattr(shipped, k) for k in keys}}
    row |= {"position_spread_images": shipped.position_spread_images, "global_taps": list(shipped.global_taps)}
    row |= {"global_grid": shipped.global_grid, "reverse_width": shipped.reverse_width}
    row |= {"map_stats_from": shipped.map_stats_from, "blur_sigma": shipped.blur_sigma}
    row |= {"seg_weight": shipped.seg_weight, "seg_stride": shipped.seg_stride, "seg_fusion": shipped.seg_fusion}
    row |= {"seg_heads": shipped.seg_heads, "seg_width": shipped.seg_width}
    wide = {**row, "image_size": 160, "image_width": 416}
    square = {**row, "image_size": 256, "image_width": None}
    assert accuracy.is_default(wide, shipped, (160, 416)) and not accuracy.is_default(square, shipped, (160, 416))
    assert accuracy.is_default(square, shipped, None) and not accuracy.is_default(wide, shipped, None)
    assert accuracy._key(wide) != accuracy._key(square)  # neither row replaces the other


def test_the_input_changes_no_weight_shape():
    """Only the fixed resize matrices depend on the input: a wide network has the square one's weights."""
    from engines.model import KDModel, NetConfig
    from engines.train import build_teacher

    shapes = []
    for width in (None, 160):
        cfg = NetConfig(image_size=64, image_width=width, global_taps=(10,), global_grid=3)
        model = KDModel(build_teacher(None, cfg.teacher_taps())[0], cfg)
        shapes.append({k: tuple(v.shape) for k, v in model.student.state_dict().items()})
    assert shapes[0] == shapes[1]
    assert shapes[0]["heads.1.weight"] == (40, 48, 1, 1)  # reverse_width 192: decoder widths 96 / 48 / 24
