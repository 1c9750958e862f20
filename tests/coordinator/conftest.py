"""Fixtures shared by the coordinator's release tests: an in-memory broker and the
coordinator's link to it (a module may define its own ``broker`` or ``link`` instead)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from edgefleet.coordinator import release as releases
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link

from .homes import mqtt


@pytest.fixture
def broker() -> Iterator[InMemoryBroker]:
    with InMemoryBroker() as b:
        yield b


@pytest.fixture
def link(broker: InMemoryBroker) -> Iterator[Link]:
    with releases.connect(mqtt("coordinator"), link_factory=broker.link) as link:
        yield link
