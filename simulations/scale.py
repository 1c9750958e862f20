"""One release to a large simulated fleet, measured: the scale test's and ``bench fleet``'s rig.

``run_scale`` enrolls ``thin`` thin devices (``simulations.thin``, spread over ``processes``
child processes, each device on its own connection) and a few real agents (``AgentDaemon``
threads of this process) in one coordinator whose registry is ``database`` (SQLite or
PostgreSQL), starts a mosquitto with all their passwords and ACL, runs ``edgefleet
coordinator serve`` as a process of its own, and publishes ``releases`` releases to
everyone, one after the other. Each is done when every thin device has verified every chunk,
every agent has installed it, and the registry shows every device on it (so every final
status was ingested).

Measured per release: the serve process's CPU seconds and its RSS (``/proc``; sampled every
``sample`` s from before the first release to after the last), and the MQTT payload bytes the
thin devices received and sent (offers, chunk frames, requests, statuses; framing not
counted).
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.coordinator import release as releases
from edgefleet.coordinator.service import mqtt_config_for
from edgefleet.protocol.manifest import Manifest

from .homes import ModelFile
from .thin import open_thin_fleet
from .wait import wait_until

__all__ = ["ReleaseFigures", "ScaleReport", "cpu_seconds", "raise_nofile",
           "rss_mb", "run_scale"]  # fmt: skip

log = logging.getLogger(__name__)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _payload(totals: dict[str, int]) -> int:
    return int(totals.get("bytes_in", 0) + totals.get("bytes_out", 0))


def raise_nofile(want: int) -> int:
    """Raise this process's (and its children's) open-file limit towards ``want``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


@dataclass(frozen=True, kw_only=True)
class ReleaseFigures:
    sequence: int
    seconds: float  # from publishing until the registry shows every device on it
    published_s: float  # ... until every offer was acknowledged by the broker
    pulled_s: float  # ... until every thin device verified every chunk
    coordinator_cpu_s: float
    thin_payload_bytes: int  # MQTT payloads the thin devices received and sent
    offer_bytes: int  # offer payloads published, all devices
    segments: int


@dataclass(kw_only=True)
class ScaleReport:
    thin: int
    agents: int
    model_bytes: int  # plaintext
    database: str
    releases: list[ReleaseFigures] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)  # MB of the serve process, sampled
    rss_before: float = 0.0  # MB once connected, before the first release
    rss_after: list[float] = field(default_factory=list)  # MB after each release
    totals: dict[str, int] = field(default_factory=dict)  # the thin devices' counters

    @property
    def devices(self) -> int:
        return self.thin + self.agents

    def devices_per_s(self, k: int = -1) -> float:
        return self.devices / self.releases[k].seconds

    def cpu_per_device_mb(self, k: int = -1) -> float:
        r = self.releases[k]
        return r.coordinator_cpu_s / (self.devices * self.model_bytes / 1e6)

    def wire_per_device(self, k: int = -1) -> float:
        return self.releases[k].thin_payload_bytes / self.thin


class _Sampler:
    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every = pid, every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(rss_mb(self.pid))

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.samples


def _serve(home: Path, log_file: Path) -> subprocess.Popen[bytes]:
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "-v", "coordinator", "serve", "--home",
             str(home), "--client-id", "serve-scale"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_until(lambda: proc.poll() is not None or "coordinator serving" in log_file.read_text(),
               "coordinator serve to listen", 120)  # fmt: skip
    if proc.poll() is not None:
        raise RuntimeError(f"coordinator serve exited: {log_file.read_text()[-2000:]}")
    return proc


def run_scale(
    work: Path,
    *,
    thin: int,
    agents: Sequence[str],
    model: ModelFile,
    segment_size: int | None = None,
    database: str = "",
    processes: int = 2,
    releases_n: int = 2,
    timeout: float = 600.0,
    sample: float = 0.2,
) -> ScaleReport:
    raise_nofile(4 * (thin + len(agents)) + 1024)  # mosquitto: a descriptor per client
    with open_thin_fleet(work, thin, agents, models=[model], segment_size=segment_size,
                         database=database) as tf:  # fmt: skip
        fleet, c = tf.fleet, tf.fleet.coordinator
        proc = _serve(c.home, work / "serve.log")
        fleet.procs["serve"] = proc
        running = [fleet.start_agent(a, heartbeat=30.0, request_timeout=5.0) for a in agents]
        tf.start_pools(processes)
        mv = c.registry.model(model.name, model.version)
        report = ScaleReport(thin=thin, agents=len(agents), model_bytes=mv.size,
                             database=database or "sqlite")  # fmt: skip
        report.rss_before = rss_mb(proc.pid)
        sampler = _Sampler(proc.pid, sample)
        try:
            with releases.connect(mqtt_config_for(c, client_id="scale-release")) as link:
                for _ in range(releases_n):
                    for a in running:
                        a.daemon.installed.clear()
                    r0, io0 = cpu_seconds(proc.pid), _payload(tf.totals())
                    t0 = time.perf_counter()
                    done = releases.release(c, link, model.name, model.version, "all")
                    seq, t_pub = done.sequence, time.perf_counter() - t0
                    if not tf.wait_sequence(seq, timeout):
                        raise TimeoutError(f"release {seq}: thin devices {tf.totals()}")
                    t_pull = time.perf_counter() - t0
                    for a in running:
                        if not a.daemon.installed.wait(timeout):
                            raise TimeoutError(f"release {seq}: {a.device_id} not installed")
                    fleet.wait_active([*tf.thin_ids, *agents], seq, timeout=timeout)
                    dt = time.perf_counter() - t0
                    report.releases.append(ReleaseFigures(
                        sequence=seq, seconds=dt, published_s=t_pub, pulled_s=t_pull,
                        coordinator_cpu_s=cpu_seconds(proc.pid) - r0,
                        thin_payload_bytes=_payload(tf.totals()) - io0,
                        offer_bytes=done.report.bytes,
                        segments=Manifest.decode(done.release.manifest).segments,
                    ))  # fmt: skip
                    report.rss_after.append(rss_mb(proc.pid))
                    log.info("release %d to %d devices: %.1f s (offers acknowledged after "
                             "%.1f s, thin devices done after %.1f s); coordinator %.1f CPU s "
                             "(%.4f per device-MB), RSS %.0f MB (%.0f before); %.0f payload "
                             "bytes per thin device", seq, report.devices, dt, t_pub, t_pull,
                             report.releases[-1].coordinator_cpu_s, report.cpu_per_device_mb(),
                             report.rss_after[-1], report.rss_before,
                             report.wire_per_device())  # fmt: skip
        finally:
            report.rss = sampler.stop()
        report.totals = tf.totals()
        return report
