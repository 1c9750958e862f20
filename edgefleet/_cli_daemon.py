"""Long-running commands: ``agent run``, ``coordinator serve``, ``model release``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from edgefleet.progress import ProgressLine

log = logging.getLogger("edgefleet")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _need_broker(url: str, config_file: str) -> None:
    if not url:
        raise ValueError(
            f"no broker: pass --broker mqtt://host:port or set broker in {config_file}"
        )


def agent_run(args: argparse.Namespace) -> int:
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.daemon import AgentDaemon, mqtt_config_for

    config = AgentConfig.load(
        args.home, broker=args.broker, password_file=args.password_file, http_port=args.http_port
    )
    _need_broker(config.broker, "agent.toml")
    agent = Agent(config)
    server = None
    if not args.no_http:
        from edgefleet.agent.http import InferenceServer

        server = InferenceServer(agent, home=config.home, port=config.http_port)
        server.start()
        log.warning("local inference API on %s", server.url)
    daemon = AgentDaemon(
        agent, mqtt_config_for(agent), heartbeat=args.heartbeat, progress=ProgressLine()
    )
    stop = _stop_on_signals()
    daemon.start()
    try:
        stop.wait()
    finally:
        daemon.stop()
        if server is not None:
            server.stop()
        agent.close()
    return 0


def coordinator_serve(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.service import CoordinatorService, mqtt_config_for

    c = Coordinator.open(args.home, broker=args.broker)
    _need_broker(c.config.broker, "coordinator.toml")
    client_id = args.client_id or f"coordinator-{socket.gethostname()}-{os.getpid()}"
    svc = CoordinatorService(c, mqtt_config_for(c, client_id=client_id))
    stop = _stop_on_signals()
    svc.start()
    log.warning("coordinator serving on %s as %s", c.config.broker, client_id)
    try:
        stop.wait()
    finally:
        svc.stop()
    return 0


def model_release(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.service import mqtt_config_for, publish_release
    from edgefleet.infra.link.mqtt import MqttLink

    c = Coordinator.open(args.home, broker=args.broker)
    _need_broker(c.config.broker, "coordinator.toml")
    release, built = c.build(args.name, args.version, args.to)
    link = MqttLink(mqtt_config_for(c, client_id=f"release-{os.getpid()}"), lambda *a: None)
    link.start()
    try:
        if not link.wait_connected(15):
            raise ConnectionError(
                f"cannot reach the broker at {c.config.broker}: {link.last_error}"
            )
        sent = publish_release(link, release)
    finally:
        link.stop()
    targets = sorted(e.device_id for e in built.envelopes)
    print(
        f"release {release.sequence}: {args.name} {args.version} to {len(targets)} devices "
        f"({sent} bytes of offers)"
    )
    if args.wait > 0:
        return _wait_for(c, release.sequence, targets, args.wait)
    return 0


def _wait_for(c: Any, sequence: int, targets: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        devices = {d.device_id: d for d in c.registry.devices()}
        done = [t for t in targets if (devices[t].active_sequence or 0) >= sequence]
        if len(done) == len(targets):
            print(f"all {len(targets)} devices run release {sequence}")
            return 0
        time.sleep(0.5)
    print(
        f"timed out: {len(done)} of {len(targets)} devices run release {sequence}", file=sys.stderr
    )
    return 3
