"""Refuse at ``model register`` what could never be released or served on a device.

A model registers only if a release of it can be signed (its name and version are manifest
names) and the agent can load and serve it (``agent/runtime.py``: ``_check_classifier``, and
``agent/updater.py``: ``check_specs``, ``smoke_test``). What the agent serves is ``SUPPORTED``;
the coordinator cannot import the agent, so ``tests/coordinator/test_register.py`` loads every
case of its table in the real agent runtime too and checks that both agree.

Every refusal is a ``ValueError`` with one line naming the tensor, what it is and what is
supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgefleet.models.graphs import GraphTensor, ModelTensors, model_tensors
from edgefleet.protocol._fields import NAME_RE
from edgefleet.protocol.manifest import TensorSpec

__all__ = ["SUPPORTED", "check_model", "check_names"]

SUPPORTED = (
    "one float32 input and one float32 output, each of shape (batch, n) with n >= 1 fixed; "
    "the batch dimension dynamic in ONNX, dynamic or fixed in TFLite"
)


def check_names(name: str, version: str | None) -> None:
    """The model name and version go into every manifest: 1-64 of [A-Za-z0-9_.-]."""
    for what, value in (("model name", name), ("model version", version)):
        if value is not None and not NAME_RE.fullmatch(value):
            raise ValueError(
                f"{what} {value!r:.80} can never be released: expected 1-64 characters of "
                "letters, digits, '_', '.', '-', starting with a letter or digit"
            )


def check_model(fmt: str, data: bytes, meta: dict[str, Any]) -> ModelTensors:
    """The model's tensors, if the agent can serve them and ``meta`` (the registry's
    release metadata: ``inputs``, ``outputs``, ``smoke``) describes them; else ``ValueError``."""
    try:
        tensors = model_tensors(fmt, data)
    except ValueError as exc:
        raise ValueError(f"the model file cannot be loaded: {exc}") from exc
    for kind, found in (("input", tensors.inputs), ("output", tensors.outputs)):
        if len(found) != 1:
            names = ", ".join(t.describe() for t in found) or "none"
            raise ValueError(f"the model has {len(found)} {kind}s ({names}); the agent serves "
                             f"{SUPPORTED}")
        _check_servable(fmt, kind, found[0])
    _check_meta(meta, tensors)
    _check_smoke(meta.get("smoke", []), tensors)
    return tensors


def _check_servable(fmt: str, kind: str, t: GraphTensor) -> None:
    problem = None
    if t.dtype != "float32":
        problem = f"dtype {t.dtype}"
    elif t.shape is None or len(t.shape) != 2:
        problem = "unranked" if t.shape is None else f"rank {len(t.shape)}"
    elif t.shape[1] is None or t.shape[1] < 1:
        problem = "no fixed width n"
    elif fmt == "onnx" and kind == "input" and t.shape[0] is not None:
        problem = f"a fixed batch of {t.shape[0]} (ONNX Runtime would refuse any other)"
    if problem is not None:
        raise ValueError(
            f"model {kind} {t.describe()} has {problem}; the agent serves {SUPPORTED}"
        )


def _check_meta(meta: dict[str, Any], tensors: ModelTensors) -> None:
    """The metadata's signed tensor specs must match the model, as the agent checks them."""
    for kind, model_tensor in (("input", tensors.inputs[0]), ("output", tensors.outputs[0])):
        specs = [TensorSpec.from_dict(s) for s in meta.get(f"{kind}s", [])]
        if len(specs) != 1 or not _same(specs[0], model_tensor):
            said = ", ".join(_describe(s) for s in specs) or "none"
            raise ValueError(
                f"model metadata says {kind} {said}, the model has {model_tensor.describe()}"
            )


def _same(spec: TensorSpec, t: GraphTensor) -> bool:
    """``agent.updater.check_specs``' rule: same dtype and rank; ``None`` matches any size."""
    if t.shape is None or spec.dtype != t.dtype or len(spec.shape) != len(t.shape):
        return False
    return all(a is None or b is None or a == b for a, b in zip(spec.shape, t.shape, strict=True))


def _describe(spec: TensorSpec) -> str:
    return GraphTensor(name=spec.name, dtype=spec.dtype, shape=spec.shape).describe()


def _check_smoke(smoke: Sequence[dict[str, Any]], tensors: ModelTensors) -> None:
    """Each smoke vector must be a batch the model takes and the output it gives."""
    n_in, n_out = tensors.inputs[0].shape, tensors.outputs[0].shape
    assert n_in is not None and n_out is not None  # checked servable
    for i, vec in enumerate(smoke):
        rows_in, rows_out = vec["input"], vec["expected"]
        widths_in = {len(r) for r in rows_in}
        widths_out = {len(r) for r in rows_out}
        if widths_in != {n_in[1]} or widths_out != {n_out[1]} or len(rows_in) != len(rows_out):
            raise ValueError(
                f"smoke vector {i}: expected {len(rows_in)} input rows of {n_in[1]} values and "
                f"as many output rows of {n_out[1]}, saw input widths {sorted(widths_in)}, "
                f"{len(rows_out)} output rows of widths {sorted(widths_out)}"
            )
