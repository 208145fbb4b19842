"""torch backend: eager fp32 on CPU (development, baseline); fp16 + CUDA graphs on an NVIDIA GPU.

For GPUs without TensorRT. Needs the ``train`` extra (torch + the teacher weights wheel).
On CUDA the networks run under fp16 autocast while the map math (cosine distance, normalisation,
smoothing, score) stays fp32; each batch size is captured once as a CUDA graph and replayed
with static, preallocated input/output buffers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.runtime.base import Runtime

log = logging.getLogger(__name__)


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(
        self,
        bundle: Path,
        meta: dict[str, Any],
        device: str = "cpu",
        fp16: bool | None = None,
        cuda_graph: bool | None = None,
        threads: int | None = None,
    ):
        super().__init__(bundle, meta)
        from engines.train import load_bundle_model

        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            msg = f"torch runtime device {device!r} requested but torch sees no CUDA GPU"
            raise ValueError(msg)
        if threads:
            torch.set_num_threads(threads)
        self.dev = dev
        self.fp16 = (dev.type == "cuda") if fp16 is None else bool(fp16)
        self.cuda_graph = (dev.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and dev.type != "cuda":
            msg = "cuda_graph needs a CUDA device"
            raise ValueError(msg)
        self.model = load_bundle_model(self.bundle, device="cpu").to(dev).eval()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    @property
    def device(self) -> str:
        if self.dev.type == "cuda":
            name = torch.cuda.get_device_name(self.dev)
            return f"{self.dev} ({name}, {'fp16' if self.fp16 else 'fp32'}{', CUDA graph' if self.cuda_graph else ''})"
        return f"cpu ({torch.get_num_threads()} threads, fp32)"

    def _forward(self, x_uint8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = x_uint8_nhwc.permute(0, 3, 1, 2).float()
        with torch.autocast(self.dev.type, dtype=torch.float16, enabled=self.fp16 and self.dev.type == "cuda"):
            t_feats, s_feats, global_raw = m.run_networks(x)
        return m.head([t.float() for t in t_feats], [s.float() for s in s_feats], [g.float() for g in global_raw])

    @torch.inference_mode()
    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.dev.type != "cuda":
            amap, score = self._forward(torch.from_numpy(batch))
            return amap.numpy(), score.numpy()
        if not self.cuda_graph:
            x = torch.from_numpy(batch).pin_memory().to(self.dev, non_blocking=True)
            amap, score = self._forward(x)
            return amap.cpu().numpy(), score.cpu().numpy()
        graph, static_in, static_map, static_score = self._graph_for(batch.shape[0])
        static_in.copy_(torch.from_numpy(batch), non_blocking=False)
        graph.replay()
        return static_map.cpu().numpy(), static_score.cpu().numpy()

    def _graph_for(self, n: int):
        if n in self._graphs:
            return self._graphs[n]
        static_in = torch.zeros((n, *self.size, 3), dtype=torch.uint8, device=self.dev)
        # warm up on a side stream (cuDNN autotuning, lazy allocations) before capture
        self._stream.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(self._stream):
            for _ in range(3):
                self._forward(static_in)
        torch.cuda.current_stream(self.dev).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_map, static_score = self._forward(static_in)
        self._graphs[n] = (graph, static_in, static_map, static_score)
        log.info("torch runtime: captured a CUDA graph for batch %d", n)
        return self._graphs[n]

    def close(self) -> None:
        self._graphs.clear()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
