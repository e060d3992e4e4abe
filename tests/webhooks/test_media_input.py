"""A message's media prepared for its agent (webhooks/media_input.py), against
Evolution and a transcription server mocked at the transport."""

import base64
import json
from typing import Any

import httpx
import pytest

from instances.clients.evolution import EvolutionClient, EvolutionTarget
from instances.clients.http import OutboundError
from tests.pdf_files import pdf_with_pages
from tests.webhooks.conftest import message_body, unsaved_instance
from webhooks.media_input import PreparedMedia, prepare_media, readable_url
from webhooks.parsing import parse_message, strip_secrets

TARGET = EvolutionTarget(
    base_url="http://evolution.acme.test", api_key="acme-evolution-key", instance_name="acme-wa"
)
JPEG = b"\xff\xd8\xff\xe0 a tiny jpeg"


class Servers:
    """Evolution's getBase64FromMediaMessage and an STT server, scripted per test."""

    def __init__(self) -> None:
        self.media: tuple[int, Any] = (201, {"mimetype": "image/jpeg", "base64": ""})
        self.stt: tuple[int, Any] = (200, {"text": "quero uma pizza grande"})
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = self.stt if "/audio/transcriptions" in request.url.path else self.media
        return httpx.Response(status, json=body)

    def calls(self, part: str) -> list[httpx.Request]:
        return [r for r in self.requests if part in r.url.path]


def serving(data: bytes, mimetype: str) -> tuple[int, Any]:
    return 201, {"mimetype": mimetype, "fileName": "x", "base64": base64.b64encode(data).decode()}


async def prepare(
    servers: Servers,
    fixture: str,
    *,
    drop_base64: bool = False,
    declared_size: int | None = None,
    last_attempt: bool = False,
    agent_kind: str = "openai",
    **fields: Any,
) -> PreparedMedia | None:
    body = message_body(fixture)
    if drop_base64:
        body["data"]["message"].pop("base64", None)
    if declared_size is not None:
        for value in body["data"]["message"].values():
            if isinstance(value, dict) and "fileLength" in value:
                # A phone may declare less than it sends: the fetched bytes are checked too.
                value["fileLength"] = declared_size
    parsed = parse_message(body)
    instance = unsaved_instance(**fields)
    async with httpx.AsyncClient(transport=httpx.MockTransport(servers.handle)) as http:
        return await prepare_media(
            instance=instance,
            content=parsed.to_content(),
            payload=strip_secrets(body),
            message_id=parsed.message_id,
            chat_jid=parsed.chat_jid,
            evolution=EvolutionClient(target=TARGET, http=http),
            http=http,
            agent_kind=agent_kind,
            last_attempt=last_attempt,
        )


@pytest.mark.asyncio
async def test_a_text_message_has_no_media() -> None:
    assert await prepare(Servers(), "messages-upsert-text.json") is None


@pytest.mark.asyncio
async def test_the_deliverys_own_base64_is_used_without_asking_evolution() -> None:
    servers = Servers()

    prepared = await prepare(servers, "messages-upsert-image-base64.json")

    assert prepared is not None
    media = prepared.media
    assert media.kind == "image" and media.data is not None and media.data[:2] == b"\xff\xd8"
    assert media.caption == "Foto do comprovante"
    assert servers.requests == []


@pytest.mark.asyncio
async def test_without_base64_the_bytes_are_fetched_from_evolution_with_the_messages_key() -> None:
    servers = Servers()
    servers.media = serving(JPEG, "image/jpeg")

    prepared = await prepare(servers, "messages-upsert-image-caption.json")

    assert prepared is not None and prepared.media.data == JPEG
    [fetch] = servers.calls("/chat/getBase64FromMediaMessage/acme-wa")
    assert fetch.headers["apikey"] == "acme-evolution-key"
    sent = json.loads(fetch.content)
    assert sent["convertToMp4"] is False
    assert sent["message"]["key"]["fromMe"] is False and sent["message"]["key"]["id"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "answer",
    [(500, {"error": "boom"}), (400, {"response": {"message": ["AggregateError"]}})],
    ids=["5xx", "aggregate-error"],
)
async def test_a_fetch_that_may_pass_is_raised_for_a_retry(answer: tuple[int, Any]) -> None:
    servers = Servers()
    servers.media = answer

    with pytest.raises(OutboundError) as caught:
        await prepare(servers, "messages-upsert-image-caption.json")

    assert caught.value.retryable is True
    assert str(caught.value).startswith("media not fetched: ")


@pytest.mark.asyncio
async def test_on_the_last_attempt_a_failed_fetch_becomes_a_note_and_the_agent_still_answers() -> (
    None
):
    servers = Servers()
    servers.media = (500, {"error": "boom"})

    prepared = await prepare(servers, "messages-upsert-image-caption.json", last_attempt=True)

    assert prepared is not None
    assert prepared.media.data is None
    assert prepared.media.note.startswith("not fetched: ")


@pytest.mark.asyncio
async def test_media_declared_larger_than_the_cap_is_described_without_fetching() -> None:
    servers = Servers()

    prepared = await prepare(servers, "messages-upsert-document.json", media_max_bytes=1000)

    assert prepared is not None
    media = prepared.media
    assert media.data is None and media.note.startswith("larger than media_max_bytes (")
    assert media.file_name == "Orcamento-2025.pdf"
    assert servers.requests == []


@pytest.mark.asyncio
async def test_media_found_larger_than_the_cap_once_fetched_is_dropped() -> None:
    servers = Servers()
    servers.media = serving(b"x" * 5000, "image/jpeg")

    prepared = await prepare(
        servers,
        "messages-upsert-image-caption.json",
        drop_base64=True,
        declared_size=100,
        media_max_bytes=4000,
    )

    assert prepared is not None
    assert prepared.media.data is None and prepared.media.size == 5000
    assert "larger than media_max_bytes" in prepared.media.note


@pytest.mark.asyncio
async def test_a_pdfs_text_comes_with_the_document() -> None:
    servers = Servers()
    servers.media = serving(pdf_with_pages("Orcamento: 3 mesas, R$ 900"), "application/pdf")

    prepared = await prepare(servers, "messages-upsert-document.json")

    assert prepared is not None and prepared.media.text is not None
    assert "3 mesas, R$ 900" in prepared.media.text


@pytest.mark.asyncio
async def test_a_voice_note_is_transcribed_by_the_instances_stt_server() -> None:
    servers = Servers()
    servers.media = serving(b"OggS voice", "audio/ogg; codecs=opus")

    prepared = await prepare(
        servers,
        "messages-upsert-audio.json",
        stt_url="http://stt.acme.test/v1",
        stt_key="stt-secret",
        stt_model="whisper-large-v3",
    )

    assert prepared is not None and prepared.transcript == "quero uma pizza grande"
    [call] = servers.calls("/audio/transcriptions")
    assert str(call.url) == "http://stt.acme.test/v1/audio/transcriptions"
    assert call.headers["authorization"] == "Bearer stt-secret"
    assert call.headers["content-type"].startswith("multipart/form-data")
    assert b'name="model"\r\n\r\nwhisper-large-v3' in call.content
    assert b"OggS voice" in call.content


@pytest.mark.asyncio
async def test_evolutions_speech_to_text_is_used_and_no_transcription_is_asked() -> None:
    servers = Servers()

    prepared = await prepare(
        servers, "messages-upsert-audio-speechtotext.json", stt_url="http://stt.acme.test/v1"
    )

    assert prepared is not None and prepared.transcript
    assert servers.calls("/audio/transcriptions") == []


@pytest.mark.asyncio
async def test_a_transcription_server_down_is_raised_for_a_retry_then_given_up() -> None:
    servers = Servers()
    servers.media = serving(b"OggS voice", "audio/ogg")
    servers.stt = (503, {"error": {"message": "overloaded"}})
    stt = {"stt_url": "http://stt.acme.test/v1"}

    with pytest.raises(OutboundError):
        await prepare(servers, "messages-upsert-audio.json", **stt)
    prepared = await prepare(servers, "messages-upsert-audio.json", last_attempt=True, **stt)

    assert prepared is not None and prepared.transcript is None
    assert prepared.voice_unreadable.startswith("transcription answered 503")


@pytest.mark.asyncio
async def test_a_refused_stt_key_is_not_retried() -> None:
    servers = Servers()
    servers.media = serving(b"OggS voice", "audio/ogg")
    servers.stt = (401, {"error": {"message": "Incorrect API key provided"}})

    prepared = await prepare(
        servers, "messages-upsert-audio.json", stt_url="http://stt.acme.test/v1"
    )

    assert prepared is not None
    assert "Incorrect API key provided" in prepared.voice_unreadable


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "unreadable"), [("automagik", False), ("openai", True)])
async def test_without_stt_only_an_automagik_agent_takes_the_audio(
    kind: str, unreadable: bool
) -> None:
    servers = Servers()
    servers.media = serving(b"OggS voice", "audio/ogg")

    prepared = await prepare(servers, "messages-upsert-audio.json", agent_kind=kind)

    assert prepared is not None and prepared.media.data == b"OggS voice"
    assert bool(prepared.voice_unreadable) is unreadable


@pytest.mark.parametrize(
    ("url", "readable"),
    [
        ("https://mmg.whatsapp.net/v/t62/abc.enc?x=1", None),
        ("https://s3.acme.test/evolution/abc.jpg", "https://s3.acme.test/evolution/abc.jpg"),
        (None, None),
    ],
)
def test_only_evolutions_own_copy_of_a_file_is_a_readable_url(url: Any, readable: Any) -> None:
    assert readable_url(url) == readable
