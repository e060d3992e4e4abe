"""Fixtures for the provisioning tests: a tenant wired to fake Evolution and agent servers."""

import socket
from collections.abc import Iterator

import pytest

from instances.models import InstanceConfig
from tests.fakes import FakeAgent, FakeEvolution

SECRETS = {
    "evolution_key": "evo-secret-key-123",
    "agent_api_key": "agent-secret-key-456",
    "webhook_token": "webhook-secret-token-789",
}


def break_evolution_cases() -> list[object]:
    """Ways provisioning fails, as (break_it(acme, evolution), the reason shown), by id."""
    return [
        pytest.param(
            lambda acme, evolution: setattr(acme, "evolution_key", "wrong-key-0000"),
            "refuses the instance's Evolution API key",
            id="401",
        ),
        pytest.param(
            lambda acme, evolution: setattr(evolution, "license_required", True),
            "Evolution answered 503 Service Unavailable: service not activated (LICENSE_REQUIRED)",
            id="503-license",
        ),
        pytest.param(
            lambda acme, evolution: setattr(acme, "evolution_url", closed_port_url()),
            ": Connection refused",
            id="refused",
        ),
    ]


def closed_port_url() -> str:
    """An address where nothing listens (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def evolution() -> Iterator[FakeEvolution]:
    server = FakeEvolution(api_key=SECRETS["evolution_key"]).start()
    yield server
    server.stop()


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    server = FakeAgent().start()
    yield server
    server.stop()


@pytest.fixture
def acme(make_instance, evolution: FakeEvolution, agent: FakeAgent) -> InstanceConfig:
    return make_instance(evolution_url=evolution.url, agent_api_url=agent.url, **SECRETS)
