"""The operator API on both registry databases: every route, every role, the audit log, errors.

A real coordinator home (real keys and crypto; a tiny opaque model), tokens made the way the
CLI makes them, FastAPI's TestClient, and releases published on the in-memory broker.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from edgefleet.console.api import create_app
from edgefleet.coordinator import access, release
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage
from edgefleet.coordinator.rollouts import Rollouts
from edgefleet.infra.link.memory import InMemoryBroker
from edgefleet.protocol import topics
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.keys import SigningKey, generate_kem_key
from fastapi.testclient import TestClient

from tests.conftest import Digits
from tests.coordinator.homes import META, mqtt

DEVICES = ("dev-a", "dev-b", "dev-c")
ROLES = ("viewer", "deployer", "admin")


class Console:
    def __init__(self, c: Coordinator, client: TestClient, broker: InMemoryBroker) -> None:
        self.c, self.client, self.broker = c, client, broker
        self.tokens = {
            role: access.create_token(c.registry, name=f"{role}-1", role=role, by="test")
            for role in ROLES
        }

    def call(self, role: str | None, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return self.client.request(method, path, headers=headers, json=body)


def _device(device_id: str) -> DevicePublic:
    return DevicePublic(device_id=device_id, sign_public=SigningKey.generate().public_raw,
                        kem=generate_kem_key("x25519").public())  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Console]:  # fmt: skip
    """One coordinator home per database for the module (tests only add to it)."""
    tmp = tmp_path_factory.mktemp("console")
    url = (f"sqlite:///{tmp / 'registry.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))  # fmt: skip
    c = Coordinator.init(tmp / "coordinator", database=url)
    c.update_config(segment_size=1024)
    for version in ("1", "2"):
        path = tmp / f"m{version}.onnx"
        path.write_bytes(f"model {version}".encode() * 300)
        path.with_suffix(".json").write_text(json.dumps(META))
        c.register_model("m", path, version=version, check=False)
    for d in DEVICES:
        c.enroll(_device(d))
    with InMemoryBroker() as broker:
        app = create_app(c, publisher=lambda: release.connect(
            mqtt("api"), link_factory=broker.link))  # fmt: skip
        with TestClient(app) as client:
            yield Console(c, client, broker)
    c.registry.engine.dispose()


def _rollout(c: Coordinator) -> int:
    spec = RolloutSpec(name="m", version="2", canary=Stage.parse("device:dev-a"),
                       waves=(Stage.parse("100%"),), gates=(Gate.parse("error_rate<0.01"),),
                       bake=60)  # fmt: skip
    return Rollouts(c, None).start(spec)


# (method, path, body, the least role, the success status); {rollout} is filled per test
ROUTES: list[tuple[str, str, Any, str, int]] = [
    ("GET", "/api/v1/me", None, "viewer", 200),
    ("GET", "/api/v1/devices", None, "viewer", 200),
    ("GET", "/api/v1/groups", None, "viewer", 200),
    ("GET", "/api/v1/models", None, "viewer", 200),
    ("GET", "/api/v1/releases", None, "viewer", 200),
    ("GET", "/api/v1/fl/runs", None, "viewer", 200),
    ("GET", "/api/v1/rollouts", None, "viewer", 200),
    ("GET", "/api/v1/telemetry", None, "viewer", 200),
    ("GET", "/api/v1/drift", None, "viewer", 200),
    ("GET", "/api/v1/audit", None, "deployer", 200),
    ("POST", "/api/v1/groups/canary", {"devices": ["dev-a"]}, "deployer", 200),
    ("POST", "/api/v1/releases", {"name": "m", "version": "1", "to": "all", "wait": 0},
     "deployer", 202),
    ("POST", "/api/v1/rollouts", {"name": "m", "version": "2", "canary": "device:dev-a",
                                  "waves": ["100%"], "gates": ["error_rate<0.01"], "bake": 5},
     "deployer", 201),
    ("POST", "/api/v1/candidates/drop", {"to": "device:dev-b"}, "deployer", 200),
    ("POST", "/api/v1/rollouts/{rollout}/pause", None, "deployer", 200),
    ("POST", "/api/v1/rollouts/{rollout}/abort", None, "deployer", 200),
    ("POST", "/api/v1/devices/dev-c/revoke", None, "admin", 200),
    ("POST", "/api/v1/devices", "ENROLL", "admin", 201),
]


@pytest.mark.parametrize(("method", "path", "body", "least", "ok"), ROUTES,
                         ids=[f"{m} {p}" for m, p, *_ in ROUTES])  # fmt: skip
def test_each_role_on_each_route(console: Console, method: str, path: str, body: Any,
                                 least: str, ok: int) -> None:  # fmt: skip
    """Viewer, deployer, admin in turn: allowed from ``least`` up, else 403; POSTs audited."""
    if body == "ENROLL":
        body = {"public_key": _device("dev-new").encode().decode()}
    for role in ROLES:
        where = path.replace("{rollout}", str(_rollout(console.c)))  # a fresh one per call
        r = console.call(role, method, where, body)
        allowed = ROLES.index(role) >= ROLES.index(least)
        assert r.status_code == (ok if allowed else 403), (role, r.text)
        if not allowed:
            assert f"role {role} may not" in r.json()["error"]
        if r.status_code == 202:  # a long operation: its audit row is written when it has run
            assert "event: end" in console.call(role, "GET", r.json()["events"]).text
        if method == "POST":  # every state change is audited, allowed or not
            last = access.audit_log(console.c.registry, limit=1)[0]
            assert (last.actor, last.role, last.source) == (f"{role}-1", role, "http:testclient")
            assert last.result == ("ok" if allowed else f"refused: role {role} may not "
                                   f"{last.action}")  # fmt: skip
        if allowed and ROLES.index(least) == 2:
            break  # admin-only changes (revoke, enroll) happen once


def test_no_token_or_a_bad_or_revoked_one_gets_401(console: Console) -> None:
    assert console.call(None, "GET", "/api/v1/devices").status_code == 401
    bad = console.client.get("/api/v1/devices", headers={"Authorization": "Bearer eft_nope"})
    assert bad.status_code == 401 and bad.json() == {"error": "invalid or revoked token"}
    forged = console.tokens["admin"][:-4] + "AAAA"
    assert console.client.get("/api/v1/devices",
                              headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    token = access.create_token(console.c.registry, name="leaver", role="viewer", by="test")
    ok = console.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    access.revoke_token(console.c.registry, token[4:20])
    gone = console.client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
    assert gone.status_code == 401


def test_tokens_are_stored_hashed(console: Console) -> None:
    rows = access.list_tokens(console.c.registry)
    secrets = {t.split(".")[1] for t in console.tokens.values()}
    assert len(rows) >= 3 and all(len(r.digest) == 32 for r in rows)
    assert not any(s.encode() in r.digest for r in rows for s in secrets)


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/v1/releases", {"name": "m", "to": "all"}, "body.version: Field required"),
        ("/api/v1/releases", {"name": "m", "version": "1", "to": "all", "wait": -1},
         "body.wait: Input should be greater than or equal to 0"),
        ("/api/v1/releases", [1, 2], "body: Input should be a valid dictionary"),
        ("/api/v1/groups/canary", {"devices": []}, "body.devices: List should have at least 1"),
        ("/api/v1/groups/canary", {"devices": ["../etc"]}, "body.devices.0: String should match"),
        ("/api/v1/groups/bad%20name", {"devices": ["dev-a"]}, "path.group: 'bad name' is not"),
        ("/api/v1/devices", {"public_key": "{}"}, "body.public_key: "),
        ("/api/v1/rollouts", {"name": "m", "version": "2", "canary": "device:dev-a",
                              "waves": ["100%"], "gates": ["errors<<1"]}, "body: "),
        ("/api/v1/rollouts", {"name": "m", "version": "2", "canary": "device:dev-a",
                              "waves": ["100%"], "wave_timeout": 0}, "body.wave_timeout: "),
        ("/api/v1/rollouts", {"name": "m", "version": "2", "canary": "device:dev-a",
                              "waves": ["100%"], "min_labels": 0}, "body.min_labels: "),
    ],
)
def test_malformed_bodies_get_422_with_one_line(console: Console, path: str, body: Any,
                                                message: str) -> None:  # fmt: skip
    r = console.call("admin", "POST", path, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(message)
    assert "\n" not in r.json()["error"]


def test_a_body_over_the_limit_gets_413_before_it_is_read(console: Console) -> None:
    from edgefleet.console.api import MAX_BODY

    big = {"devices": ["dev-a"] * (MAX_BODY // 8)}
    r = console.call("admin", "POST", "/api/v1/groups/g", big)
    assert r.status_code == 413 and r.json() == {"error": f"request body over {MAX_BODY} bytes"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"devices": ['
        for _ in range(MAX_BODY // 1000 + 1):
            yield b'"dev-a",' * 125
        yield b'"dev-a"]}'

    r = console.client.post("/api/v1/groups/g", content=chunks(), headers={
        "Authorization": f"Bearer {console.tokens['admin']}", "Content-Type": "application/json"})
    assert r.status_code == 413


def test_release_streams_progress_and_is_audited(console: Console) -> None:
    r = console.call("deployer", "POST", "/api/v1/releases",
                     {"name": "m", "version": "2", "to": "device:dev-a,dev-b", "wait": 0})
    assert r.status_code == 202
    events = console.call("viewer", "GET", r.json()["events"]).text
    assert "event: end" in events
    end = json.loads(events.strip().split("data: ")[-1])
    assert end["state"] == "timed out" and end["of"] == 2 and end["arrived"] == 0  # no agents
    assert {topics.release("dev-a"), topics.release("dev-b")} <= set(console.broker.retained)
    entry = access.audit_log(console.c.registry, action="release")[0]
    assert entry.result == "ok" and entry.target == "m@2 to device:dev-a,dev-b"
    assert entry.detail == {"sequence": end["sequence"], "targets": 2}
    op = console.call("viewer", "GET", f"/api/v1/operations/{r.json()['operation']}").json()
    assert op["state"] == "timed out"


def test_a_candidate_is_released_and_dropped_through_the_api(console: Console) -> None:
    """``model release --candidate ab --share 0.3`` and ``model drop-candidate``, over HTTP."""
    from edgefleet.coordinator.candidates import candidate_topic
    from edgefleet.protocol.manifest import Manifest
    from edgefleet.protocol.messages import ReleaseOffer

    body = {"name": "m", "version": "2", "to": "device:dev-a", "wait": 0, "candidate": "ab",
            "share": 0.3}  # fmt: skip
    r = console.call("deployer", "POST", "/api/v1/releases", body)
    assert r.status_code == 202, r.text
    events = console.call("viewer", "GET", r.json()["events"]).text
    end = json.loads(events.strip().split("data: ")[-1])
    assert end["state"] == "timed out" and end["of"] == 1  # no agent serves it here
    topic = candidate_topic(topics.cmd("dev-a"))
    offer = ReleaseOffer.decode(console.broker.retained[topic])
    m = Manifest.decode(offer.manifest)
    assert m.candidate is not None and (m.candidate.mode, m.candidate.share) == ("ab", 0.3)
    entry = access.audit_log(console.c.registry, action="release")[0]
    assert entry.target == "m@2 to device:dev-a (candidate ab)" and entry.result == "ok"

    r = console.call("deployer", "POST", "/api/v1/candidates/drop", {"to": "device:dev-a"})
    assert r.status_code == 200 and r.json()["dropped"] == 1, r.text
    assert topic not in console.broker.retained  # the empty retained message cleared it
    entry = access.audit_log(console.c.registry, action="candidate.drop")[0]
    assert (entry.target, entry.result, entry.detail) == ("device:dev-a", "ok", {"devices": 1})
    for bad, message in (({**body, "share": 2}, "body.share: "),
                         ({**body, "candidate": None}, "body.share: applies to candidate ab"),
                         ({**body, "candidate": "canary"}, "body.candidate: ")):  # fmt: skip
        got = console.call("deployer", "POST", "/api/v1/releases", bad)
        assert got.status_code == 422 and got.json()["error"].startswith(message), got.text


def test_a_failed_change_is_audited_with_its_error(console: Console) -> None:
    r = console.call("deployer", "POST", "/api/v1/groups/g", {"devices": ["nobody"]})
    assert r.status_code == 409
    entry = access.audit_log(console.c.registry, limit=1)[0]
    assert entry.action == "group.add" and entry.result.startswith("failed: ")


def test_views_show_the_fleet_versions_and_rollouts(console: Console) -> None:
    rid = _rollout(console.c)
    devices = console.call("viewer", "GET", "/api/v1/devices").json()["devices"]
    assert set(DEVICES) <= {d["device"] for d in devices}
    models = console.call("viewer", "GET", "/api/v1/models").json()["models"]
    assert [(m["name"], m["version"]) for m in models] == [("m", "1"), ("m", "2")]
    rollouts = console.call("viewer", "GET", "/api/v1/rollouts").json()["rollouts"]
    mine = {r["id"]: r for r in rollouts}[rid]
    assert mine["spec"]["version"] == "2" and mine["state"]["paused"] is False
    paused = console.call("deployer", "POST", f"/api/v1/rollouts/{rid}/pause").json()
    assert paused["state"]["paused"] is True
    after = {r["id"]: r for r in console.call("viewer", "GET", "/api/v1/rollouts").json()[
        "rollouts"]}[rid]  # fmt: skip
    assert after["state"]["paused"] is True and after["decisions"][-1]["action"] == "pause"


def test_a_model_is_registered_through_the_api(console: Console, digits_v1: Digits) -> None:
    body = {"name": "digits", "format": "onnx",
            "model": base64.b64encode(digits_v1.onnx.read_bytes()).decode(),
            "metadata": json.loads(digits_v1.meta_path.read_text())}  # fmt: skip
    refused = console.call("viewer", "POST", "/api/v1/models", body)
    assert refused.status_code == 403
    r = console.call("deployer", "POST", "/api/v1/models", body)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    listed = console.call("viewer", "GET", "/api/v1/models").json()["models"]
    assert ("digits", version, "onnx") in {(m["name"], m["version"], m["format"]) for m in listed}
    entry = access.audit_log(console.c.registry, action="model.register")[0]
    assert entry.result == "ok" and entry.detail["version"] == version
    broken = {**body, "model": base64.b64encode(b"not a model").decode()}
    bad = console.call("deployer", "POST", "/api/v1/models", broken)
    assert bad.status_code == 422 and "\n" not in bad.json()["error"], bad.text
    assert console.call("deployer", "POST", "/api/v1/models",
                        {**body, "model": "***"}).json()["error"].startswith("body.model: not")


def test_the_openapi_schema_lists_every_route(console: Console) -> None:
    schema = console.client.get("/api/openapi.json").json()
    paths = set(schema["paths"])
    for _, path, *_ in ROUTES:
        assert path.replace("{rollout}", "{rollout_id}").replace("/pause", "/{what}").replace(
            "/abort", "/{what}").replace("/canary", "/{group}").replace(
            "/dev-c/", "/{device_id}/") in paths, path  # fmt: skip


def test_operations_are_bounded() -> None:
    from edgefleet.console.api import MAX_OPERATIONS, ApiError, Operations

    ops = Operations()
    first = [ops.new("release", f"t{i}") for i in range(MAX_OPERATIONS)]
    with pytest.raises(ApiError, match="operations are running"):
        ops.new("release", "one too many")
    first[0].finish("done")
    assert ops.new("release", "after one ended").state == "running"  # the finished one goes
    with pytest.raises(ApiError, match="no operation"):
        ops.get(first[0].id)


def test_the_fleet_view_is_cached_never_stale_and_answers_304(console: Console) -> None:
    """The body is served again (same strong ETag, 304 for If-None-Match) until a device's
    columns change; whatever ingest writes shows at once, as does a group or a release."""
    viewer = {"Authorization": f"Bearer {console.tokens['viewer']}"}

    def get(etag: str | None = None) -> Any:
        headers = viewer | ({"If-None-Match": etag} if etag else {})
        return console.client.get("/api/v1/devices", headers=headers)

    def row(r: Any, device: str) -> dict[str, Any]:
        return {d["device"]: d for d in r.json()["devices"]}[device]

    first = get()
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
    assert get().headers["etag"] == etag and get().content == first.content
    unchanged = get(etag)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert get(f'W/{etag}, "other"').status_code == 304 and get('"other"').status_code == 200
    was = console.c.registry.device("dev-b")
    assert was is not None
    try:  # what ingest writes for a status in the same second, then for an offline will
        console.c.registry.update_devices({"dev-b": {
            "state": "downloading", "last_seen": was.last_seen,
            "last_result": {"ok": False, "code": "digest", "reason": "bad chunk"}}})  # fmt: skip
        changed = get(etag)
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert row(changed, "dev-b")["state"] == "downloading"
        assert row(changed, "dev-b")["last_result"] == "digest: bad chunk"
        console.c.registry.update_device("dev-b", state="offline")
        assert row(get(changed.headers["etag"]), "dev-b")["state"] == "offline"
    finally:
        console.c.registry.update_device("dev-b", state=was.state, last_result=was.last_result)
    assert row(get(), "dev-b")["state"] == was.state  # put back: shown put back
    assert console.call("deployer", "POST", "/api/v1/groups/cached",
                        {"devices": ["dev-b"]}).status_code == 200  # fmt: skip
    assert "cached" in row(get(etag), "dev-b")["groups"]


def test_the_other_polled_views_follow_their_changes(console: Console) -> None:
    viewer = {"Authorization": f"Bearer {console.tokens['viewer']}"}
    paths = ("/api/v1/releases", "/api/v1/rollouts", "/api/v1/models", "/api/v1/fl/runs")
    before = {p: console.client.get(p, headers=viewer) for p in paths}
    for path, r in before.items():
        again = console.client.get(path, headers=viewer | {"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, path
    body = {"name": "m", "version": "1", "to": "device:dev-a", "wait": 0}
    r = console.call("deployer", "POST", "/api/v1/releases", body)
    assert "event: end" in console.call("viewer", "GET", r.json()["events"]).text
    end = json.loads(console.call("viewer", "GET", r.json()["events"]).text.split("data: ")[-1])
    releases = console.call("viewer", "GET", "/api/v1/releases").json()["releases"]
    assert releases[0]["sequence"] == end["sequence"] and releases[0]["targets"] == 1
    rid = _rollout(console.c)
    listed = console.call("viewer", "GET", "/api/v1/rollouts").json()["rollouts"]
    assert listed[-1]["id"] == rid and listed[-1]["state"]["paused"] is False
    Rollouts(console.c, None).pause(rid)  # another process's change: a new revision
    listed = console.call("viewer", "GET", "/api/v1/rollouts").json()["rollouts"]
    assert {r["id"]: r for r in listed}[rid]["state"]["paused"] is True


def test_me_says_which_operations_need_the_broker_connection_it_lacks(console: Console) -> None:
    with_broker = console.call("deployer", "GET", "/api/v1/me").json()
    assert with_broker["may"]["rollout.rollback"] and all(with_broker["available"].values())
    rid = _rollout(console.c)
    with TestClient(create_app(console.c)) as alone:  # no publisher: no broker connection
        auth = {"Authorization": f"Bearer {console.tokens['deployer']}"}
        me = alone.get("/api/v1/me", headers=auth).json()
        assert me["may"] == with_broker["may"]
        off = {a for a, ok in me["available"].items() if not ok}
        assert off == {"release", "candidate.drop", "rollout.rollback", "fl.start"}
        for path in (f"/api/v1/rollouts/{rid}/rollback", "/api/v1/releases", "/api/v1/fl/runs",
                     "/api/v1/candidates/drop"):  # fmt: skip
            body = {"name": "m", "version": "1", "to": "all", "rounds": 1}
            r = alone.post(path, headers=auth, json=body)
            assert r.status_code == 503 and "without a broker connection" in r.json()["error"]
        assert alone.post(f"/api/v1/rollouts/{rid}/pause", headers=auth).status_code == 200


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"params": {"Proximal-Mu": 0.1}}, "body.params.Proximal-Mu.[key]: String should match"),
        ({"params": {"proximal_mu": "a lot"}}, "body.params.proximal_mu: Input should be a"),
        ({"params": {"proximal_mu": "inf"}}, "body.params.proximal_mu: Input should be a finite"),
        ({"params": {"eta": 0.1}}, "body: fedprox: unknown parameters ['eta']"),
        ({"family": "resnet"}, "body.family: String should match"),
        ({"hidden": [64, 0]}, "body.hidden.1: Input should be greater than or equal to 1"),
        ({"hidden": "64"}, "body.hidden: Input should be a valid list"),
        ({"max_update_norm": 0}, "body.max_update_norm: Input should be greater than 0"),
    ],
)
def test_fl_start_options_are_checked(console: Console, change: dict[str, Any],
                                      message: str) -> None:  # fmt: skip
    body = {"name": "m", "rounds": 1, "strategy": "fedprox", **change}
    r = console.call("deployer", "POST", "/api/v1/fl/runs", body)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(message) and "\n" not in r.json()["error"]


def test_fl_start_takes_the_strategy_parameters_family_and_layers(console: Console) -> None:
    body = {"name": "m", "rounds": 1, "strategy": "fedprox", "params": {"proximal_mu": 0.25},
            "family": "mlp", "hidden": [32, 16], "wait_devices": 0, "presence": 5}  # fmt: skip
    r = console.call("deployer", "POST", "/api/v1/fl/runs", body)
    assert r.status_code == 202, r.text
    entry = access.audit_log(console.c.registry, action="fl.start")[0]
    assert entry.result == "ok" and entry.target == f"fl:{r.json()['run_id']}"
    assert entry.detail == {"operation": r.json()["operation"], "rounds": 1,
                            "strategy": "fedprox", "params": {"proximal_mu": 0.25},
                            "family": "mlp", "hidden": [32, 16]}  # fmt: skip
    events = console.call("viewer", "GET", r.json()["events"]).text
    end = json.loads(events.strip().split("data: ")[-1])  # this home names no broker for FL
    assert end["state"] == "failed" and "mqtt://host:port" in end["error"]


@pytest.mark.parametrize(("path", "body", "action"), [
    ("/api/v1/fl/runs", {"name": "m", "rounds": 1}, "fl.start"),
    ("/api/v1/rollouts/1/rollback", None, "rollout.rollback"),
    ("/api/v1/releases", {"name": "m", "version": "1", "to": "all"}, "release"),
    ("/api/v1/models", {"name": "m", "format": "onnx", "model": "bm90", "metadata": {}},
     "model.register"),
])  # fmt: skip
def test_a_viewer_is_refused_and_audited_before_anything_starts(
    console: Console, path: str, body: Any, action: str
) -> None:
    before = len(access.audit_log(console.c.registry, action=action, limit=10_000))
    r = console.call("viewer", "POST", path, body)
    assert r.status_code == 403 and r.json()["error"].startswith("refused: role viewer may not")
    entries = access.audit_log(console.c.registry, action=action, limit=10_000)
    assert len(entries) == before + 1
    assert (entries[0].actor, entries[0].result) == ("viewer-1", f"refused: role viewer may not "
                                                     f"{action}")  # fmt: skip


def test_a_rollout_started_through_the_api_takes_every_option_of_rollout_start(
    console: Console,
) -> None:
    body = {"name": "m", "version": "2", "canary": "device:dev-a", "waves": ["100%"],
            "gates": ["accuracy>0.9"], "bake": 30, "min_samples": 5, "min_labels": 7,
            "wave_timeout": 90}  # fmt: skip
    r = console.call("deployer", "POST", "/api/v1/rollouts", body)
    assert r.status_code == 201, r.text
    rollouts = console.call("viewer", "GET", "/api/v1/rollouts").json()["rollouts"]
    spec = {x["id"]: x for x in rollouts}[r.json()["rollout"]]["spec"]
    assert (spec["bake"], spec["min_samples"], spec["min_labels"], spec["wave_timeout"]) == (
        30, 5, 7, 90)
