"""Runners: load one exported component and call it with numpy arrays, by tensor name.

``load_runner(target, path, *, threads=None)`` returns an object with ``input_names``,
``output_names``, ``threads`` (what the runtime actually uses; None where it does not apply) and
``run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]`` (float32 outputs). Inputs are
checked, not fixed: a missing or extra name, a wrong shape or a wrong dtype is a ValueError.

This module imports numpy and, inside each runner, that target's own runtime; never torch, never
toolkit. One exception, forced by ExecuTorch itself: its Python runtime (``executorch.runtime`` /
``executorch.extension.pybindings.portable_lib``) imports torch, links libtorch, and accepts and
returns only ``torch.Tensor`` (numpy inputs are refused: "Unsupported python type
numpy.ndarray"). The ExecuTorch runner therefore imports torch lazily, inside itself, and converts
numpy ↔ torch at its boundary. On a device, the torch-free way to run a ``.pte`` is the native
runner (``native/``, linked against the ExecuTorch C++ runtime).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

# Constant method of an ExecuTorch program holding {"inputs": [...], "outputs": [...]} as UTF-8
# bytes (written by targets/executorch.py).
EXECUTORCH_IO_NAMES_METHOD = "io_names"


class RuntimeUnavailable(RuntimeError):
    """The target's runtime cannot run on this host; the message says why."""


def cuda_unavailable() -> str | None:
    """None when the CUDA driver reports a GPU, else the reason (via libcuda; no torch, no SDK)."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return "no NVIDIA driver (libcuda not found)"
    if lib.cuInit(0) != 0:
        return "the CUDA driver failed to initialise (cuInit)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "no CUDA GPU"
    return None


def _dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Runner:
    """Shared input checking. Subclasses set ``input_specs`` {name: (shape, dtype)} and
    ``output_names``, and implement ``_run(inputs) -> list[np.ndarray]`` in output order."""

    target = ""
    input_specs: dict[str, tuple[tuple[int, ...], np.dtype]]
    output_names: list[str]
    threads: int | None = None

    @property
    def input_names(self) -> list[str]:
        return list(self.input_specs)

    def _check(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_specs if n not in inputs]
        extra = [n for n in inputs if n not in self.input_specs]
        if missing or extra:
            raise ValueError(f"{self.target}: inputs must be named {self.input_names}; "
                             f"missing {missing}, unexpected {extra}")
        arrays = []
        for name, (shape, dtype) in self.input_specs.items():
            array = inputs[name]
            if not isinstance(array, np.ndarray):
                raise ValueError(f"{self.target}: input {name!r} must be a numpy array, "
                                 f"got {type(array).__name__}")
            if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                raise ValueError(f"{self.target}: input {name!r} must be {dtype} {tuple(shape)}, "
                                 f"got {array.dtype} {tuple(array.shape)}")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._run(self._check(inputs))
        return {name: np.asarray(out, dtype=np.float32) for name, out in
                zip(self.output_names, outputs, strict=True)}

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------

_ORT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
              "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
              "tensor(int32)": np.dtype(np.int32)}


class OnnxRunner(Runner):
    """onnxruntime on the CPU execution provider.

    Graph optimisation is ``optimization`` (an ``ort.GraphOptimizationLevel`` name), by default
    ORT_ENABLE_BASIC, which keeps fp32 parity with PyTorch within float rounding. A quantized graph
    whose export found ORT's integer kernels (the component's ``details.quantization.ort_kernels``,
    targets/onnx_kernels.py) is run at the level that fuses them (``DevicePipeline`` passes it):
    at BASIC the same QDQ graph runs as DequantizeLinear + float32 kernels.
    """

    target = "onnx"

    def __init__(self, path: Path, *, threads: int | None = None, optimization: str = "ORT_ENABLE_BASIC"):
        import onnxruntime as ort

        level = getattr(ort.GraphOptimizationLevel, optimization, None)
        if level is None:
            raise ValueError(f"{path}: unknown ONNX Runtime graph optimisation level {optimization!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        self.optimization = optimization
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_specs = {}
        for value in self.session.get_inputs():
            if value.type not in _ORT_TYPES or any(not isinstance(d, int) for d in value.shape):
                raise ValueError(f"{path}: input {value.name!r} is {value.type} {value.shape}; "
                                 "runners take static float tensors")
            self.input_specs[value.name] = (tuple(value.shape), _ORT_TYPES[value.type])
        self.output_names = [value.name for value in self.session.get_outputs()]

    def _run(self, arrays):
        return self.session.run(self.output_names, dict(zip(self.input_specs, arrays)))


# ---------------------------------------------------------------------------------------------
# ExecuTorch
# ---------------------------------------------------------------------------------------------

# c10::ScalarType codes, as MethodMeta's TensorInfo.dtype() returns them.
_ET_DTYPES = {3: np.dtype(np.int32), 4: np.dtype(np.int64), 5: np.dtype(np.float16),
              6: np.dtype(np.float32), 7: np.dtype(np.float64)}


class ExecuTorchRunner(Runner):
    """The ExecuTorch Python runtime (XNNPACK and portable kernels linked in the wheel).

    Imports torch lazily: the ExecuTorch pybindings need it (see the module docstring). Threads:
    ``_unsafe_reset_threadpool(n)`` resets the process-wide XNNPACK threadpool before loading (no
    public API for it yet); it affects every ExecuTorch program in the process.
    """

    target = "executorch"

    def __init__(self, path: Path, *, threads: int | None = None):
        import torch  # noqa: F401  (loads libtorch for the pybindings; see the module docstring)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if threads is not None and portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(int(threads))
        self.threads = int(portable_lib._threadpool_get_thread_count())
        self.program = Runtime.get().load_program(Path(path))
        if EXECUTORCH_IO_NAMES_METHOD not in self.program.method_names:
            raise ValueError(f"{path}: no {EXECUTORCH_IO_NAMES_METHOD!r} method; export it with "
                             "targets.executorch, which records the tensor names in the program")
        raw = self.program.load_method(EXECUTORCH_IO_NAMES_METHOD).execute([])[0]
        names = json.loads(bytes(raw.numpy().astype(np.uint8)).decode("utf-8"))
        self.method = self.program.load_method("forward")
        meta = self.method.metadata
        if meta.num_inputs() != len(names["inputs"]):
            raise ValueError(f"{path}: forward takes {meta.num_inputs()} inputs but the program "
                             f"names {names['inputs']}")
        self.input_specs = {}
        for i, name in enumerate(names["inputs"]):
            info = meta.input_tensor_meta(i)
            dtype = _ET_DTYPES.get(int(info.dtype()))
            if dtype is None:
                raise ValueError(f"{path}: input {name!r} has unsupported dtype {info.dtype()}")
            self.input_specs[name] = (tuple(info.sizes()), dtype)
        self.output_names = list(names["outputs"])

    def _run(self, arrays):
        import torch

        outputs = self.method.execute([torch.from_numpy(a) for a in arrays])
        return [out.detach().numpy().copy() for out in outputs]


# ---------------------------------------------------------------------------------------------
# TensorRT
# ---------------------------------------------------------------------------------------------


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _cuda_check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTRunner(Runner):
    """A serialized TensorRT engine (``.plan``), with cuda-python for device buffers.

    ``path`` may be the bundle's ``<name>.onnx`` (what the manifest lists): the engine is then the
    ``<name>.plan`` beside it, which ``build_engines.py`` in the bundle builds on the GPU machine.
    """

    target = "tensorrt"

    def __init__(self, path: Path, *, threads: int | None = None):
        if threads is not None:
            raise ValueError("tensorrt: threads does not apply to a GPU engine; pass None")
        path = Path(path)
        if path.suffix == ".onnx":
            path = path.with_suffix(".plan")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no TensorRT engine; build it on this machine "
                                        "with the bundle's build_engines.py")
        import tensorrt as trt

        self.cudart = cudart = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine (built for "
                               "another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda_check(cudart.cudaStreamCreate())
        self.input_specs, self.output_names, self.buffers = {}, [], {}
        self.output_specs = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if any(d < 0 for d in shape):
                raise ValueError(f"{path}: tensor {name!r} has a dynamic shape {shape}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self.buffers[name] = _cuda_check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, int(self.buffers[name]))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_specs[name] = (shape, dtype)
            else:
                self.output_names.append(name)
                self.output_specs[name] = (shape, dtype)

    def _run(self, arrays):
        cudart = self.cudart
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in zip(self.input_specs, arrays):
            _cuda_check(cudart.cudaMemcpyAsync(self.buffers[name], array.ctypes.data, array.nbytes,
                                               h2d, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("tensorrt: execute_async_v3 failed")
        outputs = []
        for name in self.output_names:
            shape, dtype = self.output_specs[name]
            host = np.empty(shape, dtype=dtype)
            _cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name], host.nbytes,
                                               d2h, self.stream))
            outputs.append(host)
        _cuda_check(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for ptr in getattr(self, "buffers", {}).values():
            cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)


# ---------------------------------------------------------------------------------------------
# Core ML
# ---------------------------------------------------------------------------------------------

_COREML_DTYPES = {65568: np.dtype(np.float32), 65552: np.dtype(np.float16),
                  131104: np.dtype(np.int32), 65600: np.dtype(np.float64)}


class CoreMLRunner(Runner):
    """``coremltools.models.MLModel(path).predict`` (macOS only; compute units: ALL)."""

    target = "coreml"

    def __init__(self, path: Path, *, threads: int | None = None):
        if threads is not None:
            raise ValueError("coreml: threads does not apply (Core ML schedules its own compute "
                             "units); pass None")
        import coremltools as ct

        self.model = ct.models.MLModel(str(path))
        description = self.model.get_spec().description
        self.input_specs = {}
        for value in description.input:
            array_type = value.type.multiArrayType
            dtype = _COREML_DTYPES.get(array_type.dataType)
            if dtype is None:
                raise ValueError(f"{path}: input {value.name!r} has unsupported Core ML type "
                                 f"{array_type.dataType}")
            self.input_specs[value.name] = (tuple(int(d) for d in array_type.shape), dtype)
        self.output_names = [value.name for value in description.output]

    def _run(self, arrays):
        result = self.model.predict(dict(zip(self.input_specs, arrays)))
        return [np.asarray(result[name]) for name in self.output_names]


# ---------------------------------------------------------------------------------------------
# The table: everything the device side knows about a target, in one place
# ---------------------------------------------------------------------------------------------


def _onnx_unavailable() -> str | None:
    return None if _find("onnxruntime") else "onnxruntime is not installed"


def _executorch_unavailable() -> str | None:
    if not _find("executorch.extension.pybindings._C"):
        return "the ExecuTorch Python runtime (executorch pybindings) is not installed"
    if not _find("torch"):
        return "the ExecuTorch Python runtime needs torch, which is not installed"
    return None


def _tensorrt_unavailable() -> str | None:
    if not _find("tensorrt"):
        return "tensorrt is not installed"
    if not (_find("cuda.bindings") or _find("cuda.cudart")):
        return "cuda-python (cuda.bindings / cuda.cudart) is not installed"
    return cuda_unavailable()


def _coreml_unavailable() -> str | None:
    if sys.platform != "darwin":
        return "Core ML prediction needs macOS"
    return None if _find("coremltools") else "coremltools is not installed"


def _coreml_version_note() -> str:
    return f" (macOS {platform.mac_ver()[0]})" if sys.platform == "darwin" else ""


@dataclass(frozen=True)
class TargetRuntime:
    """How a device runs one target's files.

    ``file_suffix``: what every component file of such a bundle ends with (the toolkit's target
    table must agree: a test checks it); ``distribution``: the package whose version reports record;
    ``unavailable``: None when this host can run the files, else the reason (imports nothing heavy);
    ``version_note``: extra platform facts for the version line.
    """

    name: str
    runner: type[Runner]
    file_suffix: str
    distribution: str
    unavailable: Callable[[], str | None]
    version_note: Callable[[], str] = lambda: ""
    # (version at export, version here) -> why the files cannot be trusted to load, or None when a
    # difference is only worth a warning.
    incompatible: Callable[[tuple[int, ...], tuple[int, ...]], str | None] = lambda exported, here: None


def _executorch_incompatible(exported: tuple[int, ...], here: tuple[int, ...]) -> str | None:
    # A .pte's flatbuffer schema and operator set only grow between releases: an older runtime may
    # refuse, or misread, a program from a newer exporter (ExecuTorch promises the reverse only).
    if here[:2] < exported[:2]:
        return ("the program was exported by a newer ExecuTorch than this runtime; older runtimes are not "
                "guaranteed to load newer programs: upgrade the runtime on the device or re-export")
    return None


RUNTIMES: dict[str, TargetRuntime] = {
    "executorch": TargetRuntime("executorch", ExecuTorchRunner, ".pte", "executorch",
                                _executorch_unavailable, incompatible=_executorch_incompatible),
    "onnx": TargetRuntime("onnx", OnnxRunner, ".onnx", "onnxruntime", _onnx_unavailable),
    "tensorrt": TargetRuntime("tensorrt", TensorRTRunner, ".onnx", "tensorrt", _tensorrt_unavailable),
    "coreml": TargetRuntime("coreml", CoreMLRunner, ".mlpackage", "coremltools", _coreml_unavailable,
                            _coreml_version_note),
}


# Modules (comma-separated) that add targets to the tables when imported, on both sides: a plugin
# calls ``targets.register_target`` where the toolkit is installed, else adds its row to RUNTIMES.
PLUGINS_ENV = "ADM_EDGE_TARGET_PLUGINS"
_plugins_loaded: set[str] = set()


def load_target_plugins() -> None:
    """Import the plugin modules named in ``$ADM_EDGE_TARGET_PLUGINS`` (once each)."""
    import importlib
    import os

    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        if name not in _plugins_loaded:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise RuntimeError(f"${PLUGINS_ENV}: cannot import target plugin {name!r} ({exc})") from None
            _plugins_loaded.add(name)


def runtimes() -> dict[str, TargetRuntime]:
    """The device-side table, plugins included."""
    load_target_plugins()
    return RUNTIMES


def get_runtime(target: str) -> TargetRuntime:
    """The table entry of ``target``; an unknown name is a ValueError listing the choices."""
    if target not in runtimes():
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(sorted(RUNTIMES))}")
    return RUNTIMES[target]


def runtime_unavailable(target: str) -> str | None:
    """None when this host can run ``target``'s files, else the reason. Imports nothing heavy."""
    return get_runtime(target).unavailable()


def runtime_version(target: str) -> str:
    """The version of the runtime that runs ``target`` here (e.g. 'onnxruntime 1.32.0')."""
    entry = get_runtime(target)
    found = _dist_version(entry.distribution)
    if not found:
        return f"{entry.distribution} not installed"
    return f"{entry.distribution} {found}{entry.version_note()}"


def parse_version(text: str) -> tuple[int, ...] | None:
    """(1, 5, 1) from 'executorch 1.5.1' or '1.5.1+cpu'; None when no version is in the text."""
    import re

    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return None if match is None else tuple(int(g) for g in match.groups() if g is not None)


def version_check(target: str, version_at_export: str | None, *, here: str | None = None) -> dict:
    """Compare the runtime version a bundle was exported for with this device's (``here``: the
    runtime that will run it, default the installed distribution's, e.g. the native runner's SDK).

    ``status``: 'same', 'warning' (different, not known to break), 'error' (known incompatible) or
    'unknown' (a version is missing); ``note`` says what to do.
    """
    here = runtime_version(target) if here is None else here
    out = {"exported_for": version_at_export, "device": here}
    exported_v, here_v = parse_version(version_at_export or ""), parse_version(here)
    if exported_v is None or here_v is None:
        return {**out, "status": "unknown", "note": "a runtime version is missing; cannot compare"}
    if exported_v == here_v:
        return {**out, "status": "same", "note": None}
    why = get_runtime(target).incompatible(exported_v, here_v)
    if why is not None:
        return {**out, "status": "error", "note": why}
    return {**out, "status": "warning",
            "note": "runtime version differs from the one the bundle was exported and checked with"}


def load_runner(target: str, path: Path, *, threads: int | None = None, **options) -> Runner:
    """A runner for the exported file ``path``; RuntimeUnavailable when this host cannot run it.
    ``options``: runner-specific settings (ONNX Runtime: ``optimization``)."""
    entry = get_runtime(target)
    reason = entry.unavailable()
    if reason is not None:
        raise RuntimeUnavailable(f"{target}: {reason}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such {target} file")
    return entry.runner(path, threads=threads, **options)
