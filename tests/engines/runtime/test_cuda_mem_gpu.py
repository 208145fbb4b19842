"""The TensorRT runtime's GPU buffers (engines.runtime.cuda_mem) against the real pycuda and
cuda-python on an NVIDIA GPU. TensorRT itself is not needed; skipped where there is no GPU or
no such package (CI). benchmarks/gpu_check.sh runs it on the GPU machine."""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("prefer", ["pycuda", "cuda-python"])
def test_page_locked_round_trip_on_one_stream(prefer):
    package = "pycuda" if prefer == "pycuda" else "cuda"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    from engines.runtime.cuda_mem import CudaPythonBackend, PyCudaBackend

    cls = PyCudaBackend if prefer == "pycuda" else CudaPythonBackend
    cuda = cls(0)
    try:
        with cuda:
            assert cuda.device_name()
            assert cuda.compute_capability()[0] >= 5
            frame = cuda.host_array((2, 256, 256, 3), np.uint8)
            frame[:] = np.random.default_rng(0).integers(0, 256, frame.shape, dtype=np.uint8)
            back = cuda.host_array((2, 256, 256, 3), np.uint8)
            back[:] = 0
            dev = cuda.device_alloc(frame.nbytes)
            assert isinstance(cuda.stream_handle, int)
            cuda.htod(dev, frame)
            cuda.dtoh(back, dev)
            cuda.synchronize()
            np.testing.assert_array_equal(back, frame)
    finally:
        cuda.free()
