"""Helpers for the per-kind transport tests: each kind's test file has the same
shape (the request, the headers, how replies read, the failure rules)."""

from typing import Any

import httpx

from instances.clients.agents import AgentCall, AgentCheck, AgentReply, AgentSettings, agent_for
from tests.webhooks.conftest import client_answering, unsaved_instance
from webhooks.parsing import parse_message, strip_secrets


def call_for(body: dict[str, Any], **fields: Any) -> AgentCall:
    """The worker's call for a delivery, built from what ingest stores."""
    content = parse_message(body).to_content()
    return AgentCall(
        content=content, payload=strip_secrets(body), session="acme_5511987654321", **fields
    )


async def ask(
    answer: Any, *, call: AgentCall, routed: AgentSettings | None = None, **instance_fields: Any
) -> tuple[AgentReply, list[httpx.Request]]:
    """Build the request for `call` with the instance's kind (or `routed`'s, one of
    its agent rows) and run it."""
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        agent = agent_for(instance=unsaved_instance(**instance_fields), http=http, agent=routed)
        reply = await agent.run(request=agent.build(call=call))
    return reply, requests


async def check(answer: Any, **instance_fields: Any) -> tuple[AgentCheck, list[httpx.Request]]:
    """Test connections for an instance of that kind, the server answering `answer`."""
    requests: list[httpx.Request] = []
    async with client_answering(answer, requests) as http:
        agent = agent_for(instance=unsaved_instance(**instance_fields), http=http)
        result = await agent.check(timeout=2.0)
    return result, requests
