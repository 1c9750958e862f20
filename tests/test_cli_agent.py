"""``edgefleet agent …`` where a new user or a broken device tripped (issue 7), in-process.

The module fixture is a coordinator with the session's digits models registered (ONNX 1 and
2, TFLite 3) and bundles for dev-a built at the real time, as the CLI's agent checks expiry
against the wall clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.agent import Agent
from edgefleet.agent.http import MAX_BODY, InferenceServer

from edgefleet.cli import main
from tests.conftest import Digits


@dataclass(frozen=True)
class World:
    root: Path
    coordinator: Path
    fresh: Path  # dev-a's home, nothing installed
    b1: Path  # digits 1, ONNX, sequence 1
    b2: Path  # digits 2, ONNX, sequence 2
    b3: Path  # digits 3 (v1 as TFLite), sequence 3


def ok(*argv: str | Path) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, digits_v1: Digits,
          digits_v2: Digits) -> World:
    root = tmp_path_factory.mktemp("cli-agent")
    coord, fresh = root / "coordinator", root / "dev-a"
    ok("coordinator", "init", "--home", coord)
    for file, meta in ((digits_v1.onnx, digits_v1.meta_path), (digits_v2.onnx, digits_v2.meta_path),
                       (digits_v1.tflite, digits_v1.meta_path)):
        ok("model", "register", "--home", coord, "--name", "digits", "--file", file,
           "--meta", meta)
    ok("agent", "init", "--home", fresh, "--device-id", "dev-a", "--trust", coord / "root.pub")
    ok("coordinator", "enroll", "--home", coord, "--device-id", "dev-a",
       "--public-key", fresh / "keys" / "device.pub.json")
    bundles = []
    for version in ("1", "2", "3"):
        bundles.append(root / f"b{version}.efb")
        ok("bundle", "build", "--home", coord, "--name", "digits", "--version", version,
           "--to", "dev-a", "-o", bundles[-1])
    return World(root, coord, fresh, *bundles)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def home_with(world: World, tmp_path: Path, *bundles: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(world.fresh, home)
    for b in bundles:
        ok("agent", "install", "--home", home, b)
    return home


def one_line(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("edgefleet: "), err
    assert "Traceback" not in err


# -- item 12: a corrupt stored model ------------------------------------------------------------
def test_a_corrupt_store_can_be_repaired_from_a_file(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        x_test: np.ndarray, digits_v2: Digits) -> None:
    """With the active model.onnx overwritten, install, status (and run) used to refuse."""
    home = home_with(world, tmp_path, world.b1)
    (model,) = (home / "store" / "versions").glob("*/model.onnx")
    model.write_bytes(b"overwritten")

    code, out, err = run(capsys, "agent", "status", "--home", home)
    assert code == 0, err
    active = next(line for line in out.splitlines() if line.startswith("active:"))
    assert active.startswith("active:   broken: active model ") and "does not load" in active
    code, out, err = run(capsys, "agent", "status", "--home", home, "--json")
    assert code == 0 and "does not load" in json.loads(out)["broken"]

    code, out, err = run(capsys, "agent", "predict", "--home", home, "--input", "[0]")
    assert code == 1 and out == ""
    one_line(err)
    assert "no working model" in err

    code, out, err = run(capsys, "agent", "install", "--home", home, world.b2)
    assert code == 0 and out.startswith("installed digits 2 (sequence 2, onnx)"), err
    assert model.read_bytes() == b"overwritten"  # nothing deleted
    code, out, _ = run(capsys, "agent", "status", "--home", home)
    assert "active:   digits 2 (onnx, sequence 2)" in out
    code, out, _ = run(capsys, "agent", "predict", "--home", home,
                       "--input", json.dumps(x_test[:3].tolist()), "--json")
    assert code == 0
    np.testing.assert_allclose(json.loads(out)["outputs"], digits_v2.proba(x_test[:3]),
                               atol=1e-5)


# -- predict ------------------------------------------------------------------------------------
def test_predict_with_no_active_model_is_one_line(
        world: World, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "agent", "predict", "--home", world.fresh, "--input", "[1, 2]")
    assert code == 1 and out == ""
    one_line(err)
    assert "no model is active" in err


BAD_INPUTS = [  # (--input, what the one line says)
    ("[NaN, 1]", "expected finite numbers, saw NaN"),
    ("[Infinity]", "expected finite numbers, saw Infinity"),
    ("[[1, -Infinity]]", "expected finite numbers, saw -Infinity"),
    ("[1e39, 0]", "1e+39 is outside the float32 range"),
    ("[-1e39]", "-1e+39 is outside the float32 range"),
    ("[true, 0]", "expected numbers, saw true"),
    ("[[1, 2], [false, 3]]", "expected numbers, saw false"),
    ('["1", 2]', 'expected numbers, saw "1"'),
    ("[[1, 2], [3]]", "equal-length rows"),
    ("[[[1]]]", "expected a row or a list of rows"),
    ("{not json", "not a JSON array"),
]


@pytest.mark.parametrize(("text", "says"), BAD_INPUTS, ids=[t for t, _ in BAD_INPUTS])
def test_predict_refuses_input_that_is_not_finite_float32_numbers(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
        says: str) -> None:
    """NaN used to print ``0 nan`` and exit 0; ``true`` passed as 1."""
    home = home_with(world, tmp_path, world.b1)
    code, out, err = run(capsys, "agent", "predict", "--home", home, "--input", text)
    assert code == 1 and out == ""
    one_line(err)
    assert says in err


def _npz(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]


BAD_FILES = [  # (name, how to write it, what the one line says)
    ("text.npz", lambda p: p.write_text("1,2,3\n"), "not a NumPy .npy or .npz file"),
    ("text.npy", lambda p: p.write_text("[1, 2, 3]\n"), "not a NumPy .npy or .npz file"),
    ("empty.npy", lambda p: p.write_bytes(b""), "not a NumPy .npy or .npz file"),
    ("objects.npy", lambda p: np.save(p, np.array([{}, 1], dtype=object)),
     "not a NumPy .npy or .npz file"),
    ("no-x.npz", lambda p: _npz(p, y=np.zeros((1, 64))), "expected an array named 'x'"),
    ("bools.npy", lambda p: np.save(p, np.ones((1, 64), bool)), "expected an array of numbers"),
    ("nan.npy", lambda p: np.save(p, np.full((1, 64), np.nan)), "expected finite numbers"),
    ("big.npz", lambda p: _npz(p, x=np.full((1, 64), 1e39)), "outside the float32 range"),
]


@pytest.mark.parametrize(("name", "write", "says"), BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_predict_refuses_bad_input_files_in_one_line(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str,
        write: object, says: str) -> None:
    """A text file as ``.npz`` used to give numpy's "allow_pickle" hint."""
    home = home_with(world, tmp_path, world.b1)
    path = tmp_path / name
    write(path)  # type: ignore[operator]
    code, out, err = run(capsys, "agent", "predict", "--home", home, "--input-file", path)
    assert code == 1 and out == ""
    one_line(err)
    assert says in err and "allow_pickle" not in err


def test_a_large_input_works_with_the_daemon_as_without_it(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        x_test: np.ndarray) -> None:
    """Over the local API's body limit: it used to work in-process only (HTTP 413)."""
    home = home_with(world, tmp_path, world.b1)
    x = np.random.default_rng(0).uniform(0, 16, (100, 64)).astype(np.float32)
    per_row = len(json.dumps(x.tolist())) / 100
    x = np.resize(x, (int(1.2 * MAX_BODY / per_row), 64))  # its JSON: 1.2 times the limit
    path = tmp_path / "large.npy"
    np.save(path, x)
    argv = ("agent", "predict", "--home", home, "--input-file", path, "--json")
    code, alone, err = run(capsys, *argv)
    assert code == 0, err
    with Agent.open(home) as agent, InferenceServer(agent, home=home) as server:
        code, served, err = run(capsys, *argv)
        assert server.requests >= 2  # it went to the daemon, in batches
    assert code == 0 and err == "", err
    assert json.loads(served)["argmax"] == json.loads(alone)["argmax"]
    np.testing.assert_allclose(json.loads(served)["outputs"], json.loads(alone)["outputs"],
                               atol=1e-6)


# -- install: "already have it" -----------------------------------------------------------------
def test_re_installing_what_is_here_is_current_not_a_rollback(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-installing the active bundle used to say "rejected (rollback)" and exit 2."""
    home = home_with(world, tmp_path, world.b1, world.b2)
    last = json.loads((home / "last_install.json").read_bytes())
    for bundle, where in ((world.b2, "(active)"), (world.b1, "(kept, not active)")):
        code, out, err = run(capsys, "agent", "install", "--home", home, bundle)
        assert code == 0 and err == "", err
        assert out.startswith("nothing to do (current): ") and where in out
    assert json.loads((home / "last_install.json").read_bytes()) == last  # nothing recorded
    ok("agent", "rollback", "--home", home)
    code, out, err = run(capsys, "agent", "install", "--home", home, world.b2)
    assert code == 1 and out == ""
    one_line(err)
    assert "not installed (current)" in err and "rolled back locally" in err


# -- init ---------------------------------------------------------------------------------------
INIT_REJECTIONS = [  # (home, device id, what the one line says)
    ("new/home", "bad id!", "device id: expected a name"),
    ("new/home", ".leading-dot", "device id: expected a name"),
    ("new/home", "x" * 65, "device id: expected a name"),
]


@pytest.mark.parametrize(("home", "device", "says"), INIT_REJECTIONS,
                         ids=["space", "dot", "long"])
def test_a_rejected_init_leaves_no_home_behind(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str], home: str,
        device: str, says: str) -> None:
    path = tmp_path / home
    code, out, err = run(capsys, "agent", "init", "--home", path, "--device-id", device,
                         "--trust", world.coordinator / "root.pub")
    assert code == 1 and out == ""
    one_line(err)
    assert says in err
    assert not (tmp_path / "new").exists()


def test_init_over_an_initialised_home_changes_nothing(
        world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = home_with(world, tmp_path)
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    code, out, err = run(capsys, "agent", "init", "--home", home, "--device-id", "dev-a",
                         "--trust", world.coordinator / "root.pub")
    assert code == 1 and "already initialised" in err
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before


def test_a_failed_init_in_an_existing_directory_removes_only_what_it_made(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.agent import provision as provision_module
    from edgefleet.protocol.keys import decode_public_key

    home = tmp_path / "mine"
    home.mkdir()
    (home / "notes.txt").write_text("the operator's")

    def no_trust(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(provision_module.TrustStore, "pin", no_trust)
    root = decode_public_key((world.coordinator / "root.pub").read_bytes())
    with pytest.raises(OSError, match="No space"):
        provision_module.provision(home, "dev-a", root)
    assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]


# -- LiteRT's stderr notice ---------------------------------------------------------------------
def test_a_tflite_command_prints_nothing_on_stderr(world: World, tmp_path: Path,
                                                   x_test: np.ndarray) -> None:
    """Every command loading a TFLite model printed ``INFO: Created TensorFlow Lite XNNPACK
    delegate for CPU.`` (C++ stderr): in a fresh process, nothing now."""
    home = home_with(world, tmp_path, world.b3)
    env = {**os.environ, "EDGEFLEET_AGENT_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", "predict",
         "--input", json.dumps(x_test[0].tolist())],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.count("\t") == 1
