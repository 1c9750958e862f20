"""``FlClient``: the device side of an FL run. Runs the ClientApp in-process on its own thread.

The agent daemon hands every ``ef/v1/dev/<id>/fl`` payload to ``handle``, which only queues it
(bounded; full = dropped and counted) and returns, so delivery and installs never wait on a
round. The client's thread then, for each frame:

    verify (protocol.fl: release key in the trusted keyring, addressed to this device,
    digest, expiry) -> replay guard (message id, round within the run) -> Flower serde ->
    Flower metadata must agree with the envelope -> ClientApp(message, context) ->
    reply id (uuid4 hex) -> serde -> signed by the device's identity key -> ``publish`` on
    ``ef/v1/dev/<id>/up/fl``

A ClientApp that raises is answered with a Flower error reply, as a SuperNode does. Nothing
is run for an instruction that does not verify, and nothing at all unless ``opted_in``.
Flower (and whatever the ClientApp imports) is imported on the first verified instruction,
so an idle agent with FL configured stays as light as one without: this module imports no
Flower code at import time, and ``client_app`` may be a factory called at that moment.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgefleet.protocol import fl
from edgefleet.protocol.errors import BundleError, MalformedError
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.keys import SigningKey

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

__all__ = ["FlClient"]

log = logging.getLogger(__name__)
_RUNS_KEPT = 4  # per-run Flower contexts (local state across rounds) kept in memory


class FlClient:
    def __init__(
        self,
        publish: Callable[[str, bytes], None],  # (topic, payload): e.g. a QoS 1 link publish
        *,
        device_id: str,
        identity: SigningKey,  # the device's own Ed25519 key: signs replies
        trusted_keys: Callable[[], Keyring | None],  # the keyring the agent trusts now
        client_app: ClientApp | Callable[[], ClientApp],  # or a factory, called lazily
        opted_in: bool,
        clock: Callable[[], float] = time.time,
        node_config: Mapping[str, Any] | None = None,  # Flower node_config for the ClientApp
        max_queued: int = 4,  # frames waiting for the thread (each at most fl.MAX_FRAME)
        reply_ttl: int = 3600,  # s a reply stays valid
    ) -> None:
        self.device_id = device_id
        self.node_id = fl.node_id_for(device_id)
        self.publish, self.identity, self.trusted_keys = publish, identity, trusted_keys
        self.opted_in, self.clock, self.reply_ttl = opted_in, clock, reply_ttl
        self.node_config = dict(node_config or {})
        self._app_source = client_app
        self._app: Any = None
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=max_queued)
        self._guard = fl.ReplayGuard()
        self._contexts: OrderedDict[int, Context] = OrderedDict()
        self._done = threading.Condition()
        self._handled = 0  # frames finished (answered or rejected); guarded by _done
        self.counts: Counter[str] = Counter()  # replied, app_error, dropped, rejected:<code>
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # -- called by the daemon (never blocks) -----------------------------------------------------
    def handle(self, payload: bytes) -> None:
        if not self.opted_in:
            self._count("dropped:not_opted_in")
            log.debug("fl: instruction ignored: this device has not opted in")
            return
        if len(payload) > fl.MAX_FRAME:
            self._count("rejected:too_large")
            log.warning("fl: dropped a %d-byte frame (limit %d)", len(payload), fl.MAX_FRAME)
            return
        self._ensure_thread()
        try:
            self._q.put_nowait(payload)
        except queue.Full:
            self._count("dropped:queue_full")
            log.warning("fl: dropped an instruction: %d already waiting", self._q.maxsize)

    def stop(self, timeout: float = 30.0) -> None:
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._q.put(None)
            thread.join(timeout)

    def wait_handled(self, n: int, timeout: float) -> bool:
        """Block until ``n`` frames in all were answered or rejected (tests, observers)."""
        with self._done:
            return self._done.wait_for(lambda: self._handled >= n, timeout=timeout)

    # -- the client's thread -------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name=f"fl-{self.device_id}", daemon=True
                )
                self._thread.start()

    def _loop(self) -> None:
        while (frame := self._q.get()) is not None:
            try:
                self._one(frame)
            except BundleError as exc:
                self._count(f"rejected:{exc.code}")
                log.warning("fl: instruction rejected: %s", exc)
            except Exception:
                self._count("rejected:error")
                log.exception("fl: unexpected error handling an instruction")
            with self._done:
                self._handled += 1
                self._done.notify_all()

    def _one(self, frame: bytes) -> None:
        now = int(self.clock())
        opened = fl.open_instruction(
            frame, device_id=self.device_id, keyring=self.trusted_keys(), now=now
        )
        h = opened.header
        self._guard.check(h)
        from . import wire  # Flower: only once an instruction verified

        msg = wire.decode(opened.payload)
        md = msg.metadata
        if (md.message_id, md.run_id, md.dst_node_id, md.reply_to_message_id) != (
            h.message_id,
            h.run_id,
            self.node_id,
            "",
        ):
            raise MalformedError("fl instruction: Flower metadata does not match its envelope")
        self._guard.accept(h)
        log.info("fl run %d step %d: %s", h.run_id, h.round, md.message_type)
        reply = self._run_app(msg)
        reply_id = uuid.uuid4().hex
        wire.set_message_id(reply, reply_id)
        payload = wire.encode(reply)
        if len(payload) > fl.MAX_PAYLOAD:  # tell the coordinator rather than let it time out
            self._count("reply_too_large")
            reply = _error_reply(msg, f"reply is {len(payload)} bytes; limit {fl.MAX_PAYLOAD}")
            wire.set_message_id(reply, reply_id)
            payload = wire.encode(reply)
        self._send(payload, h, reply_id)

    def _run_app(self, msg: Message) -> Message:
        try:
            return self._client_app()(msg, self._context(msg.metadata.run_id))
        except Exception as exc:
            self._count("app_error")
            log.warning("fl: the ClientApp raised %s: %s", type(exc).__name__, exc)
            return _error_reply(msg, f"{type(exc).__name__}: {exc}")

    def _send(self, payload: bytes, h: fl.FlHeader, reply_id: str) -> None:
        now = int(self.clock())
        frame = fl.seal(
            payload,
            self.identity,
            kind="reply",
            run_id=h.run_id,
            round=h.round,
            message_id=reply_id,
            reply_to=h.message_id,
            device_id=self.device_id,
            issued_at=now,
            expires=now + self.reply_ttl,
        )
        from . import wire

        self.publish(wire.reply_topic(self.device_id), frame)
        self._count("replied")

    def _client_app(self) -> ClientApp:
        if self._app is None:
            from flwr.clientapp import ClientApp

            source = self._app_source
            self._app = source if isinstance(source, ClientApp) else source()
        app: ClientApp = self._app
        return app

    def _context(self, run_id: int) -> Context:
        from flwr.app import Context, RecordDict

        if run_id not in self._contexts:
            self._contexts[run_id] = Context(
                run_id=run_id,
                node_id=self.node_id,
                node_config=dict(self.node_config),
                state=RecordDict(),
                run_config={},
            )
            while len(self._contexts) > _RUNS_KEPT:
                self._contexts.popitem(last=False)
        return self._contexts[run_id]

    def _count(self, what: str) -> None:
        with self._done:
            self.counts[what] += 1


def _error_reply(msg: Message, reason: str) -> Message:
    """A Flower error reply (``CLIENT_APP_RAISED_EXCEPTION``), as a SuperNode sends one."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason[:500]), reply_to=msg
    )
