"""The reverse-distillation student: shapes, losses, the switches, training and export parity."""

from pathlib import Path

import pytest
import torch

from engines import bundle as bundle_mod
from engines.model import KDModel, NetConfig, ReverseStudent
from engines.teacher import EfficientNetLite0, Teacher


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    torch.manual_seed(0)
    return Teacher(EfficientNetLite0(num_blocks=11, with_head=False)).eval()


def test_reverse_student_rebuilds_every_tap_from_the_teachers_features_only(teacher):
    model = KDModel(teacher, NetConfig(image_size=64, student="reverse", reverse_width=32)).eval()
    assert isinstance(model.student, ReverseStudent)
    x = torch.rand(2, 3, 64, 64) * 255
    t_feats, s_feats, rec = model.features(x)
    assert [f.shape for f in s_feats] == [f.shape for f in t_feats]
    assert rec.shape == () and float(rec) >= 0
    # the image never reaches it: the same teacher features give the same output
    xn = torch.randn(2, 3, 64, 64)
    a, _ = model.student(xn, t_feats)
    b, _ = model.student(torch.zeros_like(xn), t_feats)
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb)
    with pytest.raises(ValueError, match="pass them"):
        model.student(xn)
    amap, score = model(x)
    assert amap.shape == (2, 64, 64) and score.shape == (2,)


def test_reverse_loss_trains_only_the_student(teacher):
    model = KDModel(teacher, NetConfig(image_size=64, student="reverse", reverse_width=32), hard_quantile=0.999)
    model.train()
    out = model(torch.rand(2, 3, 64, 64) * 255)
    assert float(out["sspcab_loss"]) > 0  # SSPCAB sits in the bottleneck and reconstructs it
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    grads = [p.grad for p in model.student.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize(("simam", "sspcab"), [(False, False), (True, False), (False, True)])
def test_reverse_ablation_switches(teacher, simam, sspcab):
    cfg = NetConfig(image_size=64, student="reverse", reverse_width=32, simam=simam, sspcab=sspcab)
    model = KDModel(teacher, cfg).eval()
    assert (model.student.simam is not None) == simam
    assert (model.student.sspcab is not None) == sspcab
    _, _, rec = model.features(torch.rand(1, 3, 64, 64) * 255)
    assert (float(rec) > 0) == sspcab


def test_bad_reverse_settings_are_refused():
    with pytest.raises(ValueError, match="student must be"):
        NetConfig(student="sideways").validate()
    with pytest.raises(ValueError, match="reverse_width"):
        NetConfig(student="reverse", reverse_width=20).validate()
    with pytest.raises(ValueError, match="multiple of twice"):
        NetConfig(student="reverse", image_size=80).validate()  # stride 16 deepest: needs a multiple of 32
    d = NetConfig().to_json()
    del d["student"], d["reverse_width"]  # a model.json from before the setting
    assert NetConfig.from_json(d).student == "forward"


def test_tiny_forward_training_separates_defects_and_exports_with_parity(tmp_path: Path, synthetic_root: Path):
    """The default (reverse) student is trained, evaluated and exported by the shared fixtures
    (tests/conftest.py, test_train.py, test_export.py); the forward student, the option since
    stop 15, keeps its own check here: it still learns, separates defects and exports."""
    from engines.evaluate import evaluate
    from engines.export import FP16_ATOL, export_bundle
    from engines.train import TrainConfig, load_bundle_model, predict, train

    cfg = TrainConfig(image_size=128, epochs=6, batch_size=8, seed=0, num_threads=2, device="cpu", student="forward")
    out = tmp_path / "fwd"
    meta = train(synthetic_root, out, cfg, quiet=True)
    assert meta["net"]["student"] == "forward"
    hist = meta["training"]["history"]
    assert hist[-1]["kd_loss"] < hist[0]["kd_loss"]
    model = load_bundle_model(out)
    overall = evaluate(synthetic_root, 128, lambda x: predict(model, x))["rows"][-1]
    assert overall["image_auroc"] > 0.85
    assert overall["pixel_auroc"] > 0.85
    export_bundle(out, fp16_graph=True)  # TensorRT rule check included; fails the export if broken
    meta = bundle_mod.read_meta(out)
    assert meta["onnx"]["parity"]["max_abs_map"] <= 1e-3
    assert meta["onnx_fp16"]["parity"]["max_abs_map"] <= FP16_ATOL


@pytest.mark.parametrize(("student", "synthetic"), [("reverse", 0.0), ("forward", 0.0), ("reverse", 0.5)])
def test_cached_teacher_features_train_the_same_student(tmp_path: Path, synthetic_root: Path, student, synthetic):
    """Caching the frozen teacher's features (and their flips) changes the cost of an epoch, not what is
    learnt; with synthetic defects too (their clean targets are the step's cached or fresh features)."""
    from engines.train import TrainConfig, train

    base = dict(image_size=64, epochs=2, batch_size=4, max_train_images=8, num_threads=1, device="cpu", student=student)
    base |= {"reverse_width": 32, "hard_quantile": None, "synthetic_defects": synthetic}
    train(synthetic_root, tmp_path / "cached", TrainConfig(**base), quiet=True)
    train(synthetic_root, tmp_path / "fresh", TrainConfig(**base, teacher_cache_gb=0), quiet=True)
    a = torch.load(tmp_path / "cached" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "fresh" / "student.pt", weights_only=True)
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
            moved += 1
    assert moved > 0
