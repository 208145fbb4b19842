"""OpenCV source: USB index, RTSP / GStreamer URL or a video file."""

from __future__ import annotations

import time

import cv2

from edge_app.capture import Camera, CameraError
from edge_app.frame import Frame


class OpenCVCameraSource(Camera):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.cap = None
        self._ended = False

    def open(self) -> None:
        src = self.cfg.source
        self.cap = cv2.VideoCapture(src)
        if not self.cap.isOpened():
            msg = f"[{self.id}] OpenCV cannot open source {src!r}"
            raise CameraError(msg)
        if self.cfg.width:
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width)
        if self.cfg.height:
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height)
        if self.cfg.fps:
            self.cap.set(cv2.CAP_PROP_FPS, self.cfg.fps)
        self._ended = False

    @property
    def is_file(self) -> bool:
        return isinstance(self.cfg.source, str) and "://" not in self.cfg.source and "!" not in self.cfg.source

    @property
    def exhausted(self) -> bool:
        return self._ended

    def grab(self, timeout_s: float) -> list[Frame]:
        if self._ended:
            time.sleep(min(timeout_s, 0.05))
            return []
        ok, img = self.cap.read()
        if not ok:
            if self.is_file:
                self._ended = True  # end of the video file: not an error
                return []
            msg = f"[{self.id}] OpenCV source {self.cfg.source!r} stopped delivering frames"
            raise CameraError(msg)
        seq = self.next_seq()
        return [Frame(self.id, seq, str(seq), time.time(), image=img)]

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
