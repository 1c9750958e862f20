"""The release flow: what to do with offers, chunk replies and finished installs. Sans I/O.

``ReleaseFlow`` is a state machine in the style of python-tuf's ``TrustedMetadataSet``: the
daemon feeds it events (``offer``, ``chunk``, ``tick``, ``connected``, ``install_finished``)
and carries out the actions it returns. It owns no thread, no clock and no socket; what it
needs to decide is injected:

    check         verifies the signed parts of an offer (``Updater.check``): keyring,
                  signature, sequence, expiry, target, size cap. Raises ``BundleError``.
    served        the signed manifest bytes of the version being served, or None.
    new_download  opens the ``.part`` file of a verified release (``Download``); may raise
                  ``StoreError``.

States::

    idle ──offer──▶ downloading ──last chunk──▶ installing ──install_finished──▶ idle
     ▲                   │ disk error                            │ (a newer offer that came
     └───────────────────┘                                       ▼  meanwhile starts now)

A newer offer replaces a download under way; during an install it is remembered and started
once the install finished. A release that failed here (bad model, disk full...) is
remembered (the last ``remember`` bundle ids) and not fetched again when its retained offer
is re-delivered. An offer of a release this device already accepted (the active one, or the
newest accepted one after a local rollback) needs nothing: logged at INFO, not rejected; an
older kept one offered over the air is a replay, rejected as a rollback.

Chunk replies are not signed, so a coordinator's "refused" is only a hint and never ends a
verified download: the download backs off and keeps asking (``Download``), a genuine chunk
is taken whenever it comes, and only a newer verified offer replaces it. If refusals keep
it from moving for ``stall_report`` seconds, that is reported (a ``transport`` result, once
per such period) and the download carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgefleet.protocol.errors import (
    BundleError,
    EdgeFleetError,
    StoreError,
    TransportError,
)
from edgefleet.protocol.manifest import Manifest
from edgefleet.protocol.messages import ChunkReply, ChunkRequest, ReleaseOffer
from edgefleet.protocol.verify import select_envelope

from .download import DownloadStats
from .updater import AlreadyAcceptedError

__all__ = [
    "Action",
    "Discard",
    "DownloadLike",
    "Progress",
    "Reject",
    "ReleaseFlow",
    "Report",
    "SendRequests",
    "StartInstall",
]

log = logging.getLogger(__name__)


class DownloadLike(Protocol):
    """A ``Download`` (``agent.download``) as the flow and the shell use it."""

    manifest: Manifest
    path: Path  # the part file
    missing: set[int]  # segment indexes not yet on disk
    stats: DownloadStats
    refusals: int  # refusals in a row since the last fresh chunk

    @property
    def done(self) -> bool: ...

    @property
    def bytes_done(self) -> int: ...

    def pump(self, now: float) -> list[ChunkRequest]: ...

    def resend_all(self) -> None: ...

    def accept(self, reply: ChunkReply) -> bool: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


# -- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SendRequests:
    """Publish these chunk requests."""

    requests: tuple[ChunkRequest, ...]


@dataclass(frozen=True, kw_only=True)
class StartInstall:
    """Install the complete download (off the worker); then call ``install_finished``."""

    offer: ReleaseOffer
    manifest: Manifest  # verified by ``check``; the offer's envelope matches it
    download: DownloadLike


@dataclass(frozen=True, kw_only=True)
class Report:
    """Publish the device status (the flow's state changed)."""


@dataclass(frozen=True, kw_only=True)
class Reject:
    """Record ``error`` as the last result: an offer refused or a download abandoned."""

    error: EdgeFleetError
    manifest: Manifest | None = None  # the verified release, if it got that far


@dataclass(frozen=True, kw_only=True)
class Discard:
    """Close the download and delete its part file."""

    download: DownloadLike


@dataclass(frozen=True, kw_only=True)
class Progress:
    phase: str  # "download" | "installed"
    done: int  # bytes
    total: int  # bytes


Action = SendRequests | StartInstall | Report | Reject | Discard | Progress


@dataclass(frozen=True, kw_only=True)
class _Release:
    offer: ReleaseOffer
    manifest: Manifest


class ReleaseFlow:
    def __init__(
        self,
        *,
        device_id: str,
        check: Callable[[ReleaseOffer], Manifest],
        served: Callable[[], bytes | None],
        new_download: Callable[[Manifest], DownloadLike],
        remember: int = 64,
        stall_report: float = 600.0,  # s without a fresh chunk, refused, before reporting it
    ) -> None:
        self.device_id = device_id
        self._check, self._served, self._new_download = check, served, new_download
        self._remember, self._stall_report = remember, stall_report
        self._stalled: tuple[int, float] | None = None  # (bytes done, since when) of download
        self.failed: dict[str, str] = {}  # bundle id -> error code, oldest first
        self.state = "idle"  # "idle" | "downloading" | "installing"
        self.download: DownloadLike | None = None  # downloading, or being installed
        self._current: _Release | None = None  # of ``download``
        self._next: _Release | None = None  # a newer offer that came during an install

    @property
    def downloading(self) -> bool:
        return self.state == "downloading"

    # -- events ---------------------------------------------------------------------------------
    def offer(self, payload: bytes) -> list[Action]:
        if not payload:
            return []  # a cleared retained release
        try:
            offer = ReleaseOffer.decode(payload)
            if offer.manifest == self._served():
                return []  # the retained offer of what we already run
            manifest = self._check(offer)
            code = self.failed.get(manifest.bundle_id)
            if code is not None:  # e.g. the retained offer again, after a reconnect
                log.info(
                    "release %d (%s) failed here before (%s); not fetching it again",
                    manifest.sequence,
                    manifest.bundle_id,
                    code,
                )
                return []
            # The envelope is not signed itself: its digest in the manifest is. Checked once;
            # the installer uses the offer's envelope as it is.
            select_envelope(manifest, [offer.envelope], self.device_id)
        except AlreadyAcceptedError as exc:  # e.g. the retained offer after a local rollback
            log.info("release offer needs nothing here (%s): %s", exc.code, exc)
            return []
        except BundleError as exc:
            return self._reject(exc)
        release = _Release(offer=offer, manifest=manifest)
        if self.state == "installing":
            return self._queue(release)
        if self._current is not None and self._current.manifest.sequence >= manifest.sequence:
            return []  # same or newer download already under way
        return self._begin(release)

    def chunk(self, payload: bytes) -> list[Action]:
        d = self.download
        if d is None or self.state != "downloading":
            return []
        try:
            reply = ChunkReply.decode(payload, max_data=d.manifest.segment_size + 16)
            fresh = d.accept(reply)  # a refusal only backs off: frames are not signed
        except StoreError as exc:  # disk trouble
            return self._abandon(exc)
        except EdgeFleetError as exc:
            log.warning("dropped chunk reply: %s", exc)
            return []
        actions: list[Action] = []
        if fresh:
            total = d.manifest.payload_size
            actions.append(Progress(phase="download", done=d.bytes_done, total=total))
        if d.done:
            actions += self._install()
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed (``now``: monotonic seconds); call only while the link is up."""
        d = self.download
        if self.state != "downloading" or d is None:
            return []
        actions: list[Action] = self._stall(d, now)
        requests = d.pump(now)
        return actions + [SendRequests(requests=tuple(requests))] if requests else actions

    def _stall(self, d: DownloadLike, now: float) -> list[Action]:
        """Report (once per ``stall_report`` s) a download that refusals keep from moving."""
        stalled = self._stalled
        if stalled is None or stalled[0] != d.bytes_done:
            self._stalled = (d.bytes_done, now)
            return []
        if not d.refusals or now - stalled[1] < self._stall_report:
            return []
        self._stalled = (d.bytes_done, now)
        m = d.manifest
        error = TransportError(
            f"release {m.sequence}: no chunk for {now - stalled[1]:.0f} s, the last "
            f"{d.refusals} requests refused by the coordinator; still asking"
        )
        log.warning("%s", error)
        return [Reject(error=error, manifest=m), Report()]

    def connected(self) -> list[Action]:
        """A (re)connect: requests outstanding before it may be lost, so re-send them all."""
        if self.state == "downloading" and self.download is not None:
            self.download.resend_all()
        return []

    def install_finished(self, error: EdgeFleetError | None) -> list[Action]:
        """The install of the ``StartInstall`` download ended (``error`` None: installed)."""
        d, current = self.download, self._current
        if self.state != "installing" or d is None or current is None:
            raise RuntimeError(f"install_finished: expected state installing, saw {self.state}")
        m = current.manifest
        if error is not None:
            log.warning("release %d not installed: %s", m.sequence, error)
            self._remember_failed(m, error)
        self.download, self._current, self.state = None, None, "idle"
        actions: list[Action] = [
            Discard(download=d),
            Progress(phase="installed", done=m.payload_size, total=m.payload_size),
            Report(),
        ]
        queued, self._next = self._next, None
        if queued is not None:
            actions += self._begin(queued)
        return actions

    # -- transitions ----------------------------------------------------------------------------
    def _begin(self, release: _Release) -> list[Action]:
        actions: list[Action] = []
        if self.download is not None:
            actions.append(Discard(download=self.download))
            self.download, self._current, self.state = None, None, "idle"
        m = release.manifest
        try:
            download = self._new_download(m)
        except StoreError as exc:
            return actions + self._reject(exc, m)
        self.download, self._current, self.state = download, release, "downloading"
        self._stalled = None
        log.info(
            "release %d (%s %s): fetching %d of %d chunks",
            m.sequence,
            m.name,
            m.model_version,
            len(download.missing),
            m.segments,
        )
        actions.append(Report())
        if download.done:
            actions += self._install()
        return actions

    def _queue(self, release: _Release) -> list[Action]:
        current = self._current
        for pending in (current, self._next):
            if pending is not None and pending.manifest.sequence >= release.manifest.sequence:
                return []  # same or newer release already installing or queued
        log.info("release %d: starts once the install under way ended", release.manifest.sequence)
        self._next = release
        return []

    def _install(self) -> list[Action]:
        current, d = self._current, self.download
        assert current is not None and d is not None
        self.state = "installing"
        log.info("release %d: downloaded, installing", current.manifest.sequence)
        return [Report(), StartInstall(offer=current.offer, manifest=current.manifest, download=d)]

    def _abandon(self, exc: EdgeFleetError) -> list[Action]:
        d, current = self.download, self._current
        self.download, self._current, self.state = None, None, "idle"
        log.warning("download abandoned (%s): %s", exc.code, exc)
        actions: list[Action] = []
        if d is not None:
            actions.append(Discard(download=d))
        manifest = None if current is None else current.manifest
        if manifest is not None:
            self._remember_failed(manifest, exc)
        return [*actions, Reject(error=exc, manifest=manifest), Report()]

    def _reject(self, exc: EdgeFleetError, manifest: Manifest | None = None) -> list[Action]:
        """Refuse an offer; remember it if ``manifest`` (verified) is given."""
        log.warning("rejected release offer (%s): %s", exc.code, exc)
        if manifest is not None:
            self._remember_failed(manifest, exc)
        return [Reject(error=exc, manifest=manifest), Report()]

    def _remember_failed(self, manifest: Manifest, exc: EdgeFleetError) -> None:
        self.failed.pop(manifest.bundle_id, None)
        self.failed[manifest.bundle_id] = exc.code
        while len(self.failed) > self._remember:
            del self.failed[next(iter(self.failed))]
