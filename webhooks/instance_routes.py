"""The worker's read of an instance's routing rules and agents (webhooks/routing.py).

Read once per batch, and only for an instance that has rules or a chat bound
to an agent: an instance without routing pays no statement for it.
"""

from instances.models import Agent, Route
from webhooks.routing import Routing, Rule


def load_routing(*, instance_id: int) -> Routing:
    agents = {agent.pk: agent for agent in Agent.objects.filter(instance_id=instance_id)}
    rules = tuple(
        Rule.of(match=match, value=value, agent_id=agent_id)
        for match, value, agent_id in Route.objects.filter(instance_id=instance_id)
        .order_by("position", "id")
        .values_list("match", "value", "agent_id")
    )
    return Routing(rules=rules, agents=agents)
