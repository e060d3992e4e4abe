"""The agent behind a number: one interface for every kind.

The worker (webhooks/processing.py) does

    agent = agent_for(instance=instance, http=http, agent=routed)
    request = agent.build(call=AgentCall(...))   # with history when agent.history_limit
    reply = await agent.run(request=request)     # AgentReply, or raises OutboundError

where `routed` is None for the instance's own agent fields (its default agent), or
one of its Agent rows that a routing rule chose (webhooks/routing.py): the same
field names (AgentSettings); the tenant's name and sessions stay the instance's.
Test connections (instances/provisioning.py) does `await agent.check(timeout=...)`,
an AgentCheck (ok, outcome, message) got without running a conversation.

A kind is a package instances/clients/agents/<kind>/ whose transport.py subclasses
HttpAgent (where the request goes, its headers and body, how the answer
reads); the failure rules are HttpAgent.run's, the same for all. Adding a kind:
copy one of these packages and its tests/instances/agents/test_<kind>.py, list
it in KINDS and in instances.models.AgentKind.
"""

import httpx

from instances.clients.agents.automagik.transport import Automagik
from instances.clients.agents.base import (
    AgentCall,
    AgentCheck,
    AgentReply,
    AgentSettings,
    Exchange,
    HttpAgent,
    session_name,
)
from instances.clients.agents.openai.transport import OpenAI
from instances.clients.agents.webhook.transport import Webhook
from instances.models import InstanceConfig

__all__ = [
    "KINDS",
    "AgentCall",
    "AgentCheck",
    "AgentReply",
    "AgentSettings",
    "Exchange",
    "HttpAgent",
    "agent_for",
    "session_name",
]

KINDS: dict[str, type[HttpAgent]] = {kind.kind: kind for kind in (Automagik, OpenAI, Webhook)}


def agent_for(
    *, instance: InstanceConfig, http: httpx.AsyncClient, agent: AgentSettings | None = None
) -> HttpAgent:
    """The instance's agent: its own (default) one, or `agent`, one of its agent rows."""
    settings = agent if agent is not None else instance
    return KINDS[settings.agent_kind](instance=instance, http=http, agent=agent)
