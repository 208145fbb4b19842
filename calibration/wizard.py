"""``lineinspect calibrate``: thresholds from good parts, interactive in a terminal or by flags.

Every prompt has a flag (``--good``, ``--defects``, ``--alpha``, ``--yes`` ...); without a TTY (or
with ``--yes``) nothing is asked. Writes the calibration YAML bound to the model's ONNX sha256 and
a self-contained HTML report.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from calibration.calibfile import Calibration, save_calibration
from calibration.stats import (
    CalibrationStatsError,
    defect_report,
    image_threshold,
    min_samples,
    pixel_threshold,
)

log = logging.getLogger(__name__)
MIN_GOOD = 50  # below this neither rule can say anything useful


class WizardError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# terminal helpers
# ----------------------------------------------------------------------------------------------
def text_histogram(values: np.ndarray, width: int = 40, bins: int = 12, mark: float | None = None) -> list[str]:
    if len(values) == 0:
        return []
    lo, hi = float(np.min(values)), float(np.max(values))
    if mark is not None:
        lo, hi = min(lo, mark), max(hi, mark)
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    lines = []
    for c, e0, e1 in zip(counts, edges[:-1], edges[1:], strict=True):
        bar = "#" * round(c / top * width)
        flag = " <- threshold" if mark is not None and e0 <= mark < e1 else ""
        lines.append(f"  {e0:8.3f} .. {e1:8.3f} | {bar:<{width}} {int(c)}{flag}")
    return lines


class Terminal:
    def __init__(self, out: TextIO, inp: TextIO, interactive: bool):
        self.out = out
        self.inp = inp
        self.interactive = interactive

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def ask(self, prompt: str, default: str | None = None, flag: str | None = None) -> str:
        if not self.interactive:
            if default is None:
                how = f"pass {flag}" if flag else "pass it as a flag"
                msg = f"'{prompt}' needs an answer: {how} (see lineinspect calibrate --help)"
                raise WizardError(msg)
            return default
        suffix = f" [{default}]" if default is not None else ""
        self.out.write(f"{prompt}{suffix}: ")
        self.out.flush()
        line = self.inp.readline()
        if not line:
            msg = "input ended before the wizard finished"
            raise WizardError(msg)
        return line.strip() or (default or "")

    def confirm(self, prompt: str, default: bool = True) -> bool:
        ans = self.ask(f"{prompt} (y/n)", "y" if default else "n").lower()
        return ans in ("y", "yes", "j", "ja")


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
def folder_images(folder: Path) -> list[Path]:
    from engines.data import DatasetError, good_training_images, list_images

    folder = Path(folder)
    if (folder / "test").is_dir():  # an MVTec-style dataset given for defects: every test/<defect>/
        paths = [
            p for d in sorted((folder / "test").iterdir()) if d.is_dir() and d.name != "good" for p in list_images(d)
        ]
        if paths:
            return paths
    try:
        return good_training_images(folder) if (folder / "train").is_dir() else list_images(folder)
    except DatasetError as exc:
        raise WizardError(str(exc)) from exc


def iter_folder(paths: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    import cv2

    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is None:
            msg = f"cannot read image {p}"
            raise WizardError(msg)
        yield p.name, img


def iter_camera(cfg_path: Path, camera_id: str | None, count: int) -> Iterator[tuple[str, np.ndarray]]:
    """Grab ``count`` frames from a camera of the station config (folder / opencv / pylon)."""
    from edge_app.capture import CameraError, make_camera
    from edge_app.config import load_config

    cfg = load_config(cfg_path)
    cams = [c for c in cfg.cameras if camera_id in (None, c.id)]
    if not cams:
        msg = f"no camera {camera_id!r} in {cfg_path} (cameras: {', '.join(c.id for c in cfg.cameras)})"
        raise WizardError(msg)
    cam = make_camera(cams[0])
    try:
        cam.open()
    except CameraError as exc:
        raise WizardError(str(exc)) from exc
    got = 0
    deadline = time.monotonic() + max(60.0, count * 2.0)
    try:
        while got < count and time.monotonic() < deadline:
            if cams[0].type == "pylon" and cams[0].trigger.mode == "software":
                cam.trigger()
            for f in cam.grab(1.0):
                if f.image is not None:
                    got += 1
                    yield f"{cam.id}#{f.seq}", f.image
            if cam.exhausted:
                break
    finally:
        cam.close()


def score_stream(
    runtime, items: Iterator[tuple[str, np.ndarray]], total: int, term: Terminal, label: str, keep_maps: bool = True
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Score images with a live progress bar and running histogram."""
    from engines.data import preprocess

    names, scores, maps = [], [], []
    t0 = time.monotonic()
    width = shutil.get_terminal_size((80, 20)).columns
    for i, (name, img) in enumerate(items, 1):
        out = runtime(preprocess(img, runtime.size)[None])
        names.append(name)
        scores.append(float(out["score"][0]))
        if keep_maps:
            maps.append(out["anomaly_map"][0].astype(np.float16))
        if term.interactive or i == total or i % 25 == 0:
            rate = i / max(time.monotonic() - t0, 1e-6)
            eta = (total - i) / rate if total else 0
            bar_w = max(10, min(40, width - 50))
            fill = int(bar_w * i / max(total, 1))
            term.out.write(f"\r{label}: [{'#' * fill}{'.' * (bar_w - fill)}] {i}/{total} {rate:5.1f}/s ETA {eta:4.0f}s")
            term.out.flush()
            if term.interactive and (i % 20 == 0 or i == total):
                term.out.write("\n" + "\n".join(text_histogram(np.array(scores), bins=8)) + "\n")
    term.out.write("\n")
    return names, np.array(scores), (np.stack(maps).astype(np.float32) if keep_maps and maps else None)


# ----------------------------------------------------------------------------------------------
# the wizard
# ----------------------------------------------------------------------------------------------
def run_wizard(args, out: TextIO | None = None, inp: TextIO | None = None) -> int:
    from engines.bundle import read_meta, utc_now
    from engines.runtime import load_runtime

    out = out or sys.stdout
    inp = inp or sys.stdin
    try:
        interactive = not args.yes and inp.isatty()
    except ValueError:  # stdin closed (daemons, CI)
        interactive = False
    term = Terminal(out, inp, interactive)
    term.say("lineinspect calibration: thresholds from good parts")

    bundle = args.bundle
    station_cfg = None
    if args.config:
        from edge_app.config import ConfigError, load_config

        try:
            station_cfg = load_config(Path(args.config))
        except ConfigError as exc:
            raise WizardError(str(exc)) from exc
        bundle = bundle or str(station_cfg.model.bundle)
    if not bundle:
        bundle = term.ask("model bundle folder", flag="--bundle BUNDLE (or --config STATION.yaml)")
    meta = read_meta(Path(bundle))
    if not meta.get("onnx"):
        msg = f"{bundle} has no exported model.onnx: run 'lineinspect export --bundle {bundle}' first"
        raise WizardError(msg)
    backend = args.backend or (station_cfg.model.backend if station_cfg else "onnxruntime")
    # score exactly as the station will: same backend, precision, device and threads
    opts = station_cfg.model.runtime_options() if station_cfg and backend == station_cfg.model.backend else {}
    if getattr(args, "precision", None):
        opts["precision"] = args.precision
    runtime = load_runtime(backend, Path(bundle), **opts)
    term.say(f"model {meta['onnx']['sha256'][:12]}... on {runtime.describe()}")

    # good parts
    good_dir = args.good
    use_camera = bool(args.camera or (station_cfg and not good_dir and args.count))
    if not good_dir and not use_camera:
        answer = term.ask("good parts: a folder of images, or 'camera' to grab from the configured camera", None)
        if answer == "camera":
            use_camera = True
        else:
            good_dir = answer
    paths: list[Path] = []  # the good images when they come from a folder (the report reloads examples)
    if use_camera:
        if not args.config:
            msg = "grabbing from a camera needs --config STATION.yaml"
            raise WizardError(msg)
        count = args.count or int(term.ask("how many good parts to grab", "300"))
        items, total = iter_camera(Path(args.config), args.camera, count), count
        source = f"camera {args.camera or station_cfg.cameras[0].id} ({count} frames)"
    else:
        paths = folder_images(Path(good_dir))
        items, total = iter_folder(paths), len(paths)
        source = str(good_dir)
    alpha = args.alpha if args.alpha is not None else float(term.ask("target false-reject rate alpha", "0.001"))
    confidence = args.confidence
    need = min_samples(alpha, confidence)
    if total < MIN_GOOD:
        msg = f"{total} good parts are too few: at least {MIN_GOOD} are needed ({need} for the distribution-free rule)"
        raise WizardError(msg)
    good_names, good_scores, good_maps = score_stream(runtime, items, total, term, "good parts")
    if len(good_scores) < MIN_GOOD:
        msg = f"only {len(good_scores)} good parts could be scored: at least {MIN_GOOD} are needed"
        raise WizardError(msg)

    # optional defects
    defect_dir = args.defects
    if defect_dir is None and interactive:
        defect_dir = term.ask("folder of defect images to check the threshold (empty: none)", "") or None
    defect_names, defect_scores, defect_maps = [], np.zeros(0), None
    dpaths: list[Path] = []
    if defect_dir:
        dpaths = folder_images(Path(defect_dir))
        defect_names, defect_scores, defect_maps = score_stream(
            runtime, iter_folder(dpaths), len(dpaths), term, "defect parts"
        )

    try:
        img_thr = image_threshold(good_scores, alpha, confidence, args.method)
    except CalibrationStatsError as exc:
        raise WizardError(str(exc)) from exc
    px_thr, min_area = pixel_threshold(good_maps)
    if args.min_area:
        min_area = args.min_area
    dreport = defect_report(good_scores, defect_scores, img_thr.threshold) if len(defect_scores) else None

    term.say("")
    term.say("good-part scores:")
    for line in text_histogram(good_scores, mark=img_thr.threshold):
        term.say(line)
    term.say(f"proposed image threshold: {img_thr.threshold:.4f}  (rule: {img_thr.method}, n={img_thr.n})")
    term.say(
        f"expected false-reject rate: {img_thr.expected_frr:.3%} "
        f"({img_thr.confidence:.0%} interval {img_thr.frr_lower:.3%} .. {img_thr.frr_upper:.3%}), target {alpha:.3%}"
    )
    for note in img_thr.notes:
        term.say(f"note: {note}")
    term.say(f"pixel threshold {px_thr:.4f}, minimum defect area {min_area} px")
    if dreport:
        term.say(
            f"defects: {dreport['n_defect']} parts, miss rate {dreport['miss_rate']:.1%} at this threshold, "
            f"AUROC {dreport['auroc']:.3f}"
        )
        term.say(
            f"  F1-optimal threshold {dreport['f1_threshold']:.4f} (F1 {dreport['f1_max']:.3f}); "
            f"zero-miss threshold {dreport['zero_miss_threshold']:.4f} "
            f"(would reject {dreport['frr_at_zero_miss']:.1%} of these good parts)"
        )
        if dreport.get("warning"):
            term.say(f"WARNING: {dreport['warning']}")
    if not term.confirm("accept and write the calibration", True):
        term.say("not written")
        return 1

    cal = Calibration(
        model_onnx_sha256=meta["onnx"]["sha256"],
        image_threshold=round(float(img_thr.threshold), 6),
        pixel_threshold=round(float(px_thr), 6),
        min_defect_area_px=int(min_area),
        method={"image": img_thr.to_dict(), "pixel": {"rule": "quantile", "quantile": 0.9999}},
        samples={
            "n_good": len(good_scores),
            "n_defect": len(defect_scores),
            "good_source": source,
            "defect_source": str(defect_dir) if defect_dir else None,
            "backend": runtime.name,
            "device": runtime.device,
        },
        expected_false_reject_rate={
            "estimate": img_thr.expected_frr,
            "lower": img_thr.frr_lower,
            "upper": img_thr.frr_upper,
            "confidence": confidence,
            "target": alpha,
        },
        created_at=utc_now(),
        extra={
            "good_scores": [round(float(s), 5) for s in good_scores],
            **({"defects": {k: v for k, v in dreport.items()}} if dreport else {}),
        },
    )
    out_path = Path(args.out or (station_cfg.calibration.file if station_cfg else "calibration.yaml"))
    save_calibration(cal, out_path)
    term.say(f"calibration {cal.id} written to {out_path}")
    report_path = Path(args.report) if args.report else out_path.with_suffix(".html")
    from calibration.report import ScoredParts, write_report

    good = ScoredParts(good_names, good_scores, good_maps, _loader(paths))
    defects = ScoredParts(defect_names, defect_scores, defect_maps, _loader(dpaths))
    write_report(report_path, cal, img_thr, good, defects, dreport)
    term.say(f"report written to {report_path}")
    term.say("a running service picks it up on SIGHUP (systemctl reload) or MQTT cmd/reload_calibration")
    return 0


def _loader(files: list[Path]) -> Callable[[str], np.ndarray | None] | None:
    """Reads an example image back by the name it was scored under (None without a folder source)."""
    if not files:
        return None
    paths = {p.name: p for p in files}

    def load(name: str) -> np.ndarray | None:
        import cv2

        p = paths.get(name)
        return None if p is None else cv2.imread(str(p), cv2.IMREAD_UNCHANGED)

    return load


def main_calibrate(args) -> int:
    from engines.bundle import BundleError
    from engines.runtime import ModelFileError, SDKMissingError

    try:
        return run_wizard(args)
    except (WizardError, BundleError, ModelFileError, SDKMissingError, CalibrationStatsError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130


def main_drift(args) -> int:
    from calibration.calibfile import CalibrationError, load_calibration
    from calibration.stats import drift_check
    from engines.runtime import load_runtime

    try:
        runtime = load_runtime(args.backend, Path(args.bundle))
        cal = load_calibration(Path(args.calibration), runtime.model_sha256)
        ref = np.asarray(cal.extra.get("good_scores") or [], np.float64)
        if len(ref) == 0:
            raise WizardError(f"{args.calibration} holds no good scores to compare with")
        paths = folder_images(Path(args.good))
        term = Terminal(sys.stdout, sys.stdin, False)
        _, scores, _ = score_stream(runtime, iter_folder(paths), len(paths), term, "good parts", keep_maps=False)
        res = drift_check(ref, scores, cal.image_threshold, float(cal.expected_false_reject_rate.get("upper", 1)))
    except (WizardError, CalibrationError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"KS D={res['ks_statistic']:.3f} p={res['p_value']:.3g}; observed false-reject rate "
        f"{res['observed_frr']:.2%} on {res['n']} good parts"
    )
    if res["recalibrate"]:
        print("RECALIBRATION DUE: " + "; ".join(res["reasons"]))
        return 3
    print("no drift: the calibration still holds")
    return 0
