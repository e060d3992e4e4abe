"""Several agents per number, end to end: the hub as processes, the default agent
(Automagik) and a second one (OpenAI-compatible) as loopback fakes."""

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Tenant
from tests.e2e.harness import text_delivery, unique
from tests.fakes import FakeOpenAI

CHAT = "5511911114001"


@pytest.fixture
def llm() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(prefix="sales").start()
    yield server
    server.stop()


def say(tenant: Tenant, text: str) -> dict[str, Any]:
    message_id = unique("RT").upper()
    response = tenant.post(text_delivery(message_id=message_id, text=text, phone=CHAT))
    assert response.status_code == 200, response.text
    return tenant.wait_finished(message_id)


def conversation(tenant: Tenant) -> dict[str, Any]:
    api = tenant.hub.server.api
    [chat] = api("GET", f"/api/v1/conversations/?instance={tenant.name}").json()["results"]
    return api("GET", f"/api/v1/conversations/{chat['id']}/").json()


def test_routing_a_keyword_binds_the_conversation_to_agent_b_until_reset_unmatched_messages_go_to_the_default(  # noqa: E501
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant()
    api = shop.hub.server.api
    created = api(
        "POST",
        f"/api/v1/instances/{shop.name}/agents/",
        json={
            "name": "sales",
            "agent_kind": "openai",
            "agent_api_url": f"{llm.url}/v1",
            "agent_api_key": "sk-sales",
            "default_agent": "gpt-4o-mini",
            "system_prompt": "You sell.",
        },
    )
    assert created.status_code == 201, created.text
    rule = api(
        "POST",
        f"/api/v1/instances/{shop.name}/routes/",
        json={"match": "keyword", "value": "vendas", "agent": "sales"},
    )
    assert rule.status_code == 201, rule.text

    first = say(shop, "oi")
    assert conversation(shop)["agent"] == "default"
    keyword = say(shop, "vendas")
    bound = say(shop, "quanto custa?")
    detail = conversation(shop)
    reset = say(shop, "/reset")
    after = say(shop, "e agora?")

    # Unmatched before the keyword: the default agent; from the keyword on, agent B.
    assert [r["status"] for r in (first, keyword, bound, reset, after)] == ["replied"] * 5
    assert [r.body["message_content"] for r in shop.agent.received("/run")] == [
        "[Maria Souza]: oi",
        "[Maria Souza]: e agora?",
    ]
    assert llm.completions == [
        [{"role": "system", "content": "You sell."}, {"role": "user", "content": "vendas"}],
        [
            {"role": "system", "content": "You sell."},
            {"role": "user", "content": "vendas"},
            {"role": "assistant", "content": "sales 1: vendas"},
            {"role": "user", "content": "quanto custa?"},
        ],
    ]
    [request] = llm.received("/chat/completions")[:1]
    assert request.headers["authorization"] == "Bearer sk-sales"
    assert detail["agent"] == "sales"
    assert detail["session_name"] == f"{shop.name}_{CHAT}-sales"
    assert keyword["session_name"] == bound["session_name"] == f"{shop.name}_{CHAT}-sales"
    # The reset ends the binding with the session: the default answers in a new one.
    assert conversation(shop)["agent"] == "default"
    assert after["session_name"] == f"{shop.name}_{CHAT}-2"
    assert [r.body["text"] for r in shop.evolution.sent()] == [
        "reply: [Maria Souza]: oi",
        "sales 1: vendas",
        "sales 2: quanto custa?",
        "Conversation restarted.",
        "reply: [Maria Souza]: e agora?",
    ]
