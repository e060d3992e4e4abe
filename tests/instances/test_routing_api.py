"""/api/v1/instances/{name}/agents/ and .../routes/: CRUD with the instances' auth,
the model's messages, the agent's key write-only."""

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rest_framework.authtoken.models import Token

from instances.models import Agent, InstanceConfig, Route
from webhooks.models import Conversation

pytestmark = pytest.mark.django_db

AGENTS = "/api/v1/instances/acme/agents/"
ROUTES = "/api/v1/instances/acme/routes/"
SALES = {
    "name": "sales",
    "agent_kind": "openai",
    "agent_api_url": "http://llm.acme.test/v1",
    "agent_api_key": "sk-SECRET",
    "default_agent": "gpt-4o-mini",
    "system_prompt": "You sell.",
}
BAD_REGEX = "Not a valid regular expression: missing ), unterminated subpattern at position 7."


@pytest.fixture
def acme(make_instance) -> InstanceConfig:
    return make_instance()


@pytest.fixture
def api(client: Client, api_key_headers: dict[str, str]) -> Any:
    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        kwargs: dict[str, Any] = dict(api_key_headers)
        if body is not None:
            kwargs.update(data=body, content_type="application/json")
        return getattr(client, method)(path, **kwargs)

    return call


def test_an_agent_is_created_and_its_key_never_read_back(acme, api) -> None:
    response = api("post", AGENTS, SALES)

    assert response.status_code == 201, response.json()
    body = response.json()
    assert "agent_api_key" not in body
    assert body["has_agent_api_key"] is True
    assert body["name"] == "sales" and body["default_agent"] == "gpt-4o-mini"
    assert Agent.objects.get(instance=acme).agent_api_key == "sk-SECRET"
    assert api("get", AGENTS).json()["results"][0]["name"] == "sales"


def test_an_agent_is_updated_by_name_keeping_its_key(acme, api) -> None:
    api("post", AGENTS, SALES)

    response = api("patch", f"{AGENTS}sales/", {"agent_timeout": 90})

    assert response.status_code == 200, response.json()
    agent = Agent.objects.get(instance=acme)
    assert (agent.agent_timeout, agent.agent_api_key) == (90, "sk-SECRET")


def test_an_agent_url_on_another_host_needs_its_key(acme, api) -> None:
    api("post", AGENTS, SALES)

    response = api("patch", f"{AGENTS}sales/", {"agent_api_url": "http://attacker.example"})

    assert response.status_code == 400
    assert "give the Agent API key again" in response.json()["agent_api_key"][0]


def test_an_agent_name_is_unique_in_its_instance(acme, api) -> None:
    api("post", AGENTS, SALES)

    response = api("post", AGENTS, SALES)

    assert response.status_code == 400
    assert response.json() == {
        "non_field_errors": ["The instance already has an agent of this name."]
    }


def test_the_agents_of_another_instance_are_not_seen(acme, api, make_instance) -> None:
    globex = make_instance(name="globex")
    Agent.objects.create(
        instance=globex, name="sales", agent_api_url="http://x.test", agent_api_key="k"
    )

    assert api("get", AGENTS).json()["count"] == 0
    assert api("get", f"{AGENTS}sales/").status_code == 404
    assert api("get", "/api/v1/instances/nobody/agents/").status_code == 404


def test_a_rule_is_created_after_the_last_one_and_names_its_agent(acme, api) -> None:
    api("post", AGENTS, SALES)
    first = api("post", ROUTES, {"match": "keyword", "value": "vendas", "agent": "sales"})
    second = api("post", ROUTES, {"match": "chat", "value": "5511*", "agent": "default"})

    assert first.status_code == 201, first.json()
    assert first.json()["position"] == 1
    assert second.json()["position"] == 2
    assert second.json()["agent"] == "default"
    assert Route.objects.get(pk=second.json()["id"]).agent is None
    listed = api("get", ROUTES).json()["results"]
    assert [(r["match"], r["value"], r["agent"]) for r in listed] == [
        ("keyword", "vendas", "sales"),
        ("chat", "5511*", "default"),
    ]


def test_it_refuses_a_bad_regex(acme, api) -> None:
    response = api("post", ROUTES, {"match": "regex", "value": "pedido (\\d+", "agent": "default"})

    assert response.status_code == 400
    assert response.json() == {"value": [BAD_REGEX]}
    assert not Route.objects.exists()


def test_it_refuses_a_rule_to_an_unknown_agent(acme, api) -> None:
    response = api("post", ROUTES, {"match": "keyword", "value": "x", "agent": "nobody"})

    assert response.status_code == 400
    assert response.json() == {
        "agent": ["Instance 'acme' has no agent named 'nobody' ('default' is its own agent)."]
    }


def test_a_rule_is_moved_and_deleted_by_id(acme, api) -> None:
    created = api("post", ROUTES, {"match": "prefix", "value": "/a", "agent": "default"}).json()

    moved = api("patch", f"{ROUTES}{created['id']}/", {"position": 10})
    assert moved.status_code == 200 and moved.json()["position"] == 10

    assert api("delete", f"{ROUTES}{created['id']}/").status_code == 204
    assert not Route.objects.exists()


def test_an_agent_rules_point_at_is_not_deleted(acme, api) -> None:
    api("post", AGENTS, SALES)
    api("post", ROUTES, {"match": "keyword", "value": "vendas", "agent": "sales"})

    response = api("delete", f"{AGENTS}sales/")

    assert response.status_code == 400
    assert response.json() == {
        "non_field_errors": [
            "Agent 'sales' is used by the routing rules at position 1: delete them or point "
            "them at another agent first."
        ]
    }
    Route.objects.all().delete()
    assert api("delete", f"{AGENTS}sales/").status_code == 204


def test_a_staff_user_needs_the_agent_permissions(acme, client, django_user_model) -> None:
    staff = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    headers = {"Authorization": f"Token {Token.objects.create(user=staff).key}"}

    assert client.get(AGENTS, headers=headers).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_agent"))
    assert client.get(AGENTS, headers=headers).status_code == 200
    assert client.get(ROUTES, headers=headers).status_code == 403
    assert client.get(ROUTES).status_code == 401


def test_the_conversation_detail_shows_its_bound_agent(acme, api) -> None:
    agent = Agent.objects.create(
        instance=acme, name="sales", agent_api_url="http://x.test", agent_api_key="k"
    )
    chat = Conversation.objects.create(
        instance=acme, chat_jid="5511987654321@s.whatsapp.net", phone="5511987654321"
    )
    path = f"/api/v1/conversations/{chat.pk}/"
    assert api("get", path).json()["agent"] == "default"

    Conversation.objects.filter(pk=chat.pk).update(bound_agent=agent)
    detail = api("get", path).json()

    assert detail["agent"] == "sales"
    assert detail["session_name"] == "acme_5511987654321-sales"
    reset = api("post", f"{path}reset/").json()
    assert (reset["agent"], reset["session_name"]) == ("default", "acme_5511987654321-2")


@pytest.mark.parametrize("path", ["/api/v1/instances/acme/", ROUTES, AGENTS])
def test_a_body_without_a_content_type_is_a_documented_400(acme, client, api_key_headers, path):
    response = client.generic(
        "POST" if path != "/api/v1/instances/acme/" else "PATCH",
        path,
        b"name=x",
        content_type="",
        **api_key_headers,
    )

    assert response.status_code == 400
    assert response.json() == {"detail": 'Unsupported media type "" in request.'}
