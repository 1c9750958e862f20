"""Operator key management through the CLI: release-key rotation and device revocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cli import main
from tests.conftest import Digits


def ok(*argv: str | Path) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def homes(tmp_path: Path, digits_v1: Digits) -> tuple[Path, Path]:
    coord, dev = tmp_path / "coord", tmp_path / "dev"
    ok("coordinator", "init", "--home", coord)
    ok("model", "register", "--home", coord, "--name", "digits", "--file", digits_v1.onnx)
    ok("agent", "init", "--home", dev, "--device-id", "dev-k", "--trust", coord / "root.pub")
    ok("coordinator", "enroll", "--home", coord, "--device-id", "dev-k",
       "--public-key", dev / "keys" / "device.pub.json")
    return coord, dev


def test_rotated_key_is_adopted_and_the_old_one_refused(
    homes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord, dev = homes
    old, new = tmp_path / "old.efb", tmp_path / "new.efb"
    ok("bundle", "build", "--home", coord, "--name", "digits", "--version", "1", "--to", "dev-k",
       "-o", old)  # sequence 1, signed by the first release key
    ok("coordinator", "rotate-key", "--home", coord)
    ok("bundle", "build", "--home", coord, "--name", "digits", "--version", "1", "--to", "dev-k",
       "-o", new)  # sequence 2, new key, keyring v2
    ok("agent", "install", "--home", dev, new)
    code, err = run(capsys, "agent", "install", "--home", dev, old)
    assert code == 2 and "untrusted_signer" in err, err  # revoked by keyring v2, not just old


def test_revoked_device_gets_no_release_and_can_re_enroll(
    homes: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord, dev = homes
    ok("coordinator", "revoke", "--home", coord, "--device-id", "dev-k")
    code, err = run(capsys, "bundle", "build", "--home", coord, "--name", "digits",
                    "--version", "1", "--to", "dev-k", "-o", tmp_path / "x.efb")
    assert code == 1 and "revoked" in err
    code, err = run(capsys, "bundle", "build", "--home", coord, "--name", "digits",
                    "--version", "1", "--to", "all", "-o", tmp_path / "x.efb")
    assert code == 1 and "matches no enrolled device" in err
    fresh = tmp_path / "fresh"  # the device is re-imaged: new keys, same id
    ok("agent", "init", "--home", fresh, "--device-id", "dev-k", "--trust", coord / "root.pub")
    ok("coordinator", "enroll", "--home", coord, "--device-id", "dev-k",
       "--public-key", fresh / "keys" / "device.pub.json")
    ok("bundle", "build", "--home", coord, "--name", "digits", "--version", "1", "--to", "dev-k",
       "-o", tmp_path / "y.efb")
    ok("agent", "install", "--home", fresh, tmp_path / "y.efb")
    code, err = run(capsys, "agent", "install", "--home", dev, tmp_path / "y.efb")
    assert code == 2 and "decrypt" in err, err  # the old keys cannot open the new envelope
