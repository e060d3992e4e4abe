"""The automagik kind (the Agent API contract): the request body, the call, and how
answers and failures read."""

import json
from typing import Any

import httpx
import pytest

from instances.clients.agents import AgentCheck, AgentReply, session_name
from instances.clients.agents.automagik.transport import Automagik, build_agent_request
from instances.clients.http import OutboundError
from tests.conftest import FIXTURES
from tests.instances.agents.conftest import check
from tests.webhooks.conftest import client_answering, message_body, unsaved_instance
from webhooks.parsing import parse_message, strip_secrets

PHONE = "5511987654321"


def request_for(body: dict[str, Any], **instance_fields: Any) -> dict[str, Any]:
    """The agent request for a delivery, built from what ingest stores."""
    instance = unsaved_instance(**instance_fields)
    content = parse_message(body).to_content()
    session = session_name(instance=instance, phone=content["phone"], chat_jid=content["chat_jid"])
    return build_agent_request(content=content, payload=strip_secrets(body), session=session)


def test_it_builds_exactly_the_contract_of_the_run_request_fixture() -> None:
    contract = json.loads((FIXTURES / "agent" / "run-request.json").read_text())
    body = message_body()
    body["data"]["pushName"] = "Maria Teste"
    body["data"]["message"]["conversation"] = "Olá, qual o horário de funcionamento?"

    request = request_for(body, name="tenant-a", session_id_prefix="tenant-a-")

    expected = {k: v for k, v in contract.items() if not k.startswith("_doc")}
    expected["channel_payload"] = strip_secrets(body)
    assert request == expected
    assert "apikey" not in request["channel_payload"]
    assert request["channel_payload"]["data"]["key"]["id"] == body["data"]["key"]["id"]


def test_the_request_carries_the_sender_and_the_text() -> None:
    request = request_for(message_body())

    assert request["message_content"] == "[Maria Souza]: Olá! Qual o horário de atendimento?"
    assert request["message_type"] == "text"
    assert request["message_limit"] == 100
    assert request["preserve_system_prompt"] is False
    assert request["user"] == {
        "phone_number": f"+{PHONE}",
        "email": None,
        "user_data": {
            "name": "Maria Souza",
            "whatsapp_id": f"{PHONE}@s.whatsapp.net",
            "source": "whatsapp",
        },
    }
    assert "media_contents" not in request


def test_a_sender_without_a_name_is_a_whatsapp_user() -> None:
    body = message_body()
    del body["data"]["pushName"]

    request = request_for(body)

    assert request["message_content"].startswith("[WhatsApp User]: ")
    assert request["user"]["user_data"]["name"] == "WhatsApp User"


@pytest.mark.parametrize(
    ("fields", "session"),
    [
        ({"legacy_mode": True, "session_id_prefix": ""}, PHONE),
        ({"legacy_mode": True, "session_id_prefix": "wa-"}, f"wa-{PHONE}"),
        ({"legacy_mode": True, "session_id_prefix": "acme_"}, f"acme_{PHONE}"),
        ({"legacy_mode": False, "session_id_prefix": ""}, f"acme_{PHONE}"),
        ({"legacy_mode": False, "session_id_prefix": "shop-"}, f"shop-{PHONE}"),
        # Being the default does not name sessions: moving it renames none.
        ({"is_default": True, "session_id_prefix": ""}, f"acme_{PHONE}"),
    ],
    ids=["legacy-blank", "legacy-prefix", "legacy-name-like", "blank", "prefix", "default"],
)
def test_the_session_name_is_the_prefix_and_the_phone_digits(
    fields: dict[str, Any], session: str
) -> None:
    assert request_for(message_body(), **fields)["session_name"] == session


def test_a_chat_without_a_phone_uses_the_jid_digits_and_no_phone_number() -> None:
    request = request_for(message_body("messages-upsert-lid-only.json"))

    assert request["session_name"] == "acme_123456789012345"
    assert request["user"]["phone_number"] is None
    assert request["user"]["user_data"]["whatsapp_id"] == "123456789012345@lid"


def test_an_image_with_base64_sends_the_data() -> None:
    body = message_body("messages-upsert-image-base64.json")

    request = request_for(body)

    assert request["message_type"] == "image"
    assert request["message_content"] == "[Maria Souza]: Foto do comprovante"
    assert request["media_contents"] == [
        {
            "mime_type": "image/jpeg",
            "alt_text": "Foto do comprovante",
            "data": body["data"]["message"]["base64"],
        }
    ]


def test_an_image_without_base64_sends_its_url() -> None:
    body = message_body("messages-upsert-image-caption.json")

    request = request_for(body)

    assert request["message_type"] == "image"
    assert request["media_contents"] == [
        {
            "mime_type": "image/jpeg",
            "alt_text": "Esse é o defeito no produto",
            "media_url": body["data"]["message"]["imageMessage"]["url"],
        }
    ]


def test_a_voice_note_is_an_audio_request() -> None:
    body = message_body("messages-upsert-audio.json")

    request = request_for(body)

    assert request["message_type"] == "audio"
    [media] = request["media_contents"]
    assert media["mime_type"] == "audio/ogg; codecs=opus"
    assert media["media_url"] == body["data"]["message"]["audioMessage"]["url"]
    assert "data" not in media


def test_a_type_the_agent_does_not_know_is_sent_as_text() -> None:
    request = request_for(message_body("messages-upsert-location.json"))

    assert request["message_type"] == "text"
    assert request["message_content"].startswith("[Maria Souza]: [location] ")
    assert "media_contents" not in request


# --- Automagik.run ----------------------------------------------------------


async def run(answer: Any, **instance_fields: Any) -> tuple[AgentReply, list[httpx.Request]]:
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        agent = Automagik(instance=unsaved_instance(**instance_fields), http=http)
        reply = await agent.run(request={"message_content": "[Maria]: oi"})
    return reply, requests


@pytest.mark.asyncio
async def test_run_posts_the_request_to_the_agent_with_its_key_and_timeout() -> None:
    reply, [request] = await run(
        (200, {"message": "olá"}),
        agent_api_url="http://agent.acme.test/base/",
        agent_timeout=42,
    )

    assert request.method == "POST"
    assert str(request.url) == "http://agent.acme.test/base/api/v1/agent/acme_agent/run"
    assert request.headers["x-api-key"] == "acme-agent-key"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"message_content": "[Maria]: oi"}
    assert request.extensions["timeout"] == {
        "connect": 5.0,
        "read": 42.0,
        "write": 42.0,
        "pool": 42.0,
    }
    assert reply == AgentReply(text="olá", body={"message": "olá"})


@pytest.mark.asyncio
async def test_run_quotes_the_agent_name_in_the_path() -> None:
    _, [request] = await run((200, {"message": "x"}), default_agent="sales/bot v2")

    assert request.url.raw_path == b"/api/v1/agent/sales%2Fbot%20v2/run"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"message": "Abrimos às 9h.", "success": True}, "Abrimos às 9h."),
        ({"message": {"content": "Abrimos às 9h.", "role": "assistant"}}, "Abrimos às 9h."),
        ({"message": {"role": "assistant"}}, ""),
        ({"message": None}, ""),
        ({"message": 42}, ""),
        ({"success": True}, ""),
    ],
)
async def test_run_reads_the_reply_text(body: dict[str, Any], text: str) -> None:
    reply, _ = await run((200, body))

    assert reply.text == text
    assert reply.body == body


@pytest.mark.asyncio
async def test_run_reads_the_fixture_response() -> None:
    body = json.loads((FIXTURES / "agent" / "run-response.json").read_text())

    reply, _ = await run((200, body))

    assert reply.text == "Abrimos das 9h às 18h.\n\nPosso ajudar em algo mais?"
    assert reply.should_send


@pytest.mark.asyncio
async def test_a_json_answer_that_is_not_an_object_is_an_empty_reply() -> None:
    reply, _ = await run((200, ["not", "an", "object"]))

    assert reply == AgentReply(text="", body={})


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_gateway_error_is_retryable(status: int) -> None:
    with pytest.raises(OutboundError) as caught:
        await run((status, {"detail": "upstream down"}))

    assert caught.value.retryable is True
    assert caught.value.status == status
    assert f"agent answered {status}" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow connect"),
        # No pooled connection came free: the request never left, so the agent
        # cannot have acted (the Evolution client retries this one too).
        httpx.PoolTimeout("pool full"),
    ],
    ids=["connect-error", "connect-timeout", "pool-timeout"],
)
async def test_an_agent_that_cannot_be_reached_is_retryable(error: Exception) -> None:
    with pytest.raises(OutboundError) as caught:
        await run(error)

    assert caught.value.retryable is True


@pytest.mark.asyncio
async def test_a_read_timeout_is_not_retried_as_the_agent_may_have_acted() -> None:
    with pytest.raises(OutboundError) as caught:
        await run(httpx.ReadTimeout("no answer"))

    assert caught.value.retryable is False
    assert "ReadTimeout" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [500, 401, 404, 422])
async def test_other_error_statuses_are_not_retryable(status: int) -> None:
    with pytest.raises(OutboundError) as caught:
        await run((status, {"detail": "nope"}))

    assert caught.value.retryable is False
    assert caught.value.status == status
    assert "nope" in str(caught.value)


@pytest.mark.asyncio
async def test_a_non_json_answer_is_not_retryable() -> None:
    with pytest.raises(OutboundError) as caught:
        await run(httpx.Response(200, text="<html>gateway</html>"))

    assert caught.value.retryable is False
    assert str(caught.value) == "agent answered non-JSON: an HTML page"


@pytest.mark.asyncio
async def test_an_error_message_does_not_carry_the_agent_key() -> None:
    with pytest.raises(OutboundError) as caught:
        await run(httpx.ConnectError("refused"))

    assert "acme-agent-key" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "should_send"),
    [
        ("Olá!", True),
        ("", False),
        ("   ", False),
        ("\n\t", False),
        ("AUTOMAGIK:x", False),
        ("AUTOMAGIK:", False),
    ],
)
def test_a_reply_is_sent_unless_it_is_blank_or_silent(text: str, should_send: bool) -> None:
    assert AgentReply(text=text, body={}).should_send is should_send


# --- Test connections ---


@pytest.mark.asyncio
async def test_an_automagik_check_gets_the_health_route_with_the_key() -> None:
    result, [request] = await check((200, {"status": "healthy"}))

    # A GET on /health, never the run URL: a test does not run the agent.
    assert (request.method, str(request.url)) == ("GET", "http://agent.acme.test/health")
    assert request.headers["x-api-key"] == "acme-agent-key"
    assert result == AgentCheck(
        True, "reachable", "The agent server at http://agent.acme.test/health answers (HTTP 200)."
    )


@pytest.mark.asyncio
async def test_an_automagik_check_counts_any_answer_but_a_refused_key_as_reachable() -> None:
    result, _ = await check((404, {"detail": "Not Found"}))

    assert (result.ok, result.outcome) == (True, "reachable")
    assert "(HTTP 404)" in result.message
