"""ONNX export of the whole inference graph, with a parity check against torch (train extra).

Graph contract (recorded in model.json under "onnx"):

- input ``image``: uint8, NHWC ``(batch, H, W, 3)``, RGB, at the bundle's size; batch is dynamic.
  Cast, normalisation, teacher, student, map fusion, upsampling, smoothing and image score all
  run inside the graph.
- outputs ``anomaly_map``: float32 ``(batch, H, W)``; ``score``: float32 ``(batch,)``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engines import bundle as bundle_mod
from engines.model import KDModel
from engines.trt_compat import tensorrt_problems

log = logging.getLogger(__name__)

OPSET = 18  # ONNX Runtime >= 1.14, OpenVINO >= 2023, TensorRT 10 all support opset 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
# Parity tolerance of ONNX Runtime (fp32) against torch (fp32) on the normalised map.
MAP_ATOL = 1e-3  # on the map and the score


class ExportError(RuntimeError):
    """Export failed; the message says what to do."""


def to_float_nchw(image: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, cast FIRST: TensorRT takes a uint8 network input only into a cast
    (its Shuffle layer, which a Transpose becomes, lists no uint8 in TensorRT 10's documentation)."""
    return image.to(torch.float32).permute(0, 3, 1, 2)


def frozen_copy(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy for export, with every SSPCAB's fused convolution stored as constants."""
    import copy

    from engines.blocks import SSPCAB

    out = copy.deepcopy(module).eval()
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SSPCAB):
                setattr(parent, name, child.frozen())
    return out


class InferenceGraph(nn.Module):
    """uint8 NHWC in -> (anomaly_map, score) out: exactly what the runtimes execute."""

    def __init__(self, model: KDModel):
        super().__init__()
        self.model = frozen_copy(model)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(to_float_nchw(image))


class InferenceGraphFP16(nn.Module):
    """The same contract with the two networks in fp16 (for TensorRT 11's strongly typed builds).

    Input/output stay uint8 / float32; SimAM statistics, cosine distances, normalisation,
    smoothing, the global term and the score stay fp32.
    """

    def __init__(self, model: KDModel):
        super().__init__()
        self.model = model.eval()
        self.teacher16 = frozen_copy(model.teacher).half()
        self.student16 = frozen_copy(model.student).half()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from engines.teacher import normalize_input

        m = self.model
        xn = normalize_input(to_float_nchw(image)).to(torch.float16)
        kd_raw, global_raw = m.split_taps([t.float() for t in self.teacher16(xn)])
        t_feats = m.standardise(kd_raw)
        s_feats = [s.float() for s in self.student16(xn, [t.half() for t in t_feats])[0]]
        return m.head(t_feats, s_feats, global_raw)


def export_onnx(model: KDModel, path: Path, opset: int = OPSET, fp16: bool = False) -> Path:
    """Export ``model`` to one self-contained ONNX file at ``path`` (dynamic batch)."""
    graph = InferenceGraphFP16(model) if fp16 else InferenceGraph(model)
    doc = "lineinspect student/teacher anomaly graph: uint8 NHWC RGB -> anomaly_map, score" + (
        " (networks in fp16)" if fp16 else ""
    )
    return export_graph(graph, model.cfg.input_hw(), path, doc, opset)


def export_graph(
    graph: nn.Module, size: int | tuple[int, int], path: Path, doc: str, opset: int = OPSET, tensorrt_check: bool = True
) -> Path:
    """Export a graph of the contract above (uint8 NHWC at ``size``, one side or (H, W)), checked by ONNX and
    (unless ``tensorrt_check`` is off: benchmark graphs only) the TensorRT rule check, to one
    self-contained file at ``path``."""
    import onnx

    graph = graph.eval()
    from engines.data import hw

    example = torch.zeros(2, *hw(size), 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=64)
    path = Path(path)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: batch}},
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        msg = f"torch.onnx.export failed: {exc}"
        raise ExportError(msg) from exc
    proto = program.model_proto
    proto.doc_string = doc
    onnx.checker.check_model(proto, full_check=True)
    problems = tensorrt_problems(proto) if tensorrt_check else []
    if problems:
        msg = "the exported graph would not build in TensorRT 10: " + "; ".join(problems)
        raise ExportError(msg)
    bundle_mod.atomic_write_bytes(path, proto.SerializeToString())
    return path


def parity_images(
    meta: dict[str, Any], size: tuple[int, int], n: int = 4, images_dir: Path | None = None
) -> np.ndarray:
    """Real images for the parity check: a folder given, else the training data, else synthetic parts."""
    from engines.data import good_training_images, list_images, load_images

    paths: list[Path] = []
    if images_dir is not None:
        paths = list_images(images_dir)[:n]
        if not paths:
            msg = f"no images in {images_dir} for the parity check"
            raise ExportError(msg)
    else:
        data = meta.get("training", {}).get("data")
        if data and Path(data).exists():
            try:
                paths = good_training_images(Path(data))[:n]
            except ValueError:
                paths = []
    if paths:
        return load_images(paths, size)
    from engines.data import preprocess
    from engines.synthetic import render

    rng = np.random.default_rng(0)
    parts = [render(rng, max(size), d)[0] for d in (None, "scratch", "spot", "dent")][:n]
    return np.stack([preprocess(p[..., ::-1].copy(), size) for p in parts])  # render is RGB, preprocess reads BGR


def _compare_with_torch(
    model: KDModel, images: np.ndarray, o_map: np.ndarray, o_score: np.ndarray, atol: float, what: str
) -> dict[str, float]:
    """Max |difference| of a runtime's outputs against torch fp32; ExportError beyond ``atol``."""
    with torch.no_grad():
        # the trained module itself (live SSPCAB corners), not the frozen copy the export traced
        t_map, t_score = model.eval()(to_float_nchw(torch.from_numpy(images)))
    d_map = float(np.abs(o_map - t_map.numpy()).max())
    d_score = float(np.abs(o_score - t_score.numpy()).max())
    if not (d_map <= atol and d_score <= atol):
        msg = (
            f"{what} parity check failed: max |map diff| {d_map:.2e}, max |score diff| {d_score:.2e} "
            f"(limit {atol:.0e}) on {len(images)} images"
        )
        raise ExportError(msg)
    return {"max_abs_map": d_map, "max_abs_score": d_score, "n_images": len(images)}


def check_parity(model: KDModel, onnx_path: Path, images: np.ndarray) -> dict[str, float]:
    """Run the graph in ONNX Runtime and torch on the same images; raise when they differ."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        msg = "the parity check needs onnxruntime: pip install 'lineinspect[ort]'"
        raise ExportError(msg) from exc
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    o_map, o_score = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    return _compare_with_torch(model, images, o_map, o_score, MAP_ATOL, "ONNX")


FP16_ATOL = 0.1  # fp16 networks against torch fp32, on the normalised map (good pixels ~ N(0, 1))


def check_parity_fp16(model: KDModel, onnx_path: Path, images: np.ndarray) -> dict[str, float]:
    """The fp16 graph in OpenVINO (ONNX Runtime's CPU provider has no fp16 convolutions) vs torch fp32."""
    try:
        import openvino as ov
    except ImportError as exc:
        msg = "checking the fp16 graph needs openvino: pip install 'lineinspect[openvino]'"
        raise ExportError(msg) from exc
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled.create_infer_request().infer({0: images})
    o_map, o_score = res[compiled.output("anomaly_map")], res[compiled.output("score")]
    return _compare_with_torch(model, images, o_map, o_score, FP16_ATOL, "fp16 graph") | {"atol": FP16_ATOL}


def export_bundle(bundle: Path, images_dir: Path | None = None, opset: int = OPSET, fp16_graph: bool = False) -> Path:
    """Export ``bundle/model.onnx``, verify it against torch, record its sha256 in model.json."""
    from engines.train import load_bundle_model

    bundle = Path(bundle)
    meta = bundle_mod.read_meta(bundle)
    model = load_bundle_model(bundle, device="cpu")
    size = model.cfg.input_hw()
    fd, tmp_name = tempfile.mkstemp(dir=bundle, prefix=".model.", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(model, tmp, opset)
        parity = check_parity(model, tmp, parity_images(meta, size, images_dir=images_dir))
        final = bundle / bundle_mod.MODEL_ONNX
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    meta["onnx"] = {
        "file": bundle_mod.MODEL_ONNX,
        "sha256": bundle_mod.sha256_file(final),
        "opset": opset,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", *size, 3]},
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": ["batch", *size]},
            "score": {"dtype": "float32", "shape": ["batch"]},
        },
        "parity": parity | {"atol": MAP_ATOL, "reference": "torch fp32"},
        "exported_at": bundle_mod.utc_now(),
        "torch": torch.__version__,
    }
    meta["onnx_fp16"] = None
    meta["openvino_int8"] = None  # quantised from the previous export: re-run 'lineinspect quantize'
    if fp16_graph:
        final16 = bundle / "model_fp16.onnx"
        tmp16 = bundle / ".model_fp16.onnx.tmp"
        try:
            export_onnx(model, tmp16, opset, fp16=True)
            parity16 = check_parity_fp16(model, tmp16, parity_images(meta, size, images_dir=images_dir))
            os.replace(tmp16, final16)
        finally:
            tmp16.unlink(missing_ok=True)
        meta["onnx_fp16"] = {
            "file": final16.name,
            "sha256": bundle_mod.sha256_file(final16),
            "for_onnx_sha256": meta["onnx"]["sha256"],
            "parity": parity16 | {"reference": "torch fp32", "checked_with": "openvino f32 execution"},
        }
    bundle_mod.write_meta(bundle, meta)
    return final


def main_export(args) -> int:
    try:
        path = export_bundle(Path(args.bundle), Path(args.images) if args.images else None, fp16_graph=args.fp16_graph)
    except (ExportError, bundle_mod.BundleError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = bundle_mod.read_meta(Path(args.bundle))
    p = meta["onnx"]["parity"]
    print(
        f"exported {path} (sha256 {meta['onnx']['sha256'][:12]}..., {path.stat().st_size / 1e6:.1f} MB); "
        f"parity vs torch: max |map diff| {p['max_abs_map']:.1e}, max |score diff| {p['max_abs_score']:.1e}"
    )
    return 0
