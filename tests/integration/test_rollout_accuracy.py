"""The ``accuracy`` gate in a simulated fleet, fed by labels that flow back over the agents' local
HTTP API (``POST /v1/predict``, then ``POST /v1/feedback`` with the true class of each answer).

The rig is ``test_rollout``'s: every device on digits v1 with its baseline telemetry, the
deliberately worse model (trained on shifted labels: it installs, passes its own smoke test,
never errs) registered as v3. Each agent serves its daemon's recorder on loopback; a client
predicts rows of the digits test split through it and reports each row's true label. The
gates are ``error_rate<0.01`` and ``accuracy>0.9`` only: the worse model's error rate is
perfect, only the labels show it is wrong, and the canary is rolled back; a good model (v2)
passes the same gates on every wave. Assertions are on decisions and evidence, never on time.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.agent.http import InferenceServer, load_token
from edgefleet.coordinator import telemetry
from edgefleet.coordinator.rollout import Gate
from edgefleet.coordinator.rollouts import Rollout, Rollouts
from edgefleet.models.digits import load_digits_split
from edgefleet.simulations.workload import write_permuted_digits

from tests.conftest import Digits

from .fleet import FleetHarness, wait_until
from .test_rollout import DEVICES, running_fleet, spec

pytestmark = [pytest.mark.timeout(240)]
GATES = ("error_rate<0.01", "accuracy>0.9")
MIN_LABELS = 20


@pytest.fixture(scope="module")
def worse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_permuted_digits(tmp_path_factory.mktemp("worse"))


class Labelled:
    """Single-row predictions over each running agent's HTTP API, each followed by its true
    label; ``labelled`` counts the labels each device took."""

    def __init__(self, fleet: FleetHarness, stack: ExitStack) -> None:
        split = load_digits_split(0)
        self.x, self.y = split.X_test.astype(np.float32), split.y_test
        self.rng = np.random.default_rng(1)
        self.fleet = fleet
        self.conns: dict[str, tuple[http.client.HTTPConnection, dict[str, str]]] = {}
        for device, running in sorted(fleet.agents.items()):
            home = fleet.homes[device]
            server = stack.enter_context(
                InferenceServer(running.agent, home=home, recorder=running.daemon.recorder)
            )
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            stack.callback(conn.close)
            headers = {"Authorization": f"Bearer {load_token(home)}"}
            self.conns[device] = (conn, headers)
        self.labelled: dict[str, int] = dict.fromkeys(self.conns, 0)

    def _post(self, device: str, path: str, doc: Any) -> Any:
        conn, headers = self.conns[device]
        conn.request("POST", path, json.dumps(doc), headers)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return body

    def step(self, calls: int = 4) -> None:
        for device in self.conns:
            for r in self.rng.integers(0, len(self.y), size=calls):
                answer = self._post(device, "/v1/predict", {"inputs": self.x[r].tolist()})
                [pid] = answer["ids"]
                scored = self._post(device, "/v1/feedback", {"id": pid, "label": int(self.y[r])})
                assert scored["predicted"] == answer["argmax"][0]
                assert scored["model"] == f"digits@{answer['model']['version']}"
                self.labelled[device] += 1


@contextmanager
def labelled_fleet(
    tmp_path: Path, digits: Digits, worse: Path | None = None
) -> Iterator[tuple[FleetHarness, Labelled]]:
    with running_fleet(tmp_path, digits, "memory", worse) as (fleet, _), ExitStack() as stack:
        yield fleet, Labelled(fleet, stack)


def drive(ro: Rollouts, rid: int, traffic: Labelled) -> Rollout:
    def final() -> Rollout | None:
        traffic.step()
        ro.tick(rid)
        r = ro.store.get(rid)
        return r if r.state.final else None

    return wait_until(final, f"rollout {rid} to finish", timeout=180, interval=0.05)


def accuracy_spec(version: str) -> Any:
    return spec(version, gates=tuple(Gate.parse(g) for g in GATES), min_labels=MIN_LABELS)


def test_labels_fed_back_fail_a_worse_model_on_accuracy_and_it_is_rolled_back(
    tmp_path: Path, digits_v1: Digits, worse: Path
) -> None:
    with labelled_fleet(tmp_path, digits_v1, worse) as (fleet, traffic):
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(accuracy_spec("3"))
        r = drive(ro, rid, traffic)

        assert r.state.phase == "rolled_back"
        [canary] = r.state.released
        decisions = ro.store.decisions(rid)
        assert [d["action"] for d in decisions if d["action"] != "wait"] == ["start", "halt"]
        start, halt = decisions[0], decisions[-1]
        assert halt["devices"] == [canary]
        assert "gate accuracy>0.9 failed" in halt["reason"] and canary in halt["reason"]
        gates = {g["gate"]: g for g in halt["evidence"]["gates"] if g["device"] == canary}
        assert gates["error_rate<0.01"]["passed"] and gates["error_rate<0.01"]["value"] == 0
        acc = gates["accuracy>0.9"]
        assert not acc["passed"] and MIN_LABELS <= acc["labelled"] <= traffic.labelled[canary]
        assert acc["value"] < 0.2  # it answers wrongly on nearly every labelled input
        assert halt["evidence"]["rollback"] == {"1": [canary]}
        [back] = halt["sequences"]
        assert back > start["sequences"][0]
        fleet.wait_active([canary], back)
        assert fleet.agents[canary].agent.status().active.version == "1"

        # the coordinator's aggregates: accuracy per version, from the same labels
        since = int(r.created) - 60
        v3 = telemetry.version_health(fleet.coordinator.registry, name="digits", version="3",
                                      since=since, device_ids=[canary])[canary]  # fmt: skip
        assert v3.labelled >= acc["labelled"] and v3.accuracy is not None and v3.accuracy < 0.2
        wait_until(lambda: all(h.labelled for h in telemetry.version_health(
            fleet.coordinator.registry, name="digits", version="1", since=since,
            device_ids=DEVICES).values()), "v1's labels")  # fmt: skip
        v1 = telemetry.version_health(fleet.coordinator.registry, name="digits", version="1",
                                      since=since, device_ids=DEVICES)  # fmt: skip
        assert all(h.accuracy is not None and h.accuracy > 0.9 for h in v1.values())
        for d in DEVICES:
            if d != canary:
                assert fleet.device(d).active_version == "1"


def test_a_good_model_passes_the_accuracy_gate_on_every_wave(
    tmp_path: Path, digits_v1: Digits
) -> None:
    with labelled_fleet(tmp_path, digits_v1) as (fleet, traffic):
        assert fleet.service is not None
        ro = Rollouts(fleet.coordinator, fleet.service.link)
        rid = ro.start(accuracy_spec("2"))
        r = drive(ro, rid, traffic)

        assert r.state.phase == "done" and set(r.state.released) == set(DEVICES)
        judged = [d for d in ro.store.decisions(rid) if d["action"] in ("promote", "done")]
        assert len(judged) == 3
        for d in judged:
            acc = [g for g in d["evidence"]["gates"] if g["metric"] == "accuracy"]
            assert acc and all(g["passed"] and g["labelled"] >= MIN_LABELS for g in acc)
            assert all(g["value"] > 0.9 for g in acc)
