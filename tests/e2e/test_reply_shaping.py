"""Replies shaped like a person's, end to end: the hub as a process, a webhook
workflow answering, and the fake Evolution recording what went out."""

from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import Tenant
from tests.e2e.harness import text_delivery, unique
from tests.fakes import FakeWebhookAgent

CHAT = "5511911114001"


def tenant_answering(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent, reply: str, **fields: Any
) -> Tenant:
    workflow.answer = (200, {"output": reply})
    return make_tenant(agent_kind="webhook", agent_api_url=f"{workflow.url}/hook", **fields)


def say(tenant: Tenant, text: str) -> dict[str, Any]:
    message_id = unique("RS").upper()
    response = tenant.post(text_delivery(message_id=message_id, text=text, phone=CHAT))
    assert response.status_code == 200, response.text
    return tenant.wait_finished(message_id)


def test_a_split_reply_arrives_as_separate_send_texts_in_order(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    shop = tenant_answering(
        make_tenant,
        workflow,
        "Olá!\n\nTemos entrega amanhã.\n\nPosso reservar?",
        split_replies=True,
        typing_ms_per_char=1,
    )

    assert say(shop, "tem entrega?")["status"] == "replied"

    sent = shop.evolution.sent_messages()
    assert [(r.path.split("/")[2], r.body["text"]) for r in sent] == [
        ("sendText", "Olá!"),
        ("sendText", "Temos entrega amanhã."),
        ("sendText", "Posso reservar?"),
    ]
    # typing_ms_per_char: Evolution's delay, at least 1 s a part.
    assert [r.body["delay"] for r in sent] == [1000, 1000, 1000]
    assert len(workflow.received()) == 1


def test_a_markdown_image_becomes_one_send_media_with_the_text_around_it_as_send_text(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    shop = tenant_answering(
        make_tenant,
        workflow,
        "Aqui está o catálogo:\n![Catálogo de dezembro](https://cdn.example.com/dez.png)\n"
        "Algum item te interessou?",
    )

    assert say(shop, "catálogo?")["status"] == "replied"

    before, media, after = shop.evolution.sent_messages()
    assert before.path.startswith("/message/sendText/")
    assert before.body["text"] == "Aqui está o catálogo:"
    assert media.path.startswith("/message/sendMedia/")
    assert {k: media.body[k] for k in ("mediatype", "mimetype", "media", "caption")} == {
        "mediatype": "image",
        "mimetype": "image/png",
        "media": "https://cdn.example.com/dez.png",
        "caption": "Catálogo de dezembro",
    }
    assert after.body["text"] == "Algum item te interessou?"
