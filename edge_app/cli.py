"""The ``lineinspect`` command. Subcommands import their heavy modules lazily."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engines.data import parse_image_width


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a student on good images and write a model bundle")
    p.add_argument("--data", required=True, help="MVTec-style dataset folder (train/good) or a folder of good images")
    p.add_argument("--out", required=True, help="bundle folder to write (model.json + student.pt)")
    p.add_argument("--config", type=Path, help="training YAML (see engines.train.TrainConfig)")
    p.add_argument("--epochs", type=int, help="override epochs")
    p.add_argument("--image-size", type=int, help="override the input size (the square's side, or the height)")
    p.add_argument(
        "--image-width",
        type=parse_image_width,
        help="input width in pixels, auto (the training images' aspect when they share one; the default) or square",
    )
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--teacher-weights", type=Path, help="Lite0 state_dict file instead of the packaged weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_refit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "refit",
        help="give a trained bundle other map / score settings without training again (then export and calibrate)",
    )
    p.add_argument("--bundle", required=True, help="trained bundle folder (its training data must still be on disk)")
    p.add_argument("--blur-sigma", type=float, help="Gaussian smoothing of the map, input pixels (default now: 2)")
    p.add_argument("--map-stats-from", choices=["training", "held_out"], help="parts the map's statistics come from")
    p.add_argument("--position-spread-images", type=int, help="training parts for the map's statistics / spread")
    p.add_argument("--score", choices=["max", "topk"], help="the map's image score")
    p.add_argument("--topk-fraction", type=float, help="fraction of pixels averaged with --score topk")
    p.add_argument("--global-taps", type=int, nargs="*", help="teacher blocks of the global term (none given: no term)")
    p.add_argument("--global-grid", type=int, help="cells per side of the global term's grid")
    p.add_argument(
        "--seg-weight", type=float, help="weight of a segmentation head trained on synthetic defects (0: none)"
    )
    p.add_argument("--seg-steps", type=int, help="optimiser steps of the segmentation head's training")
    p.add_argument("--seg-samples", type=int, help="synthetic samples per training part the head learns from")
    p.add_argument("--seg-heads", type=int, help="segmentation heads averaged (each from its own seed)")
    p.add_argument("--seg-width", type=int, help="width of each head network's first convolutions (96)")
    p.add_argument("--seg-stride", type=int, choices=[8, 16], help="the segmentation head's grid, input px per cell")
    p.add_argument(
        "--seg-fusion", choices=["add", "max"], help="how the head's map joins the distillation map (add or max)"
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="image/pixel AUROC, AU-PRO, F1-max on an MVTec-style test split")
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--data", required=True, help="dataset folder with test/ and ground_truth/")
    p.add_argument("--out", help="folder for metrics.json and overlays (default: BUNDLE/eval)")
    p.add_argument("--backend", default="torch", help="torch (default) or a runtime: onnxruntime, openvino")
    p.add_argument("--device", default="cpu", help="torch device for --backend torch")
    p.add_argument("--overlays", type=int, default=12, help="number of heatmap overlay PNGs to save")


def _add_synthetic(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-synthetic", help="write a small synthetic MVTec-layout dataset (tests, demo)")
    p.add_argument("--out", required=True, help="dataset folder to write (reused when it already has images)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--train", type=int, default=80, help="good training images")
    p.add_argument("--seed", type=int, default=0)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write BUNDLE/model.onnx (whole graph, uint8 NHWC in) and verify it")
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--images", help="folder of real images for the parity check (default: training data)")
    p.add_argument(
        "--fp16-graph", action="store_true", help="also write model_fp16.onnx (for TensorRT 11 fp16 engines)"
    )


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="write an int8 OpenVINO model into BUNDLE (openvino precision int8)")
    p.add_argument("--bundle", required=True, help="exported model bundle folder")
    p.add_argument("--images", help="folder of good-part images (default: the bundle's training data)")
    p.add_argument("--n-images", type=int, default=300, help="images for the activation statistics")


def _add_build_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-engine", help="build the TensorRT plan for this GPU from BUNDLE/model.onnx")
    p.add_argument("--bundle", required=True, help="exported model bundle folder")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 engine (recommended on GPUs)")
    prec.add_argument("--int8", action="store_true", help="INT8 engine, calibrated on --calib-dir (TensorRT 10)")
    p.add_argument("--calib-dir", help="folder of good-part images for INT8 calibration")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch the engine accepts")
    p.add_argument("--opt-batch", type=int, default=1, help="batch size the engine is tuned for")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index")


def _add_service(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the line service (systemd: Type=notify)")
    p.add_argument("--config", required=True, help="station YAML (see deploy/config.example.yaml)")
    p = sub.add_parser("check-config", help="validate a station YAML; exit 0 when valid, 1 otherwise")
    p.add_argument("file", help="station YAML")
    p.add_argument(
        "--schema-only",
        action="store_true",
        help="check the YAML against the schema only (skip files, bundle and calibration)",
    )


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="thresholds from good parts (interactive, or by flags with --yes)")
    p.add_argument("--bundle", help="exported model bundle (default: the station config's)")
    p.add_argument("--config", help="station YAML: model, backend, camera and calibration path from it")
    p.add_argument("--good", help="folder of good-part images")
    p.add_argument("--camera", help="grab good parts from this camera of --config instead of a folder")
    p.add_argument("--count", type=int, help="number of parts to grab from the camera")
    p.add_argument("--defects", help="folder of defect images (or an MVTec-style dataset) to check the threshold")
    p.add_argument("--alpha", type=float, help="target false-reject rate (default 0.001)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the false-reject bound")
    p.add_argument("--method", default="auto", choices=["auto", "order_statistic", "gpd"], help="threshold rule")
    p.add_argument("--min-area", type=int, help="minimum defect area in model pixels (default: from good parts)")
    p.add_argument("--backend", help="runtime backend (default: the config's, else onnxruntime)")
    p.add_argument("--precision", help="runtime precision, e.g. openvino bf16 (default: the config's)")
    p.add_argument("--out", help="calibration YAML to write (default: the config's calibration.file)")
    p.add_argument("--report", help="HTML report path (default: next to --out)")
    p.add_argument("--yes", action="store_true", help="no prompts: accept the proposal")
    p = sub.add_parser("drift", help="compare new good parts with a calibration; exit 3 when recalibration is due")
    p.add_argument("--bundle", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--good", required=True, help="folder of recent good-part images")
    p.add_argument("--backend", default="onnxruntime")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on synthetic parts: train, export, calibrate, run, summary")
    p.add_argument("--out", default="demo_out", help="work folder (re-runs reuse what is there)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-images", type=int, default=200, help="synthetic good parts to train on")
    p.add_argument("--image-size", type=int, default=128, help="model input size (camera frames are 256 px)")
    p.add_argument("--rate-hz", type=float, default=10.0, help="camera frame rate")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--web-port", type=int, default=8080, help="port of the station page (a free one if taken)")
    p.add_argument(
        "--keep-open", type=float, default=0.0, help="keep the station and its page running this many s after the parts"
    )


def _add_web_password(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web-password", help="print a users-file line (name:scrypt hash) for the station page; password on stdin"
    )
    p.add_argument("name", help="user name shown in the audit table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineinspect", description="factory-line anomaly inspection")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_refit(sub)
    _add_evaluate(sub)
    _add_synthetic(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_build_engine(sub)
    _add_service(sub)
    _add_calibrate(sub)
    _add_demo(sub)
    _add_web_password(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "train":
        from engines.train import main_train

        return main_train(args)
    if args.command == "refit":
        from engines.train import main_refit

        return main_refit(args)
    if args.command == "evaluate":
        from engines.evaluate import main_evaluate

        return main_evaluate(args)
    if args.command == "export":
        from engines.export import main_export

        return main_export(args)
    if args.command == "quantize":
        from engines.quantize import main_quantize

        return main_quantize(args)
    if args.command == "build-engine":
        from engines.runtime import BACKENDS, SDKMissingError, _import_sdk

        try:
            _import_sdk("tensorrt", BACKENDS["tensorrt"])
        except SDKMissingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        from engines.runtime.tensorrt import main_build_engine

        return main_build_engine(args)
    if args.command == "run":
        from edge_app.service import main_run

        return main_run(args)
    if args.command == "check-config":
        from edge_app.config import main_check_config

        return main_check_config(args)
    if args.command == "calibrate":
        from calibration.wizard import main_calibrate

        return main_calibrate(args)
    if args.command == "drift":
        from calibration.wizard import main_drift

        return main_drift(args)
    if args.command == "demo":
        from edge_app.demo import main_demo

        return main_demo(args)
    if args.command == "web-password":
        from edge_app.web.auth import main_web_password

        return main_web_password(args)
    if args.command == "make-synthetic":
        from engines.synthetic import make_dataset

        out = Path(args.out)
        if (out / "train" / "good").is_dir() and any((out / "train" / "good").iterdir()):
            print(f"reusing the synthetic dataset in {out}")
            return 0
        make_dataset(out, n_train=args.train, size=args.size, seed=args.seed)
        print(f"synthetic dataset written to {out}")
        return 0
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
