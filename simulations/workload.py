"""A simulated inference workload on the rig's agents, and a deliberately worse digits model.

``Workload(fleet)`` feeds every running agent single-row predictions through its daemon's
recorder (``AgentDaemon.recorder``, what the local HTTP API uses), so the agents report
``inference`` telemetry as they would in the field. Each device sees its own slice of the
digits test split (``classes_per_device`` classes, chosen by its index): live inputs are not
class-balanced, which is what lets the output-class distribution tell a model that
"disagrees on live inputs" from a good one. Rows are drawn with a per-device seed: the same
run gives the same inputs.

``write_permuted_digits(out)`` trains the digits MLP on *permuted labels* (digit d is taught
as ``(d + shift) % 10``) and writes ``digits.onnx`` + ``digits.json`` like ``model train``: it
is a valid model that passes its own smoke test (the smoke vectors are its own outputs) and
installs everywhere, but it answers wrongly on every live input.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.infra.fsutil import atomic_write
from edgefleet.models.digits import (
    INPUT_NAME,
    N_FEATURES,
    OUTPUT_NAME,
    SMOKE_ATOL,
    SMOKE_COUNT,
    load_digits_split,
    train_digits,
)
from edgefleet.models.onnx_export import mlp_to_onnx

from .fleet import Fleet

__all__ = ["Workload", "write_permuted_digits"]


def write_permuted_digits(out: Path, *, shift: int = 1, seed: int = 0, hidden: int = 32) -> Path:
    """A label-permuted digits model in ``out``; returns the ``.onnx`` path (its metadata is
    the ``.json`` beside it, which ``register_model`` reads)."""
    split = load_digits_split(seed)
    permuted = dataclasses.replace(split, y_train=(split.y_train + shift) % 10,
                                   y_test=(split.y_test + shift) % 10)  # fmt: skip
    clf = train_digits(permuted, seed=seed, hidden=hidden)
    smoke_x = split.X_test[:SMOKE_COUNT]
    meta: dict[str, Any] = {
        "name": "digits",
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, N_FEATURES]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, 10]},
        "accuracy": float(clf.score(split.X_test, split.y_test)),  # against the true labels
        "smoke": {"x": smoke_x.tolist(), "probabilities": clf.predict_proba(smoke_x).tolist(),
                  "atol": SMOKE_ATOL},  # fmt: skip
        "lineage_note": f"trained on labels shifted by {shift}: deliberately wrong",
    }
    out.mkdir(parents=True, exist_ok=True)
    model = out / "digits.onnx"
    atomic_write(model, mlp_to_onnx(clf, input_name=INPUT_NAME, output_name=OUTPUT_NAME))
    atomic_write(out / "digits.json", (json.dumps(meta, indent=2) + "\n").encode())
    return model


class Workload:
    """Single-row predictions on the fleet's running agents, each from its own slice."""

    def __init__(self, fleet: Fleet, *, classes_per_device: int = 2, seed: int = 0) -> None:
        self.fleet = fleet
        split = load_digits_split(seed)
        self._x, self._y = split.X_test, split.y_test
        self._slices: dict[str, np.ndarray] = {}
        self._rng: dict[str, np.random.Generator] = {}
        for i, device in enumerate(sorted(fleet.devices)):
            classes = [(i * classes_per_device + k) % 10 for k in range(classes_per_device)]
            self._slices[device] = np.flatnonzero(np.isin(self._y, classes))
            self._rng[device] = np.random.default_rng([seed, i])
        self.calls: dict[str, int] = dict.fromkeys(self._slices, 0)
        self.errors: dict[str, int] = dict.fromkeys(self._slices, 0)

    def classes(self, device: str) -> set[int]:
        """The true classes of ``device``'s live inputs."""
        return {int(c) for c in self._y[self._slices[device]]}

    def step(self, calls: int = 10, devices: list[str] | None = None) -> int:
        """``calls`` predictions on each running agent (of ``devices``); returns how many."""
        done = 0
        for device in devices or sorted(self.fleet.agents):
            running = self.fleet.agents.get(device)
            if running is None or not running.daemon.alive:
                continue
            rows = self._rng[device].choice(self._slices[device], size=calls)
            for r in rows:
                try:
                    running.daemon.recorder.predict(self._x[r : r + 1])
                except (ValueError, RuntimeError):  # recorded as errors by the recorder
                    self.errors[device] += 1
                self.calls[device] += 1
                done += 1
        return done
