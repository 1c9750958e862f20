"""The ``edgefleet`` command line end to end, in-process through ``edgefleet.cli.main``.

The module fixture does what an operator does once: train two digits models, make a
coordinator, register the models, make two devices and enroll them, build two bundles.
The tests then install, inspect, predict, roll back and get rejected, as on a device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.protocol.canonical import b64e
from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header

from edgefleet.cli import main
from tests.conftest import Digits


@dataclass(frozen=True)
class World:
    root: Path
    coordinator: Path
    models_v1: Path
    models_v2: Path
    agents: dict[str, Path]
    b1: Path  # digits 1 for dev-a (sequence 1)
    b2: Path  # digits 2 for group lab = dev-a, dev-b (sequence 2)


def ok(*argv: str | Path) -> None:
    code = main([str(a) for a in argv])
    assert code == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("cli")
    coord, m1, m2 = root / "coordinator", root / "models-v1", root / "models-v2"
    ok("coordinator", "init", "--home", coord)
    ok("model", "train", "digits", "--out", m1)
    ok("model", "train", "digits", "--out", m2, "--seed", "1", "--hidden", "64")
    ok("model", "register", "--home", coord, "--name", "digits", "--file", m1 / "digits.onnx")
    ok("model", "register", "--home", coord, "--name", "digits", "--file", m2 / "digits.onnx")
    agents = {}
    for dev in ("dev-a", "dev-b"):
        agents[dev] = root / dev
        ok("agent", "init", "--home", agents[dev], "--device-id", dev,
           "--trust", coord / "root.pub")
        ok("coordinator", "enroll", "--home", coord, "--device-id", dev,
           "--public-key", agents[dev] / "keys" / "device.pub.json", "--group", "lab")
    b1, b2 = root / "b1.efb", root / "b2.efb"
    ok("bundle", "build", "--home", coord, "--name", "digits", "--version", "1", "--to", "dev-a",
       "-o", b1)
    ok("bundle", "build", "--home", coord, "--name", "digits", "--version", "2",
       "--to", "group:lab", "-o", b2)
    return World(root, coord, m1, m2, agents, b1, b2)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def status(capsys: pytest.CaptureFixture[str], home: Path) -> dict[str, Any]:
    code, out, _ = run(capsys, "agent", "status", "--home", home, "--json")
    assert code == 0
    return dict(json.loads(out))


def test_install_predict_update_rollback(world: World, capsys: pytest.CaptureFixture[str],
                                         digits_v1: Digits) -> None:
    home = world.root / "flow"
    shutil.copytree(world.agents["dev-a"], home)
    assert status(capsys, home)["active"] is None

    code, out, err = run(capsys, "agent", "install", "--home", home, world.b1)
    assert code == 0 and out.startswith("installed digits 1 (sequence 1, onnx)"), err
    st = status(capsys, home)
    assert st["device_id"] == "dev-a" and st["highest_sequence"] == 1
    assert st["active"]["name"] == "digits" and st["active"]["version"] == "1"
    assert st["last_install"]["ok"] is True

    # the whole held-out split through the installed model: sklearn's accuracy, and its numbers
    code, out, _ = run(capsys, "agent", "predict", "--home", home,
                       "--input-file", world.models_v1 / "digits_test.npz", "--json")
    assert code == 0
    result = json.loads(out)
    with np.load(world.models_v1 / "digits_test.npz") as npz:
        x, y = npz["x"], npz["y"]
    accuracy = float(np.mean(np.asarray(result["argmax"]) == y))
    assert accuracy == json.loads((world.models_v1 / "digits.json").read_text())["accuracy"]
    assert accuracy == digits_v1.accuracy
    np.testing.assert_allclose(result["outputs"], digits_v1.proba(x), atol=1e-5)

    code, out, _ = run(capsys, "agent", "predict", "--home", home,
                       "--input", json.dumps(x[0].tolist()))
    assert code == 0 and out.split("\t")[0] == str(result["argmax"][0])

    code, out, _ = run(capsys, "agent", "install", "--home", home, world.b2)
    assert code == 0 and "digits 2 (sequence 2" in out
    st = status(capsys, home)
    assert st["active"]["version"] == "2"
    assert [k["version"] for k in st["kept"]] == ["2", "1"]

    code, out, _ = run(capsys, "agent", "rollback", "--home", home)
    assert code == 0 and out.startswith("rolled back: digits 1 (sequence 1)")
    st = status(capsys, home)
    assert st["active"]["version"] == "1" and st["highest_sequence"] == 2
    assert st["last_install"]["code"] == "rollback"

    code, out, _ = run(capsys, "agent", "status", "--home", home)
    assert code == 0 and "active:   digits 1 (onnx, sequence 1)" in out


REJECTIONS = [
    # (bundle, install b2 first, code, reason); dev-b's home
    # (re-installing the active b2 is "current", not a rollback: tests/test_cli_agent.py)
    ("b1", False, "not_for_me", "device 'dev-b' is not a target"),
    ("flipped", False, "integrity", "segment"),
    ("truncated", False, "malformed", "bundle truncated"),
    ("garbage", False, "malformed", "expected magic"),
]


@pytest.mark.parametrize(("bundle", "first", "code", "reason"), REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_rejection_is_one_line_on_stderr(world: World, capsys: pytest.CaptureFixture[str],
                                         bundle: str, first: bool, code: str,
                                         reason: str) -> None:
    home = world.root / f"reject-{bundle}"
    shutil.copytree(world.agents["dev-b"], home)
    if first:
        assert run(capsys, "agent", "install", "--home", home, world.b2)[0] == 0
    data = world.b2.read_bytes()
    path = {"b1": world.b1, "b2": world.b2}.get(bundle, world.root / f"{bundle}.efb")
    if bundle == "flipped":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif bundle == "truncated":
        path.write_bytes(data[:-1])
    elif bundle == "garbage":
        path.write_bytes(b"PK\x03\x04" + bytes(100))
    before = status(capsys, home)["active"]

    exit_code, out, err = run(capsys, "agent", "install", "--home", home, path)

    assert exit_code == 2 and out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith(f"edgefleet: rejected ({code}): ") and reason in err
    st = status(capsys, home)
    assert st["active"] == before
    assert st["last_install"]["ok"] is False and st["last_install"]["code"] == code


@pytest.mark.parametrize("argv", [
    ["agent", "status", "--home", "{root}/nowhere"],
    ["agent", "predict", "--home", "{root}/dev-a", "--input-file", "{root}/nowhere.npy"],
    ["coordinator", "init", "--home", "{root}/coordinator"],
    ["bundle", "build", "--home", "{root}/coordinator", "--name", "digits", "--version", "9",
     "--to", "dev-a", "-o", "{root}/x.efb"],
    ["bundle", "build", "--home", "{root}/coordinator", "--name", "digits", "--version", "1",
     "--to", "dev-x", "-o", "{root}/x.efb"],
    ["coordinator", "enroll", "--home", "{root}/coordinator", "--device-id", "dev-z",
     "--public-key", "{root}/dev-a/keys/device.pub.json"],
    ["model", "release", "--home", "{root}/coordinator", "--name", "digits", "--version", "1",
     "--to", "all"],  # no broker configured
])
def test_operator_errors_exit_1_with_one_line(world: World, capsys: pytest.CaptureFixture[str],
                                              argv: list[str]) -> None:
    code, out, err = run(capsys, *[a.format(root=world.root) for a in argv])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("edgefleet: ")


def test_bundle_inspect_shows_the_manifest_but_no_secrets(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bundle", "inspect", world.b2, "--trust",
                       world.coordinator / "root.pub")
    assert code == 0
    doc = json.loads(out)
    assert doc["signature"] == "verified against the given root key"
    assert doc["manifest"]["name"] == "digits" and doc["manifest"]["sequence"] == 2
    assert set(doc["manifest"]["targets"]) == {"dev-a", "dev-b"}
    assert [e["device_id"] for e in doc["envelopes"]] == ["dev-a", "dev-b"]

    from edgefleet.coordinator.home import Coordinator

    release = Coordinator.open(world.coordinator).registry.release(sequence=2)
    assert release is not None
    data = world.b2.read_bytes()
    layout = parse_header(data[:HEADER_SIZE], file_size=len(data), max_payload=1 << 30)
    off, length = layout["envelopes"]
    secrets = [release.content_key.hex(), b64e(release.content_key)]
    secrets += [b64e(e.sealed) for e in decode_envelopes(data[off: off + length])]
    for dev in ("dev-a", "dev-b"):
        private = json.loads((world.agents[dev] / "keys" / "device.json").read_text())
        secrets += [private["kem_private"], private["sign_seed"]]
    for secret in secrets:
        assert secret not in out
    assert "sealed" not in out and "content_key" not in out

    code, out, _ = run(capsys, "bundle", "inspect", world.b1)
    assert code == 0 and json.loads(out)["signature"].startswith("not verified")


def test_inspect_with_the_wrong_root_is_rejected(world: World, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other"
    assert run(capsys, "coordinator", "init", "--home", other)[0] == 0
    code, out, err = run(capsys, "bundle", "inspect", world.b1, "--trust", other / "root.pub")
    assert code == 2 and out == "" and err.startswith("edgefleet: rejected (untrusted_signer)")


def test_model_list(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "model", "list", "--home", world.coordinator, "--json")
    assert code == 0
    assert [(m["name"], m["version"], m["format"]) for m in json.loads(out)] == [
        ("digits", "1", "onnx"), ("digits", "2", "onnx")]


def test_fleet_status(world: World, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Actual (what devices report: nothing yet) beside desired (the newest release for each)."""
    monkeypatch.setenv("COLUMNS", "160")  # the table's width, so that no cell is cut
    code, out, _ = run(capsys, "fleet", "status", "--home", world.coordinator, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["device"] for r in rows] == ["dev-a", "dev-b"]
    for r in rows:
        assert r == {"device": r["device"], "groups": ["lab"], "state": "enrolled",
                     "model": None, "version": None, "sequence": None, "last_seen_s": None,
                     "last_result": None, "desired_sequence": 2, "desired_version": "2",
                     "revoked": False}
    code, out, _ = run(capsys, "fleet", "status", "--home", world.coordinator)
    assert code == 0
    lines = [line for line in out.splitlines() if "dev-" in line]
    assert len(lines) == 2 and all("lab" in line and "2 (v2)" in line for line in lines), out
    assert "never" in lines[0] and "enrolled" in lines[0]


def test_model_release_publishes_and_waits(world: World, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Over a real broker with no agent running: the offers are retained for each target, and
    ``--wait`` gives up with exit 3 saying how many devices got there."""
    from edgefleet.infra.broker import EmbeddedBroker
    from edgefleet.infra.link.mqtt import MqttConfig, MqttLink

    from tests.integration.brokers import TIMEOUT, Inbox

    home = tmp_path / "coordinator"  # a copy: the release must not change the module's world
    shutil.copytree(world.coordinator, home)
    with EmbeddedBroker(data_dir=tmp_path / "broker") as broker:
        from edgefleet.coordinator.home import Coordinator

        # amqtt (where mosquitto is missing) speaks only MQTT 3.1.1
        Coordinator.open(home).update_config(mqtt_protocol=broker.protocol)
        code, out, err = run(capsys, "model", "release", "--home", home, "--broker", broker.url,
                             "--name", "digits", "--version", "1", "--to", "group:lab",
                             "--wait", "0.2")
        assert code == 3, err
        assert out.splitlines()[0].startswith("release 3: digits 1 to 2 devices (")
        assert err.strip().splitlines()[-1] == "timed out: 0 of 2 devices run release 3"
        inbox = Inbox()
        link = MqttLink(MqttConfig(url=broker.url, client_id="dev-a", protocol=broker.protocol),
                        inbox)
        link.start()
        try:
            link.subscribe("ef/v1/dev/dev-a/release")
            offer = json.loads(inbox.wait_topic("ef/v1/dev/dev-a/release", TIMEOUT).payload)
        finally:
            link.stop()
    assert offer["type"] == "release" and offer["envelope"]["device_id"] == "dev-a"
    code, out, _ = run(capsys, "audit", "--home", home, "--json")  # the CLI's changes are audited
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rows[-1]["action"] == "release" and rows[-1]["result"] == "ok"
    assert rows[-1]["actor"].startswith("cli:") and rows[-1]["target"] == "digits@1 to group:lab"
    assert rows[-1]["detail"] == {"sequence": 3, "targets": 2}


def test_home_from_the_environment(world: World, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_AGENT_HOME", str(world.agents["dev-b"]))
    st = json.loads(run(capsys, "agent", "status", "--json")[1])
    assert st["device_id"] == "dev-b"


def test_console_script_in_a_subprocess(world: World, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(world.agents["dev-a"], home)
    script = Path(sys.executable).with_name("edgefleet")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "edgefleet"]
    done = subprocess.run([*cmd, "agent", "install", "--home", str(home), str(world.b1)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.startswith("installed digits 1"), done.stderr
    done = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "status", "--home",
                           str(home), "--json"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["active"]["version"] == "1"
    bad = tmp_path / "bad.efb"  # (re-installing b1 is "current" now, not a rejection)
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    done = subprocess.run([*cmd, "agent", "install", "--home", str(home), str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    # the reason is the last line (the agent's WARNING log line may precede it)
    assert done.stderr.splitlines()[-1].startswith("edgefleet: rejected (malformed): ")
