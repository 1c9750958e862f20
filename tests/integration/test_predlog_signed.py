"""Prediction-log uploads on a real mosquitto: an unsigned, forged, expired or replayed
request published on the device's ``cmd/predlog`` is refused (counted, nothing uploaded);
``edgefleet fleet predictions`` (a request signed with the release key) still gets the log."""

from __future__ import annotations

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from edgefleet.agent.predlog import predlog_topic, seal_request
from edgefleet.coordinator.telemetry import recent
from edgefleet.protocol import topics
from edgefleet.protocol.keys import SigningKey

from edgefleet.cli import main
from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import TIMEOUT, digits_test_split, open_fleet, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)]  # fmt: skip


def test_only_signed_fresh_requests_upload_the_log(tmp_path: Path, digits_v1: Digits) -> None:
    with open_fleet(tmp_path, digits_v1, ["dev-1"], predlog_sample=1.0) as fleet:
        fleet.start_service()
        a = fleet.start_agent("dev-1")
        fleet.wait_active(["dev-1"], fleet.release("1", "all").sequence)
        x, _ = digits_test_split(digits_v1)
        for i in range(5):
            a.daemon.recorder.predict(x[i : i + 1])
        c = fleet.coordinator
        link, _ = fleet.client(c.config.username, "predlog-test")
        topic = predlog_topic(topics.cmd("dev-1"))
        now = int(time.time())
        args = dict(device_id="dev-1", since=0.0, limit=10)
        replayed = seal_request(c.keys.release, corr="00000000", now=now, **args)  # type: ignore[arg-type]
        assert a.daemon.predlog_gate.open(replayed) is not None  # seen once (not uploaded)
        bad = {
            "refused:malformed": json.dumps({"corr": "11111111", "since": 0, "limit": 10}).encode(),
            "refused:untrusted_signer": seal_request(SigningKey.generate(), corr="22222222",
                                                     now=now, **args),  # type: ignore[arg-type]
            "refused:expired": seal_request(c.keys.release, corr="33333333", now=now - 600,
                                            **args),  # type: ignore[arg-type]
            "refused:rollback": replayed,
        }  # fmt: skip
        for frame in bad.values():
            link.publish(topic, frame, qos=1).wait(TIMEOUT)
        gate = a.daemon.predlog_gate
        wait_until(lambda: gate.refused == len(bad), "the bad requests refused", TIMEOUT)
        assert gate.counts == {"accepted": 1, **{k: 1 for k in bad}}

        def reported() -> bool:  # the agent's own telemetry, as coordinator serve stored it
            rows = recent(c.registry, namespace="agent", since=0, device_ids=["dev-1"])
            return any(p.get("predlog_refused") == len(bad) for _, _, p in rows)

        wait_until(reported, "predlog_refused in the agent's telemetry", TIMEOUT)
        assert not recent(c.registry, namespace="predlog", since=0, device_ids=["dev-1"])

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["fleet", "predictions", "--home", str(c.home), "--device", "dev-1",
                       "--since", "3600", "--wait", "30"])  # fmt: skip
        assert rc == 0, err.getvalue()
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [r["inputs"][0] for r in records] == x[:5].tolist()
        assert gate.counts["accepted"] == 2
        link.stop()
