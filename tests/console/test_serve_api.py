"""``edgefleet coordinator serve --api``: one process serves chunks over MQTT and the HTTP API.

Over a real mosquitto, three real agents; a deployer releases through the API and follows the
operation's server-sent events until every device runs the release.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from edgefleet.coordinator import access
from edgefleet.simulations.workload import Workload

from tests.conftest import Digits
from tests.integration.brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from tests.integration.fleet import open_fleet, wait_until

from .test_dashboard import free_port

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)]
DEVICES = ["dev-0", "dev-1", "dev-2"]


def test_a_release_through_the_api_of_coordinator_serve(tmp_path: Path, digits_v1: Digits) -> None:
    with open_fleet(tmp_path, digits_v1, DEVICES, kind="mosquitto") as fleet:
        for d in DEVICES:
            fleet.start_agent(d)
        c = fleet.coordinator
        token = access.create_token(c.registry, name="ci", role="deployer", by="test")
        port = free_port()
        log = (tmp_path / "serve.log").open("wb")
        serve = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "coordinator", "serve", "--home", str(c.home),
             "--api", f"127.0.0.1:{port}", "--client-id", "serve-api"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"Bearer {token}"}
        try:
            def up() -> bool:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                try:
                    return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, "the API of coordinator serve")
            r = httpx.post(f"{base}/api/v1/releases", headers=auth, timeout=10,
                           json={"name": "digits", "version": "1", "to": "all", "wait": 120})
            assert r.status_code == 202, r.text
            with httpx.stream("GET", base + r.json()["events"], headers=auth, timeout=150) as s:
                events = [json.loads(line[6:]) for line in s.iter_lines()
                          if line.startswith("data: ")]  # fmt: skip
            assert events[0]["phase"] == "published" and events[0]["targets"] == len(DEVICES)
            assert events[-1]["state"] == "done", events[-1]
            assert events[-1]["arrived"] == len(DEVICES)
            devices = httpx.get(f"{base}/api/v1/devices", headers=auth, timeout=10).json()
            assert {d["device"]: d["sequence"] for d in devices["devices"]} == {
                d: events[-1]["sequence"] for d in DEVICES}
            entry = access.audit_log(c.registry, action="release")[0]
            assert (entry.actor, entry.result, entry.source) == ("ci", "ok", "http:127.0.0.1")

            # A rollout started through the API is carried out by the same process.
            r = httpx.post(f"{base}/api/v1/rollouts", headers=auth, timeout=10, json={
                "name": "digits", "version": "2", "canary": "device:dev-0", "waves": ["100%"],
                "gates": ["error_rate<0.5"], "bake": 0, "min_samples": 5})  # fmt: skip
            assert r.status_code == 201 and r.json()["ticking"] is True, r.text
            rid = r.json()["rollout"]
            work = Workload(fleet)

            def finished() -> bool:
                work.step(3)  # live inferences, so the gate has evidence
                rollouts = httpx.get(f"{base}/api/v1/rollouts", headers=auth, timeout=10)
                mine = {x["id"]: x for x in rollouts.json()["rollouts"]}[rid]
                assert mine["state"]["phase"] not in ("rolling_back", "rolled_back"), mine
                return bool(mine["state"]["phase"] == "done")

            wait_until(finished, "the rollout to finish", timeout=150, interval=0.3)
            assert all(fleet.device(d).active_version == "2" for d in DEVICES)
        finally:
            serve.send_signal(signal.SIGTERM)
            assert serve.wait(30) == 0, (tmp_path / "serve.log").read_text()
            log.close()
