"""TEST DOUBLE of the TensorRT 10/11 and pycuda Python APIs — a fake, named as such.

TensorRT and pycuda cannot be installed on the build machines. This double implements the
subset of their APIs that ``engines.runtime.tensorrt`` and ``engines.runtime.cuda_mem`` call, with
the same names and call shapes, and checks the rules those APIs impose (input shape set before
execution, an address for every I/O tensor, buffers large enough, profile bounds, builder flags
that TensorRT 11 removed). "Device memory" is host memory keyed by fake pointers; a "plan" is a
small header plus the ONNX bytes, and execution runs that ONNX graph with ONNX Runtime, so
outputs are real numbers. It proves the calling code is consistent, not that TensorRT runs.
"""

from __future__ import annotations

import enum
import json
import types

import numpy as np

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"


# ----------------------------------------------------------------------------------------------
# fake pycuda.driver
# ----------------------------------------------------------------------------------------------
class _DeviceMemory:
    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self.next = 0x10000

    def alloc(self, nbytes: int) -> int:
        ptr = self.next
        self.next += (nbytes + 0xFFF) & ~0xFFF
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def block(self, ptr: int, nbytes: int) -> np.ndarray:
        if ptr not in self.blocks:
            msg = f"fake cuda: invalid device pointer {ptr:#x}"
            raise RuntimeError(msg)
        buf = self.blocks[ptr]
        if nbytes > buf.size:
            msg = f"fake cuda: copy of {nbytes} bytes overruns a {buf.size}-byte allocation"
            raise RuntimeError(msg)
        return buf[:nbytes]


def make_fake_pycuda(gpu_name: str = "NVIDIA Fake GPU", memory: _DeviceMemory | None = None):
    mem = memory or _DeviceMemory()
    state = {"context_depth": 0, "copies": []}

    class DeviceAllocation:
        def __init__(self, nbytes: int):
            self.ptr = mem.alloc(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            mem.blocks.pop(self.ptr, None)

    class Context:
        @staticmethod
        def pop() -> None:
            if state["context_depth"] <= 0:
                msg = "fake cuda: Context.pop() without a pushed context"
                raise RuntimeError(msg)
            state["context_depth"] -= 1

    class PrimaryContext:
        def push(self) -> None:
            state["context_depth"] += 1

        def detach(self) -> None:
            pass

    class Device:
        def __init__(self, index: int):
            self.index = index

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return (9, 0)

        def retain_primary_context(self) -> PrimaryContext:
            return PrimaryContext()

    class Stream:
        handle = 0xABC

        def synchronize(self) -> None:
            pass

    def _need_context() -> None:
        if state["context_depth"] <= 0:
            msg = "fake cuda: no current context (push the context before CUDA calls)"
            raise RuntimeError(msg)

    def memcpy_htod_async(dst, src: np.ndarray, stream=None) -> None:
        _need_context()
        src = np.ascontiguousarray(src)
        mem.block(int(dst), src.nbytes)[:] = src.view(np.uint8).ravel()
        state["copies"].append(("htod", src.nbytes))

    def memcpy_dtoh_async(dst: np.ndarray, src, stream=None) -> None:
        _need_context()
        if not dst.flags["C_CONTIGUOUS"]:
            msg = "fake cuda: dtoh destination must be contiguous"
            raise RuntimeError(msg)
        dst.view(np.uint8).reshape(-1)[:] = mem.block(int(src), dst.nbytes)
        state["copies"].append(("dtoh", dst.nbytes))

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda: None
    driver.Device = Device
    driver.Context = Context
    driver.Stream = Stream
    driver.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)
    driver.mem_alloc = DeviceAllocation
    driver.memcpy_htod_async = memcpy_htod_async
    driver.memcpy_dtoh_async = memcpy_dtoh_async
    driver.state = state
    pkg = types.ModuleType("pycuda")
    pkg.driver = driver
    return pkg, driver, mem


# ----------------------------------------------------------------------------------------------
# fake tensorrt
# ----------------------------------------------------------------------------------------------
def make_fake_tensorrt(version: str, memory: _DeviceMemory):
    major = int(version.split(".")[0])
    calls: list[str] = []

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity

    class DataType(enum.Enum):
        FLOAT = "float32"
        HALF = "float16"
        UINT8 = "uint8"

    def nptype(dt: DataType):
        return np.dtype(dt.value).type

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    flag_names = ["TF32"] + (["FP16", "INT8"] if major < 11 else [])
    BuilderFlag = enum.Enum("BuilderFlag", flag_names)
    creation = ["STRONGLY_TYPED"] if major >= 10 else ["EXPLICIT_BATCH"]
    NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {n: i for i, n in enumerate(creation)}
    )

    class Network:
        def __init__(self, flags: int):
            self.flags = flags
            self.onnx: bytes | None = None

    class OnnxParser:
        def __init__(self, network: Network, logger):
            self.network = network
            self.errors: list[str] = []

        def parse_from_file(self, path: str) -> bool:
            import onnx

            with open(path, "rb") as f:
                data = f.read()
            try:
                model = onnx.load_from_string(data)
                onnx.checker.check_model(model)
            except Exception as exc:
                self.errors.append(f"fake parser: {exc}")
                return False
            # the documented parser restrictions (operators, uint8, constant inputs) refuse the graph
            from engines.trt_compat import tensorrt_problems

            self.errors += [f"fake parser: {p}" for p in tensorrt_problems(model)]
            if self.errors:
                return False
            self.network.onnx = data
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name, mn, opt, mx) -> None:
            if not (
                all(a <= b for a, b in zip(mn, opt, strict=True)) and all(a <= b for a, b in zip(opt, mx, strict=True))
            ):
                msg = f"fake trt: profile min <= opt <= max violated for {name}"
                raise ValueError(msg)
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data or b"fake-timing-cache"

        def serialize(self) -> bytes:
            return self.data

    class Config:
        def __init__(self) -> None:
            self.flags: set = set()
            self.profiles: list[Profile] = []
            self.pools: dict = {}
            self.cache = None
            self.int8_calibrator = None

        def set_memory_pool_limit(self, pool, nbytes: int) -> None:
            self.pools[pool] = nbytes

        def add_optimization_profile(self, p: Profile) -> int:
            self.profiles.append(p)
            return len(self.profiles) - 1

        def set_flag(self, flag) -> None:
            self.flags.add(flag)

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            return self.cache

        def set_calibration_profile(self, p: Profile) -> None:
            self.calibration_profile = p

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags: int = 0) -> Network:
            calls.append(f"create_network({flags})")
            return Network(flags)

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config):
            if network.onnx is None or not config.profiles:
                return None
            shapes = config.profiles[0].shapes["image"]
            header = {
                "version": version,
                "fp16": any(f.name == "FP16" for f in config.flags),
                "strongly_typed": bool(network.flags),
                "max_shape": list(shapes[2]),
                "min_shape": list(shapes[0]),
            }
            calls.append("build_serialized_network")
            return PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    class Context:
        def __init__(self, engine: Engine):
            self.engine = engine
            self.addresses: dict[str, int] = {}
            self.input_shape: tuple | None = None

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            if name not in self.engine.io:
                return False
            self.addresses[name] = int(ptr)
            return True

        def set_input_shape(self, name: str, shape) -> bool:
            mn, mx = self.engine.header["min_shape"], self.engine.header["max_shape"]
            if name != "image" or not all(a <= b <= c for a, b, c in zip(mn, shape, mx, strict=True)):
                return False
            self.input_shape = tuple(shape)
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if self.input_shape is None or set(self.addresses) != set(self.engine.io):
                return False
            n = self.input_shape[0]
            nbytes = int(np.prod(self.input_shape))
            x = memory.block(self.addresses["image"], nbytes).reshape(self.input_shape).copy()
            amap, score = self.engine.session.run(["anomaly_map", "score"], {"image": x})
            memory.block(self.addresses["anomaly_map"], amap.nbytes)[:] = amap.view(np.uint8).ravel()
            memory.block(self.addresses["score"], score.nbytes)[:] = score.view(np.uint8).ravel()
            calls.append(f"execute_async_v3(batch={n})")
            return True

    class Engine:
        def __init__(self, header: dict, onnx_bytes: bytes):
            import onnxruntime as ort

            self.header = header
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.io = ["image", "anomaly_map", "score"]

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return self.io[i]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType.UINT8 if name == "image" else DataType.FLOAT

        def get_tensor_profile_shape(self, name: str, profile: int):
            return [self.header["min_shape"], self.header["max_shape"], self.header["max_shape"]]

        def create_execution_context(self) -> Context:
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes):
            if not data.startswith(PLAN_MAGIC):
                self.logger.log(Severity.ERROR, "fake trt: not a plan")
                return None
            head, _, onnx_bytes = data[len(PLAN_MAGIC) :].partition(b"\n")
            header = json.loads(head)
            if header["version"] != version:
                self.logger.log(Severity.ERROR, "fake trt: plan built by another TensorRT version")
                return None
            try:
                return Engine(header, onnx_bytes)
            except Exception as exc:
                self.logger.log(Severity.ERROR, f"fake trt: {exc}")
                return None

    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.ILogger = ILogger
    mod.Logger = ILogger
    mod.Builder = Builder
    mod.OnnxParser = OnnxParser
    mod.Runtime = Runtime
    mod.BuilderFlag = BuilderFlag
    mod.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    mod.MemoryPoolType = MemoryPoolType
    mod.TensorIOMode = TensorIOMode
    mod.DataType = DataType
    mod.nptype = nptype
    mod.calls = calls
    if major < 11:

        class IInt8EntropyCalibrator2:
            def __init__(self) -> None:
                pass

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return mod
