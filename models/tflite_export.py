"""Export a fitted scikit-learn ``MLPClassifier`` to a ``.tflite`` flatbuffer, without TensorFlow.

The model is assembled with the flatbuffers object API generated from the TFLite schema that
ships in ``ai_edge_litert.schema_py_generated``: one subgraph of ``FULLY_CONNECTED`` ops (ReLU
fused; logistic/tanh as separate ``LOGISTIC``/``TANH`` ops, since the float FC kernel only
fuses the ReLU family) ending in ``SOFTMAX``. Input float32 [batch, n_features]; the batch
dimension is declared dynamic (``shape_signature`` -1) so runtimes may resize it.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl
from edgefleet.models.onnx_export import DenseLayer, dense_layers
from sklearn.neural_network import MLPClassifier

__all__ = ["mlp_to_tflite"]

SCHEMA_VERSION = 3
FILE_IDENTIFIER = b"TFL3"
_BUFFER_ALIGNMENT = 16  # the schema's force_align for Buffer.data; the Python API ignores it

_SEPARATE_ACTIVATION = {"logistic": tfl.BuiltinOperator.LOGISTIC, "tanh": tfl.BuiltinOperator.TANH}


class _AlignedBufferT(tfl.BufferT):  # type: ignore[misc]
    """A ``BufferT`` whose data vector starts on a 16-byte boundary in the finished file."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (flatbuffers API)
        data: bytes = self.data
        builder.StartVector(1, len(data), _BUFFER_ALIGNMENT)
        builder.head -= len(data)
        builder.Bytes[builder.head : builder.head + len(data)] = data
        vector = builder.EndVector()
        tfl.BufferStart(builder)
        tfl.BufferAddData(builder, vector)
        return int(tfl.BufferEnd(builder))


class _GraphBuilder:
    """Accumulates tensors, buffers, operator codes and operators for one subgraph."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.tensors: list[tfl.TensorT] = []
        self.buffers: list[tfl.BufferT] = [tfl.BufferT()]  # buffer 0: the empty sentinel
        self.opcodes: list[tfl.OperatorCodeT] = []
        self.operators: list[tfl.OperatorT] = []

    def activation_tensor(self, name: str, width: int) -> int:
        """A float32 [batch, width] tensor with a dynamic batch; returns its index."""
        tensor = tfl.TensorT()
        tensor.name, tensor.type, tensor.buffer = name, tfl.TensorType.FLOAT32, 0
        tensor.shape, tensor.shapeSignature = [self.batch, width], [-1, width]
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def constant(self, name: str, array: np.ndarray) -> int:
        """A float32 constant tensor backed by its own (aligned) buffer; returns its index."""
        array = np.ascontiguousarray(array, dtype="<f4")
        self.buffers.append(_AlignedBufferT(data=array.tobytes()))
        tensor = tfl.TensorT()
        tensor.name, tensor.type = name, tfl.TensorType.FLOAT32
        tensor.shape, tensor.buffer = list(array.shape), len(self.buffers) - 1
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def add_op(
        self,
        code: int,
        inputs: list[int],
        outputs: list[int],
        options_type: int = tfl.BuiltinOptions.NONE,
        options: object = None,
    ) -> None:
        op = tfl.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = self._opcode_index(code), inputs, outputs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        self.operators.append(op)

    def _opcode_index(self, code: int) -> int:
        for i, opcode in enumerate(self.opcodes):
            if opcode.builtinCode == code:
                return i
        opcode = tfl.OperatorCodeT()
        # Codes below 127 are mirrored into the deprecated int8 field old readers use.
        opcode.builtinCode, opcode.deprecatedBuiltinCode = code, min(code, 127)
        opcode.version = 1
        self.opcodes.append(opcode)
        return len(self.opcodes) - 1


def mlp_to_tflite(
    clf: MLPClassifier,
    *,
    input_name: str = "input",
    output_name: str = "probabilities",
    batch: int = 1,
) -> bytes:
    """Serialize ``clf`` as a TFLite model (schema version 3) and return its bytes.

    Raises the same TypeError/ValueError as ``dense_layers`` for unsupported classifiers,
    and ValueError if ``batch`` < 1 or the two tensor names are equal.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if input_name == output_name:
        raise ValueError(f"input and output names must differ, both are {input_name!r}")
    layers = dense_layers(clf)
    g = _GraphBuilder(batch)
    x = g.activation_tensor(input_name, layers[0].weights.shape[0])
    for i, layer in enumerate(layers):
        x = _add_dense(g, i, layer, x, output_name)
    subgraph = tfl.SubGraphT()
    subgraph.tensors, subgraph.operators = g.tensors, g.operators
    subgraph.inputs, subgraph.outputs, subgraph.name = [0], [x], "main"
    model = tfl.ModelT()
    model.version, model.description = SCHEMA_VERSION, "edgefleet mlp_to_tflite"
    model.operatorCodes, model.subgraphs, model.buffers = g.opcodes, [subgraph], g.buffers
    model.signatureDefs = [_signature(input_name, 0, output_name, x)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def _add_dense(g: _GraphBuilder, i: int, layer: DenseLayer, x: int, output_name: str) -> int:
    """Append FULLY_CONNECTED (+ activation or SOFTMAX) for one layer; return its output."""
    width = layer.weights.shape[1]
    w = g.constant(f"dense{i}/weights", layer.weights.T)  # TFLite FC weights are [out, in]
    b = g.constant(f"dense{i}/bias", layer.bias)
    options = tfl.FullyConnectedOptionsT()
    if layer.activation == "relu":
        options.fusedActivationFunction = tfl.ActivationFunctionType.RELU
    z = g.activation_tensor(f"dense{i}/z", width)
    g.add_op(
        tfl.BuiltinOperator.FULLY_CONNECTED,
        [x, w, b],
        [z],
        tfl.BuiltinOptions.FullyConnectedOptions,
        options,
    )
    if layer.activation == "softmax":
        out = g.activation_tensor(output_name, width)
        softmax = tfl.SoftmaxOptionsT()
        softmax.beta = 1.0
        g.add_op(
            tfl.BuiltinOperator.SOFTMAX, [z], [out], tfl.BuiltinOptions.SoftmaxOptions, softmax
        )
        return out
    if layer.activation in _SEPARATE_ACTIVATION:
        out = g.activation_tensor(f"dense{i}/{layer.activation}", width)
        g.add_op(_SEPARATE_ACTIVATION[layer.activation], [z], [out])
        return out
    return z  # relu (fused) or identity


def _signature(input_name: str, input_index: int, output_name: str, output_index: int) -> object:
    """A ``serving_default`` signature so ``get_signature_runner()`` works too."""
    inp, out = tfl.TensorMapT(), tfl.TensorMapT()
    inp.name, inp.tensorIndex = input_name, input_index
    out.name, out.tensorIndex = output_name, output_index
    sig = tfl.SignatureDefT()
    sig.inputs, sig.outputs = [inp], [out]
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    return sig
