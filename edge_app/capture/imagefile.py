"""Reading one image file as a camera frame: a file that is not a complete image is refused.

libjpeg decodes a truncated JPEG into a whole-looking image (the missing rows grey) with only a
warning on stderr, and a half-written PNG can decode partly: inspecting either gives a verdict on
pixels the camera never saw. ``read_frame_image`` checks the container first (JPEG end-of-image
marker, PNG IEND chunk, BMP size field) and decodes only a complete file.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class ImageFileError(ValueError):
    """The file is not a complete, decodable image: ``reason`` is the not_inspected reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def incomplete(data: bytes) -> str | None:
    """Why ``data`` is not a complete image file, or None when its container looks whole."""
    if data[:2] == b"\xff\xd8":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return f"JPEG without its end-of-image marker ({len(data)} bytes: truncated or still being written)"
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if not data.endswith(PNG_END):
            return f"PNG without its IEND chunk ({len(data)} bytes: truncated or still being written)"
        return None
    if data[:2] == b"BM" and len(data) >= 6:
        size = int.from_bytes(data[2:6], "little")
        if len(data) < size:
            return f"BMP of {len(data)} bytes, its header says {size}: truncated"
    return None


def read_frame_image(path: Path) -> np.ndarray:
    """The decoded image (as ``cv2.IMREAD_UNCHANGED``), or ImageFileError with the reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageFileError("grab_failed", f"cannot read {Path(path).name}: {exc.strerror or exc}") from exc
    why = incomplete(data)
    if why is not None:
        raise ImageFileError("incomplete_image", f"{Path(path).name}: {why}")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageFileError("grab_failed", f"cannot decode {Path(path).name} (not an image OpenCV reads)")
    return img
