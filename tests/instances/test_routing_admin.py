"""Agents and routing rules inline on the instance's admin page: the model's
messages, the agent's key write-only."""

from typing import Any

import pytest

from instances.models import Agent, InstanceConfig, Route
from tests.instances.test_admin import change_url, form_data

pytestmark = pytest.mark.django_db

# The sales agent's fields as the page shows them (its key left empty).
AS_STORED = {
    "name": "sales",
    "agent_kind": "automagik",
    "agent_api_url": "http://sales.acme.test",
    "default_agent": "sales_agent",
}
BAD_REGEX = "Not a valid regular expression: missing ), unterminated subpattern at position 7."


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


@pytest.fixture
def sales(acme) -> Agent:
    return Agent.objects.create(
        instance=acme,
        name="sales",
        agent_api_url="http://sales.acme.test",
        agent_api_key="sales-SECRET-key",
        default_agent="sales_agent",
    )


def agent_form(index: int, agent: Agent | None = None, **fields: Any) -> dict[str, str]:
    values = {
        "id": str(agent.pk) if agent else "",
        "instance": "",
        "name": "support",
        "agent_kind": "webhook",
        "agent_api_url": "http://n8n.acme.test/hook",
        "agent_api_key": "",
        "default_agent": "simple_agent",
        "system_prompt": "",
        "agent_timeout": "60",
        "history_limit": "20",
        **fields,
    }
    return {f"agents-{index}-{key}": value for key, value in values.items()}


def route_form(index: int, route: Route | None = None, **fields: Any) -> dict[str, str]:
    values = {"id": str(route.pk) if route else "", "instance": "", **fields}
    return {f"routes-{index}-{key}": value for key, value in values.items()}


def post(admin_client, acme, *, agents=(), routes=(), initial_agents=0, initial_routes=0):
    data = form_data(
        **{
            "agents-TOTAL_FORMS": str(len(agents)),
            "agents-INITIAL_FORMS": str(initial_agents),
            "routes-TOTAL_FORMS": str(len(routes)),
            "routes-INITIAL_FORMS": str(initial_routes),
        }
    )
    for form in (*agents, *routes):
        data.update(form)
    return admin_client.post(change_url(acme), data)


def test_the_page_shows_the_agents_and_rules_without_the_key(admin_client, acme, sales) -> None:
    Route.objects.create(instance=acme, position=1, match="keyword", value="vendas", agent=sales)

    response = admin_client.get(change_url(acme))

    assert response.status_code == 200
    content = response.content.decode()
    assert "Other agents" in content and "Routing rules" in content
    assert "sales_agent" in content and "vendas" in content
    assert "default (the instance&#x27;s own agent)" in content
    assert "sales-SECRET-key" not in content


def test_an_agent_and_a_rule_to_it_are_added(admin_client, acme, sales) -> None:
    response = post(
        admin_client,
        acme,
        agents=[agent_form(0, sales, **AS_STORED), agent_form(1)],
        routes=[route_form(0, position="1", match="keyword", value="vendas", agent=str(sales.pk))],
        initial_agents=1,
    )

    assert response.status_code == 302, response.context["errors"]
    assert list(acme.agents.values_list("name", flat=True)) == ["sales", "support"]
    # Left empty, the stored key is kept.
    assert Agent.objects.get(name="sales").agent_api_key == "sales-SECRET-key"
    route = Route.objects.get()
    assert (route.match, route.value, route.agent) == ("keyword", "vendas", sales)


def test_it_refuses_a_bad_regex(admin_client, acme) -> None:
    response = post(
        admin_client,
        acme,
        routes=[route_form(0, position="1", match="regex", value="pedido (\\d+")],
    )

    assert response.status_code == 200
    assert BAD_REGEX in response.content.decode()
    assert not Route.objects.exists()


def test_a_rule_without_position_goes_after_the_last(admin_client, acme) -> None:
    Route.objects.create(instance=acme, position=4, match="keyword", value="a")

    post(
        admin_client,
        acme,
        routes=[route_form(0, position="", match="prefix", value="/help", agent="")],
    )

    assert Route.objects.get(value="/help").position == 5


def test_an_agent_rules_point_at_is_not_deleted(admin_client, acme, sales) -> None:
    route = Route.objects.create(instance=acme, position=1, match="keyword", value="x", agent=sales)

    response = post(
        admin_client,
        acme,
        agents=[agent_form(0, sales, **AS_STORED, DELETE="on")],
        routes=[
            route_form(0, route, position="1", match="keyword", value="x", agent=str(sales.pk))
        ],
        initial_agents=1,
        initial_routes=1,
    )

    assert response.status_code == 200
    assert "used by the routing rules at position 1" in response.content.decode()
    assert Agent.objects.filter(pk=sales.pk).exists()


def test_the_conversation_page_shows_its_bound_agent_and_session(admin_client, acme, sales):
    from webhooks.models import Conversation

    chat = Conversation.objects.create(
        instance=acme,
        chat_jid="5511987654321@s.whatsapp.net",
        phone="5511987654321",
        bound_agent=sales,
    )

    response = admin_client.get(f"/admin/webhooks/conversation/{chat.pk}/change/")

    content = response.content.decode()
    assert "sales" in content
    assert "acme_5511987654321-sales" in content
