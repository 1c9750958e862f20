"""The shadow / A/B CLI on a real mosquitto: release a candidate and wait until the device
reports serving it (its status carries the candidate), read it back, drop it."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from edgefleet.cli import main
from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import TIMEOUT, digits_test_split, open_fleet, wait_until

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)]


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_candidate_release_fleet_shadow_and_drop(tmp_path: Path, digits_v1: Digits,
                                                 digits_v2: Digits) -> None:
    with open_fleet(tmp_path, digits_v1, ["dev-1"], kind="mosquitto", shadow_sample=1.0,
                    predlog_sample=1.0) as fleet:
        fleet.start_service()
        a = fleet.start_agent("dev-1")
        release = fleet.release("1", "all")
        fleet.wait_active(["dev-1"], release.sequence)
        home = str(fleet.coordinator.home)
        fleet.coordinator.register_model("digits", digits_v2.onnx, version="3")

        for argv, message in [
            (["--share", "0.5"], "--share applies to --candidate ab only"),
            (["--candidate", "ab", "--share", "2"], "--share: expected 0..1"),
        ]:
            rc, _, err = run("model", "release", "--home", home, "--name", "digits",
                             "--version", "3", "--to", "all", *argv)
            assert rc == 1 and message in err and len(err.strip().splitlines()) == 1, err

        rc, out, err = run("model", "release", "--home", home, "--name", "digits",
                           "--version", "3", "--to", "device:dev-1", "--candidate", "shadow",
                           "--wait", str(TIMEOUT))
        assert rc == 0, err
        assert "(shadow) to 1 devices" in out and "never made active" in out
        sequence = int(out.split()[1].rstrip(":"))
        assert out.splitlines()[-1] == f"all 1 devices serve candidate {sequence}"
        [row] = fleet.fleet_status()  # what the device's status said, as the registry keeps it
        assert row["candidate"] == {"name": "digits", "version": "3", "sequence": sequence,
                                    "bundle_id": row["candidate"]["bundle_id"], "mode": "shadow"}
        assert row["sequence"] == release.sequence and len(row["candidate"]["bundle_id"]) == 32
        rc, out, _ = run("audit", "--home", home, "--action", "release", "--json")
        audited = json.loads(out.splitlines()[-1])
        assert audited["target"] == "digits@3 to device:dev-1 (candidate shadow)"
        assert audited["result"] == "ok" and audited["detail"]["candidate"] == "shadow"
        side = a.daemon.candidate
        assert side is not None and side.feed.installed.wait(TIMEOUT), side.slot.last_error

        x, _ = digits_test_split(digits_v1)
        for i in range(10):
            a.daemon.recorder.predict(x[i : i + 1])
        wait_until(lambda: (side.shadow.totals() or {}).get("samples", 0) == 10, "compared")

        def shadow_rows() -> list[dict[str, object]]:
            rc, out, _ = run("fleet", "shadow", "--home", home, "--json")
            assert rc == 0
            return [r for r in json.loads(out) if r["mode"] == "shadow"]

        wait_until(lambda: [r["compared"] for r in shadow_rows()] == [10], "fleet shadow rows")
        row = shadow_rows()[0]
        assert row["device"] == "dev-1" and row["candidate"] == "digits@3"
        rc, out, _ = run("fleet", "shadow", "--home", home)
        assert rc == 0 and "agreement" in out and "digits@3" in out

        # the prediction log, uploaded through the link for audit
        rc, out, err = run("fleet", "predictions", "--home", home, "--device", "dev-1",
                           "--since", "3600", "--wait", "30")
        assert rc == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) == 10 and "10 records from dev-1" in err
        assert [r["inputs"][0] for r in records] == x[:10].tolist()
        rc, _, err = run("fleet", "predictions", "--home", home, "--device", "nope")
        assert rc == 1 and "not enrolled" in err

        rc, out, err = run("model", "drop-candidate", "--home", home, "--to", "all")
        assert rc == 0 and "dropped on 1 devices" in out, err
        wait_until(lambda: side.slot.serving is None, "the candidate dropped", TIMEOUT)
        assert a.agent.active is not None and a.agent.active.manifest.sequence == release.sequence
        wait_until(lambda: "candidate" not in fleet.fleet_status()[0], "the status without it")

        # a target that never gets it: the wait times out, names it, exits 3
        a.daemon.stop()
        rc, out, err = run("model", "release", "--home", home, "--name", "digits",
                           "--version", "3", "--to", "device:dev-1", "--candidate", "ab",
                           "--wait", "1")
        assert rc == 3 and "(A/B, 0.1 of requests) to 1 devices" in out
        assert "timed out: 0 of 1 devices serve candidate" in err and "dev-1" in err, err
