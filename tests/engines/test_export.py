import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines import bundle as bundle_mod
from engines.export import ExportError, export_bundle


def test_export_writes_one_verified_file_and_records_its_sha(exported_bundle: Path):
    meta = bundle_mod.read_meta(exported_bundle)
    onnx_file = exported_bundle / "model.onnx"
    assert meta["onnx"]["sha256"] == bundle_mod.sha256_file(onnx_file)
    assert not list(exported_bundle.glob("*.data")), "no external data files"
    assert meta["onnx"]["parity"]["max_abs_map"] <= 1e-3
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    assert inp.name == "image"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 128, 128, 3]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) == 18
    # everything runs inside the graph: no custom domains TensorRT would not know
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    # the graph-level rewrites that the CPU latency depends on survive the export: resizes are
    # matrix products (no Resize), SSPCAB is one dilated convolution (no corner slices)
    ops = [n.op_type for n in model.graph.node]
    assert "Resize" not in ops and "Slice" not in ops
    dilated = [
        n.input[1]
        for n in model.graph.node
        if n.op_type == "Conv" and any(a.name == "dilations" and max(a.ints) > 1 for a in n.attribute)
    ]
    # (the default's segmentation head, stride 16: per network (two since stop 42) its convolutions
    # dilated 2, 4 and 8 cells)
    assert [w for w in dilated if not w.startswith("model.seg_head.")] == ["model.student.sspcab.weight"]
    assert meta["net"]["seg_heads"] == 2 and len(dilated) == 1 + 3 * 2
    # what TensorRT 10's parser needs: uint8 only straight into a Cast, constant conv weights, ...
    from engines.trt_compat import tensorrt_problems

    assert tensorrt_problems(model) == []
    first = next(n for n in model.graph.node if "image" in n.input)
    assert first.op_type == "Cast"
    # SSPCAB's fused kernel is stored, not concatenated at run time: the Concats are the reverse
    # student's merge of the three tapped maps and the segmentation head's inputs (per tap the
    # teacher's features and the squared differences, then the taps), and join activations only
    constants = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    head = len(meta["net"]["taps"]) + 1 if meta["net"]["seg_weight"] else 0
    assert len(concats) == (1 if meta["net"]["student"] == "reverse" else 0) + head == 5
    assert not any(i in constants for n in concats for i in n.input)


def test_failed_parity_check_leaves_no_model(tmp_path: Path, trained_bundle: Path, monkeypatch):
    import engines.export as ex

    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    monkeypatch.setattr(ex, "MAP_ATOL", -1.0)
    with pytest.raises(ExportError, match="parity check failed"):
        export_bundle(b)
    assert not (b / "model.onnx").exists()
    assert not list(b.glob(".model.*"))
    assert json.loads((b / "model.json").read_text())["onnx"] is None


def test_export_of_a_bundle_without_weights(tmp_path: Path, trained_bundle: Path):
    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    (b / "student.pt").write_bytes(b"garbage")
    with pytest.raises(bundle_mod.BundleError, match=r"student\.pt is not the student weights model\.json records"):
        export_bundle(b)
    (b / "student.pt").unlink()
    with pytest.raises(bundle_mod.BundleError, match=r"student\.pt is missing"):
        export_bundle(b)


def test_export_cli_reports_parity(capsys, tmp_path: Path, trained_bundle: Path):
    from edge_app.cli import main

    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    assert main(["export", "--bundle", str(b)]) == 0
    out = capsys.readouterr().out
    assert "parity vs torch" in out and "model.onnx" in out
    assert np.isfinite(json.loads((b / "model.json").read_text())["onnx"]["parity"]["max_abs_map"])


def test_graph_tensorrt_would_refuse_fails_the_export(tmp_path: Path, trained_bundle: Path, monkeypatch):
    import engines.export as ex

    b = tmp_path / "b"
    shutil.copytree(trained_bundle, b)
    monkeypatch.setattr(ex, "tensorrt_problems", lambda m: ["node 'x' (Foo): operator not in the list"])
    with pytest.raises(ExportError, match=r"would not build in TensorRT 10: node 'x' \(Foo\)"):
        export_bundle(b)
    assert not (b / "model.onnx").exists()
    assert not list(b.glob(".model.*"))
