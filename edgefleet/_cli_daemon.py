"""Long-running commands: ``agent run``, ``coordinator serve``, ``model release``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
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
    fl = None
    if config.fl_enabled:  # federated learning: the client trains on its own thread
        from edgefleet.federated.agent import DeviceFl

        fl = DeviceFl(agent)
    daemon = AgentDaemon(
        agent, mqtt_config_for(agent), heartbeat=args.heartbeat, progress=ProgressLine(),
        extra_handlers=fl.handlers if fl else None,
    )  # fmt: skip
    if fl is not None:
        fl.bind(daemon)
        log.info("federated learning enabled: local data in %s", fl.data_dir)
    server = None
    if not args.no_http:
        from edgefleet.agent.http import InferenceServer

        server = InferenceServer(
            agent, home=config.home, port=config.http_port, recorder=daemon.recorder
        )  # predict, /metrics and the daemon's inference telemetry share one recorder
        server.start()
        log.info("local inference API on %s", server.url)
    stop = _stop_on_signals()
    daemon.start()
    try:
        stop.wait()
    finally:
        if fl is not None:
            fl.stop()
        daemon.stop()
        if server is not None:
            server.stop()
        agent.close()
    return 0


REGISTRY_PROBE = 2.0  # s a command waits for a locked registry before saying so
REGISTRY_RETRY = 2.0  # s between `serve`'s attempts to open a locked registry


def _registry_unlocked(args: argparse.Namespace) -> None:
    """``StoreError`` (one line) if another process holds the SQLite registry locked."""
    from edgefleet.coordinator.config import CoordinatorConfig
    from edgefleet.coordinator.registry import check_unlocked

    url = CoordinatorConfig.load(args.home, broker=args.broker).database_url
    check_unlocked(url, busy_timeout=REGISTRY_PROBE)


def _open_waiting(args: argparse.Namespace, stop: threading.Event) -> Any:
    """The coordinator, once its registry is not locked by another process (``serve`` waits
    for it, saying so, instead of dying); None if stopped meanwhile."""
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.protocol.errors import StoreError

    while True:
        try:
            _registry_unlocked(args)
            return Coordinator.open(args.home, broker=args.broker)
        except StoreError as exc:
            if "locked" not in str(exc):
                raise
            log.warning("%s: waiting (retry in %g s)", exc, REGISTRY_RETRY)
        if stop.wait(REGISTRY_RETRY):
            return None


def coordinator_serve(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.service import CoordinatorService, mqtt_config_for

    stop = _stop_on_signals()
    c = _open_waiting(args, stop)
    if c is None:
        return 0
    _need_broker(c.config.broker, "coordinator.toml")
    client_id = args.client_id or f"coordinator-{socket.gethostname()}-{os.getpid()}"
    svc = CoordinatorService(c, mqtt_config_for(c, client_id=client_id))
    metrics = _serve_metrics(svc, args.metrics)
    api = None
    if getattr(args, "api", None):
        from ._cli_console import Tls, parse_listen, start_api

        parse_listen(args.api)  # a bad address is one line, before anything starts
        api = start_api(c, args.api, Tls.from_args(args))
    svc.start()
    log.info("coordinator serving on %s as %s", c.config.broker, client_id)
    try:
        stop.wait()
    finally:
        svc.stop()
        if metrics is not None:
            metrics.shutdown()
        if api is not None:
            from ._cli_console import stop_api

            stop_api(api)
    return 0


def _serve_metrics(svc: Any, address: str | None) -> Any:
    """``--metrics HOST:PORT``: Prometheus ``/metrics`` (before the service starts, so a bad
    address or a port in use is one line and nothing is left running)."""
    if not address:
        return None
    from edgefleet.coordinator.metrics import serve_metrics

    return serve_metrics(svc, address)


def model_release(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import fleet, operations, release
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.service import mqtt_config_for

    from ._cli_coordinator import storage_key_from_env

    _registry_unlocked(args)  # a locked registry: one line now, not a traceback later
    c = Coordinator.open(args.home, broker=args.broker, storage_key=storage_key_from_env(args.home))
    _need_broker(c.config.broker, "coordinator.toml")
    with release.connect(mqtt_config_for(c, client_id=f"release-{os.getpid()}")) as link:
        done = operations.publish_release(c, operations.cli_principal(), "cli", link,
                                          args.name, args.version, args.to)  # fmt: skip
    print(
        f"release {done.sequence}: {args.name} {args.version} to {len(done.targets)} devices "
        f"({done.report.bytes} bytes of offers)"
    )
    if args.wait <= 0:
        return 0
    waited = fleet.wait_for(c.registry, done.sequence, done.targets, args.wait)
    if waited.ok:
        print(f"all {len(done.targets)} devices run release {done.sequence}")
        return 0
    print(
        f"timed out: {len(waited.arrived)} of {len(done.targets)} devices run release "
        f"{done.sequence}",
        file=sys.stderr,
    )
    return 3
