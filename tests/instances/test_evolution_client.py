"""Sending replies through Evolution: URL, key, body, and which failures may be retried."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from django.conf import settings

from instances.clients.evolution import (
    EvolutionClient,
    EvolutionTarget,
    FoundMessages,
    StoredMessage,
    evolution_error_text,
)
from instances.clients.http import OutboundError, describe_body
from tests.conftest import FIXTURES
from tests.webhooks.conftest import client_answering

TARGET = EvolutionTarget(
    base_url="http://evolution.acme.test/", api_key="acme-evolution-key", instance_name="acme-wa"
)


async def send(
    answer: Any, target: EvolutionTarget = TARGET
) -> tuple[dict[str, Any], list[httpx.Request]]:
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        body = await EvolutionClient(target=target, http=http).send_text(
            number="5511987654321", text="Abrimos às 9h."
        )
    return body, requests


@pytest.mark.asyncio
async def test_send_text_posts_the_number_and_text_with_the_apikey() -> None:
    answer = {"key": {"id": "3EB0"}, "status": "PENDING"}

    body, [request] = await send((201, answer))

    assert request.method == "POST"
    assert str(request.url) == "http://evolution.acme.test/message/sendText/acme-wa"
    assert request.headers["apikey"] == "acme-evolution-key"
    assert json.loads(request.content) == {"number": "5511987654321", "text": "Abrimos às 9h."}
    timeout = settings.EVOLUTION_TIMEOUT
    assert request.extensions["timeout"] == dict.fromkeys(
        ("connect", "read", "write", "pool"), timeout
    )
    assert body == answer


@pytest.mark.asyncio
async def test_send_text_with_a_delay_has_evolution_type_that_long_and_waits_for_it() -> None:
    requests: list[httpx.Request] = []
    async with client_answering((201, {"key": {"id": "3EB0"}}), requests) as http:
        await EvolutionClient(target=TARGET, http=http).send_text(
            number="5511987654321", text="Oi", delay_ms=2500
        )

    [request] = requests
    assert json.loads(request.content)["delay"] == 2500
    # Evolution holds the request while "typing...": the read waits that much longer.
    assert request.extensions["timeout"]["read"] == settings.EVOLUTION_TIMEOUT + 2.5


@pytest.mark.asyncio
async def test_send_media_posts_the_media_with_its_type_caption_and_file_name() -> None:
    requests: list[httpx.Request] = []
    answer = {"key": {"id": "3EB0MEDIA"}, "status": "PENDING"}
    async with client_answering((201, answer), requests) as http:
        body = await EvolutionClient(target=TARGET, http=http).send_media(
            number="5511987654321",
            mediatype="image",
            media="https://cdn.example.com/catalogo.jpg",
            mimetype="image/jpeg",
            file_name="catalogo.jpg",
            caption="Catálogo",
        )

    [request] = requests
    assert str(request.url) == "http://evolution.acme.test/message/sendMedia/acme-wa"
    assert request.headers["apikey"] == "acme-evolution-key"
    # The shape of Evolution's own sendMedia request (shared fixtures), without delay.
    expected = json.loads((FIXTURES / "evolution/api/send-media.request.json").read_text())
    del expected["delay"]
    assert json.loads(request.content) == expected
    assert body == answer


@pytest.mark.asyncio
async def test_send_media_fails_like_send_text() -> None:
    requests: list[httpx.Request] = []
    async with client_answering((503, {"error": "Service Unavailable"}), requests) as http:
        with pytest.raises(OutboundError) as caught:
            await EvolutionClient(target=TARGET, http=http).send_media(
                number="5511987654321",
                mediatype="document",
                media="https://x.test/a.pdf",
                mimetype="application/pdf",
                file_name="a.pdf",
            )
    assert (caught.value.retryable, caught.value.status) == (True, 503)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("loja acme", b"/message/sendText/loja%20acme"),
        ("a/b", b"/message/sendText/a%2Fb"),
        ("ação", b"/message/sendText/a%C3%A7%C3%A3o"),
    ],
)
async def test_send_text_quotes_the_instance_name(name: str, path: bytes) -> None:
    target = EvolutionTarget(base_url="http://evolution.acme.test", api_key="k", instance_name=name)

    _, [request] = await send((201, {}), target)

    assert request.url.raw_path == path


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [httpx.Response(201, text="ok"), (201, ["a"])])
async def test_send_text_reads_an_unexpected_success_body_as_empty(answer: Any) -> None:
    body, _ = await send(answer)

    assert body == {}


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_server_error_is_retryable(status: int) -> None:
    with pytest.raises(OutboundError) as caught:
        await send((status, {"error": "Internal Server Error"}))

    assert caught.value.retryable is True
    assert caught.value.status == status


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        httpx.PoolTimeout("pool full"),
    ],
    ids=["connect-error", "connect-timeout", "pool-timeout"],
)
async def test_an_evolution_that_cannot_be_reached_is_retryable(error: Exception) -> None:
    with pytest.raises(OutboundError) as caught:
        await send(error)

    assert caught.value.retryable is True
    assert "acme-evolution-key" not in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_a_client_error_is_not_retryable_and_keeps_the_body(status: int) -> None:
    answer = {"status": status, "error": "Bad Request", "response": {"message": ["exists: false"]}}

    with pytest.raises(OutboundError) as caught:
        await send((status, answer))

    assert caught.value.retryable is False
    assert caught.value.status == status
    assert f"Evolution answered {status}" in str(caught.value)
    assert "exists: false" in str(caught.value)


@pytest.mark.asyncio
async def test_a_long_error_body_is_cut() -> None:
    with pytest.raises(OutboundError) as caught:
        await send(httpx.Response(400, text="x" * 5000))

    assert len(str(caught.value)) < 600
    assert str(caught.value).endswith("...")


@pytest.mark.asyncio
async def test_a_read_timeout_is_not_retried_as_the_text_may_have_been_sent() -> None:
    with pytest.raises(OutboundError) as caught:
        await send(httpx.ReadTimeout("no answer"))

    assert caught.value.retryable is False
    assert "may have been sent" in str(caught.value)


@pytest.mark.asyncio
async def test_send_presence_shows_typing_to_the_number() -> None:
    requests: list[httpx.Request] = []
    async with client_answering((201, {}), requests) as http:
        await EvolutionClient(target=TARGET, http=http).send_presence(number="5511987654321")

    [request] = requests
    assert request.url.path == "/chat/sendPresence/acme-wa"
    assert request.headers["apikey"] == "acme-evolution-key"
    assert json.loads(request.content) == {
        "number": "5511987654321",
        "presence": "composing",
        "delay": 5000,
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "answer",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("no answer"),
        httpx.RemoteProtocolError("closed"),
        (500, {"error": "boom"}),
        (404, {"error": "no such instance"}),
    ],
    ids=["connect-error", "read-timeout", "protocol-error", "500", "404"],
)
async def test_send_presence_swallows_every_failure(answer: Any) -> None:
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        result = await EvolutionClient(target=TARGET, http=http).send_presence(number="55")

    assert result is None
    assert len(requests) == 1


# --- what an operator sees of an answer -----------------------------------------


def test_an_html_error_page_is_shown_as_its_title_never_the_page() -> None:
    page = (
        "<!DOCTYPE html><html><head><title>502 Bad\n Gateway &amp; co</title>"
        "<script>alert(1)</script></head><body>" + "<p>noise</p>" * 500 + "</body></html>"
    )
    response = httpx.Response(502, text=page, headers={"content-type": "text/html"})

    assert evolution_error_text(response) == (
        "Evolution answered 502 Bad Gateway: an HTML page (502 Bad Gateway & co)"
    )


def test_an_html_page_without_a_content_type_is_still_an_html_page() -> None:
    response = httpx.Response(200, content=b"  <html><body>login</body></html>")

    assert describe_body(response) == "an HTML page"


def test_the_error_text_is_bounded_and_carries_no_control_characters() -> None:
    message = "\x1b[31mred\x1b[0m \u202e" + "long " * 1000
    response = httpx.Response(400, json={"response": {"message": [message]}})

    text = evolution_error_text(response)
    detail = text.split(": ", 1)[1]

    assert len(detail) <= 200
    assert detail.startswith("[31mred [0m long long")
    assert detail.endswith("...")
    assert not any(ch in text for ch in "\x1b\u202e\n")


def test_a_long_text_answer_shows_at_most_200_characters() -> None:
    response = httpx.Response(500, text="oops\r\n" * 1000)

    detail = evolution_error_text(response).split(": ", 1)[1]

    assert len(detail) <= 200
    assert detail.startswith("oops oops")


# --- findMessages: was a reply sent? -----------------------------------------------
async def find(answer: Any, **query: Any) -> tuple[FoundMessages, list[httpx.Request]]:
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        found = await EvolutionClient(target=TARGET, http=http).find_messages(**query)
    return found, requests


RECORD = {
    "id": "cmiu0x0qf0001",
    "key": {
        "id": "3EB0FD63D733EA80664A56",
        "fromMe": True,
        "remoteJid": "5511987654321@s.whatsapp.net",
    },
    "pushName": "Você",
    "messageType": "conversation",
    "message": {"conversation": "Abrimos às 9h."},
    "messageTimestamp": 1765023987,
    "instanceId": "6f1c2b7e-9a4d-4c51-8e2f-3b0d5a7c9e11",
    "source": "web",
    "contextInfo": None,
    "MessageUpdate": [{"status": "SERVER_ACK"}],
}
PAGE = {"messages": {"total": 1, "pages": 1, "currentPage": 1, "records": [RECORD]}}


@pytest.mark.asyncio
async def test_find_messages_asks_for_the_chats_own_messages_between_two_dates() -> None:
    since = datetime(2025, 12, 6, 9, 26, 23, 101999, tzinfo=UTC)
    until = since + timedelta(minutes=2)

    found, [request] = await find(
        (200, PAGE), remote_jid="5511987654321@s.whatsapp.net", from_me=True, between=(since, until)
    )

    assert request.method == "POST"
    assert str(request.url) == "http://evolution.acme.test/chat/findMessages/acme-wa"
    assert request.headers["apikey"] == "acme-evolution-key"
    assert json.loads(request.content) == {
        "where": {
            "key": {"remoteJid": "5511987654321@s.whatsapp.net", "fromMe": True},
            # Evolution filters on the timestamp only with both ends, as JS dates.
            "messageTimestamp": {
                "gte": "2025-12-06T09:26:23.101Z",
                "lte": "2025-12-06T09:28:23.101Z",
            },
        },
        "page": 1,
        "offset": 50,
    }
    assert found == FoundMessages(
        records=[
            StoredMessage(
                key_id="3EB0FD63D733EA80664A56",
                remote_jid="5511987654321@s.whatsapp.net",
                from_me=True,
                text="Abrimos às 9h.",
                timestamp=1765023987,
            )
        ],
        pages=1,
    )


@pytest.mark.asyncio
async def test_find_messages_reads_extended_text_long_timestamps_and_1_8_lists() -> None:
    record = {
        "key": {"id": "X", "fromMe": True, "remoteJid": "a@s.whatsapp.net"},
        "message": {"extendedTextMessage": {"text": "link https://a.example"}},
        "messageTimestamp": {"low": 1765023987, "high": 0, "unsigned": False},
    }

    found, _ = await find((200, [record, {"key": "broken"}]), key_id="X")

    assert found.records == [
        StoredMessage("X", "a@s.whatsapp.net", True, "link https://a.example", 1765023987)
    ]


@pytest.mark.asyncio
async def test_an_evolution_that_keeps_no_messages_answers_an_empty_page() -> None:
    empty = {"messages": {"total": 0, "pages": 0, "currentPage": 1, "records": []}}

    found, _ = await find((200, empty), key_id="3EB0")

    assert found == FoundMessages(records=[], pages=0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "retryable"),
    [
        ((500, {"error": "Internal Server Error"}), True),
        ((404, {"response": {"message": ['The "acme-wa" instance does not exist']}}), True),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("dropped"), True),
        ((400, {"response": {"message": ["where.key is invalid"]}}), False),
        (httpx.Response(200, text="<html><title>Login</title></html>"), False),
        ((200, {"messages": "none"}), False),
    ],
)
async def test_a_failed_find_messages_says_whether_asking_again_can_help(
    answer: Any, retryable: bool
) -> None:
    with pytest.raises(OutboundError) as caught:
        await find(answer, key_id="3EB0")

    assert caught.value.retryable is retryable
    assert "findMessages" in str(caught.value)
    assert caught.value.maybe_sent is False


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "maybe_sent"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ReadTimeout("slow"), True),
        (httpx.RemoteProtocolError("Server disconnected"), True),
    ],
)
async def test_send_text_says_when_the_text_may_have_gone_out(
    error: Exception, maybe_sent: bool
) -> None:
    with pytest.raises(OutboundError) as caught:
        await send(error)

    assert caught.value.maybe_sent is maybe_sent
