"""TensorRT backend: build a plan ON the target GPU from model.onnx, and run it.

Written against the TensorRT 10 Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) and TensorRT 11 (strongly typed networks only: the
FP16/INT8 builder flags and the implicit INT8 calibrator are gone). Buffers come from pycuda
(cuda-python as fallback): page-locked host arrays and device buffers allocated once for the
largest batch of the optimisation profile, one stream.

NOT RUN in this project's CI: TensorRT cannot be installed on the build machines. The code is
exercised there against a test double of the TensorRT and pycuda APIs (tests/engines/runtime/
fake_tensorrt.py, named as such) that executes the ONNX graph with ONNX Runtime.

Plans are named ``model-<gpu>-trt<version>-<onnx sha256[:16]>-<precision>.plan`` with a JSON
sidecar (same name + ``.json``) holding the full metadata and the plan's own sha256. The runtime
refuses a plan whose GPU, TensorRT version or ONNX hash differs, or whose bytes are corrupt, and
says how to rebuild; a stale plan is never used silently.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorrt as trt

from engines import bundle as bundle_mod
from engines.runtime.base import ModelFileError, Runtime, artifact_checked, onnx_path_checked
from engines.runtime.cuda_mem import make_cuda

log = logging.getLogger(__name__)

ENGINE_DIR = "engines"
PRECISIONS = ("fp32", "fp16", "int8")
INPUT = "image"
OUTPUTS = ("anomaly_map", "score")


class _Logger(trt.ILogger):
    """Routes TensorRT messages to Python logging."""

    _levels: ClassVar[dict] = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    def __init__(self) -> None:
        trt.ILogger.__init__(self)
        self.errors: list[str] = []

    def log(self, severity, msg):
        level = self._levels.get(severity, logging.INFO)
        if level >= logging.ERROR:
            self.errors.append(msg)
        log.log(level, "tensorrt: %s", msg)


def trt_major() -> int:
    return int(trt.__version__.split(".")[0])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def engine_stem(gpu_name: str, trt_version: str, onnx_sha: str, precision: str) -> str:
    return f"model-{slug(gpu_name)}-trt{trt_version}-{onnx_sha[:16]}-{precision}"


def engine_paths(bundle: Path, gpu_name: str, onnx_sha: str, precision: str) -> tuple[Path, Path]:
    stem = engine_stem(gpu_name, trt.__version__, onnx_sha, precision)
    d = Path(bundle) / ENGINE_DIR
    return d / f"{stem}.plan", d / f"{stem}.plan.json"


def _fp16_graph(bundle: Path, meta: dict[str, Any]) -> Path:
    if not meta.get("onnx_fp16"):
        msg = (
            f"TensorRT {trt.__version__} builds only strongly typed networks: --fp16 needs the fp16 graph; "
            f"run 'lineinspect export --bundle {bundle} --fp16-graph' first"
        )
        raise ModelFileError(msg)
    return artifact_checked(bundle, meta, "onnx_fp16")[0]


class _EntropyCalibrator(trt.IInt8EntropyCalibrator2 if hasattr(trt, "IInt8EntropyCalibrator2") else object):
    """TensorRT 10 implicit INT8 calibration on good-part images (uint8 NHWC batches)."""

    def __init__(self, images: np.ndarray, batch: int, cuda, cache: Path):
        super().__init__()
        self.images = images
        self.batch = batch
        self.cuda = cuda
        self.cache = cache
        self.i = 0
        self.host = cuda.host_array((batch, *images.shape[1:]), np.uint8)
        self.dev = cuda.device_alloc(self.host.nbytes)

    def get_batch_size(self) -> int:
        return self.batch

    def get_batch(self, names):
        if self.i + self.batch > len(self.images):
            return None
        self.host[:] = self.images[self.i : self.i + self.batch]
        self.i += self.batch
        self.cuda.htod(self.dev, self.host)
        self.cuda.synchronize()
        return [self.dev]

    def read_calibration_cache(self):
        return self.cache.read_bytes() if self.cache.is_file() else None

    def write_calibration_cache(self, cache) -> None:
        bundle_mod.atomic_write_bytes(self.cache, bytes(cache))


@dataclass(frozen=True)
class BuildSpec:
    """What one engine build needs, decided by ``build_engine`` before any TensorRT call."""

    onnx_path: Path
    size: tuple[int, int]  # the input's (height, width)
    precision: str
    strongly_typed: bool
    workspace_mb: int
    opt_batch: int
    max_batch: int
    calib_dir: Path | None
    plan_path: Path
    gpu: str


def _build(cuda, logger, spec: BuildSpec) -> tuple[bytes, Path, bytes]:
    """The TensorRT builder calls proper (inside the CUDA context)."""
    with cuda:
        builder = trt.Builder(logger)
        flags = 0
        if spec.strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(spec.onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            msg = f"TensorRT could not parse {spec.onnx_path}: {errs}"
            raise ModelFileError(msg)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mb) << 20)
        profile = builder.create_optimization_profile()
        shape = (*spec.size, 3)
        profile.set_shape(INPUT, (1, *shape), (spec.opt_batch, *shape), (spec.max_batch, *shape))
        config.add_optimization_profile(profile)
        if not spec.strongly_typed and spec.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        calibrator = None
        if spec.precision == "int8":  # TensorRT 10 only (checked above)
            if spec.calib_dir is None:
                msg = "--int8 needs --calib-dir with good-part images for calibration"
                raise ValueError(msg)
            from engines.data import list_images, load_images

            paths = list_images(Path(spec.calib_dir))
            if len(paths) < 8:
                msg = f"{spec.calib_dir}: INT8 calibration needs at least 8 good images, found {len(paths)}"
                raise ValueError(msg)
            images = load_images(paths[:512], spec.size)
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)  # layers INT8 cannot take fall back to fp16
            calibrator = _EntropyCalibrator(images, min(8, spec.max_batch), cuda, spec.plan_path.with_suffix(".calib"))
            config.int8_calibrator = calibrator
            cal_profile = builder.create_optimization_profile()
            cb = (calibrator.batch, *shape)
            cal_profile.set_shape(INPUT, cb, cb, cb)
            config.set_calibration_profile(cal_profile)
        cache_path = spec.plan_path.parent / f"timing-{slug(spec.gpu)}-trt{trt.__version__}.cache"
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            msg = (
                f"TensorRT failed to build the engine from {spec.onnx_path}: {'; '.join(logger.errors) or 'no details'}"
            )
            raise ModelFileError(msg)
        return bytes(serialized), cache_path, bytes(config.get_timing_cache().serialize())


def build_engine(
    bundle: Path,
    precision: str = "fp16",
    calib_dir: Path | None = None,
    workspace_mb: int = 1024,
    max_batch: int = 16,
    opt_batch: int = 1,
    device_index: int = 0,
) -> Path:
    """Build the plan for this GPU and TensorRT version; returns its path (sidecar JSON beside it)."""
    bundle = Path(bundle)
    if precision not in PRECISIONS:
        msg = f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        raise ValueError(msg)
    if not 1 <= opt_batch <= max_batch:
        msg = f"need 1 <= opt_batch <= max_batch, got {opt_batch} and {max_batch}"
        raise ValueError(msg)
    meta = bundle_mod.read_meta(bundle)
    onnx_path = onnx_path_checked(bundle, meta)
    onnx_sha = meta["onnx"]["sha256"]
    size = bundle_mod.input_hw(meta)
    major = trt_major()
    if major < 10:
        msg = f"TensorRT {trt.__version__} is too old: lineinspect needs TensorRT 10 or newer"
        raise ModelFileError(msg)
    strongly_typed = major >= 11
    if strongly_typed and precision == "int8":
        msg = (
            f"TensorRT {trt.__version__} removed implicit INT8 calibration: INT8 needs an explicitly "
            "quantized (Q/DQ) ONNX graph, which lineinspect does not produce yet; use --fp16"
        )
        raise ModelFileError(msg)
    if strongly_typed and precision == "fp16":
        onnx_path = _fp16_graph(bundle, meta)

    cuda = make_cuda(device_index)
    gpu = cuda.device_name()
    capability = list(cuda.compute_capability())
    plan_path, info_path = engine_paths(bundle, gpu, onnx_sha, precision)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _Logger()
    t0 = time.perf_counter()
    try:
        spec = BuildSpec(
            onnx_path=onnx_path,
            size=size,
            precision=precision,
            strongly_typed=strongly_typed,
            workspace_mb=workspace_mb,
            opt_batch=opt_batch,
            max_batch=max_batch,
            calib_dir=calib_dir,
            plan_path=plan_path,
            gpu=gpu,
        )
        plan, cache_path, cache_bytes = _build(cuda, logger, spec)
    finally:
        cuda.free()
    bundle_mod.atomic_write_bytes(cache_path, cache_bytes)
    bundle_mod.atomic_write_bytes(plan_path, plan)
    info = {
        "gpu": gpu,
        "compute_capability": capability,
        "tensorrt": trt.__version__,
        "onnx_sha256": onnx_sha,
        "onnx_file": onnx_path.name,
        "precision": precision,
        "strongly_typed": strongly_typed,
        "min_batch": 1,
        "opt_batch": opt_batch,
        "max_batch": max_batch,
        "input": {"name": INPUT, "dtype": "uint8", "layout": "NHWC", "size": list(size)},
        "plan_sha256": bundle_mod.sha256_file(plan_path),
        "built_at": bundle_mod.utc_now(),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    bundle_mod.atomic_write_bytes(info_path, (json.dumps(info, indent=2) + "\n").encode())
    return plan_path


def check_plan(bundle: Path, meta: dict[str, Any], gpu: str, precision: str) -> tuple[Path, dict[str, Any]]:
    """The plan for this GPU / TensorRT / ONNX / precision, verified; else an error saying why and how."""
    onnx_meta = meta.get("onnx") or {}
    onnx_sha = onnx_meta.get("sha256")
    if not onnx_sha:
        msg = f"{bundle} has no exported graph: run 'lineinspect export --bundle {bundle}' first"
        raise ModelFileError(msg)
    plan_path, info_path = engine_paths(bundle, gpu, onnx_sha, precision)
    rebuild = f"lineinspect build-engine --bundle {bundle}" + {"fp16": " --fp16", "int8": " --int8"}.get(precision, "")
    if not plan_path.is_file() or not info_path.is_file():
        others = sorted(p.name for p in (Path(bundle) / ENGINE_DIR).glob("*.plan"))
        why = (
            f"found only {', '.join(others)} (another GPU, TensorRT version, model export or precision)"
            if others
            else "no engine has been built"
        )
        msg = (
            f"no TensorRT engine for {gpu}, TensorRT {trt.__version__}, this model and {precision}: {why}; "
            f"run: {rebuild}"
        )
        raise ModelFileError(msg)
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        msg = f"{info_path} is unreadable ({exc}); run: {rebuild}"
        raise ModelFileError(msg) from exc
    expected = {"gpu": gpu, "tensorrt": trt.__version__, "onnx_sha256": onnx_sha, "precision": precision}
    stale = {k: (info.get(k), v) for k, v in expected.items() if info.get(k) != v}
    if stale:
        diffs = ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in stale.items())
        msg = f"stale TensorRT engine {plan_path.name}: {diffs}; run: {rebuild}"
        raise ModelFileError(msg)
    if bundle_mod.sha256_file(plan_path) != info.get("plan_sha256"):
        msg = f"{plan_path} is corrupt or truncated (sha256 differs from {info_path.name}); run: {rebuild}"
        raise ModelFileError(msg)
    return plan_path, info


class TensorRTRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, bundle: Path, meta: dict[str, Any], precision: str = "fp16", device: int = 0, cuda=None):
        super().__init__(bundle, meta)
        if precision not in PRECISIONS:
            msg = f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            raise ValueError(msg)
        self.cuda = cuda or make_cuda(device)
        self.gpu = self.cuda.device_name()
        self.precision = precision
        plan_path, info = check_plan(self.bundle, meta, self.gpu, precision)
        self.logger = _Logger()
        self._lock = threading.Lock()
        with self.cuda:
            self.trt_runtime = trt.Runtime(self.logger)
            self.engine = self.trt_runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                msg = (
                    f"TensorRT could not deserialize {plan_path}: {'; '.join(self.logger.errors) or 'no details'}; "
                    f"rebuild it with lineinspect build-engine --bundle {bundle}"
                )
                raise ModelFileError(msg)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                msg = f"TensorRT could not create an execution context for {plan_path} (GPU memory?)"
                raise ModelFileError(msg)
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            expected = {INPUT, *OUTPUTS}
            if set(names) != expected:
                msg = f"{plan_path} has I/O tensors {sorted(names)}, expected {sorted(expected)}; rebuild it"
                raise ModelFileError(msg)
            if self.engine.get_tensor_mode(INPUT) != trt.TensorIOMode.INPUT:
                msg = f"{plan_path}: tensor {INPUT!r} is not an input"
                raise ModelFileError(msg)
            # the profile's largest batch sizes every buffer, allocated once
            _, _, max_shape = self.engine.get_tensor_profile_shape(INPUT, 0)
            self.max_batch = int(max_shape[0])
            self.host: dict[str, np.ndarray] = {}
            self.dev: dict[str, int] = {}
            per_image = {INPUT: (*self.size, 3), "anomaly_map": self.size, "score": ()}
            for name in names:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = (self.max_batch, *per_image[name])
                self.host[name] = self.cuda.host_array(shape, dtype)
                self.dev[name] = self.cuda.device_alloc(self.host[name].nbytes)
                if not self.context.set_tensor_address(name, self.dev[name]):
                    msg = f"TensorRT refused the device address for tensor {name!r}"
                    raise ModelFileError(msg)
            if self.host[INPUT].dtype != np.uint8:
                msg = f"{plan_path}: input dtype {self.host[INPUT].dtype}, expected uint8; rebuild it"
                raise ModelFileError(msg)
        self.info = info

    @property
    def device(self) -> str:
        return f"cuda ({self.gpu}, TensorRT {trt.__version__}, {self.precision})"

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        if n > self.max_batch:
            msg = f"batch {n} exceeds the engine's maximum {self.max_batch}; rebuild with a larger --max-batch"
            raise ValueError(msg)
        with self._lock, self.cuda:
            self.host[INPUT][:n] = batch
            if not self.context.set_input_shape(INPUT, (n, *self.size, 3)):
                msg = f"TensorRT rejected input shape {(n, *self.size, 3)}"
                raise RuntimeError(msg)
            self.cuda.htod(self.dev[INPUT], self.host[INPUT][:n])
            if not self.context.execute_async_v3(self.cuda.stream_handle):
                msg = "TensorRT execute_async_v3 failed: " + ("; ".join(self.logger.errors[-3:]) or "no details")
                raise RuntimeError(msg)
            for name in OUTPUTS:
                self.cuda.dtoh(self.host[name][:n], self.dev[name])
            self.cuda.synchronize()
            return self.host["anomaly_map"][:n].astype(np.float32), self.host["score"][:n].astype(np.float32)

    def close(self) -> None:
        with self.cuda:
            self.context = None
            self.engine = None
        self.cuda.free()


def main_build_engine(args) -> int:
    precision = "int8" if args.int8 else ("fp16" if args.fp16 else "fp32")
    try:
        path = build_engine(
            Path(args.bundle),
            precision=precision,
            calib_dir=Path(args.calib_dir) if args.calib_dir else None,
            workspace_mb=args.workspace_mb,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            device_index=args.gpu,
        )
    except (ModelFileError, ValueError, bundle_mod.BundleError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"TensorRT engine written to {path}")
    return 0
