"""Processing a claimed message against a mocked agent and Evolution.

The ORM runs in asgiref's executor thread, hence transaction=True (see conftest).
"""

import asyncio
import json
import os
import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from instances.models import DEFAULT_FALLBACK_MESSAGE, InstanceConfig
from tests.webhooks.conftest import AGENT_REPLY, PHONE, Upstream, queue_message
from webhooks.db import run_db
from webhooks.models import Conversation, InboundMessage, Status
from webhooks.processing import NO_TARGET, handle_batch
from webhooks.transitions import Batch, claim_conversations

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

FIXTURE_APIKEY = "B6D9E2A4-1F3C-4E8A-9C7B-2D5E8F0A1B3C"


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


async def queue(instance: InstanceConfig, **fields: Any) -> InboundMessage:
    return await sync_to_async(queue_message)(instance, **fields)


async def claim_one() -> Batch:
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    return batch


async def process(upstream: Upstream) -> InboundMessage:
    """Claim the one due chat, handle its one message, and return the stored row."""
    batch = await claim_one()
    [message] = batch.messages
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    return await InboundMessage.objects.aget(pk=message.pk)


async def due_again_now(row: InboundMessage) -> None:
    """Skip a retry's backoff."""
    now = timezone.now()
    await InboundMessage.objects.filter(pk=row.pk).aupdate(next_attempt_at=now)
    await Conversation.objects.filter(chat_jid=row.chat_jid).aupdate(due_at=now)


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


async def test_a_reply_is_sent_and_the_row_records_the_exchange(acme, upstream) -> None:
    queued = await queue(acme)
    before = timezone.now()

    row = await process(upstream)

    [agent_call] = upstream.agent_calls
    assert agent_call.url == "http://agent.acme.test/api/v1/agent/acme_agent/run"
    assert agent_call.headers["x-api-key"] == "acme-agent-key"
    assert body_of(agent_call)["channel_payload"] == queued.payload
    [sent] = upstream.sent
    assert sent.url == "http://evolution.acme.test/message/sendText/acme-wa"
    assert sent.headers["apikey"] == "acme-evolution-key"
    assert body_of(sent) == {"number": PHONE, "text": AGENT_REPLY}

    assert row.status == Status.REPLIED
    assert row.reply_text == AGENT_REPLY
    assert row.agent_response == {"message": AGENT_REPLY, "success": True}
    assert row.agent_request == {
        k: v for k, v in body_of(agent_call).items() if k != "channel_payload"
    }
    assert (row.agent_attempts, row.send_attempts, row.attempts) == (1, 1, 1)
    assert before <= row.agent_started_at <= row.agent_finished_at <= row.sent_at
    assert row.finished_at >= row.sent_at
    assert (row.claim_token, row.lease_until, row.last_error) == ("", None, "")
    assert row.used_fallback is False


async def test_the_legacy_instance_replies_through_the_delivering_server_and_forgets_its_key(
    make_instance, upstream
) -> None:
    legacy = await sync_to_async(make_instance)(
        name="default",
        is_default=True,
        legacy_mode=True,
        evolution_url="",
        evolution_key="",
        whatsapp_instance="",
    )
    queued = await queue(legacy)
    assert queued.reply_api_key == FIXTURE_APIKEY

    row = await process(upstream)

    [sent] = upstream.sent
    assert sent.url == "https://evolution.example.com/message/sendText/tenant-acme-01"
    assert sent.headers["apikey"] == FIXTURE_APIKEY
    assert row.status == Status.REPLIED
    assert row.reply_api_key == ""


async def test_a_legacy_message_with_nowhere_to_reply_is_never_sent_to_the_agent(
    make_instance, upstream
) -> None:
    legacy = await sync_to_async(make_instance)(
        name="default", is_default=True, legacy_mode=True, evolution_url="", evolution_key=""
    )
    # Stored before its reply server was known (the pin came later, or was cleared).
    await queue(legacy, reply_server_url="")

    row = await process(upstream)

    assert row.status == Status.FAILED
    assert row.last_error == NO_TARGET
    assert row.reply_api_key == ""
    # Its answer could never reach the user: the agent's session must not hold it.
    assert upstream.agent_calls == []
    assert upstream.sent == []


async def test_an_agent_failure_worth_retrying_requeues_the_message(acme, upstream) -> None:
    await queue(acme)
    upstream.agent = (503, {"detail": "overloaded"})

    row = await process(upstream)

    assert row.status == Status.QUEUED
    assert row.next_attempt_at > timezone.now()
    assert row.agent_attempts == 1
    assert "503" in row.last_error
    assert row.reply_text is None
    assert (row.claim_token, row.lease_until, row.finished_at) == ("", None, None)
    assert upstream.sent == []


async def test_the_last_agent_attempt_sends_the_fallback(acme, upstream) -> None:
    await queue(acme, agent_attempts=settings.AGENT_MAX_ATTEMPTS - 1)
    upstream.agent = (503, {"detail": "overloaded"})

    row = await process(upstream)

    [sent] = upstream.sent
    assert body_of(sent) == {"number": PHONE, "text": DEFAULT_FALLBACK_MESSAGE}
    assert row.status == Status.REPLIED
    assert row.used_fallback is True
    assert row.reply_text == DEFAULT_FALLBACK_MESSAGE
    assert row.agent_attempts == settings.AGENT_MAX_ATTEMPTS
    assert "503" in row.last_error
    assert row.sent_at is not None


async def test_an_agent_failure_not_worth_retrying_sends_the_fallback_at_once(
    make_instance, upstream
) -> None:
    instance = await sync_to_async(make_instance)(fallback_message="Volto já!")
    await queue(instance)
    upstream.agent = httpx.ReadTimeout("no answer")

    row = await process(upstream)

    assert [body_of(r)["text"] for r in upstream.sent] == ["Volto já!"]
    assert (row.status, row.used_fallback, row.agent_attempts) == (Status.REPLIED, True, 1)


async def test_without_a_fallback_a_failed_agent_fails_the_message(make_instance, upstream) -> None:
    instance = await sync_to_async(make_instance)(fallback_message="")
    await queue(instance)
    upstream.agent = (500, {"detail": "crashed"})

    row = await process(upstream)

    assert row.status == Status.FAILED
    assert row.finished_at is not None
    assert "crashed" in row.last_error
    assert row.used_fallback is False
    assert upstream.sent == []


@pytest.mark.parametrize("reply", ["", "   ", "AUTOMAGIK:ticket created"])
async def test_a_blank_or_silent_reply_is_kept_but_not_sent(acme, upstream, reply: str) -> None:
    await queue(acme)
    upstream.agent = (200, {"message": reply})

    row = await process(upstream)

    assert row.status == Status.REPLIED
    assert row.reply_text == ""
    assert row.agent_response == {"message": reply}
    assert row.sent_at is None
    assert upstream.sent == []


async def test_a_stored_reply_is_sent_again_without_asking_the_agent_again(acme, upstream) -> None:
    await queue(acme)
    upstream.evolution = (503, {"error": "Service Unavailable"})

    first = await process(upstream)

    assert first.status == Status.QUEUED
    assert first.reply_text == AGENT_REPLY
    assert first.send_attempts == 1
    assert first.first_send_failed_at is not None
    await due_again_now(first)
    upstream.evolution = (201, {})

    second = await process(upstream)

    assert len(upstream.agent_calls) == 1
    assert [body_of(r)["text"] for r in upstream.sent] == [AGENT_REPLY, AGENT_REPLY]
    assert second.status == Status.REPLIED
    assert (second.agent_attempts, second.send_attempts, second.attempts) == (1, 2, 2)
    assert second.first_send_failed_at == first.first_send_failed_at


@pytest.mark.parametrize("status", [400, 404])
async def test_an_evolution_client_error_fails_the_message(acme, upstream, status: int) -> None:
    await queue(acme)
    upstream.evolution = (status, {"response": {"message": ["exists: false"]}})

    row = await process(upstream)

    assert row.status == Status.FAILED
    assert "exists: false" in row.last_error
    assert row.send_attempts == 1
    assert row.reply_text == AGENT_REPLY
    assert row.finished_at is not None


async def test_an_evolution_server_error_past_the_retry_window_fails_the_message(
    acme, upstream
) -> None:
    window = timedelta(seconds=settings.EVOLUTION_RETRY_WINDOW)
    await queue(
        acme,
        reply_text="Já respondido.",
        send_attempts=5,
        first_send_failed_at=timezone.now() - window - timedelta(seconds=1),
    )
    upstream.evolution = (503, {"error": "Service Unavailable"})

    row = await process(upstream)

    assert upstream.agent_calls == []
    assert len(upstream.sent) == 1
    assert row.status == Status.FAILED
    assert row.send_attempts == 6
    assert "503" in row.last_error


async def test_an_evolution_server_error_within_the_window_is_retried(acme, upstream) -> None:
    await queue(acme, reply_text="Já respondido.")
    upstream.evolution = httpx.ConnectError("refused")

    row = await process(upstream)

    assert row.status == Status.QUEUED
    assert row.next_attempt_at > timezone.now()
    assert row.send_attempts == 1


async def test_an_evolution_read_timeout_is_not_retried(acme, upstream) -> None:
    await queue(acme)
    upstream.evolution = httpx.ReadTimeout("no answer")

    row = await process(upstream)

    assert row.status == Status.FAILED
    assert len(upstream.sent) == 1


async def test_a_worker_that_lost_its_claim_cannot_overwrite_the_row(acme, upstream) -> None:
    await queue(acme)
    batch = await claim_one()
    [message] = batch.messages
    # Another worker took the chat over after this one's lease expired.
    await InboundMessage.objects.filter(pk=message.pk).aupdate(claim_token="other-worker")
    await Conversation.objects.aupdate(claim_token="other-worker")

    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)

    row = await InboundMessage.objects.aget(pk=message.pk)
    assert row.status == Status.PROCESSING
    assert row.claim_token == "other-worker"
    assert (row.reply_text, row.agent_response, row.finished_at) == (None, None, None)
    assert row.agent_attempts == 0
    assert upstream.sent == []


async def test_a_worker_that_lost_its_claim_cannot_finish_a_send(acme, upstream) -> None:
    await queue(acme, reply_text="Já respondido.")
    batch = await claim_one()
    [message] = batch.messages
    await InboundMessage.objects.filter(pk=message.pk).aupdate(
        status=Status.REPLIED, claim_token=""
    )
    upstream.evolution = (400, {"error": "bad"})

    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)

    row = await InboundMessage.objects.aget(pk=message.pk)
    assert row.status == Status.REPLIED
    assert row.last_error == ""


async def test_typing_is_shown_while_a_slow_agent_works(acme, upstream, settings) -> None:
    settings.TYPING_AFTER = 0.05

    async def slow(request: httpx.Request) -> tuple[int, Any]:
        await asyncio.sleep(0.3)
        return 200, {"message": AGENT_REPLY}

    upstream.agent = slow
    await queue(acme)

    row = await process(upstream)

    [presence] = upstream.calls("/chat/sendPresence/")
    assert presence.url == "http://evolution.acme.test/chat/sendPresence/acme-wa"
    assert presence.headers["apikey"] == "acme-evolution-key"
    assert body_of(presence) == {"number": PHONE, "presence": "composing", "delay": 5000}
    assert upstream.requests.index(presence) < upstream.requests.index(upstream.sent[0])
    assert row.status == Status.REPLIED


async def test_no_typing_is_shown_for_a_reply_that_comes_at_once(acme, upstream, settings) -> None:
    settings.TYPING_AFTER = 0.5
    await queue(acme)

    row = await process(upstream)
    await asyncio.sleep(0.6)

    assert upstream.calls("/chat/sendPresence/") == []
    assert row.status == Status.REPLIED


async def test_an_agent_that_trickles_its_answer_past_its_timeout_is_cut_off(
    make_instance, upstream
) -> None:
    # The per-read timeout never fires for an agent sending a byte a second;
    # the call's total deadline does (and the chat's lease outlasts it).
    acme = await sync_to_async(make_instance)(agent_timeout=1, fallback_message="")

    async def trickle(request: httpx.Request) -> tuple[int, Any]:
        await asyncio.sleep(1.5)
        return 200, {"message": AGENT_REPLY}

    upstream.agent = trickle
    await queue(acme)

    row = await process(upstream)

    assert row.status == Status.FAILED
    assert "timed out: no complete answer within 1s" in row.last_error
    assert upstream.sent == []


async def test_its_database_calls_run_where_this_pass_says() -> None:
    thread = await run_db(lambda: threading.current_thread().name)

    # make test's pipeline pass (TEST_GROUP_COMMIT=true) is production's path:
    # the group committer's one database thread, not the test's own.
    if os.environ.get("TEST_GROUP_COMMIT") == "true":
        assert thread.startswith("omnihub-db")
    else:
        assert not thread.startswith("omnihub-db")
