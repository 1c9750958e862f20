"""Fixtures: a plain loopback broker and an authenticated one with the EdgeFleet ACL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from edgefleet.infra.broker import EmbeddedBroker, edgefleet_acl

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO, LinkFactory, SecureBroker


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """mosquitto without auth; the in-process amqtt broker (3.1.1) where mosquitto is missing."""
    with EmbeddedBroker(data_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """mosquitto with users coordinator, dev-a, dev-b and the EdgeFleet ACL."""
    if not HAVE_MOSQUITTO:
        pytest.skip(NEED_MOSQUITTO)
    passwords = {user: secrets.token_urlsafe(12) for user in ("coordinator", "dev-a", "dev-b")}
    with EmbeddedBroker(
        data_dir=tmp_path_factory.mktemp("secure-broker"),
        users=passwords,
        acl=edgefleet_acl(),
        force_kind="mosquitto",
    ) as running:
        yield SecureBroker(running, passwords)


@pytest.fixture
def links() -> Iterator[LinkFactory]:
    factory = LinkFactory()
    yield factory
    factory.close()
