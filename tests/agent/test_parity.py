"""Runtime parity: the digits model installed through a bundle predicts like scikit-learn.

The ONNX (release v1) and TFLite (release v3) exports of the same MLP, each installed by the
agent from its signed, encrypted bundle, on the X25519 device and on the hybrid-KEM device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Digits, Fleet, open_agent

ATOL = 1e-5


@pytest.mark.parametrize("device", ["dev-a", "dev-b"])
@pytest.mark.parametrize(("bundle", "fmt"), [("v1", "onnx"), ("v3", "tflite")])
def test_installed_model_agrees_with_sklearn_on_the_whole_test_split(
        bundle: str, fmt: str, device: str, fleet: Fleet, digits_v1: Digits, tmp_path: Path,
        x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", device=device)
    agent = open_agent(home)
    version = agent.install_file(fleet.bundles[bundle])
    assert version.manifest.format == fmt and version.model_path.suffix == f".{fmt}"
    assert agent.status().active.format == fmt

    out = agent.predict(x_test)
    want = digits_v1.proba(x_test)
    assert out.shape == want.shape == (len(x_test), 10) and out.dtype == np.float32
    np.testing.assert_array_equal(out.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(out, want, atol=ATOL, rtol=0)
    with np.load(digits_v1.test_path) as npz:
        assert float(np.mean(out.argmax(axis=1) == npz["y"])) == digits_v1.accuracy
    # one row at a time too (the TFLite interpreter resizes its batch)
    np.testing.assert_allclose(agent.predict(x_test[:1]), want[:1], atol=ATOL, rtol=0)
    agent.close()


def test_reopened_agent_serves_the_installed_model(fleet: Fleet, digits_v1: Digits,
                                                   tmp_path: Path, x_test: np.ndarray) -> None:
    home = fleet.agent_home(tmp_path / "home", installed=["v3"])
    agent = open_agent(home)
    assert agent.status().active.format == "tflite"
    np.testing.assert_allclose(agent.predict(x_test), digits_v1.proba(x_test), atol=ATOL, rtol=0)
    agent.close()


def test_predict_before_any_install_is_a_call_order_error(fleet: Fleet, tmp_path: Path,
                                                         x_test: np.ndarray) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home"))
    assert agent.status().active is None
    with pytest.raises(RuntimeError, match="no model is active"):
        agent.predict(x_test)
