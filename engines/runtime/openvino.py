"""OpenVINO backend (CPU). f32 by default (this CPU would otherwise pick bf16); bf16 and int8 are opt-in.

int8 runs the IR that ``lineinspect quantize`` wrote into the bundle (engines/quantize.py); its
non-quantised part (the map head) runs in bf16 where the CPU has it, else f32.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from engines.runtime.base import ModelFileError, Runtime, onnx_path_checked

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16", "int8")


def int8_float_precision(core: ov.Core, device: str = "CPU") -> str:
    """What an int8 model's unquantised part (the map head) runs in: bf16 where the CPU has it, else f32.

    On the benchmark CPU (AVX-512 bf16) this took int8 from 5.2 to 4.8 ms at batch 1 in ad-hoc runs; the map head is
    where bf16 rounds (scores within ~0.4 of f32 for bf16 alone, against the int8 convolutions' ~4).
    """
    try:
        caps = core.get_property(device.upper(), "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a device that does not report capabilities: stay exact
        return "f32"
    return "bf16" if "BF16" in caps else "f32"


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
            msg = f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
            raise ValueError(msg)
        path = onnx_path_checked(self.bundle, meta, verify_sha)
        if precision == "int8":
            from engines.quantize import int8_paths_checked

            path = int8_paths_checked(self.bundle, meta, verify_sha)
        self.core = ov.Core()
        self.float_precision = int8_float_precision(self.core, device) if precision == "int8" else precision
        self.config = {
            "INFERENCE_PRECISION_HINT": self.float_precision,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads or (os.cpu_count() or 1)),
        }
        self.path = path
        self.precision = precision
        self._device = device.upper()
        try:
            self.model = self.core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            msg = f"openvino could not load {path}: {str(exc).strip().splitlines()[0]}"
            raise ModelFileError(msg) from exc
        self._input_name = self.model.input(0).any_name
        # One compiled model per batch size, with that batch fixed: OpenVINO's CPU plugin runs a
        # static shape measurably faster than the dynamic batch (about 15 % at batch 1 here).
        # Batch 1 (the line's case) is compiled now, so a broken model fails at load; other sizes
        # on first use, the most recent few kept.
        self._compiled: OrderedDict[int, tuple[Any, Any, Any, Any]] = OrderedDict()
        self._compiled_for(1)

    MAX_COMPILED = 4

    def _compiled_for(self, batch: int) -> tuple[Any, Any, Any, Any]:
        hit = self._compiled.get(batch)
        if hit is not None:
            self._compiled.move_to_end(batch)
            return hit
        try:
            model = self.model.clone()
            model.reshape({self._input_name: [batch, *self.size, 3]})
            compiled = self.core.compile_model(model, self._device, self.config)
        except Exception as exc:
            msg = f"openvino could not compile {self.path} on {self._device}: {str(exc).strip().splitlines()[0]}"
            raise ModelFileError(msg) from exc
        entry = (compiled, compiled.create_infer_request(), compiled.output("anomaly_map"), compiled.output("score"))
        self._compiled[batch] = entry
        while len(self._compiled) > self.MAX_COMPILED:
            self._compiled.popitem(last=False)
        log.debug("openvino: compiled %s for batch %d (%s)", self.path.name, batch, self.precision)
        return entry

    @property
    def device(self) -> str:
        if self.precision == "int8":
            return f"{self._device.lower()} (int8, head {self.float_precision})"
        return f"{self._device.lower()} ({self.precision})"

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, request, map_port, score_port = self._compiled_for(batch.shape[0])
        res = request.infer({0: batch})
        # copy: the request reuses its output tensors on the next call
        return np.array(res[map_port], copy=True), np.array(res[score_port], copy=True)
