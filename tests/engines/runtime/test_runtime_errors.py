"""Bad input to the runtimes: each a clear error."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from engines import bundle as bundle_mod
from engines.runtime import BACKENDS, InputError, ModelFileError, SDKMissingError, load_runtime


@pytest.fixture
def bundle_copy(tmp_path: Path, exported_bundle: Path) -> Path:
    b = tmp_path / "b"
    shutil.copytree(exported_bundle, b)
    return b


def test_unknown_backend_lists_the_choices(exported_bundle):
    with pytest.raises(ValueError, match="onnxruntime, openvino, tensorrt, torch"):
        load_runtime("tflite", exported_bundle)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "tensorrt"])
def test_missing_sdk_names_backend_and_extra(monkeypatch, exported_bundle, backend):
    for mod in BACKENDS[backend].sdk:
        monkeypatch.setitem(sys.modules, mod, None)  # makes "import mod" raise ImportError
    with pytest.raises(SDKMissingError) as exc:
        load_runtime(backend, exported_bundle)
    text = str(exc.value)
    assert f"'{backend}'" in text and f"lineinspect[{BACKENDS[backend].extra}]" in text


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_truncated_onnx_is_refused(bundle_copy: Path, backend):
    onnx_file = bundle_copy / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match=r"does not match model\.json"):
        load_runtime(backend, bundle_copy)
    # even when the sha check is skipped, the SDK's own failure becomes a clear error
    with pytest.raises(ModelFileError, match="could not load"):
        load_runtime(backend, bundle_copy, verify_sha=False)


def test_bundle_without_export(trained_bundle: Path):
    with pytest.raises(ModelFileError, match="lineinspect export"):
        load_runtime("onnxruntime", trained_bundle)


def test_missing_onnx_file(bundle_copy: Path):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        load_runtime("onnxruntime", bundle_copy)


def test_bundle_from_a_newer_format(bundle_copy: Path):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["format_version"] = bundle_mod.FORMAT_VERSION + 1
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(bundle_mod.BundleError, match="newer than this lineinspect understands"):
        load_runtime("onnxruntime", bundle_copy)


def test_corrupt_model_json(bundle_copy: Path):
    (bundle_copy / "model.json").write_text("{ not json")
    with pytest.raises(bundle_mod.BundleError, match="not valid JSON"):
        load_runtime("onnxruntime", bundle_copy)


def test_unset_statistics_are_refused(bundle_copy: Path):
    meta = json.loads((bundle_copy / "model.json").read_text())
    meta["map_stats"]["scale_std"] = [1.0, None, 1.0]
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(bundle_mod.BundleError, match="scale_std"):
        load_runtime("onnxruntime", bundle_copy)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (np.zeros((1, 128, 128, 3), np.float32), "dtype uint8"),
        (np.zeros((1, 256, 256, 3), np.uint8), r"expected shape \(N, 128, 128, 3\)"),
        (np.zeros((1, 3, 128, 128), np.uint8), "NHWC"),
        (np.zeros((0, 128, 128, 3), np.uint8), "batch size"),
        ([[0]], "numpy array"),
    ],
)
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_wrong_input_at_call_time(exported_bundle: Path, backend, batch, match):
    rt = load_runtime(backend, exported_bundle)
    with pytest.raises(InputError, match=match):
        rt(batch)


def test_cuda_provider_requested_without_gpu(exported_bundle: Path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ModelFileError, match="no CUDA provider"):
        load_runtime("onnxruntime", exported_bundle, device="cuda")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["input"].update(height="tall"), r"input\.height"),
        (lambda m: m["teacher"].update(weights_sha256="abc"), r"teacher\.weights_sha256"),
        (lambda m: m["normalization"].update(std=0), r"normalization\.std"),
    ],
)
def test_the_manifest_is_typed(bundle_copy: Path, edit, match):
    meta = json.loads((bundle_copy / "model.json").read_text())
    edit(meta)
    (bundle_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(bundle_mod.BundleError, match=match):
        load_runtime("onnxruntime", bundle_copy)


def test_one_artifact_check_for_every_file(bundle_copy: Path):
    """Every artifact: recorded, present, matching its sha256, derived ones made from this export."""
    meta = bundle_mod.read_meta(bundle_copy)
    assert bundle_mod.read_manifest(bundle_copy).input.height == meta["input"]["height"]
    assert bundle_mod.artifact_files(bundle_copy, meta, "onnx") == [bundle_copy / "model.onnx"]
    (bundle_copy / "g16.onnx").write_bytes(b"fp16 graph")
    meta["onnx_fp16"] = {
        "file": "g16.onnx",
        "sha256": bundle_mod.sha256_file(bundle_copy / "g16.onnx"),
        "for_onnx_sha256": meta["onnx"]["sha256"],
    }
    assert bundle_mod.artifact_files(bundle_copy, meta, "onnx_fp16") == [bundle_copy / "g16.onnx"]
    meta["onnx_fp16"]["for_onnx_sha256"] = "0" * 64  # model.onnx exported again since
    with pytest.raises(bundle_mod.ArtifactError, match=r"exported with another export.*--fp16-graph"):
        bundle_mod.artifact_files(bundle_copy, meta, "onnx_fp16")
    with pytest.raises(bundle_mod.ArtifactError, match="has no int8 model: run 'lineinspect quantize"):
        bundle_mod.artifact_files(bundle_copy, meta, "openvino_int8")
