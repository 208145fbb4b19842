"""Camera backends on real inputs: an image folder and a real video file through OpenCV."""

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_app.capture import CameraError, make_camera
from edge_app.config import FolderCamera, OpenCVCamera


def _write_video(path: Path, n: int) -> None:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert vw.isOpened()
    for i in range(n):
        vw.write(np.full((48, 64, 3), 20 * i, np.uint8))
    vw.release()


def test_opencv_video_file_gives_every_frame_then_ends(tmp_path):
    video = tmp_path / "line.avi"
    _write_video(video, 5)
    cam = make_camera(OpenCVCamera(id="usb", type="opencv", source=str(video)))
    cam.open()
    frames = []
    while not cam.exhausted:
        frames += cam.grab(0.5)
    cam.close()
    assert [f.seq for f in frames] == [1, 2, 3, 4, 5]
    assert frames[0].image.shape == (48, 64, 3)
    assert frames[3].image.mean() > frames[1].image.mean()  # the real frames, in order


def test_opencv_source_that_cannot_open(tmp_path):
    cam = make_camera(OpenCVCamera(id="usb", type="opencv", source=str(tmp_path / "missing.avi")))
    with pytest.raises(CameraError, match="cannot open"):
        cam.open()


def test_folder_camera_rate_loop_and_errors(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8), i * 50, np.uint8))
    cam = make_camera(FolderCamera(id="f", type="folder", path=tmp_path, rate_hz=20, loop=True))
    cam.open()
    t0 = time.monotonic()
    frames = []
    while len(frames) < 7:
        frames += cam.grab(1.0)
    elapsed = time.monotonic() - t0
    assert [f.detail for f in frames] == ["0.png", "1.png", "2.png", "0.png", "1.png", "2.png", "0.png"]
    assert elapsed >= 6 / 20 * 0.9, "the replay keeps its rate"
    assert not cam.exhausted
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CameraError, match="no images"):
        make_camera(FolderCamera(id="e", type="folder", path=empty)).open()
    with pytest.raises(CameraError, match="not found"):
        make_camera(FolderCamera(id="e", type="folder", path=tmp_path / "nope")).open()


def test_pylon_without_pypylon_names_the_extra(monkeypatch):
    import sys

    from edge_app.config import PylonCamera

    monkeypatch.setitem(sys.modules, "pypylon", None)
    monkeypatch.delitem(sys.modules, "edge_app.capture.pylon", raising=False)
    with pytest.raises(CameraError, match=r"lineinspect\[basler\]"):
        make_camera(PylonCamera(id="p", type="pylon"))


def test_pylon_emulator_bayer_roi_and_software_trigger_part_id():
    """The emulator's test pattern in BayerRG8 is converted to BGR; ROI and exposure are applied."""
    from edge_app.config import PylonCamera

    cfg = PylonCamera(
        id="p",
        type="pylon",
        serial="0815-0000",
        pixel_format="BayerRG8",
        trigger={"mode": "software"},
        roi={"x": 16, "y": 8, "width": 320, "height": 240},
        exposure_us=1000,
        grab_timeout_ms=2000,
    )
    cam = make_camera(cfg)
    cam.open()
    try:
        assert cam.trigger("X1")
        frames = []
        end = time.monotonic() + 10
        while not frames and time.monotonic() < end:
            frames = cam.grab(2.0)
        (f,) = frames
        assert f.part_id == "X1" and f.error is None
        assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8
        assert f.block_id is not None
    finally:
        cam.close()
