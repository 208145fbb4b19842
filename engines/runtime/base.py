"""The runtime interface: numpy in, numpy out; no torch, no SDK imported here."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from engines import bundle as bundle_mod

log = logging.getLogger(__name__)


class RuntimeBackendError(RuntimeError):
    """Base of the runtime errors."""


class SDKMissingError(RuntimeBackendError):
    """The selected backend's SDK is not installed; the message names the backend and the extra."""


class ModelFileError(RuntimeBackendError):
    """A model/engine file is missing, corrupt, stale or made for another model."""


class InputError(ValueError):
    """A batch of the wrong shape or dtype was passed to a runtime."""


def artifact_checked(bundle: Path, meta: dict[str, Any], key: str, verify_sha: bool = True) -> list[Path]:
    """``engines.bundle.artifact_files`` (the one check of every file a runtime loads), its error as
    a ModelFileError."""
    try:
        return bundle_mod.artifact_files(bundle, meta, key, verify_sha)
    except bundle_mod.ArtifactError as exc:
        raise ModelFileError(str(exc)) from exc


def onnx_path_checked(bundle: Path, meta: dict[str, Any], verify_sha: bool = True) -> Path:
    """``bundle/model.onnx``, checked against the sha256 that export recorded in model.json."""
    return artifact_checked(bundle, meta, "onnx", verify_sha)[0]


class Runtime(ABC):
    """One loaded model on one device.

    ``__call__(batch)`` takes uint8 RGB ``(N, H, W, 3)`` and returns
    ``{"anomaly_map": float32 (N, H, W), "score": float32 (N,)}``.
    """

    name: str = "?"

    def __init__(self, bundle: Path, meta: dict[str, Any]):
        self.bundle = Path(bundle)
        self.meta = meta
        self.size = bundle_mod.input_hw(meta)  # (height, width), what engines.data.preprocess takes
        self.max_batch = 64

    # --- description ---------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[str | int, int, int, int]:
        return ("batch", *self.size, 3)

    @property
    def input_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    @abstractmethod
    def device(self) -> str: ...

    @property
    def model_sha256(self) -> str | None:
        onnx_meta = self.meta.get("onnx") or {}
        return onnx_meta.get("sha256")

    def describe(self) -> str:
        return f"{self.name} on {self.device}, input uint8 {self.input_shape}"

    # --- inference -----------------------------------------------------------------------
    def check_input(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            msg = f"{self.name}: expected a numpy array, got {type(batch).__name__}"
            raise InputError(msg)
        if batch.dtype != np.uint8:
            msg = f"{self.name}: expected dtype uint8 (RGB 0..255), got {batch.dtype}"
            raise InputError(msg)
        if batch.ndim == 3:
            batch = batch[None]
        expected = (*self.size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            msg = (
                f"{self.name}: expected shape (N, {self.size[0]}, {self.size[1]}, 3) (NHWC RGB), got {batch.shape}; "
                f"resize with engines.data.preprocess(image, {self.size})"
            )
            raise InputError(msg)
        if not 1 <= batch.shape[0] <= self.max_batch:
            msg = f"{self.name}: batch size must be 1..{self.max_batch}, got {batch.shape[0]}"
            raise InputError(msg)
        return np.ascontiguousarray(batch)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.check_input(batch)
        amap, score = self._run(batch)
        return {"anomaly_map": amap, "score": score}

    @abstractmethod
    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def predict(self, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Maps and scores for any number of images, in batches (used by evaluation)."""
        maps, scores = [], []
        for i in range(0, len(images), batch_size):
            out = self(images[i : i + batch_size])
            maps.append(out["anomaly_map"])
            scores.append(out["score"])
        return np.concatenate(maps), np.concatenate(scores)

    def warmup(self, n: int = 3) -> None:
        x = np.zeros((1, *self.size, 3), np.uint8)
        for _ in range(n):
            self(x)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources (optional)."""
