"""End-to-end fixtures: the hub as uvicorn subprocesses on a throwaway database, with fakes.

These tests never use pytest-django's test database: the hub processes have
their own, and assertions read it directly (Hub.query). Its backend follows the
test run's: when DATABASE_URL is a postgres:// URL (the PostgreSQL pass of
`make test`), every hub gets a database of its own on that server, copied from
one migrated template and dropped at the end; otherwise a SQLite file.
"""

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.harness import (
    Hub,
    PostgresDatabases,
    is_postgres,
    postgres_unreachable,
    text_delivery,
    unique,
)
from tests.fakes import FakeAgent, FakeEvolution, FakeOpenAI, FakeWebhookAgent

E2E_DIR = Path(__file__).parent
# Small enough that "always failing" finishes in well under a second of backoff.
AGENT_MAX_ATTEMPTS = 3
PHONE = "5511987654321"
# The server `make test` uses when TEST_POSTGRES_URL is not set.
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/omnihub"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs the hub as subprocesses (deselect: -m 'not e2e')")
    config.addinivalue_line(
        "markers", "slow: an e2e test that takes a minute or more (deselect: -m 'not slow')"
    )
    config.addinivalue_line(
        "markers", "scale_out: always runs on PostgreSQL (make test runs it in that pass only)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def postgres_server_url() -> str:
    """The PostgreSQL server of this run: DATABASE_URL's, else TEST_POSTGRES_URL's."""
    for variable in ("DATABASE_URL", "TEST_POSTGRES_URL"):
        url = os.environ.get(variable, "")
        if is_postgres(url):
            return url
    return DEFAULT_POSTGRES_URL


class Databases:
    """The run's migrated templates and throwaway databases, each made on first use."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.run_on_postgres = is_postgres(os.environ.get("DATABASE_URL"))
        self._postgres: PostgresDatabases | None = None
        self._sqlite_template: Path | None = None

    def postgres(self) -> PostgresDatabases:
        """The PostgreSQL server's databases; skips the test when the server is unreachable.

        `make test` checks that the server answers before its first pytest pass,
        so in CI this never skips.
        """
        if self._postgres is None:
            url = postgres_server_url()
            problem = postgres_unreachable(url)
            if problem:
                pytest.skip(f"PostgreSQL is not reachable at {url} ({problem}); .ci/run starts it")
            databases = PostgresDatabases(url)
            databases.migrated_template(workdir=self.tmp_path_factory.mktemp("pg-template"))
            self._postgres = databases
        return self._postgres

    def sqlite_template(self) -> Path:
        if self._sqlite_template is None:
            hub = Hub(workdir=self.tmp_path_factory.mktemp("template"))
            hub.migrate()
            assert hub.sqlite_path is not None
            self._sqlite_template = hub.sqlite_path
        return self._sqlite_template

    def new_hub(
        self, *, env: dict[str, str] | None = None, fast: bool = True, postgres: bool = False
    ) -> Hub:
        """A Hub (no process started) on a fresh migrated database of the run's backend;
        postgres=True puts it on PostgreSQL in the SQLite pass too."""
        workdir = self.tmp_path_factory.mktemp("hub")
        if postgres or self.run_on_postgres:
            databases = self.postgres()
            url = databases.create(template=databases.migrated_template())
            return Hub(database_url=url, workdir=workdir, env=env, fast=fast)
        hub = Hub(workdir=workdir, env=env, fast=fast)
        hub.migrate(template=self.sqlite_template())
        return hub

    def drop_all(self) -> None:
        if self._postgres is not None:
            self._postgres.drop_all()


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    made = Databases(tmp_path_factory)
    yield made
    made.drop_all()


@pytest.fixture
def start_hub(databases: Databases) -> Iterator[Callable[..., Hub]]:
    """Make hubs on fresh databases; all their processes are stopped after the test.

    Keyword arguments: env, fast, postgres (see Databases.new_hub).
    """
    hubs: list[Hub] = []

    def start(**kwargs: Any) -> Hub:
        hub = databases.new_hub(**kwargs)
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


@pytest.fixture(scope="session")
def hub(databases: Databases) -> Iterator[Hub]:
    """One hub server with its embedded worker, shared by the tests that make their own tenants."""
    shared = databases.new_hub(env={"AGENT_MAX_ATTEMPTS": str(AGENT_MAX_ATTEMPTS)})
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
        # Evolution names the instance that delivers it; the legacy route checks it.
        fields.setdefault("instance", self.fields.get("whatsapp_instance") or self.name)
        return text_delivery(message_id=message_id, text=text, **fields)

    def send_text(self, text: str = "hello", **fields: Any) -> tuple[str, httpx.Response]:
        body = self.delivery(text=text, **fields)
        # Evolution keeps what it receives from WhatsApp before it delivers it.
        self.evolution.receive(body["data"])
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


@pytest.fixture
def llm() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible server: chat completions, models, audio transcriptions."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def workflow() -> Iterator[FakeWebhookAgent]:
    """A workflow behind a webhook (n8n's "Respond to Webhook")."""
    server = FakeWebhookAgent().start()
    yield server
    server.stop()
