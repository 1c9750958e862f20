"""The operator's HTTP API (FastAPI) and the dashboard it serves, over one coordinator home.

``create_app(coordinator, publisher=...)`` builds the app; ``edgefleet console serve`` or
``edgefleet coordinator serve --api HOST:PORT`` run it on uvicorn. The OpenAPI schema is at
``/api/openapi.json`` (Swagger UI at ``/api/docs``). Every ``/api/v1`` route needs
``Authorization: Bearer eft_…`` (a token made by ``edgefleet token create``); the role decides
what it may do (``coordinator/access.py``). Views are read straight from the registry; every
state change goes through ``coordinator/operations.py`` — the same functions the CLI calls —
which checks the role and writes the audit row.

Errors are JSON ``{"error": "<one line>"}``: 401 (no or bad token), 403 (role), 404, 409
(a state change the registry refuses), 422 (a malformed body: the first problem, named by its
field, e.g. ``body.version: Field required``).

Long operations return 202 with an operation handle at once; ``GET /api/v1/operations/{id}``
is its state and ``GET /api/v1/operations/{id}/events`` streams its progress as server-sent
events (one ``data:`` line of JSON per event, ``event: end`` last).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from edgefleet.coordinator import access, fleet, operations
from edgefleet.coordinator.access import Principal
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.operations import Forbidden
from edgefleet.infra.link.port import Link
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import EdgeFleetError
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from . import views
from .cache import ViewCache

__all__ = ["Operation", "create_app"]

STATIC = Path(__file__).resolve().parent / "static"
MAX_OPERATIONS = 256  # operations kept for their handles (finished ones forgotten first; all
# running = 429, so a caller cannot make the API start threads without bound)
MAX_EVENTS = 1024  # events kept per operation
MAX_BODY = 1 << 20  # bytes of a request body (an enrolment's public key file is ~2 KB)
MAX_MODEL_BODY = 96 << 20  # bytes of a model upload (base64 of a model up to ~70 MB)
# the operations that answer 503 on an API without a broker connection
NEEDS_BROKER = frozenset({"release", "candidate.drop", "rollout.rollback", "fl.start"})

Publisher = Callable[[], AbstractContextManager[Link]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Operation:
    """A long operation's handle: its events (bounded) and its end state."""

    id: str
    kind: str
    target: str
    state: str = "running"  # running | done | failed
    events: list[dict[str, Any]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def emit(self, **event: Any) -> None:
        with self.changed:
            if len(self.events) < MAX_EVENTS:
                self.events.append({"time": time.time(), **event})
            self.changed.notify_all()

    def finish(self, state: str, **event: Any) -> None:
        with self.changed:
            self.state = state
        self.emit(end=True, state=state, **event)

    def summary(self) -> dict[str, Any]:
        with self.changed:
            return {
                "id": self.id, "kind": self.kind, "target": self.target, "state": self.state,
                "events": list(self.events),
            }  # fmt: skip


class Operations:
    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        self._lock = threading.Lock()

    def new(self, kind: str, target: str) -> Operation:
        op = Operation(id=uuid.uuid4().hex[:16], kind=kind, target=target)
        with self._lock:
            if len(self._ops) >= MAX_OPERATIONS:
                done = [k for k, o in self._ops.items() if o.state != "running"]
                for k in done[: len(self._ops) - MAX_OPERATIONS + 1]:
                    del self._ops[k]
            if len(self._ops) >= MAX_OPERATIONS:  # every one still running: no new thread
                raise ApiError(429, f"{MAX_OPERATIONS} operations are running; try later")
            self._ops[op.id] = op
        return op

    def get(self, op_id: str) -> Operation:
        with self._lock:
            op = self._ops.get(op_id)
        if op is None:
            raise ApiError(404, f"no operation {op_id!r}")
        return op


# -- bodies ---------------------------------------------------------------------------------------
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class GroupBody(BaseModel):
    devices: list[Annotated[str, Field(pattern=_ID)]] = Field(min_length=1, max_length=10_000)


class ReleaseBody(BaseModel):
    name: str = Field(pattern=_ID)
    version: str = Field(pattern=_ID)
    to: str = Field(min_length=1, max_length=200, description="all | group:G | device:ID,…")
    wait: float = Field(default=60.0, ge=0, le=3600, description="seconds to follow progress")
    candidate: Literal["shadow", "ab"] | None = Field(
        default=None, description="a shadow / A/B candidate beside the active model")
    share: float | None = Field(default=None, ge=0, le=1,
                                description="candidate ab: share of requests (default 0.1)")


class DropCandidateBody(BaseModel):
    to: str = Field(min_length=1, max_length=200, description="all | group:G | device:ID,…")


class RolloutBody(BaseModel):
    name: str = Field(pattern=_ID)
    version: str = Field(pattern=_ID)
    canary: str = Field(min_length=1, max_length=200, description="N% | device:ID,… | group:G")
    waves: list[str] = Field(min_length=1, max_length=16, description="e.g. [\"50%\", \"100%\"]")
    gates: list[str] = Field(default=[], max_length=16, description="e.g. error_rate<0.01")
    bake: float = Field(default=600, ge=0, le=7 * 86400, description="seconds per stage")
    min_samples: int = Field(default=50, ge=1, le=1_000_000)
    min_labels: int = Field(default=20, ge=1, le=1_000_000,
                            description="labels per device before an accuracy gate counts")
    wave_timeout: float = Field(default=600, gt=0, le=7 * 86400,
                                description="seconds to install, and after the bake to be "
                                "healthy, before a halt")  # fmt: skip


class ModelBody(BaseModel):
    name: str = Field(pattern=_ID)
    version: str | None = Field(default=None, pattern=_ID, description="default: the next")
    format: str = Field(pattern="^(onnx|tflite)$")
    model: str = Field(min_length=1, description="the model file, base64")
    metadata: dict[str, Any] = Field(description="what `model train` writes beside the model")


_PARAM = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]  # a strategy's keyword
_FINITE = Annotated[float, Field(allow_inf_nan=False)]
_LAYER = Annotated[int, Field(ge=1, le=4096)]


class FlBody(BaseModel):
    """``edgefleet fl start``'s options, with its defaults."""

    name: str = Field(pattern=_ID)
    rounds: int = Field(ge=1, le=10_000)
    run_id: str = Field(default="", max_length=100, pattern=r"^[A-Za-z0-9._-]*$")
    strategy: str = Field(default="fedavg", pattern="^(fedavg|fedprox|fedadam|fedavgm|"
                          "fedmedian|fedtrimmedavg|krum)$")  # fmt: skip
    min_clients: int = Field(default=2, ge=1, le=100_000)
    quorum: int = Field(default=0, ge=0)
    fraction: float = Field(default=1.0, gt=0, le=1)
    local_epochs: int = Field(default=5, ge=1, le=1000)
    lr: float = Field(default=0.1, gt=0, le=10)
    optimizer: str = Field(default="sgd", pattern="^(sgd|adam)$")
    round_timeout: float = Field(default=60.0, gt=0, le=86_400)
    seed: int = 0
    params: dict[_PARAM, _FINITE] = Field(default={}, max_length=16,
                                          description='strategy parameters: {"proximal_mu": 0.1}')
    family: str = Field(default="mlp", pattern="^(mlp|linear)$")
    hidden: list[_LAYER] = Field(default=[64], max_length=8, description="mlp layer sizes")
    features: int = Field(default=64, ge=1, le=100_000)
    classes: int = Field(default=10, ge=2, le=10_000)
    max_update_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    presence: float = Field(default=120.0, gt=0, le=86_400, description="seconds since a "
                            "device's last status for it to be sampled")
    dp_noise: float | None = Field(default=None, ge=0)
    dp_clip: float | None = Field(default=None, gt=0)
    release_to: str = Field(default="", max_length=200)
    release_if_better: str = Field(default="", max_length=64)
    wait_devices: float = Field(default=30.0, ge=0, le=3600)


class EnrollBody(BaseModel):
    public_key: str = Field(min_length=1, max_length=8192, description="the device.pub file")
    groups: list[Annotated[str, Field(pattern=_ID)]] = Field(default=[], max_length=64)


class BodyLimit:
    """413 for a request body over ``limit`` bytes: a declared Content-Length is checked up
    front, a chunked body as it arrives, so no more than ``limit`` bytes are ever held
    (ASGI middleware; FastAPI itself would read any size)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_MODEL_BODY if scope.get("path") == "/api/v1/models" else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _too_large(send, limit)
            return
        # Read the body here (at most ``limit`` bytes are ever held), then hand it on.
        parts, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > limit:
                await _too_large(send, limit)
                return
            more = message.get("more_body", False)
        body, replayed = b"".join(parts), False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"error": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def principal(request: Request) -> Principal:
    """The token's principal (401 without a valid one)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing token: send Authorization: Bearer eft_…")
    who = access.authenticate(request.app.state.registry, token.strip())
    if who is None:
        raise ApiError(401, "invalid or revoked token")
    return who


Who = Annotated[Principal, Depends(principal)]


def viewer(who: Who) -> Principal:
    if not who.may("view"):
        raise ApiError(403, f"role {who.role} may not view")
    return who


View = Annotated[Principal, Depends(viewer)]


def create_app(
    coordinator: Coordinator,
    *,
    publisher: Publisher | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API over ``coordinator``; ``publisher()`` opens a link for releases (None: the
    release routes answer 503)."""
    app = FastAPI(
        title="EdgeFleet coordinator API",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    registry = coordinator.registry
    app.state.registry = registry
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    ops = Operations()

    @app.exception_handler(ApiError)
    def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Forbidden)
    def _forbidden(_req: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=403)

    @app.exception_handler(RequestValidationError)
    def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"error": f"{where}: {first.get('msg')}", "problems": len(errors)}, status_code=422
        )

    def source(request: Request) -> str:
        return f"http:{request.client.host}" if request.client else "http"

    # -- views ------------------------------------------------------------------------------------
    @app.get("/api/v1/me")
    def me(who: Who) -> dict[str, Any]:
        """The token's name and role, what the role may do, and which of those this API can
        carry out now (``available``: false for the ones that need its broker connection when it
        runs without one; they answer 503)."""
        may = {a: who.may(a) for a in access.ACTIONS}
        live = {a: publisher is not None or a not in NEEDS_BROKER for a in may}
        return {"name": who.name, "role": who.role, "may": may, "available": live}

    cache = ViewCache()  # the polled views' bodies, served while their generation holds

    @app.get("/api/v1/devices")
    def devices(_: View, request: Request) -> Response:
        return cache.answer(request, "devices", lambda: views.fleet_generation(registry),
                            lambda: views.devices(registry, int(clock())))  # fmt: skip

    @app.get("/api/v1/groups")
    def groups(_: View) -> dict[str, Any]:
        return {"groups": registry.groups()}

    @app.get("/api/v1/models")
    def models(_: View, request: Request) -> Response:
        return cache.answer(request, "models", lambda: views.models_generation(registry),
                            lambda: {"models": views.models(registry)})  # fmt: skip

    @app.get("/api/v1/releases")
    def releases(_: View, request: Request) -> Response:
        return cache.answer(request, "releases", lambda: views.releases_generation(registry),
                            lambda: {"releases": views.releases(registry)})  # fmt: skip

    @app.get("/api/v1/fl/runs")
    def fl_runs(_: View, request: Request) -> Response:
        return cache.answer(request, "fl_runs", lambda: views.models_generation(registry),
                            lambda: {"runs": views.fl_runs(registry)})  # fmt: skip

    @app.get("/api/v1/rollouts")
    def rollouts(_: View, request: Request) -> Response:
        return cache.answer(request, "rollouts", lambda: views.rollouts_generation(registry),
                            lambda: {"rollouts": views.rollouts(registry)})  # fmt: skip

    @app.get("/api/v1/telemetry")
    def telemetry(_: View, window: int = 3600) -> dict[str, Any]:
        now = int(clock())
        return views.telemetry(registry, since=now - max(60, min(window, 30 * 86400)), now=now)

    @app.get("/api/v1/drift")
    def drift(_: View, window: int = 3600) -> dict[str, Any]:
        return views.drift(registry, since=int(clock()) - max(60, min(window, 30 * 86400)))

    @app.get("/api/v1/audit")
    def audit(who: Who, since: int = 0, limit: int = 200) -> dict[str, Any]:
        if not who.may("audit.read"):
            raise Forbidden(f"refused: role {who.role} may not audit.read")
        return {"entries": [views.audit_row(e) for e in
                            access.audit_log(registry, since=since, limit=limit)]}  # fmt: skip

    @app.get("/api/v1/operations/{op_id}")
    def operation(op_id: str, _: View) -> dict[str, Any]:
        return ops.get(op_id).summary()

    @app.get("/api/v1/operations/{op_id}/events")
    def operation_events(op_id: str, _: View) -> StreamingResponse:
        op = ops.get(op_id)
        return StreamingResponse(_stream(op), media_type="text/event-stream")

    # -- state changes ----------------------------------------------------------------------------
    @app.post("/api/v1/groups/{group}")
    def group_add(group: str, body: GroupBody, who: Who, request: Request) -> dict[str, Any]:
        _check_id(group, "group")
        with _conflicts():
            operations.group_add(coordinator, who, source(request), group, body.devices)
        return {"group": group, "added": body.devices}

    @app.post("/api/v1/models", status_code=201)
    def register(body: ModelBody, who: Who, request: Request) -> dict[str, Any]:
        import base64
        import binascii
        import tempfile

        # refused (and audited) before anything is decoded
        operations.require(coordinator, who, "model.register", body.name, source(request))
        try:
            data = base64.b64decode(body.model, validate=True)
        except binascii.Error as exc:
            raise ApiError(422, f"body.model: not base64 ({exc})") from exc
        with tempfile.TemporaryDirectory(dir=coordinator.home, prefix=".upload-") as tmp:
            path = Path(tmp) / f"model.{body.format}"
            path.write_bytes(data)
            path.with_suffix(".json").write_text(json.dumps(body.metadata))
            try:  # the model or its metadata refused by the checks: the body's fault
                mv = operations.register_model(coordinator, who, source(request), body.name,
                                               path, version=body.version)  # fmt: skip
            except (ValueError, EdgeFleetError) as exc:
                raise ApiError(422, f"body: {str(exc).splitlines()[0]}") from exc
        return {"name": mv.name, "version": mv.version, "format": mv.format, "size": mv.size}

    @app.post("/api/v1/devices", status_code=201)
    def enroll(body: EnrollBody, who: Who, request: Request) -> dict[str, Any]:
        try:
            public = DevicePublic.decode(body.public_key.encode())
        except (ValueError, EdgeFleetError) as exc:
            raise ApiError(422, f"body.public_key: {exc}") from exc
        with _conflicts():
            operations.enroll(coordinator, who, source(request), public, body.groups)
        return {"device": public.device_id, "kem": public.kem.kem}

    @app.post("/api/v1/devices/{device_id}/revoke")
    def revoke(device_id: str, who: Who, request: Request) -> dict[str, Any]:
        _check_id(device_id, "device")
        with _conflicts():
            operations.revoke(coordinator, who, source(request), device_id)
        return {"device": device_id, "revoked": True}

    @app.post("/api/v1/rollouts", status_code=201)
    def rollout_start(body: RolloutBody, who: Who, request: Request) -> dict[str, Any]:
        from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage

        try:
            spec = RolloutSpec(
                name=body.name, version=body.version, canary=Stage.parse(body.canary),
                waves=tuple(Stage.parse(w) for w in body.waves),
                gates=tuple(Gate.parse(g) for g in body.gates), bake=body.bake,
                min_samples=body.min_samples, min_labels=body.min_labels,
                wave_timeout=body.wave_timeout)  # fmt: skip
        except ValueError as exc:
            raise ApiError(422, f"body: {exc}") from exc
        with _conflicts():
            rid = operations.rollout_start(coordinator, who, source(request), spec)
        return {"rollout": rid, "ticking": publisher is not None}

    @app.post("/api/v1/rollouts/{rollout_id}/{what}")
    def rollout_control(rollout_id: int, what: str, who: Who, request: Request) -> dict[str, Any]:
        if what == "rollback":
            operations.require(coordinator, who, "rollout.rollback", f"rollout:{rollout_id}",
                               source(request))  # fmt: skip
            if publisher is None:
                raise ApiError(503, "this API runs without a broker connection: rollback is off")
            with _conflicts(), publisher() as link:
                d = operations.rollout_rollback(coordinator, who, source(request), link,
                                                rollout_id)  # fmt: skip
            return {"rollout": rollout_id, "rolled_back": list(d.devices), "reason": d.reason}
        if what not in ("pause", "resume", "abort"):
            raise ApiError(404, f"no rollout operation {what!r} (pause, resume, abort, rollback)")
        with _conflicts():
            r = operations.rollout_control(coordinator, who, source(request), rollout_id, what)
        return {"rollout": rollout_id, "state": r.state.to_dict()}

    flying: dict[str, Any] = {}  # operation id -> its running FlService (for stop)

    @app.post("/api/v1/fl/runs", status_code=202)
    def fl_start(body: FlBody, who: Who, request: Request) -> dict[str, Any]:
        from edgefleet.federated.runs import run_spec

        operations.require(coordinator, who, "fl.start", body.name, source(request))
        if publisher is None:
            raise ApiError(503, "this API runs without a broker connection: FL runs are off")
        if body.release_if_better and not body.release_to:
            raise ApiError(422, "body.release_if_better: needs release_to")
        fields = body.model_dump(exclude={"release_to", "release_if_better", "wait_devices",
                                          "presence", "hidden"})  # fmt: skip
        try:
            spec = run_spec(**fields, hidden=tuple(body.hidden))
        except ValueError as exc:
            raise ApiError(422, f"body: {exc}") from exc
        op = ops.new("fl", f"{spec.run_id}: {spec.rounds} rounds of {spec.model_name}")
        src = source(request)
        detail = {"operation": op.id, "rounds": spec.rounds, "strategy": spec.strategy.name,
                  "params": dict(spec.strategy.params), "family": spec.model.family,
                  "hidden": list(spec.model.hidden)}  # fmt: skip
        operations.audited(coordinator, who, "fl.start", f"fl:{spec.run_id}", src,
                           lambda: None, lambda _: detail)
        threading.Thread(target=_run_fl, args=(op, spec, body), daemon=True,
                         name=f"api-fl-{op.id}").start()  # fmt: skip
        return {"operation": op.id, "run_id": spec.run_id,
                "events": f"/api/v1/operations/{op.id}/events"}  # fmt: skip

    def _run_fl(op: Operation, spec: Any, body: FlBody) -> None:
        from edgefleet.coordinator.service import mqtt_config_for
        from edgefleet.federated.service import FlService, ReleasePolicy

        policy = (ReleasePolicy(selector=body.release_to, if_better=body.release_if_better)
                  if body.release_to else None)  # fmt: skip

        def on_round(record: Any) -> None:
            fl = record.lineage.get("fl") or {}
            op.emit(phase="round", round=record.round, of=spec.rounds, version=record.version,
                    skipped=record.skipped, metrics=fl.get("metrics"))  # fmt: skip

        try:
            service = FlService(coordinator, mqtt_config_for(coordinator,
                                                             client_id=f"api-fl-{op.id}"),
                                presence_window=body.presence)
            flying[op.id] = service
            with service:
                outcome = service.run(spec, on_round=on_round, release=policy,
                                      wait_devices=body.wait_devices)  # fmt: skip
            released = outcome.released
            op.finish("done", run_id=spec.run_id,
                      rounds=[r.version for r in outcome.result.rounds],
                      released=None if released is None else released.sequence,
                      release_note=outcome.release_note)  # fmt: skip
        except Exception as exc:
            stopped = op.id in flying and getattr(flying[op.id], "stopped_by", None)
            op.finish("stopped" if stopped else "failed", error=str(exc).splitlines()[0]
                      if str(exc) else repr(exc))  # fmt: skip
        finally:
            flying.pop(op.id, None)

    @app.post("/api/v1/fl/runs/{op_id}/stop")
    def fl_stop(op_id: str, who: Who, request: Request) -> dict[str, Any]:
        op = ops.get(op_id)

        def stop() -> None:
            service = flying.get(op_id)
            if service is None or op.kind != "fl":
                raise LookupError(f"operation {op_id} is not a running FL run")
            service.stopped_by = who.name
            service.stop()  # the run ends; fl start --run-id resumes after its last round

        with _conflicts():
            operations.audited(coordinator, who, "fl.stop", f"operation:{op_id}",
                               source(request), stop)  # fmt: skip
        return {"operation": op_id, "stopping": True}

    @app.post("/api/v1/releases", status_code=202)
    def release(body: ReleaseBody, who: Who, request: Request) -> dict[str, Any]:
        # refused (and audited) before anything starts
        operations.require(coordinator, who, "release", body.to, source(request))
        if publisher is None:
            raise ApiError(503, "this API runs without a broker connection: releases are off")
        _candidate_spec(body)  # a bad share: 422 before anything starts
        op = ops.new("release", f"{body.name}@{body.version} to {body.to}")
        threading.Thread(
            target=_run_release, args=(op, who, source(request), body), daemon=True,
            name=f"api-release-{op.id}",
        ).start()  # fmt: skip
        return {"operation": op.id, "events": f"/api/v1/operations/{op.id}/events"}

    def _run_release(op: Operation, who: Principal, src: str, body: ReleaseBody) -> None:
        assert publisher is not None
        try:
            spec = _candidate_spec(body)
            with publisher() as link:
                if spec is None:
                    done = operations.publish_release(
                        coordinator, who, src, link, body.name, body.version, body.to
                    )
                    sequence, targets = done.sequence, done.targets
                else:
                    cand, _ = operations.publish_candidate(
                        coordinator, who, src, link, body.name, body.version, body.to, spec
                    )
                    sequence, targets = cand.sequence, tuple(sorted(cand.targets))
            op.emit(sequence=sequence, targets=len(targets), phase="published",
                    candidate=body.candidate)  # fmt: skip
            of = len(targets)
            waited = fleet.wait_for(registry, sequence, targets, body.wait,
                                    candidate=spec is not None,
                                    on_progress=lambda states: op.emit(
                                        phase="progress", of=of,
                                        arrived=sum(1 for s in states if s.arrived)))  # fmt: skip
            op.finish("done" if waited.ok else "timed out", sequence=sequence,
                      arrived=len(waited.arrived), of=of)  # fmt: skip
        except Exception as exc:  # reported on the operation; the audit row says it too
            op.finish("failed", error=str(exc).splitlines()[0] if str(exc) else repr(exc))

    @app.post("/api/v1/candidates/drop")
    def drop_candidate(body: DropCandidateBody, who: Who, request: Request) -> dict[str, Any]:
        operations.require(coordinator, who, "candidate.drop", body.to, source(request))
        if publisher is None:
            raise ApiError(503, "this API runs without a broker connection: candidates are off")
        with _conflicts(), publisher() as link:
            n = operations.drop_candidate(coordinator, who, source(request), link, body.to)
        return {"dropped": n, "to": body.to}

    # -- dashboard --------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return Response('{"ok": true}', media_type="application/json")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _candidate_spec(body: ReleaseBody) -> Any:
    """The release's ``CandidateSpec`` (None: an ordinary release); 422 on a bad share."""
    from edgefleet.protocol.candidate import CandidateSpec
    from edgefleet.protocol.errors import DecodeError

    if body.candidate is None:
        if body.share is not None:
            raise ApiError(422, "body.share: applies to candidate ab only")
        return None
    share = body.share if body.share is not None else (0.1 if body.candidate == "ab" else 0.0)
    try:
        return CandidateSpec(mode=body.candidate, share=share)
    except DecodeError as exc:
        raise ApiError(422, "body." + str(exc).replace("manifest.candidate.", "")) from exc


def _check_id(value: str, what: str) -> None:
    import re

    if not re.fullmatch(_ID, value):
        raise ApiError(422, f"path.{what}: {value[:80]!r} is not a valid {what} id")


@contextlib.contextmanager
def _conflicts() -> Iterator[None]:
    """A registry refusal (unknown device, duplicate enrolment, ...) -> 409; content the
    checks reject (a model that does not load or match its metadata) -> 422; one line."""
    try:
        yield
    except EdgeFleetError as exc:
        raise ApiError(422, str(exc).splitlines()[0] if str(exc) else exc.code) from exc
    except (LookupError, ValueError) as exc:
        raise ApiError(409, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc


def _stream(op: Operation) -> Iterator[bytes]:
    sent = 0
    while True:
        with op.changed:
            while sent >= len(op.events) and op.state == "running":
                op.changed.wait(timeout=15)
                if sent >= len(op.events) and op.state == "running":
                    break  # keep-alive comment below
            batch = op.events[sent:]
        if not batch:
            yield b": keep-alive\n\n"
            continue
        for event in batch:
            sent += 1
            kind = "end" if event.get("end") else "progress"
            yield f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode()
            if event.get("end"):
                return
