"""The openai kind: an OpenAI-compatible chat completions call with the hub's memory."""

import json
from typing import Any

import httpx
import pytest

from instances.clients.agents import AgentCheck, Exchange
from instances.clients.http import OutboundError
from tests.instances.agents.conftest import ask, call_for, check
from tests.webhooks.conftest import message_body

pytestmark = pytest.mark.asyncio

OPENAI = {"agent_kind": "openai", "agent_api_url": "http://llm.acme.test/v1/"}
ANSWER = (200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Olá!"}}]})


def turn(text: str, reply: str) -> Exchange:
    return Exchange(content={"text": text}, reply=reply)


async def openai(answer: Any = ANSWER, *, history: tuple[Exchange, ...] = (), **fields: Any):
    return await ask(answer, call=call_for(message_body(), history=history), **{**OPENAI, **fields})


def sent(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content)


async def test_it_posts_to_chat_completions_with_the_model_and_a_bearer_key() -> None:
    reply, [request] = await openai(default_agent="gpt-4o-mini")

    assert request.method == "POST"
    assert str(request.url) == "http://llm.acme.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer acme-agent-key"
    assert sent(request) == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Olá! Qual o horário de atendimento?"}],
    }
    assert reply.text == "Olá!"
    assert reply.body == ANSWER[1]


async def test_it_sends_no_authorization_header_when_the_key_is_blank() -> None:
    _, [request] = await openai(agent_api_key="")

    assert "authorization" not in request.headers


async def test_it_sends_the_system_prompt_first_then_the_history_then_the_user() -> None:
    history = (turn("oi", "Olá, em que posso ajudar?"), turn("preço?", "R$ 10."))

    _, [request] = await openai(system_prompt="You are Acme's assistant.", history=history)

    assert sent(request)["messages"] == [
        {"role": "system", "content": "You are Acme's assistant."},
        {"role": "user", "content": "oi"},
        {"role": "assistant", "content": "Olá, em que posso ajudar?"},
        {"role": "user", "content": "preço?"},
        {"role": "assistant", "content": "R$ 10."},
        {"role": "user", "content": "Olá! Qual o horário de atendimento?"},
    ]


async def test_a_blank_system_prompt_sends_none() -> None:
    _, [request] = await openai(system_prompt="  \n")

    assert [m["role"] for m in sent(request)["messages"]] == ["user"]


async def test_the_history_limit_counts_messages_and_drops_the_oldest_first() -> None:
    history = (turn("one", "1"), turn("two", "2"), turn("three", "3"))

    _, [request] = await openai(history_limit=3, history=history)

    contents = [m["content"] for m in sent(request)["messages"]]
    assert contents == ["2", "three", "3", "Olá! Qual o horário de atendimento?"]


async def test_a_history_limit_of_zero_sends_only_the_new_message() -> None:
    _, [request] = await openai(history_limit=0, history=(turn("one", "1"),))

    assert len(sent(request)["messages"]) == 1


async def test_an_exchange_without_a_reply_is_a_user_message_only() -> None:
    _, [request] = await openai(history=(turn("one", ""),))

    assert [m["role"] for m in sent(request)["messages"]] == ["user", "user"]


async def test_a_burst_is_one_user_turn() -> None:
    call = call_for(message_body())
    call = type(call)(
        content={**call.content, "burst_texts": ["oi", "tudo bem?"]},
        payload=call.payload,
        session=call.session,
    )

    _, [request] = await ask(ANSWER, call=call, **OPENAI)

    assert sent(request)["messages"] == [{"role": "user", "content": "oi\ntudo bem?"}]


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (ANSWER[1], "Olá!"),
        ({"choices": []}, ""),
        ({"choices": [{"message": {"content": None, "tool_calls": []}}]}, ""),
        ({"error": "x"}, ""),
        (["not", "an", "object"], ""),
    ],
)
async def test_the_reply_is_the_first_choices_message_content(body: Any, text: str) -> None:
    reply, _ = await openai((200, body))

    assert reply.text == text


async def test_a_401_is_not_retried_and_its_message_is_kept() -> None:
    body = {"error": {"message": "Incorrect API key provided: sk-xx.", "type": "invalid_request"}}

    with pytest.raises(OutboundError) as caught:
        await openai((401, body))

    assert caught.value.retryable is False
    assert caught.value.status == 401
    assert str(caught.value) == "agent answered 401: Incorrect API key provided: sk-xx."


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_gateway_error_is_retryable(status: int) -> None:
    with pytest.raises(OutboundError) as caught:
        await openai((status, {}))

    assert caught.value.retryable is True


async def test_a_connection_error_is_retryable_and_a_read_timeout_is_not() -> None:
    with pytest.raises(OutboundError) as refused:
        await openai(httpx.ConnectError("refused"))
    with pytest.raises(OutboundError) as slow:
        await openai(httpx.ReadTimeout("no answer"))

    assert refused.value.retryable is True
    assert slow.value.retryable is False


# --- Test connections: GET {base}/models, and the model must be listed ---


def models(*ids: str) -> tuple[int, dict[str, Any]]:
    return 200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}


async def test_an_openai_check_lists_the_models_with_the_bearer_key() -> None:
    result, [request] = await check(
        models("gpt-4o", "gpt-4o-mini"), **OPENAI, default_agent="gpt-4o-mini"
    )

    # Listing the models costs nothing and runs no completion.
    assert (request.method, str(request.url)) == ("GET", "http://llm.acme.test/v1/models")
    assert request.headers["authorization"] == "Bearer acme-agent-key"
    assert result == AgentCheck(
        True,
        "reachable",
        "The agent server at http://llm.acme.test/v1/models answers and lists the model "
        '"gpt-4o-mini".',
    )


async def test_an_openai_check_sends_no_authorization_header_when_the_key_is_blank() -> None:
    _, [request] = await check(models("acme_agent"), **OPENAI, agent_api_key="")

    assert "authorization" not in request.headers


async def test_a_model_the_server_does_not_list_fails_the_check_and_names_those_it_has() -> None:
    result, _ = await check(models("llama3.2:latest", "qwen3:8b"), **OPENAI, default_agent="llama3")

    assert (result.ok, result.outcome) == (False, "no_model")
    assert 'does not have the model "llama3"' in result.message
    assert 'it lists "llama3.2:latest", "qwen3:8b"' in result.message


async def test_a_server_listing_no_models_fails_the_check() -> None:
    result, _ = await check(models(), **OPENAI)

    assert (result.ok, result.outcome) == (False, "no_model")
    assert "it lists none" in result.message


async def test_a_model_without_a_tag_is_ollamas_latest() -> None:
    result, _ = await check(models("llama3.2:latest"), **OPENAI, default_agent="llama3.2")

    assert (result.ok, result.outcome) == (True, "reachable")


async def test_a_long_model_list_is_cut_in_the_message() -> None:
    result, _ = await check(models(*(f"m{i}" for i in range(25))), **OPENAI)

    assert '"m9" and 15 more' in result.message
    assert '"m10"' not in result.message


async def test_a_404_on_models_says_the_url_must_be_the_api_base() -> None:
    result, _ = await check((404, {"error": "not found"}), **OPENAI)

    assert (result.ok, result.outcome) == (False, "failed")
    assert "answered 404" in result.message
    assert "must be the API base, e.g. https://api.openai.com/v1" in result.message


async def test_a_server_error_on_models_fails_the_check_with_its_message() -> None:
    result, _ = await check((500, {"error": {"message": "model loader crashed"}}), **OPENAI)

    assert (result.ok, result.outcome) == (False, "failed")
    assert "answered 500: model loader crashed" in result.message


async def test_an_answer_without_a_model_list_passes_but_says_the_model_is_unchecked() -> None:
    result, _ = await check(httpx.Response(200, text="<html>ok</html>"), **OPENAI)

    assert (result.ok, result.outcome) == (True, "reachable")
    assert 'not with a model list: the model "acme_agent" is not checked' in result.message
