"""The memory the hub keeps for openai agents: the worker reads the session's
earlier exchanges from the stored rows (webhooks/agent_history.py)."""

import json
from datetime import timedelta
from itertools import count
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from instances.models import InstanceConfig
from tests.e2e.harness import text_delivery
from tests.webhooks.conftest import Upstream
from webhooks import transitions
from webhooks.agent_history import history_rows
from webhooks.ingest import record_delivery
from webhooks.models import Conversation, InboundMessage, Status
from webhooks.processing import handle_batch

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

PHONE = "5511987654321"
_ids = count()


class ChatServer(Upstream):
    """An OpenAI-compatible server answering "answer N" to its Nth request."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            self.requests.append(request)
            content = f"answer {len(self.completions)}"
            return httpx.Response(200, json={"choices": [{"message": {"content": content}}]})
        return await super().handle(request)

    @property
    def completions(self) -> list[dict[str, Any]]:
        calls = self.calls("/chat/completions")
        return [json.loads(r.content)["messages"] for r in calls]


@pytest.fixture
def bot(make_instance) -> InstanceConfig:
    return make_instance(
        agent_kind="openai",
        agent_api_url="http://llm.acme.test/v1",
        agent_api_key="",
        system_prompt="Be brief.",
        history_limit=4,
    )


async def say(instance: InstanceConfig, server: ChatServer, *texts: str) -> None:
    """Each text delivered and answered in turn."""
    async with server.client() as http:
        for text in texts:
            body = text_delivery(message_id=f"H{next(_ids):06d}", text=text, phone=PHONE)
            await sync_to_async(record_delivery)(instance=instance, body=body)
            for batch in await sync_to_async(transitions.claim_conversations)(limit=10):
                await handle_batch(batch=batch, http=http)


def contents(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages]


async def test_it_sends_the_system_prompt_and_the_sessions_earlier_exchanges(bot) -> None:
    server = ChatServer()

    await say(bot, server, "oi", "preço?")

    first, second = server.completions
    assert first == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "oi"},
    ]
    assert contents(second) == ["Be brief.", "oi", "answer 1", "preço?"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]


async def test_the_history_limit_drops_the_oldest_messages_first(bot) -> None:
    server = ChatServer()

    await say(bot, server, "one", "two", "three", "four")

    assert contents(server.completions[-1]) == [
        "Be brief.",
        "two",
        "answer 2",
        "three",
        "answer 3",
        "four",
    ]


async def test_a_reset_starts_the_history_empty(bot) -> None:
    server = ChatServer()

    await say(bot, server, "one", "/reset", "two")

    assert contents(server.completions[-1]) == ["Be brief.", "two"]


async def test_an_idle_expiry_starts_the_history_empty(bot) -> None:
    bot.session_idle_minutes = 5
    await bot.asave(update_fields=["session_idle_minutes"])
    server = ChatServer()
    await say(bot, server, "one")
    await Conversation.objects.aupdate(last_message_at=timezone.now() - timedelta(minutes=10))

    await say(bot, server, "two")

    assert contents(server.completions[-1]) == ["Be brief.", "two"]


async def test_the_fallback_is_not_remembered_as_the_agents_answer(bot) -> None:
    server = ChatServer()
    await say(bot, server, "one")
    await InboundMessage.objects.aupdate(used_fallback=True)

    await say(bot, server, "two")

    assert contents(server.completions[-1]) == ["Be brief.", "one", "two"]


async def test_a_failed_call_is_not_in_the_history(bot) -> None:
    server = ChatServer()
    await say(bot, server, "one")
    await InboundMessage.objects.aupdate(reply_text=None, status=Status.FAILED)

    await say(bot, server, "two")

    assert contents(server.completions[-1]) == ["Be brief.", "two"]


async def test_the_history_query_walks_the_session_index(bot) -> None:
    """The read's cost is the limit, whatever the size of the chat or the inbox."""
    query = history_rows(
        instance_id=bot.pk,
        chat_jid=f"{PHONE}@s.whatsapp.net",
        session="s",
        answering_pk=1,
        limit=20,
    )

    def explain() -> str:
        if connection.vendor != "postgresql":
            return query.explain()
        # An empty table is read sequentially; force the plan it has once it is not.
        with connection.cursor() as cursor:
            cursor.execute("SET enable_seqscan = off")
            try:
                return query.explain()
            finally:
                cursor.execute("RESET enable_seqscan")

    plan = await sync_to_async(explain)()

    assert "webhooks_session_history" in plan, plan
