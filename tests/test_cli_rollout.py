"""``edgefleet rollout …`` without a broker: one-line errors (exit 1) for bad gates, stages and
durations, start/status/pause/resume/abort on a real registry, and what needs a broker says so.
Driving a rollout through the CLI over mosquitto is in tests/integration/test_rollout.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from edgefleet.coordinator.rollouts import RolloutStore

from edgefleet.cli import main
from tests.coordinator.homes import Home, make_home
from tests.test_cli_coordinator import report


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """Three devices running m 1, all seen just now."""
    h = make_home(tmp_path)
    r = h.build("1", "all")
    for dev in ("dev-a", "dev-b", "dev-c"):
        report(h, dev, r.sequence, "1", at=time.time())
    return h


def start(h: Home, *extra: str) -> list[str]:
    return ["rollout", "start", "--home", str(h.coordinator.home), "--name", "m",
            "--version", "2", *extra]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), [
    (["--gate", "error_rate<=0.01"], "gate 'error_rate<=0.01': expected METRIC<NUMBER"),
    (["--gate", "speed<3"], "unknown metric 'speed'"),
    (["--gate", "drift<0.2x"], "only p95_latency takes a unit"),
    (["--canary", "ten"], "stage 'ten': expected N%, device:ID[,ID…] or group:G"),
    (["--waves", "10%,150%"], "stage '150%': a share must be in (0%, 100%]"),
    (["--waves", ","], "a rollout needs at least one wave"),
    (["--bake", "soon"], "duration 'soon': expected a number with s, m or h"),
    (["--wave-timeout", "0"], "wave timeout > 0 s"),
    (["--min-samples", "0"], "min samples >= 1"),
    (["--min-labels", "0"], "min labels must be >= 1, got 0"),
])  # fmt: skip
def test_bad_syntax_is_one_line_before_anything_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    argv = ["rollout", "start", "--home", str(tmp_path / "none"), "--name", "m", "--version",
            "2", *extra]  # fmt: skip
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err


@pytest.mark.parametrize("canary", ["group:none", "device:dev-z"])
def test_a_canary_selecting_nobody_is_one_line_and_records_nothing(
    home: Home, capsys: pytest.CaptureFixture[str], canary: str
) -> None:
    code, out, err = run(capsys, *start(home, "--canary", canary))
    assert (code, out) == (1, "")
    assert err == f"edgefleet: canary {canary} selects no online device\n"
    assert RolloutStore(home.coordinator.registry).all() == []


def test_an_unregistered_version_is_one_line(home: Home, capsys: pytest.CaptureFixture[str]
                                             ) -> None:  # fmt: skip
    argv = start(home)
    argv[argv.index("2")] = "7"
    code, _, err = run(capsys, *argv)
    assert code == 1 and "model m version 7 is not registered" in err and err.count("\n") == 1


def test_start_status_pause_resume_abort(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    h = str(home.coordinator.home)
    code, out, _ = run(capsys, *start(home, "--canary", "device:dev-b", "--waves", "100%",
                                      "--gate", "error_rate<0.01", "--gate", "p95_latency<1.5x",
                                      "--bake", "30s"))  # fmt: skip
    assert code == 0
    assert out.splitlines()[0] == ("rollout 1: m 2, canary device:dev-b, waves 100%, gates "
                                   "error_rate<0.01 p95_latency<1.5x, bake 30 s")  # fmt: skip
    code, out, _ = run(capsys, "rollout", "status", "--home", h)
    assert code == 0 and out.startswith("rollout 1: m 2 — pending, -")
    code, out, _ = run(capsys, "rollout", "status", "1", "--home", h, "--json")
    doc = json.loads(out)
    assert doc["spec"]["canary"] == "device:dev-b" and doc["state"]["phase"] == "pending"
    assert run(capsys, "rollout", "pause", "--home", h)[:2] == (0, "rollout 1: pending (paused)\n")
    assert run(capsys, "rollout", "resume", "1", "--home", h)[:2] == (0, "rollout 1: pending\n")
    assert run(capsys, "rollout", "abort", "--home", h)[:2] == (0, "rollout 1: aborted\n")
    code, _, err = run(capsys, "rollout", "pause", "--home", h)
    assert code == 1 and err == "edgefleet: cannot pause a rollout that is aborted\n"
    code, out, _ = run(capsys, "rollout", "status", "--home", h)
    assert "aborted" in out and "abort: abort by the operator" in out


def test_an_accuracy_gate_takes_min_labels(home: Home, capsys: pytest.CaptureFixture[str]) -> None:
    h = str(home.coordinator.home)
    code, _, err = run(capsys, *start(home, "--canary", "device:dev-b", "--gate", "accuracy>0.9",
                                      "--min-labels", "5"))  # fmt: skip
    assert code == 0, err
    code, out, _ = run(capsys, "rollout", "status", "--home", h)
    assert "gates accuracy>0.9; bake 600 s; min samples 50; min labels 5; wave timeout" in out
    doc = json.loads(run(capsys, "rollout", "status", "--home", h, "--json")[1])
    assert doc["spec"]["min_labels"] == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["rollout", "status"], "no rollout yet (edgefleet rollout start …)"),
    (["rollout", "status", "9"], "rollout 9 does not exist"),
    (["rollout", "run", "1"], "no broker: pass --broker"),
])  # fmt: skip
def test_what_cannot_be_done_is_one_line(home: Home, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], message: str) -> None:  # fmt: skip
    code, _, err = run(capsys, *argv, "--home", str(home.coordinator.home))
    assert code == 1 and message in err and err.count("\n") == 1, err
