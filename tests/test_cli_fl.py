"""The FL commands: ``fl start`` on a coordinator home against a running broker with agents
(2 rounds, per-round metrics), ``fl runs`` / ``fl status`` / ``model history`` list them,
``agent data add`` appends samples, and operator errors are one line."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.federated.data import load_dir
from edgefleet.simulations.fl import FlSimConfig, fl_fleet

from edgefleet.cli import main
from tests.integration.brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fl_world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not HAVE_MOSQUITTO:
        pytest.skip(NEED_MOSQUITTO)
    cfg = FlSimConfig(agents=3, broker="mosquitto", release="")
    with fl_fleet(tmp_path_factory.mktemp("cli-fl"), cfg) as sim:
        yield sim


def test_fl_start_runs_rounds_and_they_are_listed(fl_world: Any,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    home = fl_world.fleet.coordinator.home
    code, out, err = run(capsys, "fl", "start", "--home", home, "--name", "digits-cli",
                         "--rounds", 2, "--min-clients", 3, "--run-id", "cli-1",
                         "--local-epochs", 2, "--round-timeout", 60,
                         "--release-to", "all", "--release-if-better", "accuracy")
    assert code == 0, err
    lines = out.splitlines()
    rounds = [ln for ln in lines if ln.startswith("round ")]
    assert [ln.split()[1] for ln in rounds] == ["1/2", "2/2"]
    assert all("3 devices" in ln and "eval-accuracy=" in ln for ln in rounds), rounds
    assert "final version 2" in out
    # the bootstrap model the fleet serves (released to all) is better than 2 short rounds
    assert any(ln.startswith("not released: best accuracy") and "does not beat the released"
               in ln for ln in lines), out
    code, out, _ = run(capsys, "fl", "runs", "--home", home)
    assert code == 0 and "cli-1: digits-cli rounds 2/2 fedavg, version 2" in out
    code, out, err = run(capsys, "fl", "status", "--home", home)
    assert code == 0, err
    assert out.startswith("cli-1: digits-cli, fedavg, round 2 of 2: complete")
    code, out, _ = run(capsys, "model", "history", "--home", home, "--name", "digits-cli")
    history = out.splitlines()
    assert code == 0 and len(history) == 2
    assert history[0].startswith("digits-cli 1: run cli-1 round 1/2 fedavg")
    assert history[1].startswith("digits-cli 2 <- 1: run cli-1 round 2/2")
    assert "[fl-0,fl-1,fl-2]" in history[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fl", "start", "--name", "x", "--rounds", 1, "--min-clients", 9, "--wait-devices",
          0], "3 eligible devices"),
        (["fl", "start", "--name", "x", "--rounds", 1, "--dp-noise", 1.0], "--dp-clip"),
        (["fl", "start", "--name", "x", "--rounds", 1, "--release-if-better", "accuracy"],
         "--release-to"),
        (["fl", "status", "--run", "nope"], "no federated run 'nope'"),
        (["model", "history", "--name", "nope"], "no versions of model 'nope'"),
    ],
)  # fmt: skip
def test_operator_errors_are_one_line(fl_world: Any, capsys: pytest.CaptureFixture[str],
                                      argv: list[Any], message: str) -> None:
    home = fl_world.fleet.coordinator.home
    code, _, err = run(capsys, *argv[:2], "--home", home, *argv[2:])
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_agent_data_add(tmp_path: Path, fl_world: Any, capsys: pytest.CaptureFixture[str]) -> None:
    home = fl_world.fleet.homes["fl-0"]
    before = load_dir(home / "fl-data", test_fraction=0.0).num_train
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)
    np.savez(tmp_path / "new.npz", x=x, y=np.arange(7))
    code, out, err = run(capsys, "agent", "data", "add", "--home", home, tmp_path / "new.npz")
    assert code == 0 and out.startswith("added 7 samples (7 labels)"), err
    assert load_dir(home / "fl-data", test_fraction=0.0).num_train == before + 7
    (tmp_path / "bad.csv").write_text("1,2,x\n")
    code, _, err = run(capsys, "agent", "data", "add", "--home", home, tmp_path / "bad.csv")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'bad.csv'}: not a data file" in err


def _start(home: Path, name: str, run_id: str, rounds: int, *extra: Any) -> list[str]:
    return ["fl", "start", "--home", str(home), "--name", name, "--rounds", str(rounds),
            "--min-clients", "3", "--run-id", run_id, "--local-epochs", "2",
            "--round-timeout", "60", *map(str, extra)]  # fmt: skip


def test_dp_through_the_cli_records_noise_clip_and_epsilon(
    fl_world: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    home = fl_world.fleet.coordinator.home
    code, out, err = run(capsys, *_start(home, "digits-dp", "dp-1", 2, "--dp-noise", 1.0,
                                         "--dp-clip", 5.0))  # fmt: skip
    assert code == 0, err
    rounds = [ln for ln in out.splitlines() if ln.startswith("round ")]
    assert len(rounds) == 2 and all("eval-accuracy=" in ln and " eps=" in ln for ln in rounds)
    assert "dp z=1 C=5" in out and "eps" in out.splitlines()[-1]  # the summary line
    code, out, _ = run(capsys, "model", "history", "--home", home, "--name", "digits-dp")
    history = out.splitlines()
    assert code == 0 and len(history) == 2
    assert all("dp z=1.0 C=5.0 eps=" in ln for ln in history), history
    code, out, _ = run(capsys, "model", "history", "--home", home, "--name", "digits-dp",
                       "--json")  # fmt: skip
    dps = [v["lineage"]["fl"]["dp"] for v in json.loads(out)]
    assert [(d["noise_multiplier"], d["clipping_norm"], d["delta"]) for d in dps] == [
        (1.0, 5.0, 1e-5)] * 2
    assert 0 < dps[0]["epsilon"] < dps[1]["epsilon"]  # ε accumulates over the rounds
    code, audit, _ = run(capsys, "audit", "--home", home, "--action", "fl.start", "--json")
    assert code == 0 and json.loads(audit.splitlines()[-1])["target"] == "fl:dp-1"  # audited
    accuracy = [v["lineage"]["fl"]["metrics"]["eval"]["eval-accuracy"] for v in json.loads(out)]
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    # one more round of the same run: the accountant goes on from its registered state
    code, out, err = run(capsys, *_start(home, "digits-dp", "dp-1", 3, "--dp-noise", 1.0,
                                         "--dp-clip", 5.0))  # fmt: skip
    assert code == 0 and out.startswith("run dp-1: resuming after round 2 of 3"), err
    code, out, _ = run(capsys, "model", "history", "--home", home, "--name", "digits-dp",
                       "--json")  # fmt: skip
    eps = [v["lineage"]["fl"]["dp"]["epsilon"] for v in json.loads(out)]
    assert len(eps) == 3 and eps[2] > eps[1] == dps[1]["epsilon"]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put("")  # end of output

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(lines: queue.Queue[str], prefix: str, seen: list[str]) -> None:
    while True:
        line = lines.get(timeout=120)
        seen.append(line)
        if line.startswith(prefix):
            return
        assert line, f"no {prefix!r} before the end of output: {seen}"


def test_a_run_killed_after_a_round_resumes_through_the_cli(
    fl_world: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fl start`` in its own process is SIGKILLed once round 1 is registered; the same
    command again picks up after the last registered round: the lineage is one chain, no
    round is registered twice."""
    home = fl_world.fleet.coordinator.home
    argv = _start(home, "digits-resume", "resume-1", 3)
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        _read_until(_lines(proc), "round 1/3", seen)
    finally:
        proc.kill()
        proc.wait(30)
    code, out, _ = run(capsys, "fl", "status", "--home", home, "--run", "resume-1")
    assert code == 0 and "incomplete (resumable)" in out.splitlines()[0], out
    done = len(out.splitlines()) - 1  # round 1, or 2 if it was registered before the kill
    assert done in (1, 2), (out, seen)
    code, out, err = run(capsys, *argv)  # the same command, the same run id
    assert code == 0, err
    resumed = [ln.split()[1] for ln in out.splitlines() if ln.startswith("round ")]
    assert resumed == [f"{r}/3" for r in range(done + 1, 4)], out
    assert out.splitlines()[0] == f"run resume-1: resuming after round {done} of 3 (version {done})"
    code, out, _ = run(capsys, "model", "history", "--home", home, "--name", "digits-resume",
                       "--json")  # fmt: skip
    versions = json.loads(out)
    assert [v["lineage"]["fl"]["round"] for v in versions] == [1, 2, 3]  # none twice
    parents = [v["lineage"]["parent"] for v in versions]
    assert parents == [None, *(v["version"] for v in versions[:-1])]  # one chain across the kill
    assert {v["lineage"]["fl"]["run_id"] for v in versions} == {"resume-1"}
    code, out, _ = run(capsys, "fl", "status", "--home", home, "--run", "resume-1")
    assert "round 3 of 3: complete" in out.splitlines()[0]
    code, out, _ = run(capsys, *argv)  # once more: nothing left to do, nothing registered
    assert code == 0 and "all 3 rounds already registered" in out, out
    code, _, err = run(capsys, *_start(home, "digits-other", "resume-1", 3))
    assert code == 1 and err.strip() == ("edgefleet: run 'resume-1' trains 'digits-resume', not "
                                         "'digits-other': pass --name digits-resume to resume it, "
                                         "or another --run-id")  # fmt: skip


def test_fl_runs_start_and_stop_through_the_api(fl_world: Any) -> None:
    """``POST /api/v1/fl/runs`` runs the same rounds as ``fl start`` (progress as server-sent
    events), ``…/stop`` ends a run early (resumable), and both are audited."""
    import httpx
    from edgefleet.coordinator import access

    from edgefleet._cli_console import start_api, stop_api
    from tests.console.test_dashboard import free_port
    from tests.integration.fleet import wait_until

    c = fl_world.fleet.coordinator
    token = access.create_token(c.registry, name="ml-team", role="deployer", by="test")
    auth = {"Authorization": f"Bearer {token}"}
    port = free_port()
    api = start_api(c, f"127.0.0.1:{port}")  # as coordinator serve --api runs it
    base = f"http://127.0.0.1:{port}"
    body = {"name": "digits-api", "min_clients": 3, "local_epochs": 2, "round_timeout": 60}

    def events(url: str, *, stop_after_round: str | None = None) -> list[dict[str, Any]]:
        seen = []
        with httpx.stream("GET", base + url, headers=auth, timeout=300) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if stop_after_round and seen[-1].get("phase") == "round":
                        stopped = httpx.post(base + stop_after_round, headers=auth, timeout=30)
                        assert stopped.status_code == 200, stopped.text
                        stop_after_round = None
        return seen

    try:
        wait_until(lambda: api.server.started, "the API")
        r = httpx.post(f"{base}/api/v1/fl/runs", headers=auth, timeout=30,
                       json={**body, "rounds": 2, "run_id": "api-1"})
        assert r.status_code == 202, r.text
        seen = events(r.json()["events"])
        rounds = [e for e in seen if e.get("phase") == "round"]
        assert [e["round"] for e in rounds] == [1, 2] and all(e["version"] for e in rounds)
        assert seen[-1]["state"] == "done" and seen[-1]["rounds"] == [e["version"] for e in rounds]
        runs = httpx.get(f"{base}/api/v1/fl/runs", headers=auth, timeout=30).json()["runs"]
        assert [len(x["rounds"]) for x in runs if x["run_id"] == "api-1"] == [2]

        r = httpx.post(f"{base}/api/v1/fl/runs", headers=auth, timeout=30,
                       json={**body, "rounds": 50, "run_id": "api-2"})
        op = r.json()["operation"]
        seen = events(r.json()["events"], stop_after_round=f"/api/v1/fl/runs/{op}/stop")
        assert seen[-1]["state"] == "stopped", seen[-1]
        done = len([e for e in seen if e.get("phase") == "round"])
        assert 0 < done < 50  # stopped after its first round, well before the 50th
    finally:
        stop_api(api)
    actions = [e.action for e in access.audit_log(c.registry, limit=3)]
    assert actions == ["fl.stop", "fl.start", "fl.start"]
