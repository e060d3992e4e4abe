"""The agent kinds end to end: the hub as processes, an OpenAI-compatible server
and a webhook workflow as loopback fakes."""

from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import Tenant
from tests.e2e.harness import text_delivery, unique
from tests.fakes import FakeOpenAI, FakeWebhookAgent

CHAT = "5511911113001"


def say(tenant: Tenant, text: str, **fields: Any) -> dict[str, Any]:
    """Deliver a text from CHAT and wait for its row to finish."""
    message_id = unique("AK").upper()
    response = tenant.post(text_delivery(message_id=message_id, text=text, phone=CHAT, **fields))
    assert response.status_code == 200, response.text
    return tenant.wait_finished(message_id)


def sent_texts(tenant: Tenant) -> list[str]:
    return [r.body["text"] for r in tenant.evolution.sent()]


def test_an_openai_agent_gets_the_system_prompt_and_the_session_history(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(
        agent_kind="openai",
        agent_api_url=f"{llm.url}/v1",
        agent_api_key="sk-test",
        default_agent="gpt-4o-mini",
        system_prompt="You are Acme's assistant.",
        history_limit=3,
    )

    for text in ("oi", "preço?", "e o prazo?"):
        assert say(shop, text)["status"] == "replied"

    first, second, third = llm.completions
    assert first == [
        {"role": "system", "content": "You are Acme's assistant."},
        {"role": "user", "content": "oi"},
    ]
    assert second[1:] == [
        {"role": "user", "content": "oi"},
        {"role": "assistant", "content": "llm 1: oi"},
        {"role": "user", "content": "preço?"},
    ]
    # history_limit=3: the oldest message ("oi") is dropped first.
    assert [m["content"] for m in third] == [
        "You are Acme's assistant.",
        "llm 1: oi",
        "preço?",
        "llm 2: preço?",
        "e o prazo?",
    ]
    [request] = llm.received("/chat/completions")[:1]
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body["model"] == "gpt-4o-mini"
    assert sent_texts(shop) == ["llm 1: oi", "llm 2: preço?", "llm 3: e o prazo?"]


def test_a_reset_starts_the_openai_history_empty(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1", agent_api_key="")

    say(shop, "oi")
    assert say(shop, "/reset")["ignore_reason"] == "reset"
    say(shop, "de novo")

    assert llm.completions[-1] == [{"role": "user", "content": "de novo"}]
    assert "authorization" not in llm.received("/chat/completions")[0].headers


def test_a_401_from_the_openai_server_is_recorded_readably_and_not_retried(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1", agent_api_key="bad")
    llm.on(
        "/chat/completions",
        lambda record: (401, {"error": {"message": "Incorrect API key provided: bad."}}),
    )

    row = say(shop, "oi")

    assert len(llm.received("/chat/completions")) == 1
    assert row["agent_attempts"] == 1
    assert row["last_error"] == "agent answered 401: Incorrect API key provided: bad."
    assert sent_texts(shop) == [f"Sorry from {shop.name}"]


def test_a_webhook_agent_gets_the_documented_body_and_its_output_is_sent(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    shop = make_tenant(agent_kind="webhook", agent_api_url=f"{workflow.url}/webhook/abc")

    row = say(shop, "quero um orçamento")

    assert row["status"] == "replied"
    [request] = workflow.received("/webhook/abc")
    assert request.headers["authorization"] == f"Bearer agent-key-{shop.name}"
    body = request.body
    assert (body["instance"], body["phone"], body["text"]) == (
        shop.name,
        CHAT,
        "quero um orçamento",
    )
    assert body["chat_jid"] == f"{CHAT}@s.whatsapp.net"
    assert body["session_id"].endswith(CHAT)
    assert isinstance(body["conversation_id"], int)
    assert sent_texts(shop) == ["got: quero um orçamento"]


def test_a_webhook_agent_answering_an_array_sends_each_item_as_a_message_of_its_own(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    # split_replies is off: the array itself asks for several messages.
    shop = make_tenant(agent_kind="webhook", agent_api_url=workflow.url)
    workflow.answer = (200, [{"output": "Olá!"}, {"text": "Como posso ajudar?"}])

    row = say(shop, "oi")

    assert sent_texts(shop) == ["Olá!", "Como posso ajudar?"]
    assert row["reply_text"] == "Olá!\n\nComo posso ajudar?"


def test_a_webhook_agent_answering_null_sends_nothing(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    shop = make_tenant(agent_kind="webhook", agent_api_url=workflow.url)
    workflow.answer = (200, None)

    row = say(shop, "oi")

    assert (row["status"], row["reply_text"]) == ("replied", "")
    assert sent_texts(shop) == []
