"""Model bundle metadata (``model.json``). No torch: the line service reads this too.

A bundle is a directory::

    model.json   metadata (this module)
    student.pt   student state_dict + the global term's Gaussian (global_term.*; torch, weights_only);
                 model.json's ``student`` section names the file and its sha256 (a bundle rewritten
                 in place, e.g. by ``lineinspect refit``, gets a new file ``student-<sha>.pt``, see
                 ``write_student_and_meta``; bundles from before the section: ``student.pt``, unchecked)
    model.onnx   the whole inference graph (written by ``lineinspect export``)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def sha_mismatch(path: Path, recorded: Any) -> str | None:
    """None when ``path``'s sha256 is ``recorded``; else the two, shortened, for a message."""
    sha = sha256_file(path)
    return None if sha == recorded else f"sha256 {sha[:12]}... != {str(recorded)[:12]}..."


def student_path(bundle: Path, meta: dict[str, Any]) -> Path:
    """The student weights file model.json names, checked against its recorded sha256 (a bundle from
    before the record: ``student.pt``, unchecked). A missing or mismatching file is a BundleError."""
    info = meta.get("student") or {}
    path = Path(bundle) / str(info.get("file", STUDENT_PT))
    if not path.is_file():
        msg = f"{path} is missing from the bundle"
        raise BundleError(msg)
    differs = sha_mismatch(path, info["sha256"]) if info.get("sha256") else None
    if differs:
        msg = (
            f"{path} is not the student weights model.json records ({differs}): the file is corrupt, "
            "truncated or from another training; restore the bundle or train it again"
        )
        raise BundleError(msg)
    return path


def write_student_and_meta(bundle: Path, student: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    """Write a bundle's student weights and model.json so that a crash at any point leaves either the
    bundle as it was or the new one, never a mix: the weights go to a file the current model.json
    does not name (``student.pt``, or ``student-<sha>.pt`` when that is the current one), then
    model.json, naming it with its sha256, replaces the old one atomically (the commit), then the
    old weights and any left by an earlier interrupted write are removed. Returns ``meta`` with its
    ``student`` section set."""
    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    try:
        current = (json.loads((bundle / MODEL_JSON).read_text()).get("student") or {}).get("file", STUDENT_PT)
    except (OSError, ValueError, AttributeError):
        current = None  # no bundle here yet (or one that cannot be read: nothing to keep)
    sha = hashlib.sha256(student).hexdigest()
    name = STUDENT_PT if current != STUDENT_PT else f"student-{sha[:12]}.pt"
    atomic_write_bytes(bundle / name, student)
    meta["student"] = {"file": name, "sha256": sha}
    write_meta(bundle, meta)
    for old in [bundle / STUDENT_PT, *bundle.glob("student-*.pt")]:  # the names this function writes
        if old.name != name:
            old.unlink(missing_ok=True)
    return meta


_REQUIRED = ("format_version", "input", "normalization", "teacher", "net", "map_stats")


# --- the typed manifest -------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")  # sections may carry more than the loaders need


class InputSpec(_Section):
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = 3


class Normalization(_Section):
    mean: float
    std: float = Field(gt=0)


class TeacherSpec(_Section):
    name: str
    weights_sha256: str = Field(min_length=64, max_length=64)
    taps: list[int]


class MapStats(_Section):
    scale_mean: list[float]
    scale_std: list[float]
    feature_mean: list[list[float]] | None = None  # distance l2: per tap, per channel
    feature_std: list[list[float]] | None = None


class Manifest(_Section):
    """``model.json`` as the loaders read it (the writers add sections: training, parity, ...)."""

    format_version: int = Field(ge=1)
    input: InputSpec
    normalization: Normalization
    teacher: TeacherSpec
    net: dict[str, Any]
    map_stats: MapStats
    onnx: dict[str, Any] | None = None
    onnx_fp16: dict[str, Any] | None = None
    openvino_int8: dict[str, Any] | None = None


@dataclass(frozen=True)
class ArtifactKind:
    """A file set that model.json records: each file with its sha256, and for a derived artifact the
    ONNX export it was made from."""

    key: str  # its section in model.json
    what: str  # in messages
    files: tuple[tuple[str, str], ...]  # (field naming the file, field holding its sha256)
    made_from: str | None  # derived from model.onnx ("quantised from"): stale once the model is exported again
    redo: str  # the command that makes it ({bundle} is filled in)


ARTIFACTS = {
    "onnx": ArtifactKind("onnx", "exported graph", (("file", "sha256"),), None, "lineinspect export --bundle {bundle}"),
    "onnx_fp16": ArtifactKind(
        "onnx_fp16",
        "fp16 graph",
        (("file", "sha256"),),
        "exported with",
        "lineinspect export --bundle {bundle} --fp16-graph",
    ),
    "openvino_int8": ArtifactKind(
        "openvino_int8",
        "int8 model",
        (("xml", "xml_sha256"), ("bin", "bin_sha256")),
        "quantised from",
        "lineinspect quantize --bundle {bundle}",
    ),
}


class ArtifactError(BundleError):
    """An artifact model.json names is absent, missing on disk, corrupt or from another export."""


def artifact_files(bundle: Path, meta: dict[str, Any], key: str, verify_sha: bool = True) -> list[Path]:
    """The one check every runtime uses before it loads a file of the bundle: recorded in model.json,
    present, matching its sha256, and (for a derived artifact) made from the current ONNX export."""
    kind = ARTIFACTS[key]
    redo = kind.redo.format(bundle=bundle)
    info = meta.get(key)
    if not info:
        msg = f"{bundle} has no {kind.what}: run '{redo}' first"
        raise ArtifactError(msg)
    if kind.made_from and info.get("for_onnx_sha256") != (meta.get("onnx") or {}).get("sha256"):
        msg = f"the {kind.what} in {bundle} was {kind.made_from} another export of the model; run '{redo}' again"
        raise ArtifactError(msg)
    paths = []
    for name_field, sha_field in kind.files:
        path = Path(bundle) / info.get(name_field, MODEL_ONNX if key == "onnx" else "")
        if not path.is_file():
            msg = f"{path} is missing; re-run '{redo}'"
            raise ArtifactError(msg)
        if verify_sha:
            differs = sha_mismatch(path, info.get(sha_field))
            if differs:
                msg = (
                    f"{path} does not match model.json ({differs}): "
                    f"the file is corrupt, truncated or from another export; re-run '{redo}'"
                )
                raise ArtifactError(msg)
        paths.append(path)
    return paths


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
    try:
        Manifest.model_validate(meta)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = f"{path}: {where}: {err['msg']} (got {err.get('input')!r}); re-train or re-export the bundle"
        raise BundleError(msg) from exc
    return meta


def read_manifest(bundle: Path) -> Manifest:
    """``read_meta`` as a typed record (for readers; writers still edit the dict and ``write_meta`` it)."""
    return Manifest.model_validate(read_meta(bundle))


def input_hw(meta: dict[str, Any]) -> tuple[int, int]:
    """The model input's (height, width) in pixels."""
    return int(meta["input"]["height"]), int(meta["input"]["width"])
