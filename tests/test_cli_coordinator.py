"""What a new user tripped on, coordinator side and the CLI as a whole (issue 7).

``-v`` in any position; a coordinator command in an agent-only install; ``model release``
with the broker unreachable; ``fleet status`` (clock skew, no result yet, revoked devices,
no ingest running, desired vs actual within 80 columns).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgefleet.coordinator.ingest import STATUS, Ingest
from edgefleet.protocol.messages import ActiveModel, DeviceStatus, InstallResult

from edgefleet.cli import build_parser, main, verbosity
from tests.coordinator.homes import T0, Home, make_home

BID = "ab" * 16


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- -v anywhere ---------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "count"), [
    (["model", "list", "--home", "h"], 0),
    (["-v", "model", "list", "--home", "h"], 1),
    (["model", "list", "--home", "h", "-v"], 1),
    (["model", "list", "-vv", "--home", "h"], 2),
    (["-v", "fleet", "status", "--home", "h", "-v"], 2),
    (["coordinator", "-v", "group", "list", "--home", "h"], 1),
    (["-v", "coordinator", "group", "-v", "list", "--verbose", "--home", "h"], 3),
])
def test_verbose_counts_in_any_position(argv: list[str], count: int) -> None:
    assert verbosity(build_parser().parse_args(argv)) == count


def test_verbose_after_the_sub_command_raises_the_log_level(tmp_path: Path) -> None:
    """Through the real entry point: ``-vv`` at the end shows the INFO line of a register."""
    home = make_home(tmp_path).coordinator.home
    model = tmp_path / "m.onnx"
    from tests.coordinator.test_register import meta, onnx_model

    model.write_bytes(onnx_model())
    model.with_suffix(".json").write_text(json.dumps(meta()))
    done = subprocess.run([sys.executable, "-m", "edgefleet", "model", "register", "--home",
                           str(home), "--name", "checked", "--file", str(model), "-vv"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "registered model checked version 1" in done.stderr


# -- an agent-only install -----------------------------------------------------------------
ABSENT = """
import importlib.abc, sys
ABSENT = {"sqlalchemy", "alembic", "psycopg", "rich", "sklearn", "scipy", "onnx", "flwr",
          "amqtt"}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:  # as if never installed
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
from edgefleet.cli import main
sys.exit(main(sys.argv[1:]))
"""

EXTRAS = [
    # (argv, the command named, the extra to install)
    (["coordinator", "init", "--home", "{tmp}/c"], "coordinator init", "coordinator"),
    (["fleet", "status", "--home", "{tmp}/c"], "fleet status", "coordinator"),
    (["model", "train", "digits", "--out", "{tmp}/m"], "model train", "models"),
    (["bundle", "build", "--home", "{tmp}/c", "--name", "m", "--version", "1", "--to", "all",
      "-o", "{tmp}/b.efb"], "bundle build", "coordinator"),
]


@pytest.mark.parametrize(("argv", "command", "extra"), EXTRAS, ids=[e[1] for e in EXTRAS])
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, argv: list[str], command: str,
                                               extra: str) -> None:
    done = subprocess.run([sys.executable, "-c", ABSENT,
                           *[a.format(tmp=tmp_path) for a in argv]],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"edgefleet: `{command}` needs the {extra} extra (")
    assert done.stderr.rstrip().endswith(f"pip install 'edgefleet[{extra}]'")


# -- model release, broker unreachable -----------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_release_with_the_broker_unreachable_is_one_line_and_uses_up_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = make_home(tmp_path)
    registry = h.coordinator.registry
    url = f"mqtt://127.0.0.1:{_closed_port()}"
    code, out, err = run(capsys, "model", "release", "--home", h.coordinator.home,
                         "--broker", url, "--name", "m", "--version", "1", "--to", "all")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"edgefleet: cannot reach the broker at {url}")
    assert registry.releases() == []
    assert h.build().sequence == 1  # the failed attempt took no sequence


# -- fleet status ---------------------------------------------------------------------------
def report(h: Home, device: str, sequence: int | None, version: str, *, at: float,
           result: InstallResult | None = None) -> None:
    """A status as ``coordinator serve`` ingests it, received at ``at`` (unix seconds)."""
    active = None if sequence is None else ActiveModel(
        name="m", version=version, sequence=sequence, format="onnx", bundle_id=BID)
    ingest = Ingest(h.coordinator.registry, clock=lambda: at)
    payload = DeviceStatus(device_id=device, time=T0, state="idle", active=active,
                           last_result=result).encode()
    assert ingest.add(device, STATUS, payload)
    assert ingest.flush() == 1


@pytest.fixture
def fleet(tmp_path: Path) -> Home:
    """dev-a runs release 2 (its status from a clock an hour ahead), dev-b still runs 1 and
    reported no install result, dev-c is revoked (not in release 2)."""
    h = make_home(tmp_path)
    h.build("1", "all")
    h.coordinator.registry.revoke("dev-c")
    h.build("2", "all")
    now = time.time()
    report(h, "dev-a", 2, "2", at=now + 3600)
    report(h, "dev-b", 1, "1", at=now)
    return h


def lines_of(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line.strip()[:4] == "dev-"}


def test_fleet_status_fits_80_columns_and_shows_desired_vs_actual(
        fleet: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run(capsys, "fleet", "status", "--home", fleet.coordinator.home)
    assert code == 0 and err == ""  # dev-a was seen "just now": no staleness warning
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out
    header = next(line for line in out.splitlines() if "device" in line).split()
    assert header == ["device", "groups", "state", "model", "running", "desired", "last",
                      "seen", "last", "result"]
    rows = lines_of(out)
    assert rows["dev-a"].split() == ["dev-a", "-", "idle", "m", "2", "(v2)", "in", "sync",
                                     "just", "now", "-"]
    assert rows["dev-b"].split()[:7] == ["dev-b", "-", "idle", "m", "1", "(v1)", "2"]
    assert "None" not in rows["dev-b"] and rows["dev-b"].split()[-1] == "-"
    assert rows["dev-c"].split()[:3] == ["dev-c", "-", "revoked"] and "never" in rows["dev-c"]
    assert "3 devices: 1 in sync, 1 behind, 1 revoked" in out


def test_fleet_status_json_is_never_negative_nor_none_colon(
        fleet: Home, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "fleet", "status", "--home", fleet.coordinator.home, "--json")
    assert code == 0
    rows = {r["device"]: r for r in json.loads(out)}
    assert rows["dev-a"]["last_seen_s"] == 0
    assert rows["dev-b"]["last_result"] is None
    assert rows["dev-c"]["revoked"] is True and rows["dev-c"]["desired_sequence"] == 1


def test_a_failed_install_shows_its_code(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")  # a long reason folds within the column at 80
    h = make_home(tmp_path, devices=("dev-a",))
    h.build("1", "all")
    result = InstallResult(ok=False, code="integrity", reason="segment 3", time=T0, sequence=1)
    report(h, "dev-a", None, "1", at=time.time(), result=result)
    code, out, _ = run(capsys, "fleet", "status", "--home", h.coordinator.home)
    assert code == 0 and "integrity: segment 3" in lines_of(out)["dev-a"]


def test_the_desired_column_shows_only_when_a_device_is_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    h = make_home(tmp_path, devices=("dev-a",))
    h.build("1", "all")
    report(h, "dev-a", 1, "1", at=time.time())
    code, out, err = run(capsys, "fleet", "status", "--home", h.coordinator.home)
    assert code == 0 and err == ""
    assert "desired" not in out and "1 devices: 1 in sync, 0 behind, 0 revoked" in out


@pytest.mark.parametrize(("seen_ago", "warning"), [
    (None, "no device status ingested yet — is `coordinator serve` running?"),
    (600, "no status ingested for 10 min — is `coordinator serve` running?"),
    (3 * 86400, "no status ingested for 3 d — is `coordinator serve` running?"),
])
def test_fleet_status_says_when_nothing_is_ingested(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], seen_ago: int | None,
        warning: str) -> None:
    h = make_home(tmp_path, devices=("dev-a", "dev-b"))
    if seen_ago is not None:
        report(h, "dev-a", None, "1", at=time.time() - seen_ago)
    code, _, err = run(capsys, "fleet", "status", "--home", h.coordinator.home)
    assert code == 0 and err == warning + "\n"
