"""The "one bad device" soak (issue 7): one device attacks while a release goes to the others.

``run_soak(work, model, SoakConfig(agents=20, attack_seconds=60))`` provisions N agents and
one rogue device on a hardened mosquitto (``brokers.hardened``: ``broker-config`` output, the
dynamic-security plugin, ``BrokerLimits``), then:

1. starts the coordinator service in a process of its own (so its memory is its own; it
   answers ``stats`` on stdin with its queue counters) and the N agents as threads here;
2. releases the model once to warm up, then times a release to the N agents unattacked;
3. starts the rogue in a process of its own (``attacks.run_rogue``: every attack, with the
   rogue's own credentials, for ``attack_seconds``), waits until the coordinator is dropping
   the rogue's work, and times the same release again under attack;
4. samples ``VmRSS`` of mosquitto and the coordinator process throughout, and reports them
   with the bounds derived from the broker's and the service's limits.

The timed release is built before the clock starts and ends when every agent has installed
and activated it. ``SoakReport`` has the figures; nothing here asserts on time (the ratio is
``bench/soak.py``'s). ``python -m edgefleet.simulations.soak coordinator|rogue`` are the two
child processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from edgefleet.coordinator import release as releases
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.service import (
    MAX_INCOMING,
    UNSENT_LIMIT,
    CoordinatorService,
    ServiceLimits,
    mqtt_config_for,
)
from edgefleet.infra.broker import CHUNK_FRAME_OVERHEAD, BrokerLimits
from edgefleet.infra.link.config import HEADER_ALLOWANCE
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics

from .attacks import Rogue, RogueTarget, default_attacks
from .brokers import hardened
from .fleet import Fleet, RunningAgent, open_fleet
from .homes import ModelFile
from .wait import wait_until

__all__ = ["Memory", "SoakConfig", "SoakReport", "run_soak"]

log = logging.getLogger(__name__)

ROGUE = "rogue"
COORDINATOR_ID = "coordinator-soak"
PUBLISHER_ID = "release-soak"
SLACK = 48 << 20  # bytes of RSS growth beyond the bounds: allocator, socket buffers, logs
CHILD_TIMEOUT = 60.0  # s for a child process to start or answer
VERSIONS = ("1", "2", "3")  # the model, registered three times: releases alternate them


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    agents: int = 20
    attack_seconds: float = 60.0  # how long the rogue attacks
    fleet_segment: int = 4096  # bytes per segment of the agents' releases (digits: ~10)
    bait_segment: int = 256 * 1024  # bytes per segment of the rogue's release (the default)
    bait_segments: int = 16  # ... and how many: one full 16-index request
    limits: BrokerLimits = field(default_factory=BrokerLimits)
    rate_scale: float = 1.0  # times every attack's default rate
    install_timeout: float = 300.0  # s for a release to reach every agent
    releases: int = 5  # timed releases unattacked (under attack: as many as fit, >= 1)
    attacks: tuple[str, ...] | None = None  # names of the attacks to run (None: all)
    # s between the starts of two releases, at least: the first agent to ask for a new
    # release pays a registry lookup, and the service allows a device one a second
    # (ServiceLimits.lookup_rate); faster releases would time that agent's requests out.
    release_every: float = 1.25
    sample_every: float = 0.05  # s between RSS samples

    def __post_init__(self) -> None:
        if (self.agents < 1 or self.attack_seconds <= 0 or self.bait_segments < 1
                or self.releases < 1):
            raise ValueError(f"need agents, releases, bait_segments >= 1 and "
                             f"attack_seconds > 0: {self}")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Memory:
    """RSS of one process, bytes: before the attacks, the peak during them, at the end, and
    the most it may grow (derived from its limits)."""

    before: int
    peak: int
    after: int
    bound: int

    @property
    def growth(self) -> int:
        return self.peak - self.before

    @property
    def within(self) -> bool:
        return self.growth <= self.bound


@dataclass(frozen=True, kw_only=True)
class SoakReport:
    agents: int
    attack_seconds: float
    unattacked: list[float]  # s per release to every agent, no attack
    attacked: list[float]  # s per release to every agent while the rogue attacks
    installed: int  # agents running the attacked release at the end
    broker: Memory
    coordinator: Memory
    broker_alive: bool
    coordinator_alive: bool
    attacks: dict[str, int]  # what the rogue did (attacks.Rogue.counts)
    rogue_errors: list[str]
    service: dict[str, Any]  # the coordinator's counters at the end
    #: CPU seconds used during the attack by the broker, the coordinator, this process (the
    #: agents) and the rogue: all on the same cores
    cpu: dict[str, float]
    others_kicked: int  # broker log: sessions of other clients closed by a takeover
    broker_dropped_for_rogue: bool  # broker log: its queue for the rogue overflowed

    @property
    def ratio(self) -> float:
        """Median attacked ÷ median unattacked release time."""
        return statistics.median(self.attacked) / statistics.median(self.unattacked)

    @property
    def worst_ratio(self) -> float:
        """The slowest attacked release ÷ the median unattacked one."""
        return max(self.attacked) / statistics.median(self.unattacked)

    def rogue_drops(self) -> int:
        """The rogue's upstream messages the coordinator dropped (window, budget, size)."""
        return _device_drops(self.service, ROGUE)


def _device_drops(stats: dict[str, Any], device: str) -> int:
    mine = sum(n for k, n in stats["drops"].items() if k.split("|", 1)[0] == device)
    return int(mine + stats["queue_dropped"].get(device, 0))


# -- the coordinator as a process -------------------------------------------------------------


def _stats(svc: CoordinatorService) -> dict[str, Any]:
    """The service's queue counters (JSON)."""
    return {
        "received": dict(svc.received),
        "drops": {f"{d}|{reason}": n for (d, reason), n in list(svc.drops.items())},
        "queue_dropped": dict(svc.queues.dropped),
        "queue_peak": dict(svc.queues.peak),  # segments, per device
        "window": svc.queues.window,
        "segment_size": svc.coordinator.config.segment_size,
        "ingest_bytes": svc.ingest_bytes,
        "peak_ingest_bytes": svc.peak_ingest_bytes,
        "largest_received": svc.largest_received,
        "sent_chunks": svc.chunks.sent_chunks,
        "sent_bytes": svc.chunks.sent_bytes,
        "held_back": svc.chunks.held_back,
        "refused": svc.chunks.refused,
        "lookups": svc.chunks.lookups,
        "open_files": svc.chunks.open_files,
        "unsent_bytes": svc.link.unsent_bytes,
        "statuses": svc.statuses,
        "limits": dataclasses.asdict(svc.limits),
    }


def _serve(home: Path, out: IO[str]) -> None:
    """The child: a ``CoordinatorService`` that answers ``stats`` lines until ``stop``/EOF."""
    c = Coordinator.open(home)
    svc = CoordinatorService(c, mqtt_config_for(c, client_id=COORDINATOR_ID))
    svc.start()
    if not svc.link.wait_connected(CHILD_TIMEOUT):
        raise SystemExit(f"coordinator: cannot connect: {svc.link.last_error}")
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        if line.strip() != "stats":
            break
        print(json.dumps(_stats(svc)), file=out, flush=True)
    svc.stop()
    print(json.dumps(_stats(svc)), file=out, flush=True)


class _Child:
    """``python -m edgefleet.simulations.soak ROLE``: JSON lines on stdout, stderr to a log."""

    def __init__(self, role: str, args: Sequence[str], log_path: Path) -> None:
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.simulations.soak", role, *args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        self.log_path, self.name = log_path, f"soak {role} process"
        self._lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True, name=f"soak-{role}").start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._lines.append("")  # EOF
            self._cond.notify_all()

    def next(self, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._lines), timeout):
                raise TimeoutError(f"{self.name}: no answer in {timeout} s")
            line = self._lines.pop(0)
        if not line:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}): {tail}")
        return dict(json.loads(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 20.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _CoordinatorProcess(_Child):
    def __init__(self, home: Path, log_path: Path) -> None:
        super().__init__("coordinator", [str(home)], log_path)
        assert self.next().get("ready")

    def stats(self) -> dict[str, Any]:
        self.send("stats")
        return self.next()


# -- the rogue as a process ---------------------------------------------------------------------


def _attack(out: IO[str]) -> None:
    """The child: the spec (target, seconds, rate scale) on the first line of stdin, kept off
    the command line (it holds the rogue's password); every attack for ``seconds``; a line
    when started, the counts last."""
    spec = json.loads(sys.stdin.readline())
    chosen = [a for a in default_attacks(spec["rate_scale"])
              if spec["attacks"] is None or a.name in spec["attacks"]]  # fmt: skip
    rogue = Rogue(RogueTarget.from_dict(spec["target"]), chosen)
    runner = threading.Thread(target=rogue.run, args=(spec["seconds"],), daemon=True)
    runner.start()
    rogue.started.wait(CHILD_TIMEOUT)
    print(json.dumps({"started": rogue.started.is_set()}), file=out, flush=True)
    runner.join()
    t = os.times()
    print(json.dumps({"counts": dict(rogue.counts), "errors": rogue.errors,
                      "cpu": t.user + t.system}), file=out, flush=True)  # fmt: skip


# -- memory ----------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int | None:
    """VmRSS of a process in bytes; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Sampler:
    """Polls the RSS of some processes on a thread; ``peaks`` per name."""

    def __init__(self, pids: dict[str, int], every: float) -> None:
        self.pids, self.every = pids, every
        self.peaks: dict[str, int] = {n: rss(p) or 0 for n, p in pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="soak-rss")

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], rss(pid) or 0)


def broker_bound(limits: BrokerLimits, bait_segment: int) -> int:
    """Bytes mosquitto may grow by for one rogue: its queue of QoS 0 chunk replies (counted
    by number: in flight plus queued, each a frame of the rogue's segments), what it may
    retain (one message per upstream topic it may write, each under the packet limit), one
    incoming packet at the limit, and ``SLACK``."""
    frame = bait_segment + CHUNK_FRAME_OVERHEAD + HEADER_ALLOWANCE
    queued = (limits.max_queued_messages + limits.max_inflight_messages) * frame
    retained = len(topics.UP_KINDS) * limits.max_packet_size
    return queued + retained + limits.max_packet_size + SLACK


def coordinator_bound(limits: ServiceLimits, window_bytes: int) -> int:
    """Bytes the coordinator may grow by: its ingest queues, chunk replies queued in the link,
    every device's window of segments (``window_bytes``), one message at its announced
    maximum, and ``SLACK``."""
    ingest = limits.telemetry_bytes + limits.status_bytes
    return ingest + UNSENT_LIMIT + window_bytes + MAX_INCOMING + SLACK


# -- the soak ----------------------------------------------------------------------------------


def _bait(c: Coordinator, work: Path, model: Path, cfg: SoakConfig) -> tuple[str, int]:
    """A release only the rogue is a target of, with ``bait_segments`` large segments:
    (bundle id, segments). Opaque random bytes: nobody installs it."""
    path = work / "bait.onnx"
    path.write_bytes(secrets.token_bytes(cfg.bait_segments * cfg.bait_segment - 64))
    c.register_model("bait", path, version="1", meta_path=model.with_suffix(".json"),
                     check=False)  # fmt: skip
    fleet_segment = c.config.segment_size
    c.update_config(segment_size=cfg.bait_segment)
    try:
        r, built = c.build("bait", "1", f"device:{ROGUE}")
    finally:
        c.update_config(segment_size=fleet_segment)
    return r.bundle_id, built.manifest.segments


def _timed_release(
    fleet: Fleet, link: Link, agents: list[RunningAgent], version: str, timeout: float
) -> float:
    """Seconds from publishing a release (built beforehand) until every agent runs it."""
    selector = ",".join(a.device_id for a in agents)
    r = fleet.build(version, selector)
    for a in agents:
        a.daemon.installed.clear()
    t0 = time.perf_counter()
    releases.publish_sequence(fleet.coordinator.registry, link, r.sequence)
    for a in agents:
        if not a.daemon.installed.wait(max(0.0, timeout - (time.perf_counter() - t0))):
            raise TimeoutError(f"{a.device_id} did not install release {r.sequence} in {timeout} s")
    took = time.perf_counter() - t0
    wrong = {a.device_id: a.active_sequence() for a in agents if a.active_sequence() != r.sequence}
    if wrong:
        raise AssertionError(f"release {r.sequence} installed, but active: {wrong}")
    return took


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _log_counts(log_file: Path, rogue_client: str) -> tuple[int, bool]:
    """From mosquitto's log: sessions of clients other than the rogue taken over, and
    whether it dropped outgoing messages for the rogue."""
    text = log_file.read_text(errors="replace")
    kicked = sum(1 for line in text.splitlines()
                 if "already connected, closing old connection" in line
                 and f"Client {rogue_client} " not in line)  # fmt: skip
    return kicked, f"Outgoing messages are being dropped for client {rogue_client}" in text


@contextmanager
def _publisher(c: Coordinator) -> Iterator[Link]:
    """A publishing link as ``edgefleet model release`` makes one."""
    with releases.connect(mqtt_config_for(c, client_id=PUBLISHER_ID)) as link:
        yield link


def run_soak(work: Path, model: Path, config: SoakConfig | None = None) -> SoakReport:
    """The soak in ``work`` with ``model`` (an ONNX file with its ``.json`` sidecar)."""
    cfg = config or SoakConfig()
    devices = [f"dev-{i:02d}" for i in range(cfg.agents)]
    models = [ModelFile(name="digits", path=model, version=v) for v in VERSIONS]
    with open_fleet(work, [*devices, ROGUE], models=models, segment_size=cfg.fleet_segment,
                    broker=hardened(limits=cfg.limits)) as fleet:  # fmt: skip
        c = fleet.coordinator
        bundle_id, segments = _bait(c, work, model, cfg)
        coord = _CoordinatorProcess(c.home, work / "coordinator.log")
        try:
            report = _soak(fleet, coord, devices, bundle_id, segments, cfg)
        finally:
            coord.close()
        log_file = fleet.broker.log_file
    assert log_file is not None  # mosquitto has flushed its log now that it stopped
    kicked, dropped = _log_counts(log_file, topics.device_client_id(ROGUE))
    return dataclasses.replace(report, others_kicked=kicked, broker_dropped_for_rogue=dropped)


def _soak(fleet: Fleet, coord: _CoordinatorProcess, devices: list[str], bundle_id: str,
          segments: int, cfg: SoakConfig) -> SoakReport:  # fmt: skip
    c, broker = fleet.coordinator, fleet.broker
    assert broker.pid is not None and broker.log_file is not None
    agents = [fleet.start_agent(d) for d in devices]
    port = int(broker.url.rsplit(":", 1)[1])
    target = RogueTarget(
        host="127.0.0.1", port=port, device_id=ROGUE, password=fleet.users[ROGUE],
        bundle_id=bundle_id, segments=segments,
        victims=(*(topics.device_client_id(d) for d in devices[:2]), COORDINATOR_ID,
                 PUBLISHER_ID),
        max_packet=cfg.limits.max_packet_size, coordinator_max=MAX_INCOMING,
    )  # fmt: skip
    pids = {"broker": broker.pid, "coordinator": coord.proc.pid}
    versions = itertools.cycle(VERSIONS)
    last = [-cfg.release_every]
    with _publisher(c) as link:
        def release() -> float:
            time.sleep(max(0.0, last[0] + cfg.release_every - time.monotonic()))  # pacing
            last[0] = time.monotonic()
            return _timed_release(fleet, link, agents, next(versions), cfg.install_timeout)

        release()  # warm-up: first loads of the runtime, caches, connections
        unattacked = [release() for _ in range(cfg.releases)]
        before = {n: rss(p) or 0 for n, p in pids.items()}
        cpu0 = {n: cpu_seconds(p) for n, p in pids.items()} | {"agents": _own_cpu()}
        with _Sampler(pids, cfg.sample_every) as sampler:
            spec = {"target": target.to_dict(), "seconds": cfg.attack_seconds,
                    "rate_scale": cfg.rate_scale, "attacks": cfg.attacks}  # fmt: skip
            rogue = _Child("rogue", [], fleet.work / "rogue.log")
            try:
                rogue.send(json.dumps(spec))
                assert rogue.next().get("started"), "the rogue never connected"
                ends = time.monotonic() + cfg.attack_seconds
                wait_until(lambda: _device_drops(coord.stats(), ROGUE) > 0,
                           "the coordinator to drop the rogue's work", interval=0.1)
                attacked = [release()]
                # More releases while the next one still fits inside the attack.
                while time.monotonic() + cfg.release_every + 2 * max(attacked) < ends:
                    attacked.append(release())
                done = rogue.next(cfg.attack_seconds + CHILD_TIMEOUT)
            finally:
                rogue.close()
            stats = coord.stats()
        cpu = {n: cpu_seconds(p) - cpu0[n] for n, p in pids.items()}
        cpu |= {"agents": _own_cpu() - cpu0["agents"], "rogue": float(done["cpu"])}
        after = {n: rss(p) or 0 for n, p in pids.items()}
        peaks = sampler.peaks
    window_bytes = stats["window"] * (cfg.bait_segment + cfg.fleet_segment * cfg.agents)
    svc_limits = ServiceLimits(**stats["limits"])
    seq = max(a.active_sequence() or 0 for a in agents)
    return SoakReport(
        agents=cfg.agents,
        attack_seconds=cfg.attack_seconds,
        unattacked=unattacked,
        attacked=attacked,
        installed=sum(1 for a in agents if a.active_sequence() == seq),
        broker=Memory(before=before["broker"], peak=peaks["broker"], after=after["broker"],
                      bound=broker_bound(cfg.limits, cfg.bait_segment)),
        coordinator=Memory(before=before["coordinator"], peak=peaks["coordinator"],
                           after=after["coordinator"],
                           bound=coordinator_bound(svc_limits, window_bytes)),
        broker_alive=broker.pid is not None and rss(broker.pid) is not None,
        coordinator_alive=coord.alive,
        attacks={k: int(v) for k, v in done["counts"].items()},
        rogue_errors=list(done["errors"]),
        service=stats,
        cpu=cpu,
        others_kicked=-1,  # from the broker's log, once it is flushed
        broker_dropped_for_rogue=False,
    )  # fmt: skip


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    out = sys.stdout
    if argv[:1] == ["coordinator"] and len(argv) == 2:
        _serve(Path(argv[1]), out)
    elif argv == ["rogue"]:
        _attack(out)
    else:
        print("usage: python -m edgefleet.simulations.soak coordinator HOME | rogue",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
