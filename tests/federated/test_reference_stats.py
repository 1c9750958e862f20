"""The drift reference of an FL-produced version, built from the devices' counts.

Real agent daemons on the fleet rig (in-memory broker) train a 2-round FedAvg run; every
training reply carries the device's counts of its own rows over the run's grid, the
coordinator merges them into the registered versions' ``reference_stats``, the final round is
released through the signed release path, and each agent's own drift monitor computes drift
against it: the shifted features on the device fed shifted inputs, nothing on the other.
Below: the merged counts describe the pooled rows, a malformed summary rejects its reply, a
missing one leaves the device out, and a run without a grid or with DP collects none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.coordinator import drift
from edgefleet.federated.app import REFSTATS_KEY, train_reply
from edgefleet.federated.data import load_dir
from edgefleet.federated.runs import CoordinatorRegistrar, FederatedRun, ReferenceGrid, RunSpec
from edgefleet.federated.service import ReleasePolicy
from edgefleet.federated.strategies import DpSpec, StrategySpec, UpdatePolicy
from edgefleet.federated.trainer import ModelSpec, TrainConfig
from edgefleet.models.refstats import LocalSummary, parse_summary, stats_from_summary, summarize
from edgefleet.protocol.drift import QUANTILES, ReferenceStats, reference_stats
from edgefleet.protocol.errors import MalformedError
from edgefleet.simulations.fl import FlFleet, FlSimConfig, fl_fleet
from edgefleet.simulations.wait import wait_until
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .conftest import N_CLIENTS, LocalGrid, evaluate_reply, honest_apps

SHIFTED = [19, 20, 27, 28]
MIN_SAMPLES = 500


def _traffic(sim: FlFleet, device: str, x: np.ndarray, passes: int = 20) -> None:
    recorder = sim.fleet.agents[device].daemon.recorder
    rng = np.random.default_rng(0)
    for _ in range(passes):
        xs = x[rng.permutation(len(x))]
        for i in range(0, len(xs), 10):
            recorder.predict(xs[i : i + 10])


def test_an_fl_version_carries_device_counted_reference_stats_and_drift_works_on_it(
    tmp_path: Path,
) -> None:
    cfg = FlSimConfig(agents=3, rounds=2, hidden=16, local_epochs=1, round_timeout=30.0)
    with fl_fleet(tmp_path, cfg) as sim:
        outcome = sim.service.run(cfg.spec(), release=ReleasePolicy(selector="all"))
        assert outcome.released is not None
        sim.fleet.wait_active(sim.devices, outcome.released.sequence)
        c = sim.fleet.coordinator
        mv = c.registry.model(cfg.name, outcome.released_version)
        ref = mv.lineage["fl"]["reference"]
        assert ref["source"] == "device counts" and ref["devices"] == sim.devices
        local = [load_dir(sim.fleet.homes[d] / "fl-data") for d in sim.devices]  # as trained
        x = np.concatenate([d.x_train for d in local])
        y = np.concatenate([d.y_train for d in local])
        served = sim.fleet.agents["fl-0"].agent.active
        assert served is not None and served.manifest.model_version == mv.version
        got = served.manifest.reference_stats  # as signed in the manifest the device verified
        ReferenceStats.from_dict(got)
        _describes(got, x, y)
        assert ref["n"] == len(x)  # every device's training rows, no more

        test = sim.federation.x_test.astype(np.float32)
        shifted = test.copy()
        shifted[:, SHIFTED] = np.clip(shifted[:, SHIFTED] + 0.4, 0.0, 1.0)
        _traffic(sim, "fl-0", shifted)
        _traffic(sim, "fl-1", test)

        def reported() -> dict[str, drift.DeviceDrift]:
            got = {r.device_id: r for r in drift.latest(c.registry, since=0, name=cfg.name)
                   if r.version == mv.version and r.n >= MIN_SAMPLES}  # fmt: skip
            return got if {"fl-0", "fl-1"} <= set(got) else {}

        reports = wait_until(reported, "drift reports on the FL version")
        hot = {d: {i for i, psi, _ in r.features if psi > drift.DEFAULT_THRESHOLD}
               for d, r in reports.items()}  # fmt: skip
        assert hot["fl-0"] == set(SHIFTED) and hot["fl-1"] == set()


def _describes(got: dict[str, Any], x: np.ndarray, y: np.ndarray) -> None:
    """``got`` is what the pooled rows ``x``, ``y`` give: the same counts merged as counted in
    one place, each share exactly the pooled rows' share over its cuts, every cut a grid
    edge, moments and prior exact, quantiles within one grid bin of the inverted CDF's."""
    edges = ReferenceGrid().edges()
    assert got == stats_from_summary(summarize(x, y, edges, 10), edges)
    for f, cuts in enumerate(got["cuts"]):
        c = np.asarray(cuts)
        assert set(np.round(c * 32, 9)) <= set(range(33))
        direct = np.bincount(np.searchsorted(c, x[:, f], side="left"), minlength=len(c) + 1)
        assert np.allclose(got["ref"][f], direct / len(x), atol=1e-8)
    pooled = reference_stats(x, y, n_classes=10)
    assert got["class_prior"] == pooled["class_prior"] and got["n"] == len(x)
    assert np.allclose(got["mean"], pooled["mean"]) and np.allclose(got["var"], pooled["var"])
    lower = np.quantile(x, QUANTILES, axis=0, method="inverted_cdf").T
    assert np.abs(np.subtract(got["quantiles"], lower)).max() <= 1 / 32 + 1e-6


def _spec(**overrides: Any) -> RunSpec:
    k = N_CLIENTS
    fields: dict[str, Any] = dict(
        run_id="r", model_name="m", rounds=1, model=ModelSpec(hidden=(8,)),
        train=TrainConfig(local_epochs=1),
        strategy=StrategySpec(min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k),
        policy=UpdatePolicy(quorum=1),
    )  # fmt: skip
    fields.update(overrides)
    return RunSpec(**fields)


def _tampering_app(data: Any, tamper: Any) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        reply = train_reply(message, data)
        tamper(reply)
        return reply

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return evaluate_reply(message, data)

    return app


def _inflate(reply: Message) -> None:
    record = reply.content.config_records[REFSTATS_KEY]
    record["counts"] = [v * 2 for v in record["counts"]]  # type: ignore[union-attr]


def _drop(reply: Message) -> None:
    del reply.content[REFSTATS_KEY]


@pytest.mark.parametrize(("tamper", "rejected", "counted"), [
    (_inflate, "counts do not add up", 4),  # the reply is refused, the others still count
    (_drop, "", 4),  # an agent that sends no counts: its update counts, its rows do not
])  # fmt: skip
def test_a_bad_or_missing_summary(
    federation: Any, coordinator: Any, tamper: Any, rejected: str, counted: int
) -> None:
    apps = honest_apps(federation)
    apps[1] = _tampering_app(federation.clients[0], tamper)
    result = FederatedRun(_spec(), registrar=CoordinatorRegistrar(coordinator)).execute(
        LocalGrid(apps)
    )
    fl = result.rounds[0].lineage["fl"]
    reasons = [r["reason"] for r in fl["rejected"]]
    assert (reasons == []) if not rejected else (len(reasons) == 1 and rejected in reasons[0])
    assert len(fl["reference"]["devices"]) == counted and "dev-1" not in fl["reference"]["devices"]
    n = sum(len(p.x_train) for p in federation.clients[1:])
    assert fl["reference"]["n"] == n
    stats = coordinator.registry.model("m", result.version).meta["feature_stats"]
    assert ReferenceStats.from_dict(stats).n == n


def test_summaries_are_not_sent_when_not_asked_for_and_a_dp_run_collects_none(
    federation: Any, coordinator: Any
) -> None:
    k = N_CLIENTS
    off = DpSpec(noise_multiplier=0.0, clipping_norm=10.0, account=False)
    dp = StrategySpec(min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k, dp=off)
    for spec, why in ((_spec(reference=None), "no grid"),
                      (_spec(run_id="dp", strategy=dp), "differential privacy")):  # fmt: skip
        grid = LocalGrid(honest_apps(federation))
        result = FederatedRun(spec, registrar=CoordinatorRegistrar(coordinator)).execute(grid)
        fl = result.rounds[0].lineage["fl"]
        assert fl["reference"]["source"] == "none" and why in fl["reference"]["why"]
        assert not coordinator.registry.model("m", result.version).meta["feature_stats"]


def test_merged_counts_describe_the_pooled_rows(federation: Any) -> None:
    edges = ReferenceGrid().edges()
    parts = [parse_summary(summarize(p.x_train, p.y_train, edges, 10).to_dict(), features=64,
                           edges=len(edges), n_classes=10, n=len(p.x_train))
             for p in federation.clients]  # fmt: skip
    x = np.concatenate([p.x_train for p in federation.clients])
    y = np.concatenate([p.y_train for p in federation.clients])
    _describes(stats_from_summary(LocalSummary.merge(parts), edges), x, y)
    # a continuous feature, partly outside the grid: shares exact, quantiles clamped to it
    xc = np.random.default_rng(1).normal(0.5, 0.25, size=(2000, 1))
    s = stats_from_summary(summarize(xc, np.zeros(2000, dtype=np.int64), edges, 1), edges)
    ReferenceStats.from_dict(s)
    cuts = np.asarray(s["cuts"][0])
    direct = np.bincount(np.searchsorted(cuts, xc[:, 0], side="left"), minlength=len(cuts) + 1)
    assert np.allclose(s["ref"][0], direct / 2000, atol=1e-8) and s["ref"][0][-1] > 0
    assert s["quantiles"][0][0] == 0.0 and s["quantiles"][0][-1] == 1.0
    assert np.isclose(s["mean"][0], xc.mean()) and "class_prior" not in s  # one class


@pytest.mark.parametrize(("change", "error"), [
    ({"n": 5}, "rows, but"),
    ({"extra": 1}, "unexpected fields"),
    ({"counts": [1] * 3}, "expected 2176 counts"),
    ({"classes": [-1] + [0] * 9}, "non-negative integers"),
    ({"sum": [float("nan")] * 64}, "finite numbers"),
    ({"sumsq": [0.0] * 64}, "sums of squares below"),
])  # fmt: skip
def test_parse_summary_refuses(federation: Any, change: dict[str, Any], error: str) -> None:
    edges = ReferenceGrid().edges()
    p = federation.clients[0]
    d = {**summarize(p.x_train, p.y_train, edges, 10).to_dict(), **change}
    with pytest.raises(MalformedError, match=error):
        parse_summary(d, features=64, edges=len(edges), n_classes=10, n=len(p.x_train))


def test_a_model_too_wide_for_a_drift_reference_is_sent_no_grid() -> None:
    """Over ``drift.MAX_FEATURES`` inputs no manifest could carry the reference: the devices
    are not asked to count (no grid in their config), instead of counting for nothing."""
    from edgefleet.protocol.drift import MAX_FEATURES

    assert _spec().reference_grid is not None
    wide = _spec(model=ModelSpec(hidden=(8,), n_features=MAX_FEATURES + 1))
    assert wide.reference is not None and wide.reference_grid is None
