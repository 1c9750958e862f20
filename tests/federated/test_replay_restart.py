"""The device's FL replay guard survives an agent restart (``FlClient(replay_state=...)``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr")

from edgefleet.federated.client import FlClient  # noqa: E402
from edgefleet.protocol.keys import SigningKey  # noqa: E402

from .test_grid import KEYRING, RELEASE, WAIT, _instruction, make_app  # noqa: E402


def client(state: Path | None, sent: list[bytes]) -> FlClient:
    return FlClient(lambda topic, frame: sent.append(frame), device_id="dev-0",
                    identity=SigningKey.generate(), trusted_keys=lambda: KEYRING,
                    client_app=make_app(), opted_in=True, node_config={"i": 0},
                    replay_state=state)  # fmt: skip


def run_once(c: FlClient, frame: bytes) -> None:
    try:
        c.handle(frame)
        assert c.wait_handled(1, WAIT)
    finally:
        c.stop()


@pytest.mark.parametrize("persisted", [True, False])
def test_an_instruction_replayed_after_a_restart_is_refused(tmp_path: Path,
                                                            persisted: bool) -> None:
    state = tmp_path / "fl-replay.json" if persisted else None
    frame = _instruction("dev-0", RELEASE, message_id="once")
    sent: list[bytes] = []
    first = client(state, sent)
    run_once(first, frame)
    assert first.counts["replied"] == 1
    again = client(state, sent)  # the agent restarted: a new client, the same home
    run_once(again, frame)
    if persisted:
        assert again.counts["rejected:rollback"] == 1 and len(sent) == 1
        assert state is not None and state.stat().st_mode & 0o777 == 0o600
    else:  # what the file prevents: without it, the replay is answered again
        assert again.counts["replied"] == 1 and len(sent) == 2


def test_an_unreadable_state_file_starts_an_empty_guard(tmp_path: Path) -> None:
    state = tmp_path / "fl-replay.json"
    state.write_text("{not json")
    sent: list[bytes] = []
    c = client(state, sent)
    run_once(c, _instruction("dev-0", RELEASE, message_id="fresh"))
    assert c.counts["replied"] == 1
    assert b"fresh" in state.read_bytes()  # rewritten whole
