"""Runtimes behind one interface (numpy in, numpy out). Each SDK is imported only when chosen.

    rt = load_runtime("onnxruntime", "path/to/bundle")
    out = rt(batch_uint8_nhwc)        # {"anomaly_map": (N,H,W) float32, "score": (N,) float32}

The registry is explicit: a backend name maps to the module that implements it, the SDK it needs
and the pip extra that installs that SDK. A missing SDK raises ``SDKMissingError`` naming both.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engines import bundle as bundle_mod
from engines.runtime.base import InputError, ModelFileError, Runtime, SDKMissingError

__all__ = [
    "BACKENDS",
    "InputError",
    "ModelFileError",
    "Runtime",
    "SDKMissingError",
    "load_runtime",
]


@dataclass(frozen=True)
class Backend:
    module: str
    cls: str
    sdk: tuple[str, ...]  # modules the backend imports
    extra: str  # pip extra that installs them
    summary: str


BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend(
        "engines.runtime.ort",
        "OnnxRuntime",
        ("onnxruntime",),
        "ort",
        "ONNX Runtime (CPU; CUDA provider when present)",
    ),
    "openvino": Backend(
        "engines.runtime.openvino",
        "OpenVinoRuntime",
        ("openvino",),
        "openvino",
        "OpenVINO (CPU, f32 by default)",
    ),
    "tensorrt": Backend(
        "engines.runtime.tensorrt", "TensorRTRuntime", ("tensorrt",), "trt", "TensorRT plan built on this GPU"
    ),
    "torch": Backend(
        "engines.runtime.torch_rt", "TorchRuntime", ("torch",), "train", "torch (CUDA graphs + fp16 on a GPU)"
    ),
}


def _import_sdk(name: str, backend: Backend) -> None:
    for mod in backend.sdk:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            msg = (
                f"runtime backend '{name}' needs the Python package '{mod}', which is not importable here "
                f"({exc}); install it with: pip install 'lineinspect[{backend.extra}]'"
            )
            raise SDKMissingError(msg) from exc


def load_runtime(name: str, bundle: str | Path, **options: Any) -> Runtime:
    """Load ``bundle`` with the backend ``name``; options go to the backend (threads, device, ...)."""
    if name not in BACKENDS:
        msg = f"unknown runtime backend {name!r}; choose one of: {', '.join(BACKENDS)}"
        raise ValueError(msg)
    backend = BACKENDS[name]
    meta = bundle_mod.read_meta(Path(bundle))
    _import_sdk(name, backend)
    module = importlib.import_module(backend.module)
    cls = getattr(module, backend.cls)
    return cls(Path(bundle), meta, **options)
