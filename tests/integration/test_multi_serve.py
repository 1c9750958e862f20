"""Several ``edgefleet coordinator serve`` processes on one mosquitto and one registry.

They share the chunk requests through the ``$share/edgefleet-coord/…`` subscription. Thin
devices (``simulations.thin``, each on its own connection) pull one release; the devices
count every reply per correlation id and the servers log what they sent when stopped:

- three running: every request answered exactly once (no duplicate, no re-send, requests ==
  verified chunks), and the load shared (the one then stopped logs part of the chunks, not
  all and not none);
- a second release on the other two, one killed with SIGKILL mid-way: every device completes
  (requests that went to the dead one are re-sent after the devices' timeout and answered by
  the survivor), still nothing duplicated.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.coordinator.service import mqtt_config_for
from edgefleet.protocol.manifest import Manifest
from edgefleet.simulations.homes import ModelFile
from edgefleet.simulations.thin import ThinFleet, open_thin_fleet
from edgefleet.simulations.wait import wait_until

from tests.conftest import Digits

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("mosquitto") is None,
                       reason="needs the mosquitto binary on PATH"),  # fmt: skip
]
SEGMENT = 1024  # bytes: the ~39 KB digits model is ~38 chunks per device
DEVICES = 20
TIMEOUT = 90.0


@contextmanager
def _thin(tmp_path: Path, digits: Digits) -> Iterator[ThinFleet]:
    models = [ModelFile(name="digits", path=digits.onnx, version="1")]
    with open_thin_fleet(tmp_path, DEVICES, models=models, segment_size=SEGMENT) as tf:
        yield tf


def _serve(tf: ThinFleet, *names: str) -> list[subprocess.Popen[bytes]]:
    """Start ``coordinator serve`` processes (at once) and wait until each is listening."""
    home, procs = tf.fleet.coordinator.home, []
    for name in names:
        with open(tf.fleet.work / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "-v", "coordinator", "serve", "--home",
                 str(home), "--client-id", name],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        tf.fleet.procs[name] = proc  # the fleet terminates what is left
        procs.append(proc)
    for name, proc in zip(names, procs, strict=True):
        log = tf.fleet.work / f"{name}.log"
        wait_until(lambda p=proc, f=log: p.poll() is not None or "coordinator serving" in
                   f.read_text(), f"{name} to serve", TIMEOUT)  # fmt: skip
        assert proc.poll() is None, log.read_text()
    return procs


def _stop(tf: ThinFleet, name: str) -> int:
    """SIGTERM one server; return the chunks it logged as sent."""
    proc = tf.fleet.procs[name]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    text = (tf.fleet.work / f"{name}.log").read_text()
    found = re.findall(r"coordinator stopped: sent (\d+) chunks", text)
    assert found, text[-2000:]
    return int(found[-1])


def _publish(tf: ThinFleet) -> tuple[int, int]:
    """Build and publish a release to every thin device; (sequence, segments)."""
    c = tf.fleet.coordinator
    cfg = mqtt_config_for(c, client_id="release-test")
    with releases.connect(cfg) as link:
        done = releases.release(c, link, "digits", "1", "all")
    return done.sequence, Manifest.decode(done.release.manifest).segments


def test_servers_share_a_release_and_survive_a_kill(tmp_path: Path, digits_v1: Digits) -> None:
    with _thin(tmp_path, digits_v1) as tf:
        _serve(tf, "serve-a", "serve-b", "serve-c")
        # a generous request timeout: a re-send would mean a request was lost, not slow
        pool = tf.local_pool(timeout=60.0)
        sequence, segments = _publish(tf)
        want = DEVICES * segments
        assert pool.wait_sequence(sequence, TIMEOUT), pool.totals()
        tf.fleet.wait_active(tf.thin_ids, sequence, timeout=TIMEOUT)  # statuses ingested
        t = pool.totals()
        # every request answered exactly once: nothing lost (no re-send), nothing twice
        assert t["fetched"] == want and t["requests"] == want, t
        assert t["duplicates"] == 0 and t["late"] == 0 and t["bad_hash"] == 0, t
        c = _stop(tf, "serve-c")
        assert 0 < c < want, f"serve-c sent {c} of {want} chunks: the load was not shared"

        # a second release, served by serve-a and serve-b; serve-a dies mid-way
        victim = tf.fleet.procs["serve-a"]
        pool.set_timeout(1.0)  # what went to the dead one is asked for again soon
        sequence, _ = _publish(tf)
        wait_until(lambda: pool.totals()["fetched"] >= want + want // 10, "a tenth of the "
                   "second release", TIMEOUT)  # fmt: skip
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        at_kill = pool.totals()["fetched"] - want
        assert at_kill < want, "the release finished before the kill: nothing was tested"
        assert pool.wait_sequence(sequence, TIMEOUT), pool.totals()
        tf.fleet.wait_active(tf.thin_ids, sequence, timeout=TIMEOUT)
        t = pool.totals()
        assert t["fetched"] == 2 * want and t["bad_hash"] == 0 and t["duplicates"] == 0, t
        assert _stop(tf, "serve-b") > 0
