"""Explanations: Shapley values checked against the ``shap`` package (test side only), the
error estimate of the sampling method, the budget, ``POST /v1/explain`` and ``agent explain``."""

from __future__ import annotations

import http.client
import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.explain import MAX_EVALUATIONS, background_from, explain
from edgefleet.agent.http import InferenceServer, load_token
from edgefleet.agent.runtime import Runtime, load_runtime
from edgefleet.models.onnx_export import mlp_to_onnx
from sklearn.datasets import load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from tests.conftest import Fleet, open_agent


@pytest.fixture(scope="module")
def wine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Runtime, np.ndarray]:
    """An 8-feature, 3-class MLP in ONNX Runtime (small enough for exact enumeration)."""
    x, y = load_wine(return_X_y=True)
    x = x[:, :8]
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0).fit(x, y)
    path = tmp_path_factory.mktemp("wine") / "wine.onnx"
    path.write_bytes(mlp_to_onnx(clf))
    return load_runtime(path), x


def test_exact_values_match_shap_on_a_small_model(wine: tuple[Runtime, np.ndarray]) -> None:
    import shap

    rt, x = wine
    bg, row = x[:3], x[100]
    mine = explain(rt.run, row, bg)
    assert mine.method == "exact" and mine.evaluations == 2**8 * 3 + 1
    assert mine.values.sum() == pytest.approx(mine.output - mine.base, abs=1e-9)  # efficiency
    # Kernel SHAP over every coalition (2^8 - 2 samples besides the empty and the full one)
    # is exact: the same game, solved by shap's weighted regression instead of enumeration.
    ref = shap.KernelExplainer(lambda a: rt.run(np.asarray(a, np.float32)), bg)
    got = np.asarray(ref.shap_values(row[None], nsamples=2**8 - 2, silent=True, l1_reg=False))
    theirs = got[0, :, mine.target] if got.ndim == 3 else got[mine.target][0]
    np.testing.assert_allclose(mine.values, theirs, atol=1e-5)
    assert float(np.ravel(ref.expected_value)[mine.target]) == pytest.approx(mine.base, abs=1e-6)


def test_the_sampling_error_estimate_covers_the_exact_values(
    wine: tuple[Runtime, np.ndarray],
) -> None:
    rt, x = wine
    bg, row = x[:3], x[50]
    exact = explain(rt.run, row, bg, method="exact")
    sampled = explain(rt.run, row, bg, method="permutation", permutations=128, seed=3)
    assert sampled.values.sum() == pytest.approx(exact.values.sum(), abs=1e-9)
    assert (sampled.stderr > 0).any()
    assert (np.abs(sampled.values - exact.values) <= 4 * sampled.stderr + 1e-9).all()
    more = explain(rt.run, row, bg, method="permutation", permutations=512, seed=4)
    assert np.abs(more.values - exact.values).max() < np.abs(sampled.values - exact.values).max()


def test_digits_permutation_values_agree_with_shap(fleet: Fleet) -> None:
    import shap

    rt = load_runtime(fleet.models["v1"].onnx)
    bundle = fleet.coordinator.registry.model("digits", "1").meta
    bg = background_from(bundle["feature_stats"], 64)  # the training mean, as the agent uses
    assert bg is not None
    with np.load(fleet.models["v1"].test_path) as npz:
        row = np.asarray(npz["x"][7])
    mine = explain(rt.run, row, bg, permutations=64)
    assert mine.method == "permutation" and mine.evaluations == 2 * 64 * 65 + 1
    assert mine.values.sum() == pytest.approx(mine.output - mine.base, abs=1e-6)
    ref = shap.KernelExplainer(lambda a: rt.run(np.asarray(a, np.float32)), bg)
    got = np.asarray(ref.shap_values(row[None], nsamples=4000, silent=True, l1_reg=False))
    theirs = got[0, :, mine.target] if got.ndim == 3 else got[mine.target][0]
    assert theirs.sum() == pytest.approx(mine.values.sum(), abs=1e-5)  # both efficient
    assert np.corrcoef(mine.values, theirs)[0, 1] > 0.95
    top = set(np.argsort(-np.abs(mine.values))[:5]) & set(np.argsort(-np.abs(theirs))[:5])
    assert len(top) >= 3
    pixels_off = (row == 0) & (bg[0] == 0)  # a feature equal to its background adds nothing
    assert (mine.values[pixels_off] == 0).all()


@pytest.mark.slow
def test_digits_permutation_values_match_shaps_permutation_explainer(fleet: Fleet) -> None:
    import shap  # its first PermutationExplainer call compiles with numba: about a minute

    rt = load_runtime(fleet.models["v1"].onnx)
    bg = background_from(fleet.coordinator.registry.model("digits", "1").meta["feature_stats"], 64)
    assert bg is not None
    with np.load(fleet.models["v1"].test_path) as npz:
        row = np.asarray(npz["x"][7])
    mine = explain(rt.run, row, bg, permutations=256)
    ref = shap.PermutationExplainer(lambda a: rt.run(np.asarray(a, np.float32)),
                                    shap.maskers.Independent(bg, max_samples=1), seed=0)
    theirs = ref(row[None], max_evals=2 * 65 * 256 + 1).values[0, :, mine.target]
    both = np.sqrt(2) * mine.stderr  # theirs: the same estimator with the same budget
    assert (np.abs(mine.values - theirs) <= 5 * both + 1e-6).all()


def test_exact_over_64_features_and_an_oversized_budget_are_refused(fleet: Fleet) -> None:
    rt = load_runtime(fleet.models["v1"].onnx)
    row, bg = np.zeros(64, np.float32), np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="2\\^64 coalitions"):
        explain(rt.run, row, bg, method="exact")
    with pytest.raises(ValueError, match=f"over the {MAX_EVALUATIONS} allowed"):
        explain(rt.run, row, np.zeros((32, 64), np.float32), permutations=512)
    with pytest.raises(ValueError, match="target"):
        explain(rt.run, row, bg, target=10)


def _post(server: InferenceServer, body: Any, token: str | None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if len(data) > 1024 * 1024:  # declared, not sent: the server answers 413 and closes,
            conn.putrequest("POST", "/v1/explain")  # and a client still sending would get
            for k, v in headers.items():  # EPIPE before it could read the answer
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(data)))
            conn.endheaders()
        else:
            conn.request("POST", "/v1/explain", data, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_post_v1_explain_and_agent_explain(fleet: Fleet, tmp_path: Path) -> None:
    from edgefleet.cli import main

    home = fleet.agent_home(tmp_path / "home", installed=["v1"])
    with np.load(fleet.models["v1"].test_path) as npz:
        row = np.asarray(npz["x"][3])
    agent = open_agent(home)
    try:
        with InferenceServer(agent, home=home) as server:
            token = load_token(home)
            status, doc = _post(server, {"inputs": row.tolist(), "permutations": 16}, token)
            assert status == 200, doc
            assert doc["method"] == "permutation" and len(doc["values"]) == 64
            assert sum(doc["values"]) == pytest.approx(doc["output"] - doc["base"], abs=1e-6)
            assert doc["target"] == int(agent.predict(row[None]).argmax())
            assert doc["model"] == {"name": "digits", "version": "1", "sequence": 2}
            for body, code in [
                ({"inputs": [row.tolist()] * 2}, 400),  # one row only
                ({"inputs": row.tolist(), "method": "exact"}, 400),  # 64 features: no
                ({"inputs": row.tolist(), "permutations": True}, 400),
                ({"inputs": row.tolist(), "target": 99}, 400),
                ({"inputs": row.tolist(), "background": [[1.0] * 3]}, 400),
                ({"inputs": row.tolist(), "extra": 1}, 400),
                (b"x" * (1024 * 1024 + 1), 413),
            ]:
                got, err = _post(server, body, token)
                assert got == code and set(err) == {"error"}, (body, err)
            assert _post(server, {"inputs": row.tolist()}, None)[0] == 401
            bg = {"inputs": row.tolist(), "background": [[0.0] * 64], "seed": 1}
            status, zero = _post(server, bg, token)
            assert status == 200 and zero["base"] != doc["base"]
    finally:
        agent.close()
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["agent", "explain", "--home", str(home), "--input", json.dumps(row.tolist()),
                   "--permutations", "16", "--json"])
    assert rc == 0
    cli = json.loads(out.getvalue())
    assert cli["values"] == pytest.approx(doc["values"], abs=1e-9)  # same seed, same budget
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["agent", "explain", "--home", str(home), "--input",
                     json.dumps(row.tolist()), "--top", "3"]) == 0
    assert "digits 1" in out.getvalue() and len(out.getvalue().strip().splitlines()) == 5
