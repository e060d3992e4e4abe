"""An instance's other agents (routing): each kind calls the agent row's URL, key,
model and prompt, with the instance's name; the instance's own fields are not used."""

import json
from typing import Any

import httpx
import pytest

from instances.clients.agents import agent_for
from instances.models import Agent
from tests.instances.agents.conftest import ask, call_for
from tests.webhooks.conftest import message_body, unsaved_instance

pytestmark = pytest.mark.asyncio


def row(**fields: Any) -> Agent:
    values: dict[str, Any] = {
        "name": "sales",
        "agent_api_url": "http://sales.acme.test",
        "agent_api_key": "sales-key",
        "default_agent": "sales_agent",
        **fields,
    }
    return Agent(**values)


def sent(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content)


async def test_an_automagik_row_is_called_at_its_own_url_with_its_own_key() -> None:
    _, [request] = await ask((200, {"message": "ok"}), call=call_for(message_body()), routed=row())

    assert str(request.url) == "http://sales.acme.test/api/v1/agent/sales_agent/run"
    assert request.headers["x-api-key"] == "sales-key"


async def test_an_openai_row_sends_its_model_and_its_system_prompt() -> None:
    answer = (200, {"choices": [{"message": {"content": "Olá"}}]})
    routed = row(
        agent_kind="openai",
        agent_api_url="http://llm.acme.test/v1",
        default_agent="gpt-4o-mini",
        system_prompt="You sell.",
    )

    reply, [request] = await ask(
        answer, call=call_for(message_body()), routed=routed, system_prompt="You help."
    )

    assert str(request.url) == "http://llm.acme.test/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sales-key"
    assert sent(request)["model"] == "gpt-4o-mini"
    assert sent(request)["messages"][0] == {"role": "system", "content": "You sell."}
    assert reply.text == "Olá"


async def test_a_webhook_row_posts_to_its_url_with_the_instance_s_name() -> None:
    routed = row(agent_kind="webhook", agent_api_url="http://n8n.acme.test/hook", agent_api_key="")

    _, [request] = await ask((200, {"output": "ok"}), call=call_for(message_body()), routed=routed)

    assert str(request.url) == "http://n8n.acme.test/hook"
    assert "authorization" not in request.headers
    assert sent(request)["instance"] == "acme"


async def test_the_row_s_timeout_bounds_the_call_not_the_instance_s() -> None:
    async with httpx.AsyncClient() as http:
        agent = agent_for(
            instance=unsaved_instance(agent_timeout=60), http=http, agent=row(agent_timeout=5)
        )

    assert agent.deadline == 5.0
    assert agent.timeout.read == 5.0


async def test_the_row_s_kind_picks_the_transport_whatever_the_instance_s() -> None:
    async with httpx.AsyncClient() as http:
        agent = agent_for(
            instance=unsaved_instance(agent_kind="automagik"),
            http=http,
            agent=row(agent_kind="openai", history_limit=7),
        )

    assert agent.kind == "openai"
    assert agent.history_limit == 7
