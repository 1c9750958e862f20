"""The coordinator's Prometheus endpoint: fleet gauges and ingest counters (prometheus-client).

``FleetCollector(service)`` reads, at scrape time, the registry (devices online and offline,
devices per running model version, lifetime inference counts per version from
``inference_totals``) and the running service's counters (messages received per kind,
statuses and telemetry stored, drops per reason, ingest queue depth in messages and bytes).
``serve_metrics(service, "127.0.0.1:9108")`` serves it with prometheus-client's own HTTP server
on a loopback address only (no token: bind it where only the scraper can reach it). A failed
registry read is logged and the fleet gauges are left out of that scrape; the service's
counters are still served.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from . import telemetry

if TYPE_CHECKING:
    from .service import CoordinatorService

__all__ = ["FleetCollector", "parse_address", "serve_metrics"]

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback IPv4 host (``localhost`` too); ``ValueError`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics wants HOST:PORT, e.g. 127.0.0.1:9108, got {text!r}")
    host = "127.0.0.1" if host in ("", "localhost") else host
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--metrics binds a loopback IPv4 address only, got {host!r}")
    return host, int(port)


class FleetCollector:
    def __init__(
        self,
        service: CoordinatorService,
        *,
        clock: Callable[[], float] = time.time,
        stale_after: int = telemetry.STALE_AFTER,
    ) -> None:
        self.service, self._clock, self.stale_after = service, clock, stale_after

    def collect(self) -> Iterator[Metric]:
        yield from self._service_families()
        try:
            yield from self._fleet_families()
        except Exception:
            log.exception("metrics: reading the registry failed; fleet gauges left out")

    def _service_families(self) -> Iterator[Metric]:
        svc = self.service
        received = CounterMetricFamily(
            "edgefleet_received_messages", "upstream messages received", labels=["kind"]
        )
        for kind, n in sorted(svc.received.items()):
            received.add_metric([kind], n)
        ing = svc.ingest
        stored = CounterMetricFamily(
            "edgefleet_ingested", "upstream messages ingested", labels=["what"]
        )
        for what, n in (("status", ing.statuses), ("telemetry", ing.telemetry_stored),
                        ("dropped", ing.dropped), ("unknown_device", ing.unknown),
                        ("pruned_rows", ing.telemetry_pruned)):  # fmt: skip
            stored.add_metric([what], n)
        drops = CounterMetricFamily(
            "edgefleet_dropped_messages", "messages dropped at a bound", labels=["reason"]
        )
        by_reason: dict[str, int] = {}
        for (_, reason), n in list(svc.drops.items()):
            by_reason[reason] = by_reason.get(reason, 0) + n
        for reason, n in sorted(by_reason.items()):
            drops.add_metric([reason], n)
        depth = GaugeMetricFamily(
            "edgefleet_ingest_queue", "waiting for ingest", labels=["unit"]
        )
        statuses, telemetry_n = svc.ingest_queue
        depth.add_metric(["statuses"], statuses)
        depth.add_metric(["telemetry"], telemetry_n)
        depth.add_metric(["bytes"], svc.ingest_bytes)
        yield from (received, stored, drops, depth)

    def _fleet_families(self) -> Iterator[Metric]:
        registry = self.service.registry
        online = telemetry.presence(registry, int(self._clock()), self.stale_after)
        devices = GaugeMetricFamily("edgefleet_devices", "enrolled devices", labels=["state"])
        devices.add_metric(["online"], sum(online.values()))
        devices.add_metric(["offline"], len(online) - sum(online.values()))
        running = GaugeMetricFamily(
            "edgefleet_devices_running", "devices per running model version", labels=["model"]
        )
        for key, n in sorted(telemetry.version_counts(registry).items()):
            running.add_metric([key], n)
        calls = CounterMetricFamily(
            "edgefleet_fleet_inference_calls", "predict calls reported", labels=["model"]
        )
        errors = CounterMetricFamily(
            "edgefleet_fleet_inference_errors", "failed predict calls reported", labels=["model"]
        )
        for key, t in sorted(telemetry.version_totals(registry).items()):
            calls.add_metric([key], t["count"])
            errors.add_metric([key], t["errors"])
        yield from (devices, running, calls, errors)


def serve_metrics(service: CoordinatorService, address: str, **kwargs: Any) -> Any:
    """Serve ``/metrics`` on ``address`` (``HOST:PORT``, loopback); returns the WSGI server
    (``shutdown()`` it to stop). ``kwargs`` go to ``FleetCollector``."""
    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(service, **kwargs))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
