"""The prediction log: sampled through the recorder, rotating within its bound, redacted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.observe import Recorder
from edgefleet.agent.predlog import CURRENT, PredictionLog

from tests.conftest import Fleet, open_agent


def test_rotation_keeps_the_log_within_its_bound_and_reads_in_order(tmp_path: Path) -> None:
    t = [1000.0]
    plog = PredictionLog(tmp_path / "log", max_bytes=2048, keep=2, clock=lambda: t[0])
    x, y = np.zeros((1, 8), np.float32), np.eye(1, 4, 2, dtype=np.float32)
    for i in range(200):
        t[0] = 1000.0 + i
        plog.observe(x + i, y, "m@1")
    assert plog.written == 200
    files = sorted(os.listdir(tmp_path / "log"))
    assert len(files) == 3 and CURRENT in files  # the current one and the 2 newest rotated
    assert all((tmp_path / "log" / f).stat().st_size <= 2048 for f in files)
    assert [n for n, _ in plog.rotated()] == sorted(n for n, _ in plog.rotated())
    got = list(plog.read())
    assert [r["t"] for r in got] == sorted(r["t"] for r in got) and got[-1]["t"] == 1199.0
    assert got[-1]["inputs"] == [[199.0] * 8] and got[-1]["argmax"] == [2]
    assert [r["t"] for r in plog.read(since=1190)] == [1190.0 + i for i in range(10)]
    assert oct((tmp_path / "log" / CURRENT).stat().st_mode & 0o777) == "0o600"
    plog.close()
    again = PredictionLog(tmp_path / "log", max_bytes=2048, keep=2, clock=lambda: 2000.0)
    again.observe(x, y, "m@1")  # appends after a restart
    assert list(again.read())[-1]["t"] == 2000.0 and len(list(again.read())) == len(got) + 1
    again.close()


def test_redacted_fields_are_replaced_by_their_digest(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path / "log", redact=["inputs"], clock=lambda: 5.0)
    x = np.array([[0.5, 1.0]], np.float32)
    plog.observe(x, np.array([[0.2, 0.8]], np.float32), "m@1")
    (rec,) = plog.read()
    digest = hashlib.sha256(json.dumps([[0.5, 1.0]], separators=(",", ":")).encode()).hexdigest()
    assert rec["inputs"] == {"sha256": digest}
    assert rec["outputs"][0] == pytest.approx([0.2, 0.8]) and rec["argmax"] == [1]
    assert b"0.5" not in (tmp_path / "log" / CURRENT).read_bytes()
    with pytest.raises(ValueError, match="redact"):
        PredictionLog(tmp_path / "other", redact=["password"])
    plog.close()


def test_oversize_torn_and_non_finite_lines(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path / "log", max_line=512, clock=lambda: 1.0)
    plog.observe(np.zeros((100, 8), np.float32), np.zeros((100, 2), np.float32), "m@1")
    assert plog.oversize == 1 and plog.written == 0
    plog.observe(np.zeros((1, 2), np.float32), np.array([[np.nan, 1.0]], np.float32), "m@1")
    assert plog.errors == 1
    plog.observe(np.zeros((1, 2), np.float32), np.array([[0.0, 1.0]], np.float32), "m@1")
    with open(tmp_path / "log" / CURRENT, "ab") as f:
        f.write(b'{"t": 2, "model": "torn')  # a power cut mid-line
    assert [r["t"] for r in plog.read()] == [1.0]
    plog.close()


def test_the_recorder_logs_its_sampled_share(
    fleet: Fleet, tmp_path: Path, x_test: np.ndarray
) -> None:
    agent = open_agent(fleet.agent_home(tmp_path / "home", installed=["v1"]))
    try:
        plog = PredictionLog(tmp_path / "log", clock=lambda: 7.0)
        recorder = Recorder(agent)
        recorder.add_observer(plog.observe, share=0.5)
        for i in range(20):
            recorder.predict(x_test[i : i + 1])
        from edgefleet.simulations.wait import wait_until

        wait_until(lambda: plog.written + recorder.observer_dropped == 10, "10 lines", 30.0)
        for rec in plog.read():
            assert rec["model"] == "digits@1" and len(rec["inputs"][0]) == 64
        plog.close()
    finally:
        agent.close()


def test_an_upload_is_chunked_within_the_telemetry_bounds_and_reassembles(tmp_path: Path) -> None:
    from edgefleet.agent.predlog import assemble, parse_request, upload_messages
    from edgefleet.protocol.messages import MAX_TELEMETRY, Telemetry

    t = [0.0]
    plog = PredictionLog(tmp_path / "log", clock=lambda: t[0])
    rng = np.random.default_rng(0)
    for i in range(300):
        t[0] = float(i)
        plog.observe(rng.random((1, 64), dtype=np.float32), rng.random((1, 10), np.float32), "m@1")
    corr, since, limit = parse_request(
        b'{"command": "predlog", "corr": "0123abcd", "since": 100, "limit": 150}'
    )
    chunks = list(upload_messages(plog, corr, since, limit))
    assert len(chunks) > 1 and chunks[-1]["last"] and chunks[-1]["count"] == 150
    for c in chunks:  # each one a valid telemetry message within the size cap
        message = Telemetry(device_id="d", time=1, metrics={"predlog": c})
        assert len(message.encode()) <= MAX_TELEMETRY
    assert assemble(chunks[:-1], corr) is None  # incomplete
    assert assemble(reversed(chunks), "ffffffff") is None
    got = assemble(reversed(chunks), corr)
    assert got is not None and [r["t"] for r in got] == [100.0 + i for i in range(150)]
    assert got == list(plog.read(100))[:150]
    ok = '"command": "predlog", "corr": "0123abcd"'
    for bad, why in [("{}", "command"), ('{"corr": "0123abcd"}', "command"),
                     ('{"command": "predlog", "corr": "XYZ"}', "corr"),
                     ("{" + ok + ', "limit": 0}', "limit"), ("{" + ok + ', "since": NaN}', "since"),
                     ("{" + ok + ', "x": 1}', "expected"), ("[" * 3000, "nested"),
                     ("[" * 5000, "bytes")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_request(bad.encode())
    plog.close()
