"""Device-side wiring: an ``FlClient`` for an ``Agent``, from its config.

``agent.toml`` opts a device in with ``fl_enabled = true`` and names its local training data
with ``fl_data_dir`` (default ``<home>/fl-data``; ``.npz``/``.csv`` files, see ``data``). The
daemon then reports the ``fl`` capability in its status (``fl_enabled`` and an ``fl`` handler
given), which is how the coordinator's ``Presence`` knows it may sample the device::

    fl = DeviceFl.for_agent(agent)          # None unless fl_enabled
    daemon = AgentDaemon(agent, mqtt, extra_handlers=fl.handlers if fl else None)
    fl.bind(daemon)                         # replies go out on the daemon's own link

The client verifies instructions with the keyring the agent trusts now (``agent.trust``) and
signs replies with the device's identity key; it trains on its own thread, so the daemon's
delivery path never waits on a round. Flower and scikit-learn are imported only when the
first verified instruction arrives (``client_app`` is a factory): an idle agent with FL
enabled stays as light as one without. The data directory is read per round, so samples added
with ``edgefleet agent data add`` count from the next round on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .client import FlClient

if TYPE_CHECKING:
    from edgefleet.protocol.keyring import Keyring
    from edgefleet.protocol.keys import SigningKey
    from flwr.clientapp import ClientApp

__all__ = ["DEFAULT_DATA_DIR", "Agent", "AgentConfig", "DeviceFl", "data_dir"]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = "fl-data"  # under the agent home


# What this module needs of ``edgefleet.agent`` (which ``federated`` may not import):
# ``Agent.config`` (an ``AgentConfig``), ``Agent.identity.signing``, ``Agent.trust.keyring``.
class AgentConfig(Protocol):
    @property
    def home(self) -> Path: ...
    @property
    def device_id(self) -> str: ...
    @property
    def fl_enabled(self) -> bool: ...
    @property
    def fl_data_dir(self) -> str: ...


class _Identity(Protocol):
    @property
    def signing(self) -> SigningKey: ...


class _Trust(Protocol):
    @property
    def keyring(self) -> Keyring | None: ...


class Agent(Protocol):
    @property
    def config(self) -> AgentConfig: ...
    @property
    def identity(self) -> _Identity: ...
    @property
    def trust(self) -> _Trust: ...


class _Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = ...) -> Any: ...


class _HasLink(Protocol):
    @property
    def link(self) -> _Publisher: ...


def data_dir(config: AgentConfig) -> Path:
    """The device's local training data directory (``fl_data_dir``, relative to the home)."""
    return config.home / (config.fl_data_dir or DEFAULT_DATA_DIR)


def _client_app_factory(path: Path) -> Callable[[], ClientApp]:
    def build() -> ClientApp:
        from .app import build_client_app
        from .data import load_dir

        return build_client_app(lambda context: load_dir(path))

    return build


REPLAY_STATE = "fl-replay.json"  # in the agent's home: the FL replay guard


class DeviceFl:
    """The FL side of one agent: its ``FlClient`` and where its replies are published."""

    def __init__(
        self,
        agent: Agent,
        *,
        client_app: ClientApp | Callable[[], ClientApp] | None = None,  # default: data dir
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.agent = agent
        self.data_dir = data_dir(agent.config)
        self._daemon: _HasLink | None = None
        self._stopped = False
        kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.client = FlClient(
            self._publish,
            device_id=agent.config.device_id,
            identity=agent.identity.signing,
            trusted_keys=lambda: agent.trust.keyring,
            client_app=client_app or _client_app_factory(self.data_dir),
            opted_in=agent.config.fl_enabled,
            node_config={"data-dir": str(self.data_dir)},
            replay_state=agent.config.home / REPLAY_STATE,  # replays refused across restarts
            **kwargs,
        )

    @classmethod
    def for_agent(cls, agent: Agent, **kwargs: Any) -> DeviceFl | None:
        """None unless the agent's config opts in (``fl_enabled``)."""
        if not agent.config.fl_enabled:
            return None
        fl = cls(agent, **kwargs)
        log.info("fl: enabled, local data in %s", fl.data_dir)
        return fl

    @property
    def handlers(self) -> dict[str, Callable[[bytes], None]]:
        """``AgentDaemon(extra_handlers=...)``: the daemon routes ``ef/v1/dev/<id>/fl`` here."""
        return {"fl": self.client.handle}

    def bind(self, daemon: _HasLink) -> None:
        """Publish replies on ``daemon.link`` (QoS 1)."""
        self._daemon = daemon

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the client's thread; a reply still being computed is not sent."""
        self._stopped = True
        self.client.stop(timeout)

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._stopped:
            log.info("fl: stopped; a reply on %s is not sent", topic)
            return
        if self._daemon is None:
            raise RuntimeError("DeviceFl.bind(daemon) before a round starts")
        self._daemon.link.publish(topic, payload, qos=1)
