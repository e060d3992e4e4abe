"""What of a message's media its agent gets, prepared in the worker (never in
the webhook request): the bytes from the delivery's base64 or fetched from
Evolution, the size cap, a voice note's transcript, a document's text.

Failures that may pass (Evolution's 5xx or intermittent 400, a transcription
server down) raise OutboundError while the message has agent attempts left, so
the worker retries it later; on its last attempt they become a note instead
and the agent still answers (a voice note without a transcript: see
processing's stt failure path).
"""

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any

import httpx

from instances.clients.agents.media import MEDIA_KINDS, AgentMedia, delivered_base64, human_size
from instances.clients.evolution import EvolutionClient
from instances.clients.http import OutboundError
from instances.clients.transcription import Transcriber
from instances.models import InstanceConfig
from webhooks.document_text import document_text


@dataclass(frozen=True)
class PreparedMedia:
    media: AgentMedia
    # A voice note's text (Evolution's speechToText, or the instance's STT);
    # None when there is none.
    transcript: str | None
    # The STT was asked and failed for good (or there is none for this kind).
    voice_unreadable: str = ""


def evolution_speech(content: dict[str, Any]) -> str:
    """Evolution's own transcript of a voice note (its speechToText, which it
    starts with "[audio] "), without that marker; "" when there is none."""
    text = (content.get("text") or "").strip()
    return text.removeprefix("[audio]").strip()


def readable_url(url: object) -> str | None:
    """Evolution's own stored copy (mediaUrl, e.g. on S3) is readable; WhatsApp's CDN
    URL is an encrypted file nobody else can open."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    return None if ".whatsapp.net/" in url or url.endswith(".enc") else url


def described(content: dict[str, Any]) -> AgentMedia | None:
    """The media as the delivery describes it, without bytes; None for none."""
    media = content.get("media")
    kind = content.get("message_type", "")
    if not isinstance(media, dict) or kind not in MEDIA_KINDS:
        return None
    size = media.get("size")
    return AgentMedia(
        kind=kind,
        mime_type=media.get("mime_type") or "",
        file_name=media.get("file_name") or "",
        caption=media.get("caption") or "",
        size=size if isinstance(size, int) else None,
        url=readable_url(media.get("url")),
    )


async def prepare_media(
    *,
    instance: InstanceConfig,
    content: dict[str, Any],
    payload: dict[str, Any],
    message_id: str,
    chat_jid: str,
    evolution: EvolutionClient,
    http: httpx.AsyncClient,
    agent_kind: str,
    last_attempt: bool,
) -> PreparedMedia | None:
    """The message's media for its agent; None when it has none. Raises OutboundError
    (retryable) for a failure worth waiting for, unless this is the last attempt."""
    media = described(content)
    if media is None:
        return None
    cap = instance.media_max_bytes
    data: bytes | None = None
    speech = evolution_speech(content) if media.kind == "audio" else ""
    if speech and agent_kind != "automagik":
        # Evolution transcribed it: a text-only kind needs nothing more.
        return PreparedMedia(media=media, transcript=speech)
    if media.size is not None and media.size > cap:
        media = replace(media, note=_over_cap(media.size, cap))
    else:
        try:
            data = await _bytes(
                payload=payload,
                message_id=message_id,
                chat_jid=chat_jid,
                evolution=evolution,
                cap=cap,
            )
        except OutboundError as exc:
            if exc.retryable and not last_attempt:
                raise OutboundError(f"media not fetched: {exc}", retryable=True) from exc
            media = replace(media, note=f"not fetched: {exc}")
        if data is not None and len(data) > cap:
            media, data = replace(media, size=len(data), note=_over_cap(len(data), cap)), None
        elif data is not None:
            media = replace(media, size=len(data), data=data)
    if media.kind == "audio":
        return await _voice(
            instance,
            media,
            content=content,
            http=http,
            agent_kind=agent_kind,
            last_attempt=last_attempt,
        )
    if media.kind == "document" and media.data is not None:
        media = replace(media, text=document_text(data=media.data, mime_type=media.mime_type))
    return PreparedMedia(media=media, transcript=None)


def _over_cap(size: int, cap: int) -> str:
    return f"larger than media_max_bytes ({human_size(size)} > {human_size(cap)}): not passed on"


async def _bytes(
    *,
    payload: dict[str, Any],
    message_id: str,
    chat_jid: str,
    evolution: EvolutionClient,
    cap: int,
) -> bytes | None:
    if cap <= 0:
        return None
    encoded = delivered_base64(payload)
    if encoded is not None:
        try:
            return base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            pass  # Fetched instead, as when the delivery had none.
    key = {"id": message_id, "remoteJid": chat_jid, "fromMe": False}
    return (await evolution.get_base64(key=key, max_bytes=cap)).data


async def _voice(
    instance: InstanceConfig,
    media: AgentMedia,
    *,
    content: dict[str, Any],
    http: httpx.AsyncClient,
    agent_kind: str,
    last_attempt: bool,
) -> PreparedMedia:
    # Evolution's speechToText (parsed as the audio's text) saves a transcription.
    speech = evolution_speech(content)
    if speech:
        return PreparedMedia(media=media, transcript=speech)
    if not instance.stt_url:
        # automagik agents take the audio itself; the others cannot hear it.
        unreadable = "" if agent_kind == "automagik" else "no speech-to-text configured"
        return PreparedMedia(media=media, transcript=None, voice_unreadable=unreadable)
    if media.data is None:
        return PreparedMedia(
            media=media, transcript=None, voice_unreadable=f"no audio to transcribe ({media.note})"
        )
    try:
        text = await Transcriber(instance=instance, http=http).transcribe(
            audio=media.data, mime_type=media.mime_type, file_name=media.file_name
        )
    except OutboundError as exc:
        if exc.retryable and not last_attempt:
            raise
        return PreparedMedia(media=media, transcript=None, voice_unreadable=str(exc))
    if not text:
        return PreparedMedia(media=media, transcript=None, voice_unreadable="no speech heard")
    return PreparedMedia(media=media, transcript=text)
