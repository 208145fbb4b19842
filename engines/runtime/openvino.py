"""OpenVINO backend (CPU). f32 by default: this CPU would otherwise pick bf16; bf16 is opt-in."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from engines.runtime.base import ModelFileError, Runtime, onnx_path_checked

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(
        self,
        bundle: Path,
        meta: dict[str, Any],
        device: str = "CPU",
        precision: str = "f32",
        threads: int | None = None,
        verify_sha: bool = True,
    ):
        super().__init__(bundle, meta)
        if precision not in PRECISIONS:
            msg = (
                f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r} "
                "(int8 needs a quantized model, which this project does not produce yet)"
            )
            raise ValueError(msg)
        path = onnx_path_checked(self.bundle, meta, verify_sha)
        core = ov.Core()
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or (os.cpu_count() or 1)),
        }
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, device.upper(), config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            msg = f"openvino could not load {path} on {device}: {str(exc).strip().splitlines()[0]}"
            raise ModelFileError(msg) from exc
        self.precision = precision
        self._device = device.lower()
        self.request = self.compiled.create_infer_request()
        self._map_port = self.compiled.output("anomaly_map")
        self._score_port = self.compiled.output("score")

    @property
    def device(self) -> str:
        return f"{self._device} ({self.precision})"

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self.request.infer({0: batch})
        # copy: the request reuses its output tensors on the next call
        return np.array(res[self._map_port], copy=True), np.array(res[self._score_port], copy=True)
