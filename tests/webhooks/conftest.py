"""Fixtures for the pipeline's unit tests: outbound HTTP is answered by httpx.MockTransport.

Async tests that reach the ORM run it through sync_to_async, i.e. in asgiref's
executor thread, not in the test's thread. Such tests are marked
`django_db(transaction=True)`: the test database is then in autocommit mode and
the in-memory SQLite database (shared cache) shows every thread the same rows.
A plain `django_db` test would keep its rows inside the test thread's open
transaction, invisible to (and locking out) the executor thread.
"""

import copy
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.utils import timezone

from instances.models import InstanceConfig
from tests.conftest import instance_fields, load_fixture
from webhooks.ingest import Outcome, record_delivery
from webhooks.models import InboundMessage


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pipeline: the worker's and the webhook's database work; make test runs these once "
        "more with the production database path (TEST_GROUP_COMMIT=true)",
    )


PHONE = "5511987654321"
AGENT_REPLY = "Abrimos das 9h às 18h."

# An answer is (status, JSON body), an exception to raise as the transport
# would, or a coroutine function of the request returning either.
Answer = tuple[int, Any] | Exception | Callable[[httpx.Request], Awaitable[Any]]


class Upstream:
    """The agent and Evolution servers of one test: scripted answers, recorded requests."""

    def __init__(self) -> None:
        self.agent: Answer = (200, {"message": AGENT_REPLY, "success": True})
        self.evolution: Answer = (201, {"key": {"id": "3EB0"}, "status": "PENDING"})
        # POST /chat/findMessages/: by default an Evolution that has nothing stored.
        self.find_messages: Answer = (200, found_page([]))
        self.requests: list[httpx.Request] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.startswith("/chat/sendPresence/"):
            return httpx.Response(201, json={})
        if path.startswith("/api/v1/agent/"):
            answer = self.agent
        elif path.startswith("/chat/findMessages/"):
            answer = self.find_messages
        else:
            answer = self.evolution
        if callable(answer):
            answer = await answer(request)
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))

    def calls(self, path_part: str) -> list[httpx.Request]:
        return [r for r in self.requests if path_part in r.url.path]

    @property
    def agent_calls(self) -> list[httpx.Request]:
        return self.calls("/api/v1/agent/")

    @property
    def sent(self) -> list[httpx.Request]:
        return self.calls("/message/sendText/")

    @property
    def finds(self) -> list[httpx.Request]:
        return self.calls("/chat/findMessages/")


def found_page(records: list[dict[str, Any]], *, size: int = 50) -> dict[str, Any]:
    """Evolution 2.x's findMessages answer (channel.service.ts fetchMessages)."""
    return {
        "messages": {
            "total": len(records),
            "pages": -(-len(records) // size),
            "currentPage": 1,
            "records": records[:size],
        }
    }


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def message_body(
    name: str = "messages-upsert-text.json",
    *,
    message_id: str | None = None,
    phone: str | None = None,
) -> dict[str, Any]:
    """A fresh webhook body; message_id and phone make it another message or chat."""
    body = copy.deepcopy(load_fixture(name))
    key = body["data"]["key"]
    if message_id is not None:
        key["id"] = message_id
    if phone is not None:
        key["remoteJid"] = f"{phone}@s.whatsapp.net"
    return body


def queue_message(
    instance: InstanceConfig, body: dict[str, Any] | None = None, **fields: Any
) -> InboundMessage:
    """Store a delivery as the webhook does; `fields` then overwrite columns of the row."""
    result = record_delivery(instance=instance, body=body or message_body())
    assert result.outcome is Outcome.QUEUED, result
    row = InboundMessage.objects.get(instance=instance, message_id=result.message_id)
    if fields:
        InboundMessage.objects.filter(pk=row.pk).update(**fields)
        row.refresh_from_db()
    return row


def client_answering(answer: Any, requests: list[httpx.Request]) -> httpx.AsyncClient:
    """An httpx client whose transport answers `answer`: (status, JSON body), an
    httpx.Response, or an exception to raise."""

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        status, body = answer
        return httpx.Response(status, json=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handle))


def seconds_ago(seconds: float) -> Any:
    return timezone.now() - timedelta(seconds=seconds)


def unsaved_instance(**overrides: Any) -> InstanceConfig:
    """A tenant that never touches the database, for the HTTP clients' tests."""
    return InstanceConfig(**instance_fields(**overrides))
