"""``edgefleet token …``, ``edgefleet audit`` and ``edgefleet console serve``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli_coordinator import _open

if TYPE_CHECKING:
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.infra.link.port import Link

log = logging.getLogger(__name__)


def token_create(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import access
    from edgefleet.coordinator.operations import cli_principal

    c = _open(args.home)
    token = access.create_token(c.registry, name=args.name, role=args.role,
                                by=cli_principal().name)  # fmt: skip
    token_id = token[4:20]
    access.audit(c.registry, cli_principal(), action="token.create",
                 target=f"token:{token_id}", source="cli",
                 result="ok", detail={"name": args.name, "role": args.role})  # fmt: skip
    print(f"token {token_id} for {args.name} ({args.role}); shown once, keep it secret:",
          file=sys.stderr)  # fmt: skip
    print(token)
    return 0


def token_list(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import access

    for t in access.list_tokens(_open(args.home).registry):
        state = "active" if t.revoked is None else f"revoked {_when(t.revoked)}"
        print(f"{t.token_id}\t{t.name}\t{t.role}\tcreated {_when(t.created)}\t{state}")
    return 0


def token_revoke(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import access
    from edgefleet.coordinator.operations import cli_principal

    c = _open(args.home)
    token_id = args.token_id.removeprefix("eft_").split(".")[0]
    access.revoke_token(c.registry, token_id)
    access.audit(c.registry, cli_principal(), action="token.revoke", target=f"token:{token_id}",
                 source="cli", result="ok")  # fmt: skip
    print(f"revoked token {token_id}")
    return 0


def audit(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import access

    since = int(time.time()) - args.since if args.since else 0
    rows = access.audit_log(_open(args.home).registry, since=since, limit=args.limit,
                            action=args.action)  # fmt: skip
    for e in reversed(rows):
        if args.json:
            print(json.dumps({"id": e.id, "time": e.time, "actor": e.actor, "role": e.role,
                              "action": e.action, "target": e.target, "source": e.source,
                              "result": e.result, "detail": e.detail}, sort_keys=True))  # fmt: skip
        else:
            print(f"{_when(e.time)}  {e.actor} ({e.role}) from {e.source}: {e.action} "
                  f"{e.target} -> {e.result}")  # fmt: skip
    return 0


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` for the API; loopback unless the operator names another address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--api/--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def publisher_for(c: Coordinator) -> AbstractContextManager[Link]:
    from edgefleet.coordinator import release
    from edgefleet.coordinator.service import mqtt_config_for

    return release.connect(mqtt_config_for(c, client_id=f"api-{os.getpid()}-{time.time_ns()}"))


@dataclass
class ApiHandle:
    server: Any
    threads: list[threading.Thread]
    stop: threading.Event


@dataclass(frozen=True)
class Tls:
    """HTTPS for the API: the server's certificate and key, and (mTLS) the CA whose client
    certificates are required. Tokens still decide what a caller may do."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Tls | None:
        cert, key, ca = (getattr(args, k, None) for k in ("tls_cert", "tls_key", "client_ca"))
        if not cert and not key and not ca:
            return None
        if not cert or not key:
            raise ValueError("--tls-cert and --tls-key go together (and --client-ca needs both)")
        for f in (cert, key, ca):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{f}: no such file")
        return cls(Path(cert), Path(key), Path(ca) if ca else None)

    def uvicorn(self) -> dict[str, Any]:
        import ssl

        out: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            out |= {"ssl_ca_certs": str(self.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return out


def start_api(c: Coordinator, listen: str, tls: Tls | None = None) -> ApiHandle:
    """Run the API on a uvicorn thread, and (with a broker) tick the rollouts it starts;
    ``stop_api`` stops both."""
    import uvicorn

    from edgefleet.console.api import create_app

    host, port = parse_listen(listen)
    publisher = (lambda: publisher_for(c)) if c.config.broker else None
    app = create_app(c, publisher=publisher)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False,
                                           **(tls.uvicorn() if tls else {})))  # fmt: skip
    handle = ApiHandle(server, [threading.Thread(target=server.run, name="api", daemon=True)],
                       threading.Event())  # fmt: skip
    if publisher is not None:
        handle.threads.append(threading.Thread(target=_tick_rollouts, args=(c, handle.stop),
                                               name="rollouts", daemon=True))  # fmt: skip
    for t in handle.threads:
        t.start()
    log.info("API and dashboard on %s://%s:%d/%s", "https" if tls else "http", host, port,
             " (client certificates required)" if tls and tls.client_ca else "")
    return handle


def _tick_rollouts(c: Coordinator, stop: threading.Event) -> None:
    """Carry out every live rollout (those started through the API, the CLI or a dashboard);
    several processes may tick at once: each state change is a compare-and-set."""
    from edgefleet.coordinator.rollouts import Rollouts

    while not stop.is_set():
        try:
            with publisher_for(c) as link:
                Rollouts(c, link).run_all(stop=stop)
        except Exception as exc:  # the broker went away: try again, the API stays up
            log.warning("rollouts: %s (retrying in 5 s)", exc)
            stop.wait(5)


def stop_api(handle: ApiHandle) -> None:
    handle.stop.set()
    handle.server.should_exit = True
    for t in handle.threads:
        t.join(10)


def console_serve(args: argparse.Namespace) -> int:
    from ._cli_daemon import _stop_on_signals

    c = _open(args.home)
    parse_listen(args.listen)
    tls = Tls.from_args(args)
    stop = _stop_on_signals()
    handle = start_api(c, args.listen, tls)
    scheme = "https" if tls else "http"
    print(f"dashboard: {scheme}://{args.listen}/  (log in with a token from `edgefleet token "
          "create`)")
    try:
        stop.wait()
    finally:
        stop_api(handle)
    return 0
