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

Hot path: ``run`` on an exact ``np.ndarray`` that is already float32, C-contiguous and of
the model's width goes straight to the runtime; anything else takes the validating path
(``_as_batch``), which converts or raises. Both runtimes are also called below their public
Python wrappers when that is verified to work at load (see ``OrtRuntime`` and
``LiteRtRuntime``); ``private_api=False`` forces the public calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.manifest import FORMATS, TensorSpec

__all__ = [
    "FORMATS",
    "LiteRtRuntime",
    "OrtRuntime",
    "Runtime",
    "RuntimeLoadError",
    "StderrLineFilter",
    "TensorSpec",
    "load_runtime",
]

logger = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
# ONNX Runtime's type names -> the manifest's dtype names (``protocol.manifest.DTYPES``).
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
# The fast-path tests ``type(x) is _NDARRAY and x.dtype is _F32`` (module globals: one lookup
# each). A subclass, or a byte-swapped or metadata-carrying float32 dtype (another object),
# takes the validating path.
_NDARRAY = np.ndarray
_F32 = np.dtype(np.float32)


class RuntimeLoadError(Exception):
    """A model file could not be loaded into an inference runtime."""


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
    """ONNX Runtime on the CPU provider; ``session.run`` is thread-safe, so no lock.

    With ``private_api`` (the default) ``run`` calls the C++ session behind the Python
    ``InferenceSession`` (``session._sess.run``), skipping the wrapper's per-call checks
    (inputs present, OrtValue ownership, graph-capture and EP-fallback handling), none of
    which applies to one numpy input on the CPU provider. ``_sess`` is private, so it is
    resolved once at load and kept only if a trial call on a zero input gives exactly the
    public ``session.run`` output; otherwise (attribute missing, other signature, other
    result) ``run`` uses the public ``session.run``. ``private_api`` says which one is in use.
    """

    format = "onnx"

    def __init__(self, path: Path, threads: int = 1, *, private_api: bool = True) -> None:
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
        self._width = self.input_spec.shape[1]
        # (output names, feed, run options) -> list of outputs; None once closed.
        self._run: Any
        self._run, self.private_api = _resolve_ort_run(
            session, self.input_spec, self.output_spec, private_api
        )
        logger.info(
            "loaded ONNX model %s (%s, threads=%d, private_api=%s)",
            path,
            self.input_spec,
            threads,
            self.private_api,
        )

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession`` (None once closed)."""
        return self._session

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for the rows of ``x`` (float32 [batch, n_features])."""
        if (
            type(x) is _NDARRAY
            and x.dtype is _F32
            and x.ndim == 2
            and x.shape[1] == self._width
            and x.flags.c_contiguous
        ):
            run = self._run
            if run is not None and x.shape[0]:
                out: np.ndarray = run(self._out_names, {self._in_name: x}, None)[0]
                return out
        return self._run_checked(x)

    def _run_checked(self, x: Any) -> np.ndarray:
        x = _as_batch(x, self.input_spec)
        run = self._run
        if run is None:
            raise RuntimeError(f"runtime for {self.path} is closed")
        if x.shape[0] == 0:
            return _empty_output(self.output_spec)
        out: np.ndarray = run(self._out_names, {self._in_name: x}, None)[0]
        return out

    def close(self) -> None:
        """Release the session; idempotent. A ``run`` already in flight finishes."""
        self._run = None
        self._session = None


class LiteRtRuntime:
    """LiteRT (TFLite) interpreter; not thread-safe, so every use holds ``self._lock``.

    The batch dimension is resized on demand and the new size kept, so a caller that keeps
    one batch size pays for ``allocate_tensors`` once.

    With ``private_api`` (the default) inference calls the C++ interpreter behind the
    Python ``Interpreter`` (``_interpreter.SetTensor/Invoke/GetTensor``), resolved once at
    load and kept only if a trial on a zero input gives exactly the public calls' output.
    The public ``invoke``/``allocate_tensors`` refuse to run while anything else holds a
    reference to ``_interpreter`` (their guard for ``tensor()`` views), so the bound private
    methods are dropped, under the lock, around a resize, which uses the public calls. No
    numpy view of the interpreter's buffers is ever handed out: ``SetTensor`` copies in and
    ``GetTensor`` copies out.
    """

    format = "tflite"

    def __init__(self, path: Path, threads: int = 1, *, private_api: bool = True) -> None:
        _check_threads(threads)
        interpreter_cls = _import_interpreter()
        try:
            interp = interpreter_cls(model_path=str(path), num_threads=threads)
            with XNNPACK_NOTICE.dropped():
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
        # The input shape the interpreter is allocated for; None once closed, or while a
        # resize has not completed (so the next call resizes again).
        self._shape: tuple[int, ...] | None = tuple(int(n) for n in inputs[0]["shape"])
        self.private_api = private_api and _litert_private_ok(
            interp, self._in_index, self._out_index, self._shape
        )
        self._set: Any = None
        self._invoke: Any = None
        self._get: Any = None
        self._bind()
        self._lock = threading.Lock()
        self._acquire, self._release = self._lock.acquire, self._lock.release
        logger.info(
            "loaded TFLite model %s (%s, threads=%d, private_api=%s)",
            path,
            self.input_spec,
            threads,
            self.private_api,
        )

    def _bind(self) -> None:
        interp = self._interp
        if self.private_api:
            raw = interp._interpreter
            self._set, self._invoke, self._get = raw.SetTensor, raw.Invoke, raw.GetTensor
        else:
            self._set, self._invoke, self._get = interp.set_tensor, interp.invoke, interp.get_tensor

    def _unbind(self) -> None:
        self._set = self._invoke = self._get = None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for the rows of ``x`` (float32 [batch, n_features])."""
        if type(x) is _NDARRAY and x.dtype is _F32 and x.flags.c_contiguous:
            # Lock by hand: cheaper than ``with``. The shape test is under the lock, as
            # another thread may resize; it fails once closed, and for a new batch size, a
            # wrong width or rank, and an empty batch, which the checked path handles.
            self._acquire()
            try:
                if x.shape == self._shape:
                    self._set(self._in_index, x)
                    self._invoke()
                    out: np.ndarray = self._get(self._out_index)  # a copy, safe after unlock
                    return out
            finally:
                self._release()
        return self._run_checked(x)

    def _run_checked(self, x: Any) -> np.ndarray:
        x = _as_batch(x, self.input_spec)
        if x.shape[0] == 0:
            return _empty_output(self.output_spec)
        with self._lock:
            interp = self._interp
            if interp is None:
                raise RuntimeError(f"runtime for {self.path} is closed")
            if x.shape != self._shape:
                logger.debug("resizing %s input %s -> %s", self.path, self._shape, x.shape)
                self._shape = None
                self._unbind()  # the public resize/allocate refuse while they are held
                try:
                    interp.resize_tensor_input(self._in_index, x.shape)
                    interp.allocate_tensors()
                finally:
                    self._bind()
                self._shape = x.shape
            self._set(self._in_index, x)
            self._invoke()
            out: np.ndarray = self._get(self._out_index)  # a copy, safe after unlock
            return out

    def close(self) -> None:
        """Release the interpreter; idempotent."""
        with self._lock:
            self._shape = None
            self._unbind()
            self._interp = None


class StderrLineFilter:
    """Drops one known line that C++ code prints on the process's stderr (file descriptor 2).

    LiteRT prints ``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`` once per
    process, at the first ``allocate_tensors``, on every command that loads a TFLite model; no
    option or environment variable of ai-edge-litert turns it off (``TF_CPP_MIN_LOG_LEVEL``
    does not; ``BUILTIN_WITHOUT_DEFAULT_DELEGATES`` would, but loses XNNPACK, measured 1.8x
    slower per call). So while ``dropped()`` runs, fd 2 goes to a temporary file; afterwards
    everything written meanwhile is written to the real stderr except that one line. Real
    errors are never hidden, only held until the block ends. Once the line was seen, the
    filter does nothing (the library prints it once).
    """

    def __init__(self, line: bytes) -> None:
        self.line, self.seen = line, False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def dropped(self) -> Iterator[None]:
        if self.seen:
            yield
            return
        with self._lock:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):  # no stderr to filter
                yield
                return
            with tempfile.TemporaryFile() as held:
                os.dup2(held.fileno(), 2)
                try:
                    yield
                finally:
                    with contextlib.suppress(OSError, ValueError, AttributeError):
                        sys.stderr.flush()
                    os.dup2(saved, 2)
                    os.close(saved)
                    held.seek(0)
                    data = held.read()
                    if self.line in data:
                        self.seen = True
                        data = data.replace(self.line, b"", 1)
                    while data:
                        data = data[os.write(2, data) :]


XNNPACK_NOTICE = StderrLineFilter(b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")


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
    dtype = _ORT_DTYPES.get(args[0].type)
    if dtype is None:
        raise RuntimeLoadError(
            f"model {path}: {kind} {args[0].name!r} has type {args[0].type}, "
            f"expected one of {sorted(_ORT_DTYPES)}"
        )
    return _spec(str(args[0].name), dtype, shape, kind, path)


def _litert_spec(details: list[dict[str, Any]], kind: str, path: Path) -> TensorSpec:
    _check_single(len(details), kind, path)
    d = details[0]
    signature = d.get("shape_signature", d["shape"])
    shape = tuple(int(n) if n >= 0 else None for n in signature)
    return _spec(str(d["name"]), np.dtype(d["dtype"]).name, shape, kind, path)


def _spec(
    name: str, dtype: str, shape: tuple[int | None, ...], kind: str, path: Path
) -> TensorSpec:
    """The manifest's ``TensorSpec``; a dtype or shape it cannot describe: RuntimeLoadError."""
    try:
        return TensorSpec(name=name, dtype=dtype, shape=shape)
    except DecodeError as exc:
        raise RuntimeLoadError(f"model {path}: {kind} {name!r}: {exc}") from exc


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


def _resolve_ort_run(
    session: Any, inp: TensorSpec, out: TensorSpec, private_api: bool
) -> tuple[Any, bool]:
    """(run callable taking (output names, feed, run options), whether it is private).

    The private ``session._sess.run`` is used only if a trial call on a zero input gives
    exactly what the public ``session.run`` gives; any failure falls back to the public one.
    """
    public = session.run
    if not private_api:
        return public, False
    try:
        private = session._sess.run
        names = [out.name]
        z = np.zeros((inp.shape[0] or 1, inp.shape[1] or 0), _F32)
        want = public(names, {inp.name: z})[0]
        got = private(names, {inp.name: z}, None)[0]
        if _same_output(got, want):
            return private, True
        logger.warning(
            "onnxruntime's private session.run disagrees with the public one; using the public one"
        )
    except Exception as exc:  # a missing attribute, another signature, a failing model
        logger.info(
            "onnxruntime's private session.run is not usable (%s: %s); using the public one",
            type(exc).__name__,
            exc,
        )
    return public, False


def _litert_private_ok(interp: Any, in_index: int, out_index: int, shape: tuple[int, ...]) -> bool:
    """True if the interpreter's private SetTensor/Invoke/GetTensor match the public calls."""
    try:
        z = np.zeros(shape, _F32)
        interp.set_tensor(in_index, z)  # public first: it refuses once private refs exist
        interp.invoke()
        want = interp.get_tensor(out_index)
        raw = interp._interpreter
        raw.SetTensor(in_index, z)
        raw.Invoke()
        got = raw.GetTensor(out_index)
        if _same_output(got, want):
            return True
        logger.warning(
            "LiteRT's private interpreter calls disagree with the public ones; "
            "using the public ones"
        )
    except Exception as exc:  # a missing attribute, another signature, a failing model
        logger.info(
            "LiteRT's private interpreter calls are not usable (%s: %s); using the public ones",
            type(exc).__name__,
            exc,
        )
    return False


def _same_output(got: Any, want: Any) -> bool:
    return (
        type(got) is np.ndarray
        and type(want) is np.ndarray
        and got.dtype == want.dtype
        and got.shape == want.shape
        and bool(np.array_equal(got, want, equal_nan=True))
    )


def _empty_output(spec: TensorSpec) -> np.ndarray:
    return np.empty((0, spec.shape[1] or 0), dtype=np.float32)
