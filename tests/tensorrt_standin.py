"""A stand-in for the `tensorrt` module on a machine without TensorRT or an NVIDIA GPU.

It has the TensorRT 10 Python API names and calls that sdbridge uses, with their documented
meaning (Logger, Builder.create_network / create_builder_config / build_serialized_network,
NetworkDefinitionCreationFlag.STRONGLY_TYPED, BuilderFlag, OnnxParser.parse_from_file /
num_errors / get_error, Runtime.deserialize_cuda_engine,
ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_shape /
get_tensor_dtype / create_execution_context, IExecutionContext.set_tensor_address /
execute_async_v3, TensorIOMode, DataType), backed by onnxruntime on the CPU:
- a "serialized engine" is a header naming the stand-in and the precision, then the ONNX bytes;
  anything else fails to deserialize (None, as TensorRT returns for a foreign engine). The
  precision is the builder's precision flags, or for a strongly typed network (where each layer
  keeps the type the ONNX graph gives it) "STRONG:" and the graph's first input type;
- `install(monkeypatch, major=11)` gives TensorRT 11 instead, which removed the weak-typing
  builder flags (BuilderFlag.FP16, BF16): strong typing is all it has (its flag is accepted);
  `major=8` gives TensorRT 8.6, which has the named-tensor API but no strong typing yet;
- "device memory" is host memory: execute_async_v3 reads each input at the address given to
  set_tensor_address and writes each output at its address, as TensorRT does on the GPU, so
  the caller must give addresses of live, contiguous tensors of the engine's shapes and types.
Install it with `install(monkeypatch)`; `EXECUTIONS` counts the engine runs.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types

import numpy as np

__version__ = "10.99.0+standin"
HEADER = b"SDBRIDGE TENSORRT STAND-IN ENGINE\n"
EXECUTIONS = {"count": 0}


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity: int = WARNING) -> None:
        self.min_severity = min_severity


class BuilderFlag(enum.Enum):
    FP16 = "FP16"
    BF16 = "BF16"
    DEBUG = "DEBUG"


class BuilderFlag11(enum.Enum):  # TensorRT 11's: no precision flags
    DEBUG = "DEBUG"


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0  # deprecated and ignored since TensorRT 10
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag8(enum.IntEnum):  # TensorRT 8.6's: no strong typing yet
    EXPLICIT_BATCH = 0


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT32 = "int32"
    INT64 = "int64"


_ORT_TYPES = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
              "tensor(int32)": DataType.INT32}


class INetworkDefinition:
    def __init__(self, strongly_typed: bool) -> None:
        self.onnx: bytes | None = None
        self.strongly_typed = strongly_typed
        self.first_input_type = "?"


class IBuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        strongly_typed = bool(flags & (1 << 1))  # 1: STRONGLY_TYPED (TensorRT 9 and later)
        return INetworkDefinition(strongly_typed or __version__.startswith("11."))  # always strongly typed in 11

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if network.onnx is None:
            return None
        if network.strongly_typed and config.flags - {BuilderFlag.DEBUG, BuilderFlag11.DEBUG}:
            return None  # a precision flag on a strongly typed network: refused here (sdbridge never sets both)
        if network.strongly_typed:
            precision = "STRONG:" + network.first_input_type
        else:
            precision = ",".join(sorted(flag.value for flag in config.flags)) or "FP32"
        return HEADER + precision.encode() + b"\n" + network.onnx


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
        self.network = network
        self._errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(path)
            onnx.checker.check_model(model)
        except Exception as exc:
            self._errors.append(f"{type(exc).__name__}: {exc}")
            return False
        self.network.onnx = model.SerializeToString()
        first = model.graph.input[0].type.tensor_type.elem_type
        self.network.first_input_type = onnx.helper.tensor_dtype_to_np_dtype(first).name
        return True

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]


class ICudaEngine:
    def __init__(self, onnx_bytes: bytes) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self._tensors = {}  # name -> (mode, shape, DataType), inputs first
        for mode, entries in ((TensorIOMode.INPUT, self._session.get_inputs()),
                              (TensorIOMode.OUTPUT, self._session.get_outputs())):
            for entry in entries:
                self._tensors[entry.name] = (mode, tuple(entry.shape), _ORT_TYPES[entry.type])

    @property
    def num_io_tensors(self) -> int:
        return len(self._tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self._tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._tensors[name][0] if name in self._tensors else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._tensors[name][2]

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._addresses: dict[str, int] = {}

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if self.engine.get_tensor_mode(name) is TensorIOMode.NONE:
            return False
        self._addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if set(self._addresses) != set(self.engine._tensors):
            return False  # TensorRT: every I/O tensor needs an address
        feeds = {}
        for name, (mode, shape, dtype) in self.engine._tensors.items():
            if mode is TensorIOMode.INPUT:
                feeds[name] = _memory(self._addresses[name], shape, dtype).copy()
        outputs = self.engine._session.run(None, feeds)
        for (name, (mode, shape, dtype)), value in zip(
            [(n, t) for n, t in self.engine._tensors.items() if t[0] is TensorIOMode.OUTPUT], outputs
        ):
            _memory(self._addresses[name], shape, dtype)[...] = value
        EXECUTIONS["count"] += 1
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized: bytes) -> ICudaEngine | None:
        data = bytes(serialized)
        if not data.startswith(HEADER):
            return None
        _, onnx_bytes = data[len(HEADER):].split(b"\n", 1)
        return ICudaEngine(onnx_bytes)


def _memory(address: int, shape: tuple[int, ...], dtype: DataType) -> np.ndarray:
    """The array of `shape` and `dtype` at `address` (a tensor's data_ptr), without copying."""
    numpy_dtype = np.dtype(dtype.value)
    count = int(np.prod(shape)) if shape else 1
    buffer = (ctypes.c_byte * (count * numpy_dtype.itemsize)).from_address(address)
    return np.frombuffer(buffer, dtype=numpy_dtype, count=count).reshape(shape)


def install(monkeypatch, major: int = 10) -> types.ModuleType:
    """Make `import tensorrt` give this stand-in (TensorRT `major`: 8, 10 or 11) for the rest of the test."""
    module = sys.modules[__name__]
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    if major == 11:
        monkeypatch.setattr(module, "__version__", "11.99.0+standin")
        monkeypatch.setattr(module, "BuilderFlag", BuilderFlag11)
    elif major == 8:
        monkeypatch.setattr(module, "__version__", "8.6.99+standin")
        monkeypatch.setattr(module, "NetworkDefinitionCreationFlag", NetworkDefinitionCreationFlag8)
    elif major != 10:
        raise ValueError(f"the stand-in is TensorRT 8.6, 10 or 11, not {major}")
    EXECUTIONS["count"] = 0
    return module
