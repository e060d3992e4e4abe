"""Media and voice end to end: the hub as processes, the fake Evolution serving
getBase64FromMediaMessage and markMessageAsRead, a fake OpenAI-compatible server
with /chat/completions and /audio/transcriptions, and the fake agents."""

import base64
import time
from collections.abc import Callable
from typing import Any

from tests.e2e.conftest import Tenant
from tests.e2e.harness import unique
from tests.fakes import FakeOpenAI, FakeWebhookAgent
from tests.pdf_files import pdf_with_pages
from tests.webhooks.conftest import message_body

PHONE = "5511922225001"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF tiny photo"
FAILURE = "Sorry, I could not understand this voice note. Could you write it?"


def post(
    tenant: Tenant,
    fixture: str,
    *,
    file: tuple[bytes, str, str] | None = None,
    declared_size: int | None = None,
) -> str:
    """Post a fixture's messages.upsert as a new message of PHONE, without the
    delivery's base64; `file` is what the fake Evolution serves for it."""
    message_id = unique("MD").upper()
    if file is not None:
        tenant.evolution.media[message_id] = file
    body = message_body(fixture, message_id=message_id, phone=PHONE)
    body["instance"] = tenant.fields["whatsapp_instance"]
    body["data"]["messageTimestamp"] = int(time.time())
    body["data"]["message"].pop("base64", None)
    if declared_size is not None:
        for content in body["data"]["message"].values():
            if isinstance(content, dict) and "fileLength" in content:
                content["fileLength"] = declared_size
    response = tenant.post(body)
    assert response.status_code == 200, response.text
    return message_id


def deliver(tenant: Tenant, fixture: str, **post_fields: Any) -> dict[str, Any]:
    """post(), then the finished row."""
    return tenant.wait_finished(post(tenant, fixture, **post_fields), timeout=30)


def sent_texts(tenant: Tenant) -> list[str]:
    return [r.body["text"] for r in tenant.evolution.sent()]


def test_a_photo_fetched_from_evolution_reaches_each_agent_kind_as_specified(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI, workflow: FakeWebhookAgent
) -> None:
    shops = {
        "automagik": make_tenant(),
        "openai": make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1"),
        "webhook": make_tenant(agent_kind="webhook", agent_api_url=workflow.url),
    }
    for shop in shops.values():
        row = deliver(
            shop, "messages-upsert-image-caption.json", file=(JPEG, "image/jpeg", "p.jpeg")
        )
        assert row["status"] == "replied"
        [fetch] = shop.evolution.received("/chat/getBase64FromMediaMessage/")
        assert fetch.body["message"]["key"]["id"] == row["message_id"]

    encoded = base64.b64encode(JPEG).decode()
    [automagik] = shops["automagik"].agent.received("/run")
    assert automagik.body["message_type"] == "image"
    assert automagik.body["media_contents"][0]["data"] == encoded
    [completion] = llm.completions
    text, image = completion[-1]["content"]
    assert text["text"] == "[image] Esse é o defeito no produto"
    assert image["image_url"]["url"] == f"data:image/jpeg;base64,{encoded}"
    [hook] = workflow.received()
    assert hook.body["media"]["base64"] == encoded
    assert hook.body["media"]["caption"] == "Esse é o defeito no produto"


def test_a_voice_note_is_transcribed_and_the_transcript_answered(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(
        agent_kind="openai", agent_api_url=f"{llm.url}/v1", stt_url=f"{llm.url}/v1", stt_key="k"
    )
    row = deliver(
        shop, "messages-upsert-audio.json", file=(b"speech: quero uma pizza", "audio/ogg", "v.ogg")
    )

    assert row["status"] == "replied"
    assert row["transcript"] == "quero uma pizza"
    [transcription] = llm.transcriptions
    assert transcription.headers["authorization"] == "Bearer k"
    assert llm.completions[-1][-1]["content"] == "[voice] quero uma pizza"
    assert sent_texts(shop) == ["llm 1: [voice] quero uma pizza"]


def test_evolutions_speech_to_text_is_answered_without_a_transcription(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1", stt_url=f"{llm.url}/v1")

    row = deliver(shop, "messages-upsert-audio-speechtotext.json")

    assert row["status"] == "replied"
    # Evolution starts its transcript with "[audio] ": the hub's marker replaces it.
    assert row["transcript"] == "Oi, queria saber se vocês entregam no sábado."
    assert llm.transcriptions == []
    assert shop.evolution.received("/chat/getBase64FromMediaMessage/") == []
    assert llm.completions[-1][-1]["content"] == f"[voice] {row['transcript']}"


def test_transcription_down_then_up_then_down_for_good(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1", stt_url=f"{llm.url}/v1")

    def voice_note() -> dict[str, Any]:
        return deliver(shop, "messages-upsert-audio.json", file=(b"speech: oi", "audio/ogg", "v"))

    # Down once, then up: retried, answered once, the agent asked once.
    llm.stt_failures = 1
    first = voice_note()
    assert first["status"] == "replied" and first["transcript"] == "oi"
    assert len(llm.transcriptions) == 2 and len(llm.completions) == 1

    # Down for good: the user is asked to write, the agent is not asked, the row says why.
    llm.stt_failures = -1
    second = voice_note()
    assert second["status"] == "replied"
    assert second["reply_text"] == FAILURE
    assert "voice note not understood: transcription answered 503" in second["last_error"]
    assert len(llm.completions) == 1
    assert sent_texts(shop) == ["llm 1: [voice] oi", FAILURE]


def test_an_oversized_document_reaches_the_agent_as_a_description(
    make_tenant: Callable[..., Tenant], workflow: FakeWebhookAgent
) -> None:
    shop = make_tenant(agent_kind="webhook", agent_api_url=workflow.url, media_max_bytes=1000)

    row = deliver(shop, "messages-upsert-document.json")

    assert row["status"] == "replied"
    [hook] = workflow.received()
    assert hook.body["media"]["base64"] is None
    assert hook.body["media"]["note"].startswith("larger than media_max_bytes")
    assert hook.body["media"]["file_name"] == "Orcamento-2025.pdf"
    # Never fetched: the delivery declared its size.
    assert shop.evolution.received("/chat/getBase64FromMediaMessage/") == []
    assert "larger than media_max_bytes" in row["content"]


def test_a_pdfs_text_reaches_an_openai_agent(
    make_tenant: Callable[..., Tenant], llm: FakeOpenAI
) -> None:
    shop = make_tenant(agent_kind="openai", agent_api_url=f"{llm.url}/v1")
    pdf = pdf_with_pages("Orcamento 2025: 3 mesas por R$ 900")
    file = (pdf, "application/pdf", "Orcamento-2025.pdf")

    row = deliver(shop, "messages-upsert-document.json", file=file, declared_size=len(pdf))

    assert row["status"] == "replied"
    turn = llm.completions[-1][-1]["content"]
    assert turn.startswith("[document] Segue o orçamento assinado")
    assert "Orcamento 2025: 3 mesas por R$ 900" in turn


def test_mark_read_marks_the_message_read_with_its_phone_key(
    make_tenant: Callable[..., Tenant],
) -> None:
    shop = make_tenant(mark_read=True)
    message_id, response = shop.send_text("oi", phone=PHONE)
    assert response.status_code == 200

    assert shop.wait_finished(message_id)["status"] == "replied"
    [read] = shop.evolution.wait_for("/chat/markMessageAsRead/", 1)
    assert read.headers["apikey"] == shop.fields["evolution_key"]
    assert read.body == {
        "readMessages": [
            {"remoteJid": f"{PHONE}@s.whatsapp.net", "fromMe": False, "id": message_id}
        ]
    }


def test_without_mark_read_nothing_is_marked(make_tenant: Callable[..., Tenant]) -> None:
    shop = make_tenant()
    message_id, _ = shop.send_text("oi", phone=PHONE)

    assert shop.wait_finished(message_id)["status"] == "replied"
    assert shop.evolution.received("/chat/markMessageAsRead/") == []
