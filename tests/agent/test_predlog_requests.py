"""Prediction-log upload requests are signed like FL instructions: the gate opens only a
request signed by a release key the device trusts, for this device, unexpired and never seen
before (also across a restart); every refusal is one WARNING line and a count."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from edgefleet.agent.predlog import MAX_REQUEST_TTL, RequestGate, seal_request
from edgefleet.protocol import fl
from edgefleet.protocol.keyring import KeyEntry, Keyring
from edgefleet.protocol.keys import SigningKey

NOW = 1_800_000_000
RELEASE, OTHER = SigningKey.generate(), SigningKey.generate()
KEYRING = Keyring(version=1, expires=NOW + 7200, root_keyid="r" * 32, keys=(
    KeyEntry(keyid=RELEASE.keyid, public=RELEASE.public_raw, expires=NOW + 7200),))  # fmt: skip


def request(signer: SigningKey = RELEASE, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(device_id="dev-a", corr="0123abcd", since=100.0, limit=10,
                                now=NOW)  # fmt: skip
    return seal_request(signer, **{**args, **kw})


def gate(tmp_path: Path, now: int = NOW, keyring: Keyring | None = KEYRING) -> RequestGate:
    return RequestGate(device_id="dev-a", trusted_keys=lambda: keyring, clock=lambda: now,
                       state=tmp_path / "predlog-replay.json")  # fmt: skip


def _flip(frame: bytes, at: int) -> bytes:
    return frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1 :]


def _raw(payload: dict[str, Any], message_id: str = "0123abcd", **kw: Any) -> bytes:
    args: dict[str, Any] = dict(kind="instruction", run_id=0, round=0, message_id=message_id,
                                device_id="dev-a", issued_at=NOW, expires=NOW + 60)  # fmt: skip
    return fl.seal(json.dumps(payload).encode(), RELEASE, **{**args, **kw})


def test_a_signed_request_opens_once(tmp_path: Path) -> None:
    g = gate(tmp_path)
    assert g.open(request()) == ("0123abcd", 100.0, 10)
    assert g.open(request()) is None  # replayed
    assert g.counts == {"accepted": 1, "refused:rollback": 1}
    assert gate(tmp_path).open(request()) is None  # after a restart: still refused
    assert g.open(request(corr="0123abce")) == ("0123abce", 100.0, 10)  # a new nonce


GOOD = {"command": "predlog", "corr": "0123abcd", "since": 0, "limit": 5}
CASES = [
    ("unsigned", b'{"corr": "0123abcd", "since": 100, "limit": 10}', "malformed"),
    ("forged", request(OTHER), "untrusted_signer"),
    ("header tampered", _flip(request(), 40), "decode"),
    ("payload tampered", _flip(request(), len(request()) - 3), "integrity"),
    ("signature tampered", _flip(request(), len(fl.parse(request()).signed) + 5), "signature"),
    ("another device", request(device_id="dev-b"), "not_for_me"),
    ("expired", request(now=NOW - 200), "expired"),
    ("issued in the future", request(now=NOW + 900), "expired"),
    ("valid too long", request(ttl=MAX_REQUEST_TTL + 1), "malformed"),
    ("an FL instruction", _raw(GOOD, run_id=7, round=1), "malformed"),
    ("corr is not the nonce", _raw(GOOD, message_id="ffff0000"), "malformed"),
    ("another command", _raw({**GOOD, "command": "wipe"}), "malformed"),
    ("bad limit", _raw({**GOOD, "limit": 0}), "malformed"),
    ("oversize", b"x" * 5000, "malformed"),
]


@pytest.mark.parametrize(("case", "frame", "code"), CASES, ids=[c[0] for c in CASES])
def test_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, frame: bytes,
                 code: str) -> None:  # fmt: skip
    g = gate(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.predlog"):
        assert g.open(frame) is None
    assert g.counts == {f"refused:{code}": 1} and g.refused == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"refused a prediction-log request ({code})")


def test_without_a_trusted_keyring_nothing_opens(tmp_path: Path) -> None:
    g = gate(tmp_path, keyring=None)
    assert g.open(request()) is None and g.counts == {"refused:untrusted_signer": 1}
    expired = gate(tmp_path, now=NOW + 7200)
    assert expired.open(request(now=NOW + 7200)) is None
    assert expired.counts == {"refused:keyring": 1}


def test_the_coordinator_cannot_sign_what_no_device_accepts() -> None:
    with pytest.raises(ValueError, match="limit"):
        request(limit=5000)
    with pytest.raises(ValueError, match="corr"):
        request(corr="XYZ")
