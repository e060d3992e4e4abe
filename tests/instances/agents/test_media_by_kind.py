"""What each agent kind receives for each media type (the README's table), at the
transport: the worker's prepared AgentMedia in, the request body out."""

import base64
import json
from typing import Any

import pytest

from instances.clients.agents import agent_for
from instances.clients.agents.media import AgentMedia
from tests.instances.agents.conftest import ask, call_for
from tests.webhooks.conftest import client_answering, message_body, unsaved_instance

pytestmark = pytest.mark.asyncio

JPEG = b"\xff\xd8\xff\xe0 tiny jpeg"
PHOTO = AgentMedia(
    kind="image",
    mime_type="image/jpeg",
    caption="Esse é o defeito no produto",
    size=len(JPEG),
    data=JPEG,
)
PDF_TEXT = "Orçamento: 3 mesas, R$ 900"
PDF = AgentMedia(
    kind="document",
    mime_type="application/pdf",
    file_name="Orcamento-2025.pdf",
    caption="Segue o orçamento assinado",
    size=2048,
    data=b"%PDF-1.4 ...",
    text=PDF_TEXT,
)
TOO_BIG = AgentMedia(
    kind="video",
    mime_type="video/mp4",
    caption="o defeito",
    size=30 * 1024 * 1024,
    note="larger than media_max_bytes (30.0 MB > 10.0 MB): not passed on",
)
OPENAI = {
    "agent_kind": "openai",
    "agent_api_url": "http://llm.acme.test/v1",
    "default_agent": "gpt-4o-mini",
}
WEBHOOK = {"agent_kind": "webhook", "agent_api_url": "http://n8n.acme.test/webhook/abc"}
ANSWERS = {
    "automagik": (200, {"message": "ok"}),
    "openai": (200, {"choices": [{"message": {"content": "ok"}}]}),
    "webhook": (200, {"output": "ok"}),
}


async def sent(kind_fields: dict[str, Any], fixture: str, media: AgentMedia) -> dict[str, Any]:
    kind = kind_fields.get("agent_kind", "automagik")
    _, [request] = await ask(
        ANSWERS[kind], call=call_for(message_body(fixture), media=media), **kind_fields
    )
    return json.loads(request.content)


def user_turn(body: dict[str, Any]) -> Any:
    return body["messages"][-1]["content"]


async def test_automagik_gets_a_photo_as_base64_media_contents() -> None:
    body = await sent({}, "messages-upsert-image-caption.json", PHOTO)

    assert body["message_type"] == "image"
    assert body["media_contents"] == [
        {
            "mime_type": "image/jpeg",
            "alt_text": "Esse é o defeito no produto",
            "data": base64.b64encode(JPEG).decode(),
        }
    ]


async def test_openai_gets_a_photo_as_an_image_url_part_with_its_caption() -> None:
    body = await sent(OPENAI, "messages-upsert-image-caption.json", PHOTO)

    text, image = user_turn(body)
    assert text == {"type": "text", "text": f"[image] {PHOTO.caption}"}
    assert image == {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()},
    }


async def test_webhook_gets_a_photo_as_its_media_object_with_base64() -> None:
    body = await sent(WEBHOOK, "messages-upsert-image-caption.json", PHOTO)

    assert body["media"] == {
        "mime_type": "image/jpeg",
        "url": None,
        "file_name": "",
        "caption": "Esse é o defeito no produto",
        "size": len(JPEG),
        "base64": base64.b64encode(JPEG).decode(),
        "note": "",
    }


async def test_openai_reads_a_pdfs_text_after_its_caption() -> None:
    body = await sent(OPENAI, "messages-upsert-document.json", PDF)

    turn = user_turn(body)
    assert turn.startswith("[document] Segue o orçamento assinado")
    assert turn.endswith(f"Orcamento-2025.pdf:\n{PDF_TEXT}")


@pytest.mark.parametrize(
    "kind_fields", [{}, OPENAI, WEBHOOK], ids=["automagik", "openai", "webhook"]
)
async def test_a_file_too_large_reaches_every_kind_as_a_description_without_bytes(
    kind_fields: dict[str, Any],
) -> None:
    body = await sent(kind_fields, "messages-upsert-video.json", TOO_BIG)

    described = "[video: video/mp4, 30.0 MB, larger than media_max_bytes"
    if kind_fields is OPENAI:
        assert user_turn(body).startswith(described)
    elif kind_fields is WEBHOOK:
        assert body["media"]["base64"] is None
        assert body["media"]["note"].startswith("larger than media_max_bytes")
    else:
        [item] = body["media_contents"]
        assert "data" not in item and item["alt_text"].startswith(described)


@pytest.mark.parametrize(
    ("kind_fields", "text"),
    [({}, "[Maria Souza]: quero pizza"), (OPENAI, "[voice] quero pizza"), (WEBHOOK, None)],
    ids=["automagik", "openai", "webhook"],
)
async def test_a_transcribed_voice_note_is_its_text_marked_as_voice(
    kind_fields: dict[str, Any], text: str | None
) -> None:
    body_in = message_body("messages-upsert-audio.json")
    call = call_for(body_in, media=AgentMedia(kind="audio", mime_type="audio/ogg"))
    transcribed = {**call.content, "text": "quero pizza", "transcribed": True}
    kind = kind_fields.get("agent_kind", "automagik")
    _, [request] = await ask(
        ANSWERS[kind],
        call=type(call)(**{**call.__dict__, "content": transcribed}),
        **kind_fields,
    )
    body = json.loads(request.content)

    if kind == "automagik":
        assert (body["message_type"], body["message_content"]) == ("audio", text)
    elif kind == "openai":
        assert user_turn(body) == text
    else:
        assert body["text"] == "[voice] quero pizza"
        assert body["message_type"] == "audio"


@pytest.mark.parametrize(
    "kind_fields", [{}, OPENAI, WEBHOOK], ids=["automagik", "openai", "webhook"]
)
async def test_the_row_keeps_the_request_without_the_files_bytes(
    kind_fields: dict[str, Any],
) -> None:
    big = AgentMedia(kind="image", mime_type="image/jpeg", caption="x", data=b"\xff" * 3000)
    requests: list[Any] = []
    async with client_answering((200, {}), requests) as http:
        agent = agent_for(instance=unsaved_instance(**kind_fields), http=http)
        request = agent.build(
            call=call_for(message_body("messages-upsert-image-caption.json"), media=big)
        )
        kept = json.dumps(agent.stored(request))

    assert base64.b64encode(b"\xff" * 3000).decode() not in kept
    assert "characters of base64, not kept" in kept
