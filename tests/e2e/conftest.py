"""End-to-end fixtures: the hub as uvicorn subprocesses on a temp SQLite file, with fakes.

These tests never use pytest-django's test database: the hub processes have
their own, and assertions read it with the sqlite3 module (Hub.query).
"""

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import Hub, text_delivery, unique
from tests.fakes import FakeAgent, FakeEvolution

E2E_DIR = Path(__file__).parent
# Small enough that "always failing" finishes in well under a second of backoff.
AGENT_MAX_ATTEMPTS = 3
PHONE = "5511987654321"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs the hub as subprocesses (deselect: -m 'not e2e')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied by every hub: migrating once saves seconds per hub."""
    hub = Hub(workdir=tmp_path_factory.mktemp("template"))
    hub.migrate()
    assert hub.sqlite_path is not None
    return hub.sqlite_path


@pytest.fixture
def start_hub(
    tmp_path_factory: pytest.TempPathFactory, migrated_db: Path
) -> Iterator[Callable[..., Hub]]:
    """Make hubs on fresh databases; all their processes are stopped after the test."""
    hubs: list[Hub] = []

    def start(*, env: dict[str, str] | None = None, fast: bool = True) -> Hub:
        hub = Hub(workdir=tmp_path_factory.mktemp("hub"), env=env, fast=fast)
        hub.migrate(template=migrated_db)
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory, migrated_db: Path) -> Iterator[Hub]:
    """One hub server with its embedded worker, shared by the tests that make their own tenants."""
    shared = Hub(
        workdir=tmp_path_factory.mktemp("shared-hub"),
        env={"AGENT_MAX_ATTEMPTS": str(AGENT_MAX_ATTEMPTS)},
    )
    shared.migrate(template=migrated_db)
    with shared:
        shared.start(servers=1)
        yield shared


@dataclass
class Tenant:
    """An instance of the hub with its own fake Evolution and fake agent."""

    hub: Hub
    name: str
    fields: dict[str, Any]
    evolution: FakeEvolution
    agent: FakeAgent
    sent_ids: list[str] = field(default_factory=list)

    @property
    def token(self) -> str:
        return self.fields.get("webhook_token", "")

    @property
    def path(self) -> str:
        return f"/webhook/evolution/{self.name}"

    def post(
        self, body: Any, *, path: str | None = None, token: str | None = None
    ) -> httpx.Response:
        return self.hub.server.post_webhook(
            path or self.path, body, token=self.token if token is None else token
        )

    def delivery(self, *, text: str = "hello", **fields: Any) -> dict[str, Any]:
        message_id = fields.pop("message_id", None) or unique("msg").upper()
        self.sent_ids.append(message_id)
        return text_delivery(message_id=message_id, text=text, **fields)

    def send_text(self, text: str = "hello", **fields: Any) -> tuple[str, httpx.Response]:
        body = self.delivery(text=text, **fields)
        response = self.post(body)
        return body["data"]["key"]["id"], response

    def rows(self) -> list[dict[str, Any]]:
        return self.hub.messages(self.name)

    def row(self, message_id: str) -> dict[str, Any] | None:
        return self.hub.message(self.name, message_id)

    def wait_finished(self, message_id: str, timeout: float = 20.0) -> dict[str, Any]:
        return self.hub.wait_for_message(self.name, message_id, timeout=timeout)

    def barrier(self) -> str:
        """Send a message and wait until it is answered: everything queued before is done."""
        message_id, response = self.send_text("barrier", phone="5511900000099")
        assert response.json()["status"] == "queued", response.text
        row = self.wait_finished(message_id)
        assert row["status"] == "replied", row
        return message_id


@pytest.fixture
def tenant_on() -> Iterator[Callable[..., Tenant]]:
    """Create a tenant on a given hub with fresh fakes; keyword arguments override fields."""
    fakes: list[FakeEvolution | FakeAgent] = []

    def make(hub: Hub, *, agent_delay: float = 0.0, **overrides: Any) -> Tenant:
        evolution = FakeEvolution().start()
        agent = FakeAgent(delay=agent_delay).start()
        fakes.extend([evolution, agent])
        name = overrides.pop("name", None) or unique("t")
        fields: dict[str, Any] = {
            "name": name,
            "evolution_url": evolution.url,
            "evolution_key": f"evo-key-{name}",
            "whatsapp_instance": f"{name}-wa",
            "agent_api_url": agent.url,
            "agent_api_key": f"agent-key-{name}",
            "default_agent": f"agent_{name.replace('-', '_')}",
            "webhook_token": f"token-{name}",
            "fallback_message": f"Sorry from {name}",
        }
        fields.update(overrides)
        hub.create_instance(**fields)
        return Tenant(hub=hub, name=name, fields=fields, evolution=evolution, agent=agent)

    yield make
    for fake in fakes:
        fake.stop()


@pytest.fixture
def make_tenant(hub: Hub, tenant_on: Callable[..., Tenant]) -> Callable[..., Tenant]:
    """Create a tenant on the shared hub (see tenant_on)."""
    return functools.partial(tenant_on, hub)
