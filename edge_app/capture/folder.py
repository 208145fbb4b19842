"""Replays a folder of images in name order, at a set rate or as fast as the line takes them."""

from __future__ import annotations

import logging
import time

from edge_app.capture import Camera, CameraError
from edge_app.capture.imagefile import ImageFileError, read_frame_image
from edge_app.frame import Frame

log = logging.getLogger(__name__)
EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FolderCameraSource(Camera):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.files: list = []
        self.index = 0
        self.next_t = 0.0

    def open(self) -> None:
        path = self.cfg.path
        if not path.is_dir():
            msg = f"[{self.id}] image folder not found: {path}"
            raise CameraError(msg)
        self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTS)
        if not self.files:
            msg = f"[{self.id}] no images in {path}"
            raise CameraError(msg)
        self.next_t = time.monotonic()

    @property
    def paced_by_line(self) -> bool:
        return self.cfg.rate_hz is None  # "as fast as the line takes them"

    @property
    def exhausted(self) -> bool:
        return not self.cfg.loop and self.index >= len(self.files)

    def grab(self, timeout_s: float) -> list[Frame]:
        if self.exhausted:
            time.sleep(min(timeout_s, 0.05))
            return []
        if self.cfg.rate_hz:
            wait = self.next_t - time.monotonic()
            if wait > timeout_s:
                time.sleep(timeout_s)
                return []
            if wait > 0:
                time.sleep(wait)
            self.next_t = max(self.next_t + 1.0 / self.cfg.rate_hz, time.monotonic() - 1.0)
        path = self.files[self.index % len(self.files)]
        self.index += 1
        seq = self.next_seq()
        frame = Frame(self.id, seq, str(seq), time.time())
        try:
            frame.image = read_frame_image(path)
            frame.detail = path.name
        except ImageFileError as exc:
            frame.error, frame.detail = exc.reason, exc.detail
        return [frame]

    def close(self) -> None:
        self.files = []
