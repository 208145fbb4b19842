"""Model bundle metadata (``model.json``). No torch: the line service reads this too.

A bundle is a directory::

    model.json   metadata (this module)
    student.pt   student state_dict (torch, weights_only)
    model.onnx   the whole inference graph (written by ``lineinspect export``)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
STUDENT_PT = "student.pt"
MODEL_ONNX = "model.onnx"


class BundleError(ValueError):
    """A model bundle that cannot be used; the message says which file and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + rename so a crash or full disk never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_meta(bundle: Path, meta: dict[str, Any]) -> Path:
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / MODEL_JSON
    atomic_write_bytes(path, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())
    return path


_REQUIRED = ("format_version", "input", "normalization", "teacher", "net", "map_stats")


def read_meta(bundle: Path) -> dict[str, Any]:
    """Read and check ``model.json``: clear errors for a missing, corrupt or too-new file."""
    bundle = Path(bundle)
    path = bundle / MODEL_JSON
    if not bundle.is_dir():
        msg = f"model bundle folder not found: {bundle}"
        raise BundleError(msg)
    if not path.is_file():
        msg = f"{path} is missing: {bundle} is not a model bundle (train one with 'lineinspect train')"
        raise BundleError(msg)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{path} is not valid JSON: {exc}"
        raise BundleError(msg) from exc
    if not isinstance(meta, dict):
        msg = f"{path} must hold a JSON object"
        raise BundleError(msg)
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        msg = f"{path} lacks required keys: {', '.join(missing)}"
        raise BundleError(msg)
    version = meta["format_version"]
    if not isinstance(version, int) or version < 1:
        msg = f"{path}: format_version must be a positive integer, got {version!r}"
        raise BundleError(msg)
    if version > FORMAT_VERSION:
        msg = (
            f"{path} has format_version {version}, newer than this lineinspect understands "
            f"({FORMAT_VERSION}); upgrade lineinspect or re-export the bundle with this version"
        )
        raise BundleError(msg)
    stats = meta["map_stats"]
    for key in ("scale_mean", "scale_std"):
        vals = stats.get(key) if isinstance(stats, dict) else None
        if not isinstance(vals, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            msg = f"{path}: map_stats.{key} must be a list of finite numbers (computed at the end of training)"
            raise BundleError(msg)
    return meta


def input_size(meta: dict[str, Any]) -> int:
    return int(meta["input"]["height"])
