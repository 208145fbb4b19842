"""Basler cameras through pypylon (also the pylon camera emulator, PYLON_CAMEMU=N).

One thread owns the camera: software triggers requested from elsewhere (MQTT) are queued and
executed by the grabbing thread. Failed grabs and BlockID gaps become Frames with an error, so
every trigger still yields exactly one verdict; device removal raises CameraError (the service
reconnects with back-off).
"""

from __future__ import annotations

import logging
import queue
import time

import numpy as np
from pypylon import genicam, pylon

from edge_app.capture import Camera, CameraError
from edge_app.frame import Frame

log = logging.getLogger(__name__)

_FORMAT_ALIASES = {"BGR8": ("BGR8", "BGR8Packed"), "Mono8": ("Mono8",)}


def _set(cam, names: tuple[str, ...], value) -> str | None:
    """Set the first node of ``names`` that exists and is writable; returns its name."""
    nodemap = cam.GetNodeMap()
    for name in names:
        try:
            node = nodemap.GetNode(name)
        except genicam.GenericException:
            node = None
        if node is None or not genicam.IsWritable(node):
            continue
        getattr(cam, name).Value = value
        return name
    return None


class PylonCameraSource(Camera):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.cam = None
        self.last_block: int | None = None
        self.triggers: queue.Queue = queue.Queue()
        self.next_soft = 0.0
        self.converter = None

    # --- open / configure ---------------------------------------------------------------
    def _select(self):
        tlf = pylon.TlFactory.GetInstance()
        devices = tlf.EnumerateDevices()
        if not devices:
            msg = f"[{self.id}] no Basler camera found"
            raise CameraError(msg)
        for d in devices:
            if self.cfg.serial and d.GetSerialNumber() != self.cfg.serial:
                continue
            if self.cfg.user_id and d.GetUserDefinedName() != self.cfg.user_id:
                continue
            return tlf.CreateDevice(d)
        want = f"serial {self.cfg.serial}" if self.cfg.serial else f"user id {self.cfg.user_id}"
        have = ", ".join(f"{d.GetSerialNumber()} ({d.GetUserDefinedName() or '-'})" for d in devices)
        msg = f"[{self.id}] no camera with {want}; found {have}"
        raise CameraError(msg)

    def open(self) -> None:
        try:
            self.cam = pylon.InstantCamera(self._select())
            self.cam.Open()
            self._configure()
            self.cam.MaxNumBuffer.Value = self.cfg.buffer_count
            self.cam.StartGrabbing(pylon.GrabStrategy_OneByOne)
        except genicam.GenericException as exc:
            self.close()
            msg = f"[{self.id}] cannot open/configure the camera: {exc}"
            raise CameraError(msg) from exc
        self.last_block = None
        self.next_soft = time.monotonic()
        info = self.cam.GetDeviceInfo()
        log.info("[%s] opened %s %s", self.id, info.GetModelName(), info.GetSerialNumber())

    def _configure(self) -> None:
        cam, cfg = self.cam, self.cfg
        if cfg.emulator_image_dir is not None:
            if not cfg.emulator_image_dir.is_dir():
                msg = f"[{self.id}] emulator_image_dir not found: {cfg.emulator_image_dir}"
                raise CameraError(msg)
            _set(cam, ("TestImageSelector",), "Off")
            if not _set(cam, ("ImageFileMode",), "On"):
                msg = f"[{self.id}] emulator_image_dir set but this camera has no ImageFileMode (not an emulator?)"
                raise CameraError(msg)
            cam.ImageFilename.Value = str(cfg.emulator_image_dir)
        offered = list(cam.PixelFormat.Symbolics) if cfg.pixel_format else []
        if cfg.pixel_format and not any(
            _set(cam, ("PixelFormat",), f)
            for f in _FORMAT_ALIASES.get(cfg.pixel_format, (cfg.pixel_format,))
            if f in offered
        ):
            msg = f"[{self.id}] pixel format {cfg.pixel_format} not offered: {list(cam.PixelFormat.Symbolics)}"
            raise CameraError(msg)
        if cfg.roi:
            _set(cam, ("OffsetX",), 0)
            _set(cam, ("OffsetY",), 0)
            _set(cam, ("Width",), cfg.roi.width)
            _set(cam, ("Height",), cfg.roi.height)
            _set(cam, ("OffsetX",), cfg.roi.x)
            _set(cam, ("OffsetY",), cfg.roi.y)
        if cfg.exposure_us is not None and not _set(cam, ("ExposureTime", "ExposureTimeAbs"), float(cfg.exposure_us)):
            log.warning("[%s] camera has no writable exposure time node", self.id)
        if cfg.gain_db is not None and not _set(cam, ("Gain", "GainAbs"), float(cfg.gain_db)):
            log.warning("[%s] camera has no writable gain (dB) node", self.id)
        trig = cfg.trigger
        _set(cam, ("TriggerSelector",), "FrameStart")
        if trig.mode == "free_run":
            _set(cam, ("TriggerMode",), "Off")
        else:
            _set(cam, ("TriggerMode",), "On")
            source = "Software" if trig.mode == "software" else trig.line
            if not _set(cam, ("TriggerSource",), source):
                msg = f"[{self.id}] cannot set TriggerSource {source}"
                raise CameraError(msg)
            if trig.mode == "hardware":
                _set(cam, ("TriggerActivation",), "RisingEdge" if trig.edge == "rising" else "FallingEdge")

    # --- grabbing -----------------------------------------------------------------------
    def trigger(self, part_id: str | None = None) -> bool:
        if self.cfg.trigger.mode != "software":
            return False
        self.triggers.put(part_id)
        return True

    def _fire_software_trigger(self) -> None:
        if self.cam.WaitForFrameTriggerReady(1000, pylon.TimeoutHandling_Return):
            self.cam.ExecuteSoftwareTrigger()
        else:
            log.warning("[%s] camera not ready for a software trigger", self.id)

    def grab(self, timeout_s: float) -> list[Frame]:
        if self.cam is None or not self.cam.IsGrabbing():
            msg = f"[{self.id}] camera is not grabbing"
            raise CameraError(msg)
        trig = self.cfg.trigger
        part_hint = None
        fired = False
        try:
            if trig.mode == "software":
                try:
                    part_hint = self.triggers.get_nowait()
                    self._fire_software_trigger()
                    fired = True
                except queue.Empty:
                    pass
                if not fired and trig.software_rate_hz and time.monotonic() >= self.next_soft:
                    self.next_soft = max(self.next_soft + 1.0 / trig.software_rate_hz, time.monotonic() - 1.0)
                    self._fire_software_trigger()
                    fired = True
                if not fired:
                    # nothing to trigger: wait a little for a queued trigger, without blocking long
                    try:
                        part_hint = self.triggers.get(timeout=min(timeout_s, 0.05))
                        self._fire_software_trigger()
                        fired = True
                    except queue.Empty:
                        return []
            res = self.cam.RetrieveResult(int(timeout_s * 1000), pylon.TimeoutHandling_Return)
        except genicam.GenericException as exc:
            if self.cam.IsCameraDeviceRemoved():
                msg = f"[{self.id}] camera removed: {exc}"
                raise CameraError(msg) from exc
            raise CameraError(f"[{self.id}] grab error: {exc}") from exc
        if self.cam.IsCameraDeviceRemoved():
            msg = f"[{self.id}] camera removed (unplugged or power lost)"
            raise CameraError(msg)
        if not res.IsValid():
            if fired:  # we triggered, nothing came: that trigger still gets its verdict
                seq = self.next_seq()
                return [
                    Frame(
                        self.id,
                        seq,
                        part_hint or str(seq),
                        time.time(),
                        error="grab_failed",
                        detail="no frame within grab_timeout_ms after the software trigger",
                    )
                ]
            return []  # timeout: no trigger came
        try:
            return self._frames_from(res, part_hint)
        finally:
            res.Release()

    def _frames_from(self, res, part_hint: str | None) -> list[Frame]:
        frames: list[Frame] = []
        block = int(res.BlockID)
        now = time.time()
        if self.last_block is not None and block > self.last_block + 1:
            for missing in range(self.last_block + 1, block):
                seq = self.next_seq()
                frames.append(
                    Frame(
                        self.id,
                        seq,
                        str(seq),
                        now,
                        error="skipped_buffer",
                        detail=f"BlockID {missing} never delivered",
                        block_id=missing,
                    )
                )
        self.last_block = block
        seq = self.next_seq()
        frame = Frame(self.id, seq, part_hint or str(seq), now, block_id=block)
        if part_hint:
            frame.detail = "part id from trigger"
        if not res.GrabSucceeded():
            frame.error = "grab_failed"
            frame.detail = f"{res.ErrorCode:#x}: {res.ErrorDescription}"
        else:
            frame.image = self._to_array(res)
        frames.append(frame)
        return frames

    def _to_array(self, res) -> np.ndarray:
        fmt = res.GetPixelType()
        if fmt == pylon.PixelType_Mono8:
            return res.GetArray().copy()
        if fmt in (pylon.PixelType_BGR8packed,):
            return res.GetArray().copy()
        if self.converter is None:
            self.converter = pylon.ImageFormatConverter()
            self.converter.OutputPixelFormat = pylon.PixelType_BGR8packed
            self.converter.OutputBitAlignment = pylon.OutputBitAlignment_MsbAligned
        return self.converter.Convert(res).GetArray().copy()

    def close(self) -> None:
        if self.cam is None:
            return
        try:
            if self.cam.IsGrabbing():
                self.cam.StopGrabbing()
            if self.cam.IsOpen():
                self.cam.Close()
            self.cam.DestroyDevice()
        except genicam.GenericException as exc:
            log.warning("[%s] error while closing: %s", self.id, exc)
        self.cam = None
