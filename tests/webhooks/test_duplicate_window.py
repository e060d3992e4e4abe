"""A reply whose earlier attempt may have reached Evolution: findMessages is asked
before it is sent again (the duplicate window), against a mocked Evolution.

The ORM runs in asgiref's executor thread, hence transaction=True (see conftest).
"""

import json
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances.models import InstanceConfig
from tests.webhooks.conftest import PHONE, Upstream, found_page, queue_message
from webhooks.duplicates import NO_MESSAGES_KEPT
from webhooks.models import Conversation, InboundMessage, OutboundMessage, OutboundStatus, Status
from webhooks.processing import handle_batch
from webhooks.transitions import claim_conversations

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

REPLY = "Já respondido."
CHAT = f"{PHONE}@s.whatsapp.net"
# The fixture's message id (messages-upsert-text.json).
ANSWERED_ID = "E8404E2E2C1B45956611886A03486718"


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


def stored(
    *,
    key_id: str,
    text: str = REPLY,
    from_me: bool = True,
    remote_jid: str = CHAT,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A record of findMessages' answer, as Evolution 2.3.7 selects it."""
    return {
        "id": f"row-{key_id}",
        "key": {"remoteJid": remote_jid, "fromMe": from_me, "id": key_id},
        "pushName": "Você",
        "messageType": "conversation",
        "message": {"conversation": text},
        "messageTimestamp": int(time.time()) if timestamp is None else timestamp,
        "instanceId": "6f1c2b7e-9a4d-4c51-8e2f-3b0d5a7c9e11",
        "source": "web",
        "contextInfo": None,
        "MessageUpdate": [],
    }


def evolution_keeping(records: list[dict[str, Any]]) -> Any:
    """findMessages over these stored messages, filtered on key.* as Evolution does."""

    async def answer(request: httpx.Request) -> tuple[int, Any]:
        key = json.loads(request.content)["where"].get("key", {})
        found = [
            r
            for r in records
            if all(r["key"][name] == key[name] for name in ("id", "remoteJid") if name in key)
            and (not key.get("fromMe") or r["key"]["fromMe"])
        ]
        return 200, found_page(found)

    return answer


async def handled_again(
    instance: InstanceConfig, upstream: Upstream, *, outbound_status: str = OutboundStatus.SENDING
) -> tuple[InboundMessage, OutboundMessage]:
    """A reply whose first attempt was cut short (its row left `outbound_status`),
    claimed again and handled: the message row and that first attempt's row."""

    def prepare() -> tuple[InboundMessage, OutboundMessage]:
        message = queue_message(instance, reply_text=REPLY, attempts=1)
        earlier = OutboundMessage.objects.create(
            instance=instance,
            chat_jid=message.chat_jid,
            text=REPLY,
            in_reply_to=message,
            status=outbound_status,
        )
        OutboundMessage.objects.filter(pk=earlier.pk).update(
            created_at=timezone.now() - timedelta(seconds=10)
        )
        return message, earlier

    message, earlier = await sync_to_async(prepare)()
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    return (
        await InboundMessage.objects.aget(pk=message.pk),
        await OutboundMessage.objects.aget(pk=earlier.pk),
    )


async def handled_after_a_cut_send(
    instance: InstanceConfig, upstream: Upstream
) -> tuple[InboundMessage, list[OutboundMessage]]:
    """A reply whose worker died during its sendText: the send is noted on the
    message only (its row is written with the outcome), claimed again and
    handled. The message row and the reply's outbound rows."""

    def prepare() -> InboundMessage:
        message = queue_message(instance, reply_text=REPLY, attempts=1)
        InboundMessage.objects.filter(pk=message.pk).update(
            sending_text=REPLY, send_started_at=timezone.now() - timedelta(seconds=10)
        )
        return message

    message = await sync_to_async(prepare)()
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    sent = [o async for o in OutboundMessage.objects.filter(in_reply_to=message).order_by("id")]
    return await InboundMessage.objects.aget(pk=message.pk), sent


async def test_a_send_cut_short_is_not_sent_again_when_evolution_has_it(acme, upstream) -> None:
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0SENT")])

    row, [earlier] = await handled_after_a_cut_send(acme, upstream)

    assert upstream.sent == []
    assert row.status == Status.REPLIED
    assert (row.sending_text, row.send_started_at) == (None, None)
    assert (earlier.status, earlier.evolution_id, earlier.text) == (
        OutboundStatus.SENT,
        "3EB0SENT",
        REPLY,
    )
    # Evolution was asked about the messages around the attempt's own time.
    [query] = bodies(upstream.finds)
    assert query["where"]["key"] == {"remoteJid": CHAT, "fromMe": True}
    assert timezone.now() - earlier.created_at >= timedelta(seconds=10)


async def test_a_send_cut_short_goes_once_when_evolution_does_not_have_it(
    acme, upstream
) -> None:
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0OTHER", text="Outra coisa")])

    row, [earlier, again] = await handled_after_a_cut_send(acme, upstream)

    assert [json.loads(r.content)["text"] for r in upstream.sent] == [REPLY]
    assert row.status == Status.REPLIED and row.sending_text is None
    assert earlier.status == OutboundStatus.FAILED
    assert (again.status, again.evolution_id) == (OutboundStatus.SENT, "3EB0")


def bodies(requests: list[httpx.Request]) -> list[Any]:
    return [json.loads(r.content) for r in requests]


async def test_it_does_not_send_again_when_evolution_has_it(acme, upstream) -> None:
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0SENT")])

    row, earlier = await handled_again(acme, upstream)

    assert upstream.sent == []
    assert upstream.agent_calls == []
    assert row.status == Status.REPLIED
    assert row.sent_at is not None
    assert row.send_attempts == 1  # the attempt that died mid-send
    assert (earlier.status, earlier.evolution_id) == (OutboundStatus.SENT, "3EB0SENT")
    [query] = bodies(upstream.finds)
    assert query["where"]["key"] == {"remoteJid": CHAT, "fromMe": True}
    span = query["where"]["messageTimestamp"]
    # Dates as JavaScript parses them, around the attempt (with clock slack).
    assert span["gte"].endswith("Z") and span["lte"].endswith("Z")
    assert span["gte"] < timezone.now().strftime("%Y-%m-%dT%H:%M:%S") < span["lte"]


async def test_it_sends_once_when_evolution_does_not_have_it(acme, upstream) -> None:
    # The chat holds another of the hub's messages, not this reply.
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0OTHER", text="Outra coisa")])

    row, earlier = await handled_again(acme, upstream)

    assert [json.loads(r.content)["text"] for r in upstream.sent] == [REPLY]
    assert row.status == Status.REPLIED
    assert earlier.status == OutboundStatus.FAILED
    assert "not among Evolution's messages" in earlier.error
    new = await OutboundMessage.objects.exclude(pk=earlier.pk).aget()
    assert (new.status, new.evolution_id) == (OutboundStatus.SENT, "3EB0")


async def test_it_sends_once_when_the_chat_is_empty_but_evolution_keeps_messages(
    acme, upstream
) -> None:
    # No message of the hub's in the chat; the message being answered is kept.
    incoming = stored(key_id=ANSWERED_ID, text="Qual o horário?", from_me=False)
    upstream.find_messages = evolution_keeping([incoming])

    row, earlier = await handled_again(acme, upstream)

    assert len(upstream.sent) == 1
    assert earlier.status == OutboundStatus.FAILED
    assert row.status == Status.REPLIED and row.last_error == ""
    assert [q["where"].get("key") for q in bodies(upstream.finds)] == [
        {"remoteJid": CHAT, "fromMe": True},
        {"id": ANSWERED_ID},
    ]


async def test_it_sends_again_and_says_so_when_evolution_keeps_no_messages(acme, upstream) -> None:
    upstream.find_messages = (200, found_page([]))

    row, earlier = await handled_again(acme, upstream)

    assert len(upstream.sent) == 1
    assert row.status == Status.REPLIED
    assert row.last_error == NO_MESSAGES_KEPT
    # It may have gone out before: the first attempt stays unconfirmed, and says why.
    assert (earlier.status, earlier.error) == (OutboundStatus.UNCONFIRMED, NO_MESSAGES_KEPT)


async def test_an_identical_reply_already_recorded_is_not_taken_for_this_one(
    acme, upstream
) -> None:
    # The agent gave the same answer a moment ago, to the chat's previous message.
    await OutboundMessage.objects.acreate(
        instance=acme, chat_jid=CHAT, text=REPLY, evolution_id="3EB0BEFORE", status="sent"
    )
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0BEFORE")])

    row, earlier = await handled_again(acme, upstream)

    assert len(upstream.sent) == 1
    assert row.status == Status.REPLIED
    assert earlier.status == OutboundStatus.FAILED


async def test_an_older_message_with_the_same_text_is_not_taken_for_this_one(
    acme, upstream
) -> None:
    # A server that ignored the time filter: the record is from long before the attempt.
    old = stored(key_id="3EB0OLD", timestamp=int(time.time()) - 3600)
    upstream.find_messages = evolution_keeping([old])

    row, _ = await handled_again(acme, upstream)

    assert len(upstream.sent) == 1
    assert row.status == Status.REPLIED


async def test_when_findmessages_fails_the_reply_waits_and_is_not_sent(acme, upstream) -> None:
    upstream.find_messages = (503, {"error": "Service Unavailable"})

    row, earlier = await handled_again(acme, upstream)

    assert upstream.sent == []
    assert row.status == Status.QUEUED
    assert row.next_attempt_at > timezone.now()
    assert "could not ask Evolution whether the reply was sent" in row.last_error
    assert earlier.status == OutboundStatus.SENDING  # asked again on the retry


async def test_an_answer_evolution_cannot_give_falls_back_to_sending_again(acme, upstream) -> None:
    upstream.find_messages = (400, {"response": {"message": ["where must be object"]}})

    row, earlier = await handled_again(acme, upstream)

    assert len(upstream.sent) == 1
    assert row.status == Status.REPLIED
    assert "may be a duplicate" in row.last_error
    assert earlier.status == OutboundStatus.UNCONFIRMED


async def test_a_dropped_connection_is_asked_about_before_its_retry(acme, upstream) -> None:
    await sync_to_async(queue_message)(acme)
    upstream.evolution = httpx.RemoteProtocolError("Server disconnected")
    upstream.find_messages = evolution_keeping([stored(key_id="3EB0WENT", text=REPLY)])

    [batch] = await sync_to_async(claim_conversations)(limit=10)
    [message] = batch.messages
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    first = await InboundMessage.objects.aget(pk=message.pk)
    assert first.status == Status.QUEUED  # retried, as before
    [attempt] = [o async for o in OutboundMessage.objects.all()]
    assert attempt.status == OutboundStatus.UNCONFIRMED
    assert upstream.finds == []

    # The agent's reply is what the dropped attempt sent.
    await InboundMessage.objects.filter(pk=message.pk).aupdate(
        reply_text=REPLY, next_attempt_at=timezone.now()
    )
    await Conversation.objects.aupdate(due_at=timezone.now())
    upstream.evolution = (201, {"key": {"id": "3EB0TWICE"}})
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)

    row = await InboundMessage.objects.aget(pk=message.pk)
    assert row.status == Status.REPLIED
    assert len(upstream.sent) == 1  # only the dropped attempt
    await attempt.arefresh_from_db()
    assert (attempt.status, attempt.evolution_id) == (OutboundStatus.SENT, "3EB0WENT")


async def test_a_reply_sent_at_the_first_attempt_costs_no_findmessages_call(acme, upstream) -> None:
    await sync_to_async(queue_message)(acme)
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)

    assert len(upstream.sent) == 1
    assert upstream.finds == []


async def test_a_send_refused_by_evolution_is_retried_without_asking(acme, upstream) -> None:
    # A 5xx is an answer: nothing went out, the retry needs no question.
    upstream.evolution = (503, {"error": "Service Unavailable"})
    row, earlier = await handled_again(acme, upstream, outbound_status=OutboundStatus.FAILED)

    assert upstream.finds == []
    assert len(upstream.sent) == 1
    assert row.status == Status.QUEUED
    assert earlier.status == OutboundStatus.FAILED
