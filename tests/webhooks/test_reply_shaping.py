"""Replies shaped like a person's: split on blank lines, media links as media,
"typing..." before each part, and quotes (the worker against mocked servers)."""

import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from instances.models import InstanceConfig
from tests.webhooks.conftest import PHONE, Upstream, message_body, queue_message
from webhooks.models import Conversation, InboundMessage, OutboundMessage, OutboundStatus, Status
from webhooks.processing import handle_batch
from webhooks.transitions import claim_conversations

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True), pytest.mark.pipeline]

THREE_PARAGRAPHS = "Olá, Maria!\n\nTemos dois planos.\n\nQual prefere?"


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


def sends(upstream: Upstream) -> list[httpx.Request]:
    return [r for r in upstream.requests if r.url.path.startswith("/message/send")]


@pytest.fixture
def answer_with(make_instance, upstream) -> Callable[..., Awaitable[InstanceConfig]]:
    """An instance with these fields whose agent answers `reply`."""

    async def make(reply: str, **fields: Any) -> InstanceConfig:
        upstream.agent = (200, {"message": reply, "success": True})
        return await sync_to_async(make_instance)(**fields)

    return make


async def run_chat(upstream: Upstream, instance: InstanceConfig, **body: Any) -> InboundMessage:
    """Queue one message, claim its chat and handle it; the stored row."""
    row = await sync_to_async(queue_message)(instance, message_body(**body))
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    return await InboundMessage.objects.aget(pk=row.pk)


async def outbound_rows(row: InboundMessage) -> list[tuple[str, str, str]]:
    rows = OutboundMessage.objects.filter(in_reply_to=row).order_by("id")
    return [(o.text, o.status, o.evolution_id) async for o in rows]


def numbered_keys(*, fail: dict[int, tuple[int, Any]] | None = None) -> Any:
    """Evolution answering each send with its own key id; `fail` maps the n-th send
    (1-based) to the answer it gets instead."""
    counter = itertools.count(1)

    async def answer(request: httpx.Request) -> tuple[int, Any]:
        n = next(counter)
        if fail and n in fail:
            return fail[n]
        return 201, {"key": {"id": f"3EB0PART{n}"}, "status": "PENDING"}

    return answer


async def test_a_split_reply_goes_as_one_send_text_per_paragraph_in_order(
    upstream, answer_with
) -> None:
    instance = await answer_with(THREE_PARAGRAPHS, split_replies=True)
    upstream.evolution = numbered_keys()

    row = await run_chat(upstream, instance)

    assert [body_of(r)["text"] for r in sends(upstream)] == [
        "Olá, Maria!",
        "Temos dois planos.",
        "Qual prefere?",
    ]
    assert row.status == Status.REPLIED and row.send_attempts == 3
    # Each part is recorded with its own id: its echo is the hub's, not a human's.
    assert await outbound_rows(row) == [
        ("Olá, Maria!", OutboundStatus.SENT, "3EB0PART1"),
        ("Temos dois planos.", OutboundStatus.SENT, "3EB0PART2"),
        ("Qual prefere?", OutboundStatus.SENT, "3EB0PART3"),
    ]


async def test_split_off_sends_the_paragraphs_as_one_message(upstream, answer_with) -> None:
    instance = await answer_with(THREE_PARAGRAPHS)

    await run_chat(upstream, instance)

    assert [body_of(r)["text"] for r in sends(upstream)] == [THREE_PARAGRAPHS]


async def test_a_part_failing_for_good_stops_the_rest_and_is_recorded(
    upstream, answer_with
) -> None:
    instance = await answer_with(THREE_PARAGRAPHS, split_replies=True)
    upstream.evolution = numbered_keys(fail={2: (400, {"response": {"message": ["bad"]}})})

    row = await run_chat(upstream, instance)

    assert len(sends(upstream)) == 2
    assert row.status == Status.FAILED
    assert row.last_error.startswith("part 2 of 3: ")
    assert [status for _, status, _ in await outbound_rows(row)] == [
        OutboundStatus.SENT,
        OutboundStatus.FAILED,
    ]


async def test_a_part_retried_later_does_not_send_the_parts_before_it_again(
    upstream, answer_with
) -> None:
    instance = await answer_with(THREE_PARAGRAPHS, split_replies=True)
    upstream.evolution = numbered_keys(fail={2: (503, {"error": "Service Unavailable"})})
    row = await run_chat(upstream, instance)
    assert row.status == Status.QUEUED

    now = timezone.now()
    await InboundMessage.objects.filter(pk=row.pk).aupdate(next_attempt_at=now)
    await Conversation.objects.filter(chat_jid=row.chat_jid).aupdate(due_at=now)
    [batch] = await sync_to_async(claim_conversations)(limit=10)
    async with upstream.client() as http:
        await handle_batch(batch=batch, http=http)
    row = await InboundMessage.objects.aget(pk=row.pk)

    assert [body_of(r)["text"] for r in sends(upstream)] == [
        "Olá, Maria!",
        "Temos dois planos.",
        "Temos dois planos.",
        "Qual prefere?",
    ]
    assert row.status == Status.REPLIED
    assert len(upstream.agent_calls) == 1


async def test_a_markdown_image_goes_as_send_media_between_the_texts_around_it(
    upstream, answer_with
) -> None:
    reply = "Aqui está:\n![Catálogo](https://cdn.example.com/catalogo.jpg)\nGostou?"
    instance = await answer_with(reply)
    upstream.evolution = numbered_keys()

    row = await run_chat(upstream, instance)

    first, media, last = sends(upstream)
    assert first.url.path == "/message/sendText/acme-wa"
    assert body_of(first) == {"number": PHONE, "text": "Aqui está:"}
    assert media.url.path == "/message/sendMedia/acme-wa"
    assert media.headers["apikey"] == "acme-evolution-key"
    assert body_of(media) == {
        "number": PHONE,
        "mediatype": "image",
        "mimetype": "image/jpeg",
        "media": "https://cdn.example.com/catalogo.jpg",
        "fileName": "catalogo.jpg",
        "caption": "Catálogo",
    }
    assert body_of(last)["text"] == "Gostou?"
    assert row.status == Status.REPLIED


async def test_send_media_links_off_sends_the_markdown_as_text(upstream, answer_with) -> None:
    reply = "![Catálogo](https://cdn.example.com/catalogo.jpg)"
    instance = await answer_with(reply, send_media_links=False)

    await run_chat(upstream, instance)

    [sent] = sends(upstream)
    assert sent.url.path.startswith("/message/sendText/") and body_of(sent)["text"] == reply


async def test_typing_is_evolutions_delay_on_each_part_from_its_length(
    upstream, answer_with
) -> None:
    instance = await answer_with("Oi!\n\n" + "x" * 100, split_replies=True, typing_ms_per_char=30)

    await run_chat(upstream, instance)

    assert [body_of(r)["delay"] for r in sends(upstream)] == [1000, 3000]


async def test_quote_replies_quotes_the_answered_message_in_a_one_to_one_chat(
    upstream, answer_with
) -> None:
    instance = await answer_with(THREE_PARAGRAPHS, quote_replies=True)

    row = await run_chat(upstream, instance)

    [sent] = sends(upstream)
    assert body_of(sent)["quoted"] == {
        "key": {"id": row.message_id, "remoteJid": row.chat_jid, "fromMe": False},
        "message": {"conversation": row.text},
    }


async def test_only_the_first_part_of_a_split_reply_quotes(upstream, answer_with) -> None:
    instance = await answer_with(THREE_PARAGRAPHS, quote_replies=True, split_replies=True)

    await run_chat(upstream, instance)

    assert ["quoted" in body_of(r) for r in sends(upstream)] == [True, False, False]


async def test_a_quote_evolution_refuses_is_sent_once_without_it(upstream, answer_with) -> None:
    instance = await answer_with("Claro!", quote_replies=True)
    upstream.evolution = numbered_keys(fail={1: (400, {"response": {"message": ["quoted"]}})})

    row = await run_chat(upstream, instance)

    quoted, plain = sends(upstream)
    assert "quoted" in body_of(quoted) and "quoted" not in body_of(plain)
    assert body_of(plain)["text"] == "Claro!"
    assert row.status == Status.REPLIED


async def test_without_quote_replies_a_one_to_one_reply_quotes_nothing(
    upstream, answer_with
) -> None:
    instance = await answer_with("Claro!")

    await run_chat(upstream, instance)

    [sent] = sends(upstream)
    assert "quoted" not in body_of(sent)
