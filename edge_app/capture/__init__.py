"""Cameras behind one interface, chosen by ``type:`` from an explicit registry.

A Camera is opened, yields Frames from ``grab(timeout_s)`` (None on a plain timeout, i.e. no
trigger came), and is closed. Heavy SDKs (pypylon) are imported only inside their module.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

from edge_app.frame import Frame


class CameraError(RuntimeError):
    """The camera cannot be opened or was lost; the service reconnects with back-off."""


class Camera(ABC):
    def __init__(self, cfg):
        self.cfg = cfg
        self.id = cfg.id
        self.seq = 0

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def grab(self, timeout_s: float) -> list[Frame]:
        """Frames for the triggers seen within ``timeout_s`` (empty: none). Failed/skipped ones included."""

    @abstractmethod
    def close(self) -> None: ...

    def trigger(self, part_id: str | None = None) -> bool:
        """Software trigger (where supported); returns False when this camera has none."""
        return False

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    @property
    def paced_by_line(self) -> bool:
        """True for a source that can wait for the line (a replay); real cameras cannot: their frames
        overrun into not_inspected verdicts when the queue is full."""
        return False

    @property
    def exhausted(self) -> bool:
        """True when a finite source (a folder without loop) has nothing more to give."""
        return False


REGISTRY = {
    "folder": ("edge_app.capture.folder", "FolderCameraSource", "core"),
    "opencv": ("edge_app.capture.opencv_cam", "OpenCVCameraSource", "core"),
    "pylon": ("edge_app.capture.pylon", "PylonCameraSource", "basler"),
}


def make_camera(cfg) -> Camera:
    if cfg.type not in REGISTRY:
        msg = f"unknown camera type {cfg.type!r}; choose one of {', '.join(REGISTRY)}"
        raise ValueError(msg)
    module, cls, extra = REGISTRY[cfg.type]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        msg = f"camera type '{cfg.type}' needs {exc.name}: pip install 'lineinspect[{extra}]'"
        raise CameraError(msg) from exc
    return getattr(mod, cls)(cfg)
