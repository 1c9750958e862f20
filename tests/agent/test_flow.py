"""ReleaseFlow as a pure state machine: every event in every state, then the longer paths.

Offers are real signed releases (``tests.conftest.Fleet``); ``check`` is a stand-in for
``Updater.check`` that decodes the manifest and applies the anti-rollback rule (the flow only
needs its decision); downloads are real ``Download`` s on a temporary directory.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from edgefleet.agent import flow as F
from edgefleet.agent.download import Download
from edgefleet.agent.updater import AlreadyAcceptedError
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import (
    EdgeFleetError,
    ModelLoadError,
    RollbackError,
    StoreError,
)
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ReleaseOffer

from tests.agent.releases import DEVICE, Release
from tests.conftest import Fleet

HIGHEST = 2  # the sequence of the version served (v1)


@dataclass
class Releases:
    v1: Release  # served
    v2: Release  # sequence 3
    v3: Release  # sequence 10, newer still
    old: Release  # sequence 1: a rollback
    known: Release  # sequence 2 (HIGHEST), not served: accepted before, rolled back locally
    forged: bytes  # v2's signed parts with dev-b's envelope relabelled as dev-a's


@pytest.fixture(scope="module")
def rel(fleet: Fleet) -> Releases:
    v2 = Release(fleet.bundle_bytes("v2"))
    other = Release(fleet.bundle_bytes("v2"), device="dev-b").offer.envelope
    envelope = Envelope(device_id=DEVICE, kem=other.kem, sealed=other.sealed)
    forged = ReleaseOffer(**{**vars(v2.offer), "envelope": envelope}).encode()
    r = Releases(
        v1=Release(fleet.bundle_bytes("v1")),
        v2=v2,
        v3=Release(fleet.release(b"newer model", sequence=10)),
        old=Release(fleet.release(b"older model", sequence=1)),
        known=Release(fleet.release(b"rolled back from", sequence=HIGHEST)),
        forged=forged,
    )
    assert r.v2.manifest.segments > 1 and r.v1.manifest.sequence == HIGHEST
    return r


def check(offer: ReleaseOffer) -> Manifest:
    m = Manifest.decode(offer.manifest)
    if m.sequence == HIGHEST:  # what ``Updater.check`` says of a release accepted before
        raise AlreadyAcceptedError("accepted here before", manifest=m, version=None)
    if m.sequence <= HIGHEST:
        raise RollbackError(f"release sequence: expected > {HIGHEST}, saw {m.sequence}")
    return m


def make_flow(rel: Releases, tmp: Path, *, remember: int = 64, **kw: object) -> F.ReleaseFlow:
    def new_download(m: Manifest) -> Download:
        return Download(m, tmp / f"{m.bundle_id}.part", "reply", window=2, timeout=5.0)

    args: dict[str, object] = {
        "device_id": DEVICE,
        "check": check,
        "served": lambda: rel.v1.offer.manifest,
        "new_download": new_download,
        "remember": remember,
    }
    return F.ReleaseFlow(**{**args, **kw})  # type: ignore[arg-type]


def names(actions: list[F.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def deliver(flow: F.ReleaseFlow, r: Release) -> list[F.Action]:
    out: list[F.Action] = []
    for i in range(r.manifest.segments):
        out = flow.chunk(r.chunk(i))
    return out


# -- states -------------------------------------------------------------------------------------
def idle(flow: F.ReleaseFlow, rel: Releases) -> None:
    pass


def downloading(flow: F.ReleaseFlow, rel: Releases) -> None:
    flow.offer(rel.v2.offer.encode())


def installing(flow: F.ReleaseFlow, rel: Releases) -> None:
    flow.offer(rel.v2.offer.encode())
    assert "StartInstall" in names(deliver(flow, rel.v2))


def queued(flow: F.ReleaseFlow, rel: Releases) -> None:
    installing(flow, rel)
    assert flow.offer(rel.v3.offer.encode()) == []


STATES: dict[str, Callable[[F.ReleaseFlow, Releases], None]] = {
    "idle": idle,
    "downloading": downloading,
    "installing": installing,
    "queued": queued,  # installing, with a newer offer waiting
}

# -- events -------------------------------------------------------------------------------------
Event = Callable[[F.ReleaseFlow, Releases], list[F.Action]]
EVENTS: dict[str, Event] = {
    "offer newer": lambda f, r: f.offer(r.v3.offer.encode()),
    "offer same": lambda f, r: f.offer(r.v2.offer.encode()),
    "offer served": lambda f, r: f.offer(r.v1.offer.encode()),
    "offer rollback": lambda f, r: f.offer(r.old.offer.encode()),
    "offer accepted before": lambda f, r: f.offer(r.known.offer.encode()),
    "offer forged envelope": lambda f, r: f.offer(r.forged),
    "offer garbage": lambda f, r: f.offer(b"{not json"),
    "offer cleared": lambda f, r: f.offer(b""),
    "chunk": lambda f, r: f.chunk(r.v2.chunk(0)),
    "chunk garbage": lambda f, r: f.chunk(b"junk"),
    "chunk refused": lambda f, r: f.chunk(r.v2.chunk(0, status="refused")),
    "chunk refused x3": lambda f, r: [
        a for _ in range(3) for a in f.chunk(r.v2.chunk(0, status="refused"))
    ],
    "tick": lambda f, r: f.tick(100.0),
    "connected": lambda f, r: f.connected(),
    "install ok": lambda f, r: f.install_finished(None),
    "install failed": lambda f, r: f.install_finished(ModelLoadError("does not load")),
}

REJECTED = (["Reject", "Report"], None)  # None: the state does not change
NOTHING = ([], None)
WRONG_ORDER = (RuntimeError, None)
FINISHED = (["Discard", "Progress", "Report"], "idle")
# event -> state -> (action names, or the exception raised; the next state, None = unchanged)
TABLE: dict[str, dict[str, tuple[object, str | None]]] = {
    "offer newer": {
        "idle": (["Report"], "downloading"),
        "downloading": (["Discard", "Report"], "downloading"),
        "installing": NOTHING,  # remembered: starts after the install
        "queued": NOTHING,  # already the one waiting
    },
    "offer same": {
        "idle": (["Report"], "downloading"),
        "downloading": NOTHING,
        "installing": NOTHING,
        "queued": NOTHING,
    },
    "offer served": dict.fromkeys(STATES, NOTHING),
    "offer rollback": dict.fromkeys(STATES, REJECTED),
    "offer accepted before": dict.fromkeys(STATES, NOTHING),  # not a rollback: nothing to do
    "offer forged envelope": dict.fromkeys(STATES, REJECTED),
    "offer garbage": dict.fromkeys(STATES, REJECTED),
    "offer cleared": dict.fromkeys(STATES, NOTHING),
    "chunk": {
        "idle": NOTHING,
        "downloading": (["Progress"], None),
        "installing": NOTHING,
        "queued": NOTHING,
    },
    "chunk garbage": dict.fromkeys(STATES, NOTHING),
    "chunk refused": dict.fromkeys(STATES, NOTHING),  # unsigned: only a hint
    "chunk refused x3": dict.fromkeys(STATES, NOTHING),  # never an abandon
    "tick": {
        "idle": NOTHING,
        "downloading": (["SendRequests"], None),
        "installing": NOTHING,
        "queued": NOTHING,
    },
    "connected": dict.fromkeys(STATES, NOTHING),
    "install ok": {
        "idle": WRONG_ORDER,
        "downloading": WRONG_ORDER,
        "installing": FINISHED,
        "queued": (["Discard", "Progress", "Report", "Report"], "downloading"),  # the next one
    },
}
TABLE["install failed"] = TABLE["install ok"]
CASES = [(state, event) for event in EVENTS for state in STATES]


def test_the_table_covers_every_event_in_every_state() -> None:
    assert set(TABLE) == set(EVENTS)
    assert all(set(row) == set(STATES) for row in TABLE.values())


@pytest.mark.parametrize(("state", "event"), CASES, ids=[f"{s}-{e}" for s, e in CASES])
def test_event_in_state(state: str, event: str, rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)
    STATES[state](flow, rel)
    before = flow.state
    expected, after = TABLE[event][state]
    if isinstance(expected, type):
        with pytest.raises(expected):
            EVENTS[event](flow, rel)
        assert flow.state == before
        return
    assert names(EVENTS[event](flow, rel)) == expected
    assert flow.state == (after or before)


# -- longer paths --------------------------------------------------------------------------------
def test_complete_download_starts_the_install_with_the_verified_release(
    rel: Releases, tmp_path: Path
) -> None:
    flow = make_flow(rel, tmp_path)
    flow.offer(rel.v2.offer.encode())
    actions = deliver(flow, rel.v2)
    assert names(actions) == ["Progress", "Report", "StartInstall"]
    start = actions[-1]
    assert isinstance(start, F.StartInstall)
    assert start.offer == rel.v2.offer and start.manifest == rel.v2.manifest
    assert start.download is flow.download and flow.state == "installing"


def test_newer_offer_during_an_install_starts_after_it(rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)
    queued(flow, rel)
    assert flow.download is not None and flow.download.manifest == rel.v2.manifest
    flow.install_finished(None)
    assert flow.download is not None and flow.download.manifest == rel.v3.manifest


def test_forged_refusals_do_not_abandon_a_verified_download(
    rel: Releases, tmp_path: Path
) -> None:
    """Three (or thirty) unsigned "refused" frames used to abort the download for good."""
    flow = make_flow(rel, tmp_path)
    flow.offer(rel.v2.offer.encode())
    sent = flow.tick(0.0)
    assert names(sent) == ["SendRequests"]
    for _ in range(30):
        for i in (0, 1):
            assert flow.chunk(rel.v2.chunk(i, status="refused")) == []
    assert flow.state == "downloading" and flow.failed == {}
    assert flow.tick(1.0) == []  # backing off: not asked again at once
    actions = deliver(flow, rel.v2)  # the genuine chunks, whenever they come
    assert names(actions) == ["Progress", "Report", "StartInstall"]


def test_refused_requests_are_asked_again_after_a_back_off(rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)  # window 2, timeout 5 s
    flow.offer(rel.v2.offer.encode())
    flow.tick(0.0)
    flow.chunk(rel.v2.chunk(0, status="refused"))
    flow.chunk(rel.v2.chunk(1, status="refused"))
    assert flow.tick(0.0) == []
    assert flow.tick(9.0) == []  # two refusals in a row: 10 s
    again = flow.tick(10.0)
    assert sorted(i for a in again for r in a.requests for i in r.indexes) == [0, 1]  # type: ignore[attr-defined]


def test_a_download_refusals_keep_still_is_reported_and_goes_on(
    rel: Releases, tmp_path: Path
) -> None:
    flow = make_flow(rel, tmp_path, stall_report=600.0)
    flow.offer(rel.v2.offer.encode())
    flow.tick(0.0)
    now, reports = 0.0, []
    while now < 1300.0:  # the coordinator refuses every request
        for a in flow.tick(now):
            if isinstance(a, F.SendRequests):
                for r in a.requests:
                    flow.chunk(rel.v2.chunk(r.indexes[0], status="refused"))
            else:
                reports.append((now, a))
        now += 1.0
    rejects = [(t, a) for t, a in reports if isinstance(a, F.Reject)]
    assert [t for t, _ in rejects] == [600.0, 1200.0]  # once per period, not per refusal
    assert all(a.error.code == "transport" and a.manifest == rel.v2.manifest for _, a in rejects)  # type: ignore[attr-defined]
    assert flow.state == "downloading" and flow.failed == {}  # not abandoned, not remembered
    assert names(deliver(flow, rel.v2))[-1] == "StartInstall"


def test_a_newer_offer_replaces_a_refused_download(rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)
    flow.offer(rel.v2.offer.encode())
    flow.tick(0.0)
    flow.chunk(rel.v2.chunk(0, status="refused"))
    assert names(flow.offer(rel.v3.offer.encode())) == ["Discard", "Report"]
    assert flow.download is not None and flow.download.manifest == rel.v3.manifest


def test_disk_error_abandons_the_download_and_remembers_it(
    rel: Releases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = make_flow(rel, tmp_path)
    flow.offer(rel.v2.offer.encode())

    def disk_full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    actions = flow.chunk(rel.v2.chunk(0))
    assert names(actions) == ["Discard", "Reject", "Report"]
    assert flow.failed == {rel.v2.manifest.bundle_id: "store"}
    assert flow.offer(rel.v2.offer.encode()) == []  # re-delivered: not fetched again


def test_failed_install_is_remembered_and_not_fetched_again(
    rel: Releases, tmp_path: Path
) -> None:
    flow = make_flow(rel, tmp_path)
    installing(flow, rel)
    flow.install_finished(ModelLoadError("does not load"))
    assert flow.failed == {rel.v2.manifest.bundle_id: "model_load"}
    assert flow.offer(rel.v2.offer.encode()) == [] and flow.state == "idle"
    (tmp_path / "restarted").mkdir()  # (no shell here carried out the Discard)
    fresh = make_flow(rel, tmp_path / "restarted")  # a restart forgets it
    assert names(fresh.offer(rel.v2.offer.encode())) == ["Report"]


def test_failed_releases_are_remembered_up_to_a_bound(
    fleet: Fleet, rel: Releases, tmp_path: Path
) -> None:
    bad = [Release(fleet.release(b"not a model %d" % i, sequence=10 + i)) for i in range(3)]
    flow = make_flow(rel, tmp_path, remember=2)
    for r in bad:
        flow.offer(r.offer.encode())
        deliver(flow, r)
        flow.install_finished(ModelLoadError("no"))
    assert list(flow.failed) == [bad[1].manifest.bundle_id, bad[2].manifest.bundle_id]


def test_a_download_that_cannot_start_is_rejected_and_remembered(
    rel: Releases, tmp_path: Path
) -> None:
    def no_space(m: Manifest) -> Download:
        raise StoreError("downloads: No space left on device")

    flow = make_flow(rel, tmp_path, new_download=no_space)
    actions = flow.offer(rel.v2.offer.encode())
    assert names(actions) == ["Reject", "Report"] and flow.state == "idle"
    assert flow.offer(rel.v2.offer.encode()) == []


def test_a_download_already_complete_on_disk_installs_at_once(
    rel: Releases, tmp_path: Path
) -> None:
    (tmp_path / f"{rel.v2.manifest.bundle_id}.part").write_bytes(rel.v2.payload)
    flow = make_flow(rel, tmp_path)
    assert names(flow.offer(rel.v2.offer.encode())) == ["Report", "Report", "StartInstall"]


def test_reconnect_resends_every_outstanding_request(rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)
    flow.offer(rel.v2.offer.encode())
    first = flow.tick(0.0)
    assert flow.tick(1.0) == []  # the window is full, nothing timed out
    flow.connected()
    again = flow.tick(1.0)
    assert names(again) == ["SendRequests"]
    sent = [r.indexes for a in first + again for r in a.requests]  # type: ignore[union-attr]
    assert sent[: len(sent) // 2] == sent[len(sent) // 2 :]


def test_errors_in_rejects_are_the_verifiers_own(rel: Releases, tmp_path: Path) -> None:
    flow = make_flow(rel, tmp_path)
    codes = []
    for payload in (rel.old.offer.encode(), rel.forged, b"{not json"):
        reject = flow.offer(payload)[0]
        assert isinstance(reject, F.Reject) and isinstance(reject.error, EdgeFleetError)
        codes.append(reject.error.code)
    assert codes == ["rollback", "integrity", "decode"]
