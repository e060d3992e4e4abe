"""The webhook kind: the message as documented JSON to a workflow (n8n, Make, Flowise...)."""

import json
from typing import Any

import httpx
import pytest

from instances.clients.http import OutboundError
from tests.instances.agents.conftest import ask, call_for, check
from tests.webhooks.conftest import PHONE, message_body

pytestmark = pytest.mark.asyncio

WEBHOOK = {"agent_kind": "webhook", "agent_api_url": "http://n8n.acme.test/webhook/abc?x=1"}


async def webhook(answer: Any = (200, {"output": "Olá!"}), *, body: Any = None, **fields: Any):
    call = call_for(body or message_body(), conversation_id=7)
    return await ask(answer, call=call, **{**WEBHOOK, **fields})


async def test_it_posts_the_documented_body_to_the_url_with_a_bearer_key() -> None:
    reply, [request] = await webhook()

    assert str(request.url) == "http://n8n.acme.test/webhook/abc?x=1"
    assert request.headers["authorization"] == "Bearer acme-agent-key"
    body = json.loads(request.content)
    assert body == {
        "instance": "acme",
        "message_id": body["message_id"],
        "chat_jid": f"{PHONE}@s.whatsapp.net",
        "phone": PHONE,
        "name": "Maria Souza",
        "is_group": False,
        "group_jid": None,
        "sender_jid": body["sender_jid"],
        "message_type": "text",
        "text": "Olá! Qual o horário de atendimento?",
        "media": None,
        "session_id": "acme_5511987654321",
        "conversation_id": 7,
        "timestamp": body["timestamp"],
    }
    assert body["message_id"] and isinstance(body["timestamp"], int)
    assert reply.text == "Olá!"


async def test_it_sends_no_authorization_header_when_the_key_is_blank() -> None:
    _, [request] = await webhook(agent_api_key="")

    assert "authorization" not in request.headers


async def test_a_group_message_names_its_group() -> None:
    _, [request] = await webhook(body=message_body("messages-upsert-group.json"))

    body = json.loads(request.content)
    assert body["is_group"] is True
    assert body["group_jid"] == body["chat_jid"]
    assert body["group_jid"].endswith("@g.us")


async def test_a_media_message_carries_its_media_without_the_bytes() -> None:
    _, [request] = await webhook(body=message_body("messages-upsert-image-caption.json"))

    media = json.loads(request.content)["media"]
    assert set(media) == {"mime_type", "url", "file_name", "caption", "size", "base64", "note"}
    assert media["mime_type"].startswith("image/")
    # Without the worker's preparation there is no file to pass on.
    assert media["base64"] is None


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        ({"reply": "a", "output": "b"}, "a"),
        ({"output": "b"}, "b"),
        ({"text": "c"}, "c"),
        ({"message": "d"}, "d"),
        ({"answer": "e"}, "e"),
        ({"output": 42, "answer": "e"}, "e"),
        ("plain", "plain"),
        ([{"output": "one"}, "two", {"nothing": 1}, {"text": " three "}], "one\n\ntwo\n\nthree"),
        ([], ""),
        (None, ""),
        ({}, ""),
    ],
)
async def test_the_reply_is_the_first_string_of_the_known_keys(answer: Any, text: str) -> None:
    reply, _ = await webhook((200, answer))

    assert reply.text == text
    assert reply.body == answer


@pytest.mark.parametrize("status", [200, 204])
async def test_an_empty_answer_sends_nothing(status: int) -> None:
    reply, _ = await webhook(httpx.Response(status))

    assert reply.text == ""
    assert not reply.should_send


async def test_a_4xx_is_not_retried_and_its_body_is_kept() -> None:
    with pytest.raises(OutboundError) as caught:
        await webhook((404, {"message": "The requested webhook is not registered."}))

    assert caught.value.retryable is False
    assert "404: The requested webhook is not registered." in str(caught.value)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_gateway_error_is_retryable(status: int) -> None:
    with pytest.raises(OutboundError) as caught:
        await webhook((status, {}))

    assert caught.value.retryable is True


async def test_a_connection_error_is_retryable_and_a_read_timeout_is_not() -> None:
    with pytest.raises(OutboundError) as refused:
        await webhook(httpx.ConnectError("refused"))
    with pytest.raises(OutboundError) as slow:
        await webhook(httpx.ReadTimeout("no answer"))

    assert refused.value.retryable is True
    assert slow.value.retryable is False


# --- Test connections ---


async def test_a_webhook_check_calls_nothing_and_says_a_message_is_the_test() -> None:
    result, requests = await check(AssertionError("the workflow must not be called"), **WEBHOOK)

    # Any request would run the workflow: a test is not a conversation.
    assert requests == []
    assert (result.ok, result.outcome) == (True, "not_checked")
    assert result.message.startswith(
        "A webhook agent cannot be checked without sending it a message"
    )
    assert "http://n8n.acme.test/webhook/abc?x=1" in result.message
    assert "Send a WhatsApp message" in result.message
