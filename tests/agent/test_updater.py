"""agent.updater smoke tests on malformed vectors: refused, and nothing is left installed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.updater import smoke_test
from edgefleet.protocol.build import ReleaseSpec, build_release
from edgefleet.protocol.errors import BundleError, ModelLoadError, SmokeTestError
from edgefleet.protocol.manifest import SmokeVector, TensorSpec

from tests.agent.test_store import manifest
from tests.conftest import SEGMENT, T0, Fleet, open_agent

RAGGED = SmokeVector(input=((0.0,) * 64, (0.0,) * 63), expected=((0.1,) * 10, (0.1,) * 10))


class ZerosRuntime:
    """A runtime that answers every row with ten zeros."""

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 10), np.float32)


def test_ragged_smoke_rows_are_a_smoke_test_error() -> None:
    """A manifest built in memory (not decoded) can still carry ragged rows."""
    m = dataclasses.replace(manifest(1)[0], smoke=(RAGGED,))
    with pytest.raises(SmokeTestError, match="smoke vector 0"):
        smoke_test(ZerosRuntime(), m)  # type: ignore[arg-type]


def test_signed_release_with_ragged_smoke_rows_is_refused_cleanly(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "ragged.efb"
    bundle.write_bytes(
        fleet.release(fleet.models["v1"].onnx.read_bytes(), sequence=60, smoke=[RAGGED])
    )
    agent = open_agent(home)
    before = sorted(p.name for p in (home / "store" / "versions").iterdir())
    with pytest.raises(BundleError, match="rows of equal length"):
        agent.install_file(bundle)
    assert agent.last_result()["ok"] is False  # type: ignore[index]
    assert agent.status().active.version == "1"
    assert sorted(p.name for p in (home / "store" / "versions").iterdir()) == before
    assert not any((home / "store" / "staging").iterdir())
    agent.close()


# -- signed tensor specs against the loaded model -----------------------------------------------
def _release_with_specs(fleet: Fleet, inputs: tuple[TensorSpec, ...],
                        outputs: tuple[TensorSpec, ...], sequence: int) -> bytes:
    spec = ReleaseSpec(name="digits", format="onnx", model_version=f"specs-{sequence}",
                       sequence=sequence, inputs=inputs, outputs=outputs, created=T0,
                       segment_size=SEGMENT)
    built = build_release(fleet.models["v1"].onnx.read_bytes(), spec,
                          release_key=fleet.release_key,
                          recipients={"dev-a": fleet.identities["dev-a"].public().kem})
    keys = fleet.coordinator.keys
    return built.to_file_bytes(keys.keyring_raw, keys.keyring_sig)


IN = TensorSpec(name="input", dtype="float32", shape=(None, 64))
OUT = TensorSpec(name="probabilities", dtype="float32", shape=(None, 10))
SPEC_CASES = {  # signed (inputs, outputs) -> what the error says was expected
    "input width": ((dataclasses.replace(IN, shape=(None, 32)),), (OUT,), "input: expected"),
    "output width": ((IN,), (dataclasses.replace(OUT, shape=(None, 3)),), "output: expected"),
    "input dtype": ((dataclasses.replace(IN, dtype="int8"),), (OUT,), "input: expected"),
    "input rank": ((dataclasses.replace(IN, shape=(None, 8, 8)),), (OUT,), "input: expected"),
    "two inputs": ((IN, IN), (OUT,), "input: expected"),
}


@pytest.mark.parametrize("case", SPEC_CASES, ids=list(SPEC_CASES))
def test_signed_tensor_specs_that_do_not_match_the_model_are_refused(
    fleet: Fleet, tmp_path: Path, case: str
) -> None:
    inputs, outputs, says = SPEC_CASES[case]
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "specs.efb"
    bundle.write_bytes(_release_with_specs(fleet, inputs, outputs, sequence=70))
    agent = open_agent(home)
    with pytest.raises(ModelLoadError, match=says) as info:
        agent.install_file(bundle)
    assert "saw 'input' float32 (?, 64)" in str(info.value) or "saw 'probabilities'" in str(
        info.value)
    assert agent.active is not None and agent.active.manifest.model_version == "1"
    assert [v.manifest.model_version for v in agent.store.kept()] == ["1"]
    agent.close()


def test_signed_tensor_specs_match_with_a_symbolic_or_fixed_batch(
    fleet: Fleet, tmp_path: Path
) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    bundle = tmp_path / "specs.efb"
    fixed = dataclasses.replace(IN, shape=(1, 64))  # the model's batch is symbolic: any fits
    bundle.write_bytes(_release_with_specs(fleet, (fixed,), (OUT,), sequence=71))
    agent = open_agent(home)
    assert agent.install_file(bundle).manifest.sequence == 71
    agent.close()
