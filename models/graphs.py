"""Read a model file's input and output tensors (name, dtype, shape) without a runtime.

ONNX through ``onnx`` (the graph's inputs that are not initializers, as ONNX Runtime lists
them); TFLite through the flatbuffers schema classes that ship in
``ai_edge_litert.schema_py_generated`` (subgraph 0, ``shape_signature`` where the file has it,
as LiteRT reports it). A dynamic dimension is ``None``; an unranked tensor has shape ``None``.
Dtypes are numpy's names (``float32``, ``int64``, ``bool``…) or the format's own name in
lower case for types numpy lacks (``string``, ``bfloat16``, ``sequence``…).

Errors: ``ValueError`` if the bytes are not a model of the format (one line, no traceback
text of the parser).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["GraphTensor", "ModelTensors", "model_tensors"]


@dataclass(frozen=True, kw_only=True)
class GraphTensor:
    name: str
    dtype: str
    shape: tuple[int | None, ...] | None  # None = unranked; a None dimension is dynamic

    def describe(self) -> str:
        """``'x' float32 (?, 64)``, as the agent's messages write a tensor."""
        if self.shape is None:
            return f"{self.name!r} {self.dtype} (unranked)"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r} {self.dtype} ({dims})"


@dataclass(frozen=True, kw_only=True)
class ModelTensors:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]


def model_tensors(fmt: str, data: bytes) -> ModelTensors:
    """The inputs and outputs of a model of format ``fmt`` ("onnx" | "tflite")."""
    if fmt == "onnx":
        return _onnx_tensors(data)
    if fmt == "tflite":
        return _tflite_tensors(data)
    raise ValueError(f"unknown model format {fmt!r}; expected 'onnx' or 'tflite'")


# -- ONNX ---------------------------------------------------------------------------------
_ONNX_NAMES = {"FLOAT": "float32", "DOUBLE": "float64", "FLOAT16": "float16"}


def _onnx_tensors(data: bytes) -> ModelTensors:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        why = f"{type(exc).__name__}: {exc}"[:120]
        raise ValueError(f"not an ONNX model ({why})") from exc
    if not model.HasField("graph") or not model.graph.output:
        raise ValueError("not an ONNX model (no graph with outputs)")
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    return ModelTensors(
        inputs=tuple(_onnx_tensor(v) for v in graph.input if v.name not in constants),
        outputs=tuple(_onnx_tensor(v) for v in graph.output),
    )


def _onnx_tensor(value: Any) -> GraphTensor:
    import onnx

    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        label = (kind or "untyped").removesuffix("_type")
        return GraphTensor(name=value.name, dtype=label, shape=None)
    t = value.type.tensor_type
    type_name = onnx.TensorProto.DataType.Name(t.elem_type)
    dtype = _ONNX_NAMES.get(type_name, type_name.lower())
    if not t.HasField("shape"):
        return GraphTensor(name=value.name, dtype=dtype, shape=None)
    dims = tuple(
        int(d.dim_value) if d.WhichOneof("value") == "dim_value" else None for d in t.shape.dim
    )
    return GraphTensor(name=value.name, dtype=dtype, shape=dims)


# -- TFLite -------------------------------------------------------------------------------
def _tflite_tensors(data: bytes) -> ModelTensors:
    from ai_edge_litert import schema_py_generated as tfl

    if len(data) < 8 or not tfl.Model.ModelBufferHasIdentifier(data, 0):
        raise ValueError("not a TFLite model (no TFL3 file identifier)")
    names = {v: k.lower() for k, v in vars(tfl.TensorType).items() if not k.startswith("_")}
    try:
        model = tfl.Model.GetRootAs(data, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("no subgraph")
        graph = model.Subgraphs(0)

        def tensor(index: int) -> GraphTensor:
            t = graph.Tensors(index)
            dims = t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else t.ShapeAsNumpy()
            shape = () if isinstance(dims, int) else tuple(None if d < 0 else int(d) for d in dims)
            dtype = names.get(t.Type(), f"type {t.Type()}")
            return GraphTensor(name=(t.Name() or b"").decode(), dtype=dtype, shape=shape)

        return ModelTensors(
            inputs=tuple(tensor(int(i)) for i in _indexes(graph.InputsAsNumpy())),
            outputs=tuple(tensor(int(i)) for i in _indexes(graph.OutputsAsNumpy())),
        )
    except Exception as exc:  # flatbuffers raises struct.error, IndexError… on garbage
        why = f"{type(exc).__name__}: {exc}"[:120]
        raise ValueError(f"not a readable TFLite model ({why})") from exc


def _indexes(values: Any) -> list[int]:
    """A flatbuffers vector read as numpy (or ``0`` when the vector is absent)."""
    return [] if isinstance(values, int) else [int(v) for v in values]
