"""What a memory-bank term fused into the map would cost at inference (the issue's last lead).

    python benchmarks/bank_latency.py [--bank 700 1750 7000] [--threads 2] [--repeats 200]

``accuracy.py --fuse`` measures what fusing the PatchCore peer's map into ours does to accuracy.
This script measures what it would cost on the line: the shipped network's whole graph
(``latency.py``'s 1-epoch default bundle on synthetic parts; latency does not depend on the
weights) exported as it ships, and the same graph with a nearest-neighbour term added the way the
benchmark fuses it: the raw teacher taps 4 + 10 averaged over 3x3, the coarser one upsampled to
stride 8 (32 x 32 patches at 256 px), the Euclidean distance of every patch to the nearest of K
bank rows (one matrix product), standardised, upsampled, smoothed with the map's Gaussian and
averaged with our map; the score is the fused map's maximum. The bank is random (the cost does
not depend on its values); K = 1 % of magnetic_tile's 702 464 training patches is 7025.
Timed with ONNX Runtime (and OpenVINO bf16 when installed) in alternating rounds, median ms.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402
from latency import ensure_bundle, interleaved  # noqa: E402

from engines.export import InferenceGraph, frozen_copy, to_float_nchw  # noqa: E402
from engines.model import KDModel, bilinear_matrix, gaussian_kernel1d, resize_bilinear  # noqa: E402
from engines.teacher import normalize_input  # noqa: E402


class FusedBankGraph(nn.Module):
    """uint8 NHWC in -> (map, score): our map averaged with a nearest-neighbour map on the taps."""

    def __init__(self, model: KDModel, bank_rows: int, bank_taps: tuple[int, ...] = (4, 10)):
        super().__init__()
        self.model = frozen_copy(model)
        taps = list(model.cfg.taps)
        self.idx = [taps.index(t) for t in bank_taps]
        size = model.cfg.image_size
        self.grid = size // 8
        chans = sum({2: 24, 4: 40, 8: 112, 10: 112}[t] for t in bank_taps)
        g = torch.Generator().manual_seed(0)
        bank = torch.randn(bank_rows, chans, generator=g)
        self.register_buffer("bank_t", bank.T.contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.register_buffer("up16", bilinear_matrix(self.grid, size // 16))
        self.register_buffer("up_full", bilinear_matrix(size, self.grid))
        self.register_buffer("blur_k", gaussian_kernel1d(4.0))
        ones = torch.ones(1, 1, size, size)
        self.register_buffer("blur_norm", self._blur(ones))

    def _blur(self, m: torch.Tensor) -> torch.Tensor:
        k = self.blur_k
        r = (k.numel() - 1) // 2
        m = F.conv2d(m, k.view(1, 1, 1, -1), padding=(0, r))
        return F.conv2d(m, k.view(1, 1, -1, 1), padding=(r, 0))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        xn = normalize_input(to_float_nchw(image))
        raw = m.teacher(xn)
        t_feats = m.standardise(raw)
        s_feats, _ = m.student(xn, t_feats)
        ours = m.fuse(m.scale_maps(t_feats, s_feats))
        parts = []
        for i in self.idx:
            f = F.avg_pool2d(raw[i], 3, stride=1, padding=1, count_include_pad=False)
            if f.shape[-1] != self.grid:
                f = resize_bilinear(f, self.up16, self.up16)
            parts.append(f)
        q = torch.cat(parts, 1).flatten(2).transpose(1, 2)  # (N, patches, D)
        d2 = (q * q).sum(-1, keepdim=True) - 2 * (q @ self.bank_t) + self.bank_sq
        near = d2.amin(-1).clamp_min(0).sqrt().view(-1, 1, self.grid, self.grid)
        bank_map = resize_bilinear(near, self.up_full, self.up_full)
        bank_map = self._blur(bank_map) / self.blur_norm
        fused = 0.5 * (ours + (bank_map - 1.0) / 0.5)  # the standardisation: two constants
        return fused[:, 0], fused.flatten(1).amax(1)


def export(graph: nn.Module, size: int, path: Path) -> Path:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(
        graph.eval(),
        (example,),
        dynamo=True,
        input_names=["image"],
        output_names=["anomaly_map", "score"],
        dynamic_shapes={"image": {0: batch}},
        opset_version=18,
    )
    program.save(str(path))
    return path


class OrtRun:
    def __init__(self, path: Path, size: int, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.size = size

    def __call__(self, x: np.ndarray):
        return self.sess.run(None, {"image": x})


class OvRun:
    def __init__(self, path: Path, size: int, threads: int):
        import openvino as ov

        core = ov.Core()
        cfg = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16"}
        self.req = core.compile_model(str(path), "CPU", cfg).create_infer_request()
        self.size = size

    def __call__(self, x: np.ndarray):
        return self.req.infer({"image": x})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", type=int, nargs="+", default=[700, 1750, 7025], help="bank rows to time")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from engines.train import load_bundle_model

    torch.set_num_threads(args.threads)
    bundle = ensure_bundle(None, args.size)
    model = load_bundle_model(bundle)
    labels = ["shipped default (no bank)"] + [f"+ bank {k} rows" for k in args.bank]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [export(InferenceGraph(model), args.size, Path(tmp) / "plain.onnx")]
        for k in args.bank:
            paths.append(export(FusedBankGraph(model, k), args.size, Path(tmp) / f"bank{k}.onnx"))
        backends = [("onnxruntime", OrtRun)]
        try:
            import openvino  # noqa: F401

            backends.append(("openvino bf16", OvRun))
        except ImportError:
            pass
        print(f"\nmachine: {machine_name()}, {args.threads} threads, {args.size} px, median ms of {args.repeats}")
        print(f"{'graph':<28}" + "".join(f"{name + ' b1':>20}" for name, _ in backends))
        results = []
        for _name, cls in backends:
            runs = [cls(p, args.size, args.threads) for p in paths]
            samples = interleaved(runs, 1, args.repeats, args.rounds)
            results.append([statistics.median(s) for s in samples])
        for i, label in enumerate(labels):
            print(f"{label:<28}" + "".join(f"{res[i]:>20.2f}" for res in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
