"""ONNX Runtime backend: CPU, or the CUDA execution provider when the installed build has it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from engines.runtime.base import ModelFileError, Runtime

log = logging.getLogger(__name__)


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(
        self,
        bundle: Path,
        meta: dict[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        verify_sha: bool = True,
    ):
        super().__init__(bundle, meta)
        from engines.runtime.base import onnx_path_checked

        path = onnx_path_checked(self.bundle, meta, verify_sha)
        if device not in ("cpu", "cuda"):
            msg = f"onnxruntime device must be 'cpu' or 'cuda', got {device!r}"
            raise ValueError(msg)
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                msg = (
                    "onnxruntime device 'cuda' requested but this onnxruntime build has no CUDA provider "
                    f"(available: {', '.join(available)}); install onnxruntime-gpu or use device 'cpu'"
                )
                raise ModelFileError(msg)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            msg = f"onnxruntime could not load {path}: {exc}"
            raise ModelFileError(msg) from exc
        self._device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._input = self.session.get_inputs()[0].name
        self._outputs = ["anomaly_map", "score"]

    @property
    def device(self) -> str:
        return self._device

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.session.run(self._outputs, {self._input: batch})
        return amap, score
