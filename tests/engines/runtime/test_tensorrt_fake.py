"""The TensorRT backend against a TEST DOUBLE of the TensorRT + pycuda APIs (fake_tensorrt.py).

TensorRT cannot be installed here; these tests prove the build/load/run code is consistent with
the TensorRT 10 and 11 API rules and that stale or corrupt plans are refused — not that TensorRT
itself runs. The real check is benchmarks/gpu_check.sh on a machine with TensorRT.
"""

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from engines.runtime import ModelFileError, load_runtime
from tests.engines.runtime.fake_tensorrt import make_fake_pycuda, make_fake_tensorrt


@pytest.fixture
def fake_trt(monkeypatch, request):
    """Install fake ``tensorrt`` + ``pycuda`` modules; yields a factory to switch version / GPU."""

    def install(version: str = "10.13.0", gpu: str = "NVIDIA Fake GPU"):
        pkg, driver, mem = make_fake_pycuda(gpu)
        trt = make_fake_tensorrt(version, mem)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "pycuda", pkg)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
        for name in ("engines.runtime.cuda_mem", "engines.runtime.tensorrt"):
            sys.modules.pop(name, None)
        module = importlib.import_module("engines.runtime.tensorrt")
        return module, trt, driver

    yield install
    for name in ("engines.runtime.tensorrt", "engines.runtime.cuda_mem"):
        sys.modules.pop(name, None)


@pytest.fixture
def bundle(tmp_path: Path, exported_bundle: Path) -> Path:
    b = tmp_path / "b"
    shutil.copytree(exported_bundle, b)
    return b


def test_build_names_the_plan_and_writes_its_metadata(fake_trt, bundle: Path):
    mod, trt, _ = fake_trt()
    plan = mod.build_engine(bundle, precision="fp16", max_batch=8)
    meta = json.loads((bundle / "model.json").read_text())
    sha = meta["onnx"]["sha256"]
    assert plan.parent == bundle / "engines"
    assert plan.name == f"model-nvidia-fake-gpu-trt10.13.0-{sha[:16]}-fp16.plan"
    info = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert info["gpu"] == "NVIDIA Fake GPU" and info["tensorrt"] == "10.13.0"
    assert info["onnx_sha256"] == sha and info["max_batch"] == 8 and info["strongly_typed"] is False
    assert list((bundle / "engines").glob("timing-*.cache")), "timing cache persisted"
    assert "create_network(0)" in trt.calls  # TensorRT 10: weak typing + FP16 flag


def test_runtime_matches_onnxruntime(fake_trt, bundle: Path, synthetic_root: Path):
    mod, trt, driver = fake_trt()
    mod.build_engine(bundle, precision="fp16", max_batch=8)
    rt = load_runtime("tensorrt", bundle, precision="fp16")
    ort_rt = load_runtime("onnxruntime", bundle)
    from engines.data import eval_items, load_images

    imgs = load_images([it.path for it in eval_items(synthetic_root)[:5]], 128)
    out = rt(imgs)
    ref = ort_rt(imgs)
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(out["score"], ref["score"], atol=1e-5)
    assert out["anomaly_map"].shape == (5, 128, 128)
    # one preallocated buffer set, reused: a second smaller batch copies only what it needs
    rt(imgs[:1])
    assert ("htod", 128 * 128 * 3) in driver.state["copies"]
    assert "execute_async_v3(batch=1)" in trt.calls
    assert driver.state["context_depth"] == 0, "every context push is popped"
    with pytest.raises(ValueError, match=r"batch size must be 1\.\.8"):
        rt(np.zeros((9, 128, 128, 3), np.uint8))
    assert "tensorrt" in rt.device.lower() and "fp16" in rt.device
    rt.close()


def test_missing_engine_says_how_to_build(fake_trt, bundle: Path):
    fake_trt()
    with pytest.raises(ModelFileError, match=r"no engine has been built; run: lineinspect build-engine .* --fp16"):
        load_runtime("tensorrt", bundle, precision="fp16")


def test_engine_for_another_gpu_or_version_is_refused(fake_trt, bundle: Path):
    mod, _, _ = fake_trt(version="10.13.0", gpu="NVIDIA Fake GPU")
    mod.build_engine(bundle, precision="fp32")
    fake_trt(version="10.14.1", gpu="NVIDIA Fake GPU")
    with pytest.raises(ModelFileError, match=r"found only model-nvidia-fake-gpu-trt10\.13\.0-.*fp32\.plan"):
        load_runtime("tensorrt", bundle, precision="fp32")
    fake_trt(version="10.13.0", gpu="NVIDIA Other GPU")
    with pytest.raises(ModelFileError, match="another GPU, TensorRT version, model export or precision"):
        load_runtime("tensorrt", bundle, precision="fp32")


def test_re_exported_model_makes_the_engine_stale(fake_trt, bundle: Path):
    mod, _, _ = fake_trt()
    plan = mod.build_engine(bundle, precision="fp32")
    meta = json.loads((bundle / "model.json").read_text())
    # a tampered sidecar claiming another ONNX hash for the same file name
    info_path = plan.with_name(plan.name + ".json")
    info = json.loads(info_path.read_text())
    info["onnx_sha256"] = "0" * 64
    info_path.write_text(json.dumps(info))
    with pytest.raises(ModelFileError, match="stale TensorRT engine"):
        load_runtime("tensorrt", bundle, precision="fp32")
    # a new export (new sha in model.json) no longer finds the old plan
    meta["onnx"]["sha256"] = "f" * 64
    (bundle / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="found only"):
        mod.check_plan(bundle, meta, "NVIDIA Fake GPU", "fp32")


def test_corrupt_or_truncated_plan_is_refused(fake_trt, bundle: Path):
    mod, _, _ = fake_trt()
    plan = mod.build_engine(bundle, precision="fp32")
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_runtime("tensorrt", bundle, precision="fp32")


def test_tensorrt_11_is_strongly_typed(fake_trt, bundle: Path):
    mod, trt, _ = fake_trt(version="11.2.0")
    assert not hasattr(trt.BuilderFlag, "FP16")
    with pytest.raises(ModelFileError, match="--fp16-graph"):
        mod.build_engine(bundle, precision="fp16")
    with pytest.raises(ModelFileError, match="removed implicit INT8 calibration"):
        mod.build_engine(bundle, precision="int8")
    plan = mod.build_engine(bundle, precision="fp32")
    assert "create_network(1)" in trt.calls  # STRONGLY_TYPED flag bit
    info = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert info["strongly_typed"] is True
    rt = load_runtime("tensorrt", bundle, precision="fp32")
    assert rt(np.zeros((2, 128, 128, 3), np.uint8))["score"].shape == (2,)


def test_tensorrt_11_fp16_uses_the_fp16_graph(fake_trt, tmp_path: Path, trained_bundle: Path):
    from engines.export import export_bundle

    b = tmp_path / "b16"
    shutil.copytree(trained_bundle, b)
    export_bundle(b, fp16_graph=True)
    meta = json.loads((b / "model.json").read_text())
    assert meta["onnx_fp16"]["parity"]["max_abs_map"] <= meta["onnx_fp16"]["parity"]["atol"]
    mod, _, _ = fake_trt(version="11.2.0")
    plan = mod.build_engine(b, precision="fp16")
    info = json.loads(plan.with_name(plan.name + ".json").read_text())
    assert info["onnx_file"] == "model_fp16.onnx"


def test_int8_on_tensorrt_10_needs_calibration_images(fake_trt, bundle: Path, synthetic_root: Path):
    mod, _, _ = fake_trt()
    with pytest.raises(ValueError, match="--calib-dir"):
        mod.build_engine(bundle, precision="int8")
    plan = mod.build_engine(bundle, precision="int8", calib_dir=synthetic_root / "train" / "good", max_batch=8)
    assert plan.name.endswith("-int8.plan")


def test_build_engine_cli_without_tensorrt(monkeypatch, capsys, bundle: Path):
    from edge_app.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", "--bundle", str(bundle), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert "'tensorrt'" in err and "lineinspect[trt]" in err


def test_graph_the_parser_refuses_gives_its_reasons_and_no_plan(fake_trt, bundle: Path):
    """An export from before the cast-first fix (uint8 -> Transpose) is refused with the parser's reasons."""
    import onnx
    from onnx import helper

    from engines import bundle as bundle_mod

    mod, _, _ = fake_trt()
    m = onnx.load(str(bundle / "model.onnx"))
    cast, transpose = m.graph.node[0], m.graph.node[1]
    assert (cast.op_type, transpose.op_type) == ("Cast", "Transpose")
    # the old order: Transpose on the uint8 input, then Cast
    old_t = helper.make_node("Transpose", ["image"], ["image_nchw"], perm=[0, 3, 1, 2], name="old_permute")
    old_c = helper.make_node("Cast", ["image_nchw"], [transpose.output[0]], to=onnx.TensorProto.FLOAT, name="old_cast")
    nodes = [old_t, old_c, *m.graph.node[2:]]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    (bundle / "model.onnx").write_bytes(m.SerializeToString())
    meta = bundle_mod.read_meta(bundle)
    meta["onnx"]["sha256"] = bundle_mod.sha256_file(bundle / "model.onnx")
    bundle_mod.write_meta(bundle, meta)
    with pytest.raises(ModelFileError, match=r"TensorRT could not parse .*uint8 tensor 'image' feeds a Transpose"):
        mod.build_engine(bundle, precision="fp16")
    assert not list((bundle / "engines").glob("*.plan"))
