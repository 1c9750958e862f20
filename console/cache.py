"""Polled views answered from a per-process cache of their JSON body, with a strong ETag.

Each cached view has a *generation*: one cheap registry query whose value changes whenever the
view's rows would (``views.fleet_generation`` and its siblings). A request reads the
generation; if it equals the cached entry's, the cached bytes are served (no rows built,
nothing serialized); otherwise the body is built and serialized once and replaces the entry.
One entry per view, so memory is bounded by the number of views. The generation is read before
the body is built, so a cached body is never older than the generation it is filed under.

Concurrent requests share generation reads (``_FreshRead``): a request waits for a read that
*started after it arrived* (so it sees every change committed before it), and one read answers
every request that arrived before it started: with 50 viewers polling at once, a handful of
queries instead of 50.

The ETag is the body's SHA-256: ``If-None-Match`` answered with 304 is right whatever the
generation says. ``Cache-Control: private, no-cache`` lets a browser keep the body and
revalidate it on every poll (the dashboard's ``fetch(…, {cache: "no-cache"})``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

__all__ = ["ViewCache"]


@dataclass(frozen=True)
class _Entry:
    generation: Hashable
    body: bytes
    etag: str


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: ``*`` or a list of tags, compared weakly."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


class _FreshRead:
    """``read()`` shared by concurrent callers, never older than the caller: each caller gets
    the result of a read that started after it called (one already running is not enough, a
    change may have been committed after it started); a read that fails raises in the caller
    that ran it, and the others try again."""

    def __init__(self, read: Callable[[], Hashable]) -> None:
        self._read = read
        self._cv = threading.Condition()
        self._started = 0  # reads begun
        self._done = 0  # the newest read finished (its sequence number)
        self._value: Hashable = None
        self._running = False

    def __call__(self) -> Hashable:
        with self._cv:
            ticket = self._started + 1  # the first read that starts from now on
            while self._done < ticket:
                if self._running:
                    self._cv.wait()
                    continue
                self._running = True
                self._started += 1
                seq = self._started
                self._cv.release()
                try:
                    value = self._read()
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
                self._value, self._done = value, seq
            return self._value


class ViewCache:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._building: dict[str, threading.Lock] = {}
        self._reads: dict[str, _FreshRead] = {}
        self._lock = threading.Lock()

    def generation(self, view: str, read: Callable[[], Hashable]) -> Hashable:
        """``read()`` (the view's generation query), shared with concurrent requests."""
        with self._lock:
            shared = self._reads.get(view)
            if shared is None:
                shared = self._reads[view] = _FreshRead(read)
        return shared()

    def _entry(self, view: str, generation: Hashable, build: Callable[[], Any]) -> _Entry:
        with self._lock:
            entry = self._entries.get(view)
            building = self._building.setdefault(view, threading.Lock())
        if entry is not None and entry.generation == generation:
            return entry
        with building:  # one build per view at a time; the others then find its result
            with self._lock:
                entry = self._entries.get(view)
            if entry is not None and entry.generation == generation:
                return entry
            body = json.dumps(build(), ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode()  # fmt: skip
            entry = _Entry(generation, body, f'"{hashlib.sha256(body).hexdigest()[:32]}"')
            with self._lock:
                self._entries[view] = entry
            return entry

    def answer(
        self,
        request: Request,
        view: str,
        generation: Callable[[], Hashable],
        build: Callable[[], Any],
    ) -> Response:
        """The view's body (``build()``'s JSON, cached under what ``generation()`` reads now),
        or 304 when the request's ``If-None-Match`` names its ETag."""
        entry = self._entry(view, self.generation(view, generation), build)
        headers = {"ETag": entry.etag, "Cache-Control": "private, no-cache"}
        if _matches(request.headers.get("if-none-match"), entry.etag):
            return Response(status_code=304, headers=headers)
        return Response(entry.body, media_type="application/json", headers=headers)
