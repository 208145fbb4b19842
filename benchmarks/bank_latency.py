"""What a memory-bank term fused into the map would cost at inference (the issue's last lead).

    python benchmarks/bank_latency.py [--bank 702 1756 7025] [--threads 2] [--repeats 200]

``accuracy.py --fuse`` measures what fusing the PatchCore peer's map into ours does to accuracy.
This script measures what it would cost on the line: the shipped network's whole graph
(``latency.py``'s 1-epoch default bundle on synthetic parts; latency does not depend on the
weights) exported as it ships, and the same graph with a nearest-neighbour term added the way the
benchmark fuses it: the peer's locally aware patch features of the raw teacher taps 4 + 10
(``patchcore.local_patches``: 32 x 32 patches at 256 px), the Euclidean distance of every patch to
the nearest of K bank rows (one matrix product), standardised, upsampled, smoothed as the peer's
map and averaged with our map; the score is the fused map's maximum. Both graphs go through the
product's export (``engines.export``); the fused one without the TensorRT rule check, whose
findings on it are printed instead (what a product version would have to change). The bank is random (the cost does
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
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _machine import machine_name  # noqa: E402
from latency import ensure_bundle, interleaved  # noqa: E402
from patchcore import PatchCoreConfig, local_patches, smooth  # noqa: E402

from engines.export import export_graph, export_onnx, frozen_copy, to_float_nchw  # noqa: E402
from engines.model import KDModel, bilinear_matrix, resize_bilinear  # noqa: E402
from engines.teacher import normalize_input, tap_channels  # noqa: E402
from engines.trt_compat import tensorrt_problems  # noqa: E402


class FusedBankGraph(nn.Module):
    """uint8 NHWC in -> (map, score): our map averaged with a nearest-neighbour map on the taps."""

    def __init__(self, model: KDModel, bank_rows: int, bank_taps: tuple[int, ...] = (4, 10)):
        super().__init__()
        self.model = frozen_copy(model)
        taps = list(model.cfg.teacher_taps())  # the order of the teacher's outputs
        self.idx = [taps.index(t) for t in bank_taps]
        self.size = model.cfg.image_size
        self.sigma = PatchCoreConfig().blur_sigma
        g = torch.Generator().manual_seed(0)
        bank = torch.randn(bank_rows, sum(tap_channels(bank_taps)), generator=g)
        self.register_buffer("bank_t", bank.T.contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(1))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        xn = normalize_input(to_float_nchw(image))
        raw = m.teacher(xn)
        kd_raw, global_raw = m.split_taps(raw)
        t_feats = m.standardise(kd_raw)
        s_feats, _ = m.student(xn, t_feats)
        amap, shipped_score = m.head(t_feats, s_feats, global_raw)  # the shipped map and score
        ours = amap[:, None]
        patches = local_patches([raw[i] for i in self.idx])
        h, w = patches.shape[-2:]
        q = patches.flatten(2).transpose(1, 2)  # (N, patches, D)
        d2 = (q * q).sum(-1, keepdim=True) - 2 * (q @ self.bank_t) + self.bank_sq
        near = d2.amin(-1).clamp_min(0).sqrt().view(-1, 1, h, w)
        bank_map = resize_bilinear(near, bilinear_matrix(self.size, h), bilinear_matrix(self.size, w))
        bank_map = smooth(bank_map, self.sigma)
        fused = 0.5 * (ours + (bank_map - 1.0) / 0.5)  # the standardisation: two constants
        return fused[:, 0], torch.maximum(fused.flatten(1).amax(1), shipped_score)


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
    ap.add_argument("--bank", type=int, nargs="+", default=[702, 1756, 7025], help="bank rows to time")
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
        paths = [export_onnx(model, Path(tmp) / "plain.onnx")]
        for k in args.bank:
            graph = FusedBankGraph(model, k)
            path = Path(tmp) / f"bank{k}.onnx"
            paths.append(export_graph(graph, args.size, path, f"with a {k}-row bank", tensorrt_check=False))
        problems = tensorrt_problems(onnx.load(str(paths[-1])))
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
        print("TensorRT rule check of the fused graph: " + ("; ".join(problems) if problems else "passes"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
