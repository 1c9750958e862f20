"""``register_model`` refuses what could never be released or served, in one line.

Small models are generated per case (``onnx.helper``; the TFLite writer of
``models.tflite_export``, edited through the schema's object API). Each case is also loaded
in the real agent runtime and run on batches of 1 and 3 rows: the register-time check and the
device must agree on what is servable, so the two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tfl
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.modelcheck import SUPPORTED
from edgefleet.models.tflite_export import mlp_to_tflite
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

from .homes import T0

F32, F64, I64, U8 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.UINT8
WIDTH, CLASSES = 4, 2


def meta(shape_in: list[Any] | None = None, shape_out: list[Any] | None = None,
         dtype_in: str = "float32", dtype_out: str = "float32",
         smoke_width: int = WIDTH) -> dict[str, Any]:
    return {"input": {"name": "x", "dtype": dtype_in, "shape": shape_in or [None, WIDTH]},
            "output": {"name": "y", "dtype": dtype_out, "shape": shape_out or [None, CLASSES]},
            "smoke": [{"input": [[0.0] * smoke_width], "expected": [[0.0] * CLASSES],
                       "atol": 1.0}]}


def onnx_model(in_type: int = F32, in_shape: tuple[Any, ...] = ("N", WIDTH), *,
               out_type: int = F32, reduce: bool = False, extra_input: bool = False) -> bytes:
    """x -> Cast(float) -> Flatten -> MatMul(W) [-> ReduceSum over axis 1] -> Cast(out)."""
    batch = in_shape[0] if in_shape else None
    width = int(np.prod([d for d in in_shape[1:] if isinstance(d, int)] or [WIDTH]))
    w = numpy_helper.from_array(np.ones((width, CLASSES), np.float32) / width, "w")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=F32),
             helper.make_node("Flatten", ["xf"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["z"])]
    out_shape: list[Any] = [batch, CLASSES]
    if reduce:
        nodes.append(helper.make_node("ReduceSum", ["z", "axes"], ["r"], keepdims=0))
        out_shape = [batch]
    nodes.append(helper.make_node("Cast", ["r" if reduce else "z"], ["y"], to=out_type))
    inputs = [helper.make_tensor_value_info("x", in_type, list(in_shape))]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("z2", F32, ["N", WIDTH]))
    init = [w, numpy_helper.from_array(np.array([1], np.int64), "axes")]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", out_type, out_shape)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return bytes(model.SerializeToString())


def _mlp() -> MLPClassifier:
    rng = np.random.default_rng(0)
    x = rng.random((40, WIDTH)).astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(3,), max_iter=5, random_state=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged: irrelevant here
        clf.fit(x, (x[:, 0] > 0.5).astype(int))
    return clf


def tflite_model(edit: Callable[[Any, Any, Any], None] | None = None) -> bytes:
    """The exporter's MLP [?, 4] -> [?, 2]; ``edit(model, input tensor, output tensor)``."""
    data = mlp_to_tflite(_mlp())
    if edit is None:
        return data
    m = tfl.ModelT.InitFromPackedBuf(data, 0)
    g = m.subgraphs[0]
    edit(m, g.tensors[g.inputs[0]], g.tensors[g.outputs[0]])
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _set(**values: Any) -> Callable[[Any, Any, Any], None]:
    def edit(model: Any, inp: Any, out: Any) -> None:
        for key, value in values.items():
            target, attr = key.split("_", 1)
            setattr(inp if target == "in" else out, attr, value)
    return edit


ACCEPTED = [
    ("onnx-dynamic-batch", "onnx", lambda: onnx_model(), meta()),
    ("onnx-unnamed-batch", "onnx", lambda: onnx_model(in_shape=(None, WIDTH)), meta()),
    ("tflite-dynamic-batch", "tflite", lambda: tflite_model(), meta()),
    ("tflite-fixed-batch", "tflite", lambda: tflite_model(_set(in_shapeSignature=None)),
     meta(shape_in=[1, WIDTH])),
]

REFUSED = [
    # (case, format, model bytes, metadata, what the one line must say)
    ("onnx-float64-input", "onnx", lambda: onnx_model(F64), meta(),
     "model input 'x' float64 (?, 4) has dtype float64"),
    ("onnx-int64-input", "onnx", lambda: onnx_model(I64), meta(),
     "model input 'x' int64 (?, 4) has dtype int64"),
    ("onnx-uint8-input", "onnx", lambda: onnx_model(U8), meta(),
     "model input 'x' uint8 (?, 4) has dtype uint8"),
    ("onnx-rank-3-input", "onnx", lambda: onnx_model(in_shape=("N", 2, 2)), meta(),
     "model input 'x' float32 (?, 2, 2) has rank 3"),
    ("onnx-fixed-batch", "onnx", lambda: onnx_model(in_shape=(1, WIDTH)), meta(),
     "model input 'x' float32 (1, 4) has a fixed batch of 1"),
    ("onnx-dynamic-width", "onnx", lambda: onnx_model(in_shape=("N", "M")), meta(),
     "model input 'x' float32 (?, ?) has no fixed width n"),
    ("onnx-two-inputs", "onnx", lambda: onnx_model(extra_input=True), meta(),
     "the model has 2 inputs ('x' float32 (?, 4), 'z2' float32 (?, 4))"),
    ("onnx-float64-output", "onnx", lambda: onnx_model(out_type=F64), meta(),
     "model output 'y' float64 (?, 2) has dtype float64"),
    ("onnx-rank-1-output", "onnx", lambda: onnx_model(reduce=True), meta(),
     "model output 'y' float32 (?) has rank 1"),
    ("tflite-int8-input", "tflite",
     lambda: tflite_model(_set(in_type=tfl.TensorType.INT8)), meta(),
     "model input 'input' int8 (?, 4) has dtype int8"),
    ("tflite-rank-3-input", "tflite",
     lambda: tflite_model(_set(in_shape=[1, 2, 2], in_shapeSignature=[-1, 2, 2])), meta(),
     "model input 'input' float32 (?, 2, 2) has rank 3"),
    ("tflite-float16-output", "tflite",
     lambda: tflite_model(_set(out_type=tfl.TensorType.FLOAT16)), meta(),
     "model output 'probabilities' float16 (?, 2) has dtype float16"),
]

NOT_SERVABLE_LINE = f"; the agent serves {SUPPORTED}"

BAD_FILES = [
    # (case, format, model bytes, metadata, message): the file or its metadata
    ("onnx-garbage", "onnx", lambda: b"PK\x03\x04" + bytes(100), meta(),
     "the model file cannot be loaded: not an ONNX model"),
    ("onnx-empty", "onnx", lambda: b"model", meta(),
     "the model file cannot be loaded: not an ONNX model (no graph with outputs)"),
    ("tflite-garbage", "tflite", lambda: bytes(64), meta(),
     "the model file cannot be loaded: not a TFLite model (no TFL3 file identifier)"),
    ("tflite-truncated", "tflite", lambda: tflite_model()[:200], meta(),
     "the model file cannot be loaded: not a readable TFLite model"),
    ("meta-width", "onnx", lambda: onnx_model(), meta(shape_in=[None, 5]),
     "model metadata says input 'x' float32 (?, 5), the model has 'x' float32 (?, 4)"),
    ("meta-dtype", "onnx", lambda: onnx_model(), meta(dtype_out="int64"),
     "model metadata says output 'y' int64 (?, 2), the model has 'y' float32 (?, 2)"),
    ("smoke-width", "onnx", lambda: onnx_model(), meta(smoke_width=3),
     "smoke vector 0: expected 1 input rows of 4 values"),
]


@pytest.fixture
def coord(tmp_path: Path) -> Coordinator:
    return Coordinator.init(tmp_path / "coordinator", now=T0)


def write(tmp: Path, fmt: str, data: bytes, metadata: dict[str, Any]) -> Path:
    path = tmp / f"model.{fmt}"
    path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(metadata))
    return path


def agent_serves(path: Path) -> bool:
    """What the device does with the file: load it, run a batch of 1 and one of 3 rows."""
    from edgefleet.agent.runtime import RuntimeLoadError, load_runtime

    try:
        rt = load_runtime(path)
    except RuntimeLoadError:
        return False
    try:
        for rows in (1, 3):
            out = rt.run(np.zeros((rows, rt.input_spec.shape[1] or 1), np.float32))
            if out.shape != (rows, CLASSES):
                return False
        return True
    except Exception:  # noqa: BLE001 (ORT raises its own types for a refused batch)
        return False
    finally:
        rt.close()


@pytest.mark.parametrize(("fmt", "make", "metadata"), [c[1:] for c in ACCEPTED],
                         ids=[c[0] for c in ACCEPTED])
def test_servable_models_register_and_the_agent_serves_them(
        coord: Coordinator, tmp_path: Path, fmt: str, make: Callable[[], bytes],
        metadata: dict[str, Any]) -> None:
    path = write(tmp_path, fmt, make(), metadata)
    assert agent_serves(path)
    assert coord.register_model("m", path).version == "1"


@pytest.mark.parametrize(("fmt", "make", "metadata", "message"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_models_the_agent_cannot_serve_are_refused_at_register(
        coord: Coordinator, tmp_path: Path, fmt: str, make: Callable[[], bytes],
        metadata: dict[str, Any], message: str) -> None:
    path = write(tmp_path, fmt, make(), metadata)
    with pytest.raises(ValueError) as err:
        coord.register_model("m", path)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(message), line
    assert line.endswith(NOT_SERVABLE_LINE), line
    assert not agent_serves(path)  # the device agrees: it would fail there
    assert coord.registry.models() == []


@pytest.mark.parametrize(("fmt", "make", "metadata", "message"), [c[1:] for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_unreadable_files_and_wrong_metadata_are_refused_at_register(
        coord: Coordinator, tmp_path: Path, fmt: str, make: Callable[[], bytes],
        metadata: dict[str, Any], message: str) -> None:
    path = write(tmp_path, fmt, make(), metadata)
    with pytest.raises(ValueError) as err:
        coord.register_model("m", path)
    assert "\n" not in str(err.value) and str(err.value).startswith(message), err.value
    assert coord.registry.models() == []


NAMES = [
    # (name, version, message)
    ("", "1", "model name '' can never be released"),
    ("has space", "1", "model name 'has space' can never be released"),
    ("-leading-dash", "1", "model name '-leading-dash' can never be released"),
    ("x" * 65, "1", "model name 'xxxx"),
    ("digits", "1.0/beta", "model version '1.0/beta' can never be released"),
    ("digits", "v 2", "model version 'v 2' can never be released"),
    ("digits", "", "model version '' can never be released"),
    ("dígits", "1", "model name 'dígits' can never be released"),
]


@pytest.mark.parametrize(("name", "version", "message"), NAMES,
                         ids=[f"{n[:8]}-{v}" for n, v, _ in NAMES])
def test_names_no_manifest_can_carry_are_refused(coord: Coordinator, tmp_path: Path, name: str,
                                                  version: str, message: str) -> None:
    path = write(tmp_path, "onnx", onnx_model(), meta())
    with pytest.raises(ValueError) as err:
        coord.register_model(name, path, version=version)
    assert str(err.value).startswith(message) and "letters, digits" in str(err.value)
    assert coord.registry.models() == []


def test_the_reference_models_register(coord: Coordinator, tmp_path: Path) -> None:
    """The trainer's artifacts (what `model train` writes) pass the check as they are."""
    from edgefleet.models.digits import write_digits_artifacts

    art = write_digits_artifacts(tmp_path / "digits", hidden=8)
    for version, path in (("1.0", art.onnx_path), ("1.0-tflite", art.tflite_path)):
        assert coord.register_model("digits", path, version=version).version == version


def test_check_false_registers_opaque_bytes(coord: Coordinator, tmp_path: Path) -> None:
    path = write(tmp_path, "onnx", b"opaque payload", meta())
    assert coord.register_model("m", path, check=False).size == len(b"opaque payload")
