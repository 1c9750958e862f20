"""Inference runtimes on the device: one small interface over ONNX Runtime and LiteRT (TFLite).

Both take a batch-first float32 array [batch, n_features] and return float32 probabilities
[batch, n_classes]. Each runtime is imported lazily inside its class, so this module imports
on a device that has only one of them.

Errors:
    RuntimeLoadError  the model file is missing, corrupt, of the other format, not shaped like
                      a classifier (one float32 rank-2 input and output), or its runtime is
                      not installed. Raised ``from`` the runtime's own exception.
    ValueError        unknown format; wrong input shape in ``run``; threads < 1.
    TypeError         non-numeric input in ``run``.
    RuntimeError      ``run`` after ``close``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "FORMATS",
    "LiteRtRuntime",
    "OrtRuntime",
    "Runtime",
    "RuntimeLoadError",
    "TensorSpec",
    "load_runtime",
]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
_SUFFIX_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
_ORT_DTYPES = {"tensor(float)": "float32"}


class RuntimeLoadError(Exception):
    """A model file could not be loaded into an inference runtime."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name (``"float32"``) and shape of a tensor; ``None`` = dynamic dim."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@runtime_checkable
class Runtime(Protocol):
    """A loaded model: ``run`` maps float32 [batch, n_features] to [batch, n_classes]."""

    format: str
    input_spec: TensorSpec
    output_spec: TensorSpec

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def load_runtime(path: Path, fmt: str | None = None, threads: int = 1) -> Runtime:
    """Load ``path`` with the runtime for ``fmt`` ("onnx" | "tflite"; default: by suffix)."""
    path = Path(path)
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"cannot tell the model format from suffix {path.suffix!r}; "
                f"pass fmt as one of {FORMATS}"
            )
    if fmt == "onnx":
        return OrtRuntime(path, threads=threads)
    if fmt == "tflite":
        return LiteRtRuntime(path, threads=threads)
    raise ValueError(f"unknown model format {fmt!r}; expected one of {FORMATS}")


class OrtRuntime:
    """ONNX Runtime on the CPU provider; ``session.run`` is thread-safe, so no lock."""

    format = "onnx"

    def __init__(self, path: Path, threads: int = 1) -> None:
        _check_threads(threads)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError("cannot load ONNX models: onnxruntime is not installed") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # An idle device should not burn its cores spinning between inferences.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise RuntimeLoadError(f"cannot load ONNX model {path}: {exc}") from exc
        self.path, self.threads = Path(path), threads
        self.input_spec = _ort_spec(session.get_inputs(), "input", path)
        self.output_spec = _ort_spec(session.get_outputs(), "output", path)
        _check_classifier(self.input_spec, self.output_spec, path)
        self._session: Any = session
        self._in_name = self.input_spec.name
        self._out_names = [self.output_spec.name]
        logger.info("loaded ONNX model %s (%s, threads=%d)", path, self.input_spec, threads)

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession`` (None once closed)."""
        return self._session

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for the rows of ``x`` (float32 [batch, n_features])."""
        x = _as_batch(x, self.input_spec)
        session = self._session
        if session is None:
            raise RuntimeError(f"runtime for {self.path} is closed")
        if x.shape[0] == 0:
            return _empty_output(self.output_spec)
        out: np.ndarray = session.run(self._out_names, {self._in_name: x})[0]
        return out

    def close(self) -> None:
        """Release the session; idempotent."""
        self._session = None


class LiteRtRuntime:
    """LiteRT (TFLite) interpreter; not thread-safe, so every use holds ``self._lock``.

    The batch dimension is resized on demand and the new size kept, so a caller that keeps
    one batch size pays for ``allocate_tensors`` once.
    """

    format = "tflite"

    def __init__(self, path: Path, threads: int = 1) -> None:
        _check_threads(threads)
        interpreter_cls = _import_interpreter()
        try:
            interp = interpreter_cls(model_path=str(path), num_threads=threads)
            interp.allocate_tensors()
            inputs, outputs = interp.get_input_details(), interp.get_output_details()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with a reason
            raise RuntimeLoadError(f"cannot load TFLite model {path}: {exc}") from exc
        self.path, self.threads = Path(path), threads
        self.input_spec = _litert_spec(inputs, "input", path)
        self.output_spec = _litert_spec(outputs, "output", path)
        _check_classifier(self.input_spec, self.output_spec, path)
        self._interp: Any = interp
        self._in_index = int(inputs[0]["index"])
        self._out_index = int(outputs[0]["index"])
        self._batch = int(inputs[0]["shape"][0])
        self._lock = threading.Lock()
        logger.info("loaded TFLite model %s (%s, threads=%d)", path, self.input_spec, threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for the rows of ``x`` (float32 [batch, n_features])."""
        x = _as_batch(x, self.input_spec)
        if x.shape[0] == 0:
            return _empty_output(self.output_spec)
        with self._lock:
            interp = self._interp
            if interp is None:
                raise RuntimeError(f"runtime for {self.path} is closed")
            if x.shape[0] != self._batch:
                logger.debug("resizing %s input batch %d -> %d", self.path, self._batch, len(x))
                interp.resize_tensor_input(self._in_index, x.shape)
                interp.allocate_tensors()
                self._batch = x.shape[0]
            interp.set_tensor(self._in_index, x)
            interp.invoke()
            out: np.ndarray = interp.get_tensor(self._out_index)  # a copy, safe after unlock
            return out

    def close(self) -> None:
        """Release the interpreter; idempotent."""
        with self._lock:
            self._interp = None


def _import_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise RuntimeLoadError(
                "cannot load TFLite models: neither ai-edge-litert nor tflite-runtime is installed"
            ) from exc
    return Interpreter


def _ort_spec(args: list[Any], kind: str, path: Path) -> TensorSpec:
    _check_single(len(args), kind, path)
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in args[0].shape)
    return TensorSpec(args[0].name, _ORT_DTYPES.get(args[0].type, args[0].type), shape)


def _litert_spec(details: list[dict[str, Any]], kind: str, path: Path) -> TensorSpec:
    _check_single(len(details), kind, path)
    d = details[0]
    signature = d.get("shape_signature", d["shape"])
    shape = tuple(int(n) if n >= 0 else None for n in signature)
    return TensorSpec(str(d["name"]), np.dtype(d["dtype"]).name, shape)


def _check_single(count: int, kind: str, path: Path) -> None:
    if count != 1:
        raise RuntimeLoadError(f"model {path} has {count} {kind}s, expected exactly 1")


def _check_classifier(inp: TensorSpec, out: TensorSpec, path: Path) -> None:
    for spec in (inp, out):
        if spec.dtype != "float32" or len(spec.shape) != 2 or spec.shape[1] is None:
            raise RuntimeLoadError(
                f"model {path}: expected float32 tensors of shape (batch, n) with n fixed, "
                f"got {spec.name!r} {spec.dtype} {spec.shape}"
            )


def _check_threads(threads: int) -> None:
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def _as_batch(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """``x`` as float32 C-contiguous [batch, n_features]; no copy if it already is."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != spec.shape[1]:
        raise ValueError(
            f"expected input of shape (batch, {spec.shape[1]}) for {spec.name!r}, got {x.shape}"
        )
    if x.dtype.kind not in "biuf":
        raise TypeError(f"expected a real-valued numeric array, got dtype {x.dtype}")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def _empty_output(spec: TensorSpec) -> np.ndarray:
    return np.empty((0, spec.shape[1] or 0), dtype=np.float32)
