"""Minimal CUDA memory/stream helpers for the TensorRT runtime: pycuda, or cuda-python as fallback.

Only what the runtime needs: device name, page-locked host arrays, device buffers, async copies
on one stream, synchronisation. Both SDKs are imported lazily, when a TensorRT runtime is made.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from engines.runtime.base import SDKMissingError


class CudaError(RuntimeError):
    pass


class PyCudaBackend:
    """pycuda: the device's primary context, pushed around every call (thread-safe use)."""

    name = "pycuda"

    def __init__(self, device_index: int = 0):
        import pycuda.driver as cuda

        self.cuda = cuda
        cuda.init()
        if device_index >= cuda.Device.count():
            msg = f"CUDA device {device_index} requested, {cuda.Device.count()} present"
            raise CudaError(msg)
        self.device = cuda.Device(device_index)
        self.ctx = self.device.retain_primary_context()
        self._keep: list[Any] = []  # DeviceAllocation objects must outlive their pointers
        with self:
            self.stream = cuda.Stream()

    def __enter__(self) -> PyCudaBackend:
        self.ctx.push()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cuda.Context.pop()

    def device_name(self) -> str:
        return self.device.name()

    def compute_capability(self) -> tuple[int, int]:
        return tuple(self.device.compute_capability())

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.cuda.pagelocked_empty(shape, dtype)

    def device_alloc(self, nbytes: int) -> int:
        buf = self.cuda.mem_alloc(max(int(nbytes), 1))
        self._keep.append(buf)
        return int(buf)

    def htod(self, dst: int, src: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dst, src, self.stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, self.stream)

    @property
    def stream_handle(self) -> int:
        return self.stream.handle

    def synchronize(self) -> None:
        self.stream.synchronize()

    def free(self) -> None:
        with self:
            for buf in self._keep:
                buf.free()
        self._keep.clear()
        self.ctx.detach()


class CudaPythonBackend:
    """NVIDIA cuda-python (``cuda.bindings.runtime``): the runtime API's primary context."""

    name = "cuda-python"

    def __init__(self, device_index: int = 0):
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:  # cuda-python < 12.6 layout
            from cuda import cudart  # type: ignore[no-redef]
        self.rt = cudart
        self.device_index = device_index
        self._check(cudart.cudaSetDevice(device_index), "cudaSetDevice")
        self._props = self._check(cudart.cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
        self.stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._device_ptrs: list[int] = []
        self._host_ptrs: list[int] = []

    def __enter__(self) -> CudaPythonBackend:
        self._check(self.rt.cudaSetDevice(self.device_index), "cudaSetDevice")
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _check(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            msg = f"{what} failed: {err}"
            raise CudaError(msg)
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def device_name(self) -> str:
        name = self._props.name
        return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)

    def compute_capability(self) -> tuple[int, int]:
        return int(self._props.major), int(self._props.minor)

    def host_array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = int(self._check(self.rt.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
        self._host_ptrs.append(ptr)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        return np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)

    def device_alloc(self, nbytes: int) -> int:
        ptr = int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))
        self._device_ptrs.append(ptr)
        return ptr

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream), "cudaMemcpyAsync")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self) -> None:
        for p in self._device_ptrs:
            self.rt.cudaFree(p)
        for p in self._host_ptrs:
            self.rt.cudaFreeHost(p)
        self._device_ptrs.clear()
        self._host_ptrs.clear()
        self.rt.cudaStreamDestroy(self.stream)


def make_cuda(device_index: int = 0, prefer: str | None = None):
    """pycuda when importable (or asked for), else cuda-python; a clear error when neither is there."""
    order = ["pycuda", "cuda-python"] if prefer in (None, "pycuda") else ["cuda-python", "pycuda"]
    errors = []
    for name in order:
        try:
            return PyCudaBackend(device_index) if name == "pycuda" else CudaPythonBackend(device_index)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    msg = (
        "runtime backend 'tensorrt' needs pycuda or cuda-python for GPU buffers ("
        + "; ".join(errors)
        + "); install it with: pip install 'lineinspect[trt]'"
    )
    raise SDKMissingError(msg)
