"""INT8 for OpenVINO: post-training quantisation of the exported graph on good-part images (NNCF).

    lineinspect quantize --bundle B [--images GOOD_DIR] [--n-images 300]

Writes ``model_int8.xml`` + ``model_int8.bin`` (OpenVINO IR) into the bundle and records them in
model.json under ``openvino_int8`` (file hashes, the ONNX export they come from, the images used
and how far the int8 outputs land from f32 on held-out good images). The runtime loads them with
``openvino`` precision ``int8``, and refuses them once the ONNX export they came from is replaced.

Only the two networks' dense convolutions are quantised (weights per channel, activations per
tensor); in a bundle with a global term (the default since stop 17) only the student's: the
teacher, the term and the score's sums stay in floating point (``FLOAT_SCOPES``). Depthwise
convolutions and the map head (cosine distances, SimAM statistics, resizes as matrix products,
smoothing, score) stay in floating point: bf16 on CPUs that have it, else f32. On CPUs without
bf16 (most line PCs) int8 was the fast path before the global term (-37 % against f32 on the
benchmark CPU, both networks quantised; not re-measured with the teacher in float); where bf16
exists it was 10 % faster than bf16 alone there in normal runs (4.91 against 5.48 ms at batch 1)
and 10 % slower in the VM's slow spells. It moves the scores more than bf16 does
(``benchmarks/backend_accuracy.py`` has the table), so it is opt-in and the station must be
calibrated with it (calibration records the precision and the service warns when they differ).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engines import bundle as bundle_mod
from engines.runtime.base import ModelFileError, artifact_checked, onnx_path_checked

log = logging.getLogger(__name__)

INT8_XML = "model_int8.xml"
INT8_BIN = "model_int8.bin"
MIN_IMAGES = 32
HEAD_OPS = ("MatMul", "Multiply", "ReduceL2", "ReduceSum", "ReduceMean")
# Depthwise convolutions stay in floating point too: OpenVINO's CPU plugin ran them in bf16 on
# fake-quantised inputs anyway (no int8 kernel picked), so quantising them only added error and
# reorders (int8 at batch 1: 5.00 -> 4.87 ms without them, on the benchmark CPU).
NOT_QUANTISED = (*HEAD_OPS, "GroupConvolution")
# With a global term, these modules (exporter namespaces) stay in floating point: the term's
# Mahalanobis distance magnifies the good parts' least-varying feature directions, so int8 teacher
# features moved it so far that magnetic_tile's image AUROC fell from 0.949 (f32) to 0.669; with
# the teacher and the term in floating point (and the sums below) int8 scored 0.965 (bf16 0.959).
FLOAT_SCOPES = ("model.global_term", "model.teacher")
# ... and with a global term, the elementwise sums and differences too: NNCF quantised the inputs
# of the score's standardisation and maximum, and every part scored the same
GLOBAL_TERM_FLOAT_TYPES = ("Add", "Subtract")
HELD_OUT = 16  # good images kept out of the statistics to measure the int8 deviation on


class QuantizeError(RuntimeError):
    """Quantisation could not be done; the message says what to do."""


def calibration_images(meta: dict[str, Any], size: tuple[int, int], images_dir: Path | None, n: int) -> np.ndarray:
    """Good-part images: the folder given, else the bundle's training data. Spread over the folder."""
    from engines.data import DatasetError, good_training_images, list_images, load_images

    if images_dir is not None:
        if not Path(images_dir).is_dir():
            msg = f"image folder not found: {images_dir}"
            raise QuantizeError(msg)
        paths = list_images(Path(images_dir))
        source = str(images_dir)
    else:
        data = (meta.get("training") or {}).get("data")
        if not data or not Path(data).exists():
            msg = "the bundle's training data is not here; pass --images with a folder of good-part images"
            raise QuantizeError(msg)
        try:
            paths = good_training_images(Path(data))
        except DatasetError as exc:
            raise QuantizeError(str(exc)) from exc
        source = str(data)
    if len(paths) < MIN_IMAGES:
        msg = f"{source}: int8 quantisation needs at least {MIN_IMAGES} good images, found {len(paths)}"
        raise QuantizeError(msg)
    if len(paths) > n:
        pick = np.linspace(0, len(paths) - 1, n).round().astype(int)
        paths = [paths[i] for i in pick]
    return load_images(paths, size)


def _int8_deviation(f32, int8, images: np.ndarray) -> dict[str, float]:
    """Largest |map| and |score| difference of the int8 model from f32 on ``images``."""
    out = {}
    for name, compiled in (("f32", f32), ("int8", int8)):
        req = compiled.create_infer_request()
        maps, scores = [], []
        for x in images:
            res = req.infer({0: x[None]})
            maps.append(np.array(res[compiled.output("anomaly_map")][0]))
            scores.append(float(res[compiled.output("score")][0]))
        out[name] = (np.stack(maps), np.array(scores))
    if not (np.isfinite(out["int8"][0]).all() and np.isfinite(out["int8"][1]).all()):
        msg = "the int8 model gives non-finite outputs on good images; keep f32/bf16 for this model"
        raise QuantizeError(msg)
    d_map = np.abs(out["int8"][0] - out["f32"][0])
    d_score = np.abs(out["int8"][1] - out["f32"][1])
    return {
        "max_abs_map": round(float(d_map.max()), 4),
        "p99_abs_map": round(float(np.quantile(d_map, 0.99)), 4),
        "max_abs_score": round(float(d_score.max()), 4),
        "median_abs_score": round(float(np.median(d_score)), 4),
        "n_images": len(images),
    }


def nodes_under(onnx_path: Path, scopes: tuple[str, ...]) -> list[str]:
    """Names of the ONNX nodes the exporter recorded under any of the modules ``scopes`` (their
    ``namespace`` metadata), from one read of the file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [
        n.name
        for n in model.graph.node
        if any(p.key == "namespace" and any(f"/{sc}:" in p.value for sc in scopes) for p in n.metadata_props)
    ]


def float_scope_patterns(onnx_path: Path, scopes: tuple[str, ...] = FLOAT_SCOPES) -> list[str]:
    """Patterns (OpenVINO names a node after its ONNX node, with suffixes such as ``/WithoutBiases``)
    for the nodes of the modules that stay in floating point in a bundle with a global term."""
    import re

    return [f"^{re.escape(name)}(/.*)?$" for name in nodes_under(onnx_path, scopes)]


def quantize_bundle(bundle: Path, images_dir: Path | None = None, n_images: int = 300, seed: int = 0) -> Path:
    """Quantise ``bundle/model.onnx`` to an int8 OpenVINO IR in the bundle; returns the .xml path."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        msg = f"int8 quantisation needs nncf and openvino ({exc}); install: pip install 'lineinspect[int8]'"
        raise QuantizeError(msg) from exc
    bundle = Path(bundle)
    meta = bundle_mod.read_meta(bundle)
    onnx_path = onnx_path_checked(bundle, meta)
    size = bundle_mod.input_hw(meta)
    images = calibration_images(meta, size, images_dir, n_images + HELD_OUT)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    held_out, stats = images[order[:HELD_OUT]], images[order[HELD_OUT:]]

    has_global = bool(meta["net"].get("global_taps"))
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    nncf.set_log_level(logging.ERROR)
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(stats), lambda x: x[None]),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(stats),
            fast_bias_correction=True,
            # The map head stays in floating point: quantising the inputs of its products and
            # reductions (cosine distances, SimAM) tripled the int8 error on the map (mean |diff|
            # from f32 0.32 without them, 1.0 with them, on magnetic_tile) for no gain in speed.
            ignored_scope=nncf.IgnoredScope(
                types=list(NOT_QUANTISED) + (list(GLOBAL_TERM_FLOAT_TYPES) if has_global else []),
                patterns=float_scope_patterns(onnx_path) if has_global else [],
                validate=False,
            ),
        )
    except Exception as exc:
        msg = f"nncf could not quantise {onnx_path}: {str(exc).strip().splitlines()[0]}"
        raise QuantizeError(msg) from exc

    from engines.runtime.openvino import int8_float_precision

    def compiled(m, hint):
        m = m.clone()
        m.reshape({m.input(0).any_name: [1, *size, 3]})
        return core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": hint})

    # measured as the runtime will run it (head in bf16 where this CPU has it) against exact f32
    deviation = _int8_deviation(compiled(model, "f32"), compiled(quantized, int8_float_precision(core)), held_out)

    xml, bin_ = bundle / INT8_XML, bundle / INT8_BIN
    tmp_xml = bundle / f".{INT8_XML}.{os.getpid()}.tmp.xml"
    tmp_bin = tmp_xml.with_suffix(".bin")
    try:
        ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_bin, bin_)
        # the .xml does not name its .bin: OpenVINO reads the .bin with the .xml's stem
        os.replace(tmp_xml, xml)
    finally:
        tmp_xml.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
    meta["openvino_int8"] = {
        "xml": INT8_XML,
        "bin": INT8_BIN,
        "xml_sha256": bundle_mod.sha256_file(xml),
        "bin_sha256": bundle_mod.sha256_file(bin_),
        "for_onnx_sha256": meta["onnx"]["sha256"],
        "calibration_images": {"n": len(stats), "source": str(images_dir or meta["training"]["data"])},
        "scheme": "nncf PERFORMANCE preset: int8 convolutions, per-channel weights, per-tensor activations; "
        f"not quantised: {', '.join(NOT_QUANTISED + (GLOBAL_TERM_FLOAT_TYPES if has_global else ()))}"
        + (f", modules {', '.join(FLOAT_SCOPES)}" if has_global else "")
        + " (the map head and depthwise convolutions: bf16 where the "
        "CPU has it, else f32)",
        "deviation_from_f32": deviation,
        "nncf": nncf.__version__,
        "openvino": ov.__version__,
        "quantized_at": bundle_mod.utc_now(),
    }
    bundle_mod.write_meta(bundle, meta)
    return xml


def int8_paths_checked(bundle: Path, meta: dict[str, Any], verify_sha: bool = True) -> Path:
    """The int8 IR's .xml, checked against model.json and against the current ONNX export."""
    if not meta.get("openvino_int8"):
        msg = (
            f"{bundle} has no int8 model: run 'lineinspect quantize --bundle {bundle}' first "
            "(it needs nncf: pip install 'lineinspect[int8]')"
        )
        raise ModelFileError(msg)
    return artifact_checked(bundle, meta, "openvino_int8", verify_sha)[0]


def main_quantize(args) -> int:
    try:
        xml = quantize_bundle(Path(args.bundle), Path(args.images) if args.images else None, args.n_images)
    except (QuantizeError, ModelFileError, bundle_mod.BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = bundle_mod.read_meta(Path(args.bundle))["openvino_int8"]["deviation_from_f32"]
    print(
        f"int8 model written to {xml}; on {d['n_images']} held-out good images it differs from f32 by up to "
        f"{d['max_abs_map']:.3g} on the map and {d['max_abs_score']:.3g} on the score "
        f"(median {d['median_abs_score']:.3g}); calibrate the station with precision int8"
    )
    return 0
