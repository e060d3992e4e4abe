"""A message's media in the console: what the message log and the conversation
page show of it, and the staff-only view that serves its bytes.

The hub stores no media of its own. The bytes come from the delivery's base64
(Evolution's webhook "base64" option) when it carried them, else from
Evolution's getBase64FromMediaMessage with the instance's own URL and key,
bounded by the instance's media_max_bytes. Nothing is cached on the hub; the
browser may keep a copy for a few minutes (Cache-Control: private).
"""

import base64
import binascii
import logging
import mimetypes
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from asgiref.sync import async_to_sync
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import content_disposition_header
from django.utils.safestring import SafeString

from instances.clients.agents.media import delivered_base64, human_size
from instances.clients.evolution import EvolutionClient, MediaFile
from instances.clients.http import OutboundError, new_http_client, scrub_secrets
from webhooks.models import InboundMessage
from webhooks.step import evolution_target

logger = logging.getLogger(__name__)

# Shown in the browser; anything else is a download. SVG is an image that can
# run scripts, from the admin's own origin: never inline.
INLINE_PREFIXES = ("image/", "audio/", "video/")
INLINE_TYPES = frozenset({"application/pdf"})
NEVER_INLINE = frozenset({"image/svg+xml"})
# What a thumbnail may be (the browser draws these; the rest get a link).
THUMBNAIL_PREFIX = "image/"
# A MIME type as Evolution and phones write it, with optional parameters
# ("audio/ogg; codecs=opus"); anything else is served as octet-stream.
MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
MIME_PARAMETER = re.compile(r"^[a-z0-9_.-]+=[a-z0-9_.+-]+$")
FILE_NAME_LIMIT = 120
CACHE_CONTROL = "private, max-age=300"
# A media document (an image or a player) needs nothing from anywhere.
MEDIA_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'"
THUMBNAIL_STYLE = (
    "max-width: 160px; max-height: 160px; border-radius: 4px; display: block; margin-top: 4px"
)
NOTE_STYLE = "color: #b45309"
TRANSCRIPT_STYLE = (
    "margin: 4px 0; padding: 2px 8px; border-left: 3px solid var(--border-color, #ccc); "
    "font-style: italic; white-space: pre-wrap"
)


@dataclass(frozen=True)
class MediaFacts:
    """content["media"] as the parser wrote it (and the worker's note)."""

    kind: str
    mime_type: str
    size: int | None
    file_name: str
    caption: str
    note: str

    @property
    def base_type(self) -> str:
        return safe_mime_type(self.mime_type).split(";")[0]

    @property
    def has_thumbnail(self) -> bool:
        return self.base_type.startswith(THUMBNAIL_PREFIX) and self.base_type not in NEVER_INLINE


def media_facts(content: Any) -> MediaFacts | None:
    """The message's media as stored in its content; None for a message without."""
    media = content.get("media") if isinstance(content, dict) else None
    if not isinstance(media, dict):
        return None
    size = media.get("size")

    def text(key: str) -> str:
        value = media.get(key)
        return value if isinstance(value, str) else ""

    return MediaFacts(
        kind=str(content.get("message_type") or ""),
        mime_type=text("mime_type"),
        size=size if isinstance(size, int) and size >= 0 else None,
        file_name=text("file_name"),
        caption=text("caption"),
        note=text("note"),
    )


def safe_mime_type(value: str) -> str:
    """The MIME type lower-cased with its well-formed parameters; octet-stream if odd."""
    parts = [part.strip() for part in (value or "").lower().split(";")]
    if not MIME_TYPE.match(parts[0]):
        return "application/octet-stream"
    parameters = [part for part in parts[1:] if MIME_PARAMETER.match(part)]
    return "; ".join([parts[0], *parameters])


def shown_inline(mime_type: str) -> bool:
    base = safe_mime_type(mime_type).split(";")[0]
    if base in NEVER_INLINE:
        return False
    return base.startswith(INLINE_PREFIXES) or base in INLINE_TYPES


def safe_file_name(name: str, *, message: InboundMessage, mime_type: str) -> str:
    """A file name without paths, quotes or control characters; made up if none is left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(
        char
        for char in unicodedata.normalize("NFC", name)
        if unicodedata.category(char)[0] not in "CZ" or char == " "
    )
    name = re.sub(r'["<>|:*?]', "_", name).strip(" .")[:FILE_NAME_LIMIT]
    if name:
        return name
    extension = mimetypes.guess_extension(safe_mime_type(mime_type).split(";")[0]) or ""
    stem = re.sub(r"[^A-Za-z0-9_-]", "", message.message_id)[:64] or str(message.pk)
    return f"{message.message_type or 'media'}-{stem}{extension}"


def media_url(message: InboundMessage) -> str:
    return reverse("admin:webhooks_inboundmessage_media", args=[message.pk])


# --- what the pages show -------------------------------------------------------------
def media_html(
    message: InboundMessage, *, can_open: bool, facts: MediaFacts | None = None
) -> SafeString | str:
    """The media's type, size, file name, caption and note, the transcript, and (for
    a user who may open it) a thumbnail, a player or a link to the file."""
    facts = facts or media_facts(message.content)
    parts: list[SafeString] = []
    if facts is not None:
        details = [format_html('<span class="media-type">{}</span>', facts.kind or "media")]
        if facts.mime_type:
            details.append(format_html('<span class="media-mime">{}</span>', facts.mime_type))
        details.append(
            format_html(
                '<span class="media-size">{}</span>',
                human_size(facts.size) if facts.size is not None else "size unknown",
            )
        )
        if facts.file_name:
            details.append(format_html('<span class="media-file-name">{}</span>', facts.file_name))
        parts.append(format_html_join(" · ", "{}", ((detail,) for detail in details)))
        if facts.caption:
            parts.append(format_html('<div class="media-caption">{}</div>', facts.caption))
        if facts.note:
            parts.append(
                format_html('<div class="media-note" style="{}">{}</div>', NOTE_STYLE, facts.note)
            )
    if message.transcript:
        parts.append(
            format_html(
                '<blockquote class="media-transcript" style="{}" title="Transcript">{}'
                "</blockquote>",
                TRANSCRIPT_STYLE,
                message.transcript,
            )
        )
    if facts is not None and can_open:
        parts.append(_opener(message, facts))
    if not parts:
        return "-"
    return format_html(
        '<div class="media">{}</div>', format_html_join("", "{}", ((part,) for part in parts))
    )


def _opener(message: InboundMessage, facts: MediaFacts) -> SafeString:
    url = media_url(message)
    if facts.has_thumbnail:
        return format_html(
            '<a class="media-open" href="{}" target="_blank" rel="noopener">'
            '<img class="media-thumbnail" src="{}" alt="{}" loading="lazy" style="{}"></a>',
            url,
            url,
            facts.caption or f"{facts.kind} from {message.push_name or message.phone}",
            THUMBNAIL_STYLE,
        )
    player = ""
    if facts.base_type.startswith("audio/"):
        player = format_html(
            '<audio class="media-player" controls preload="none" src="{}"></audio><br>', url
        )
    elif facts.base_type.startswith("video/"):
        player = format_html(
            '<video class="media-player" controls preload="none" src="{}" '
            'style="max-width: 320px; max-height: 240px"></video><br>',
            url,
        )
    label = "Open" if shown_inline(facts.mime_type) else "Download"
    return format_html(
        '{}<a class="media-open" href="{}" target="_blank" rel="noopener">{} the file</a>',
        player,
        url,
        label,
    )


# --- the bytes -----------------------------------------------------------------------
class MediaUnavailable(Exception):
    """The file cannot be had; `status` is the page's (404 gone/none, 502 Evolution)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedMedia:
    data: bytes
    mime_type: str
    file_name: str


def media_bytes(message: InboundMessage, facts: MediaFacts) -> ServedMedia:
    """The message's file: the delivery's base64, else Evolution's copy. Raises
    MediaUnavailable."""
    encoded = delivered_base64(message.payload)
    if encoded is not None:
        try:
            data = base64.b64decode(encoded, validate=False)
        except (binascii.Error, ValueError):
            data = b""  # Fetched instead, as the worker does.
        if data:
            return ServedMedia(data=data, mime_type=facts.mime_type, file_name=facts.file_name)
    fetched = _fetched(message, facts)
    return ServedMedia(
        data=fetched.data,
        mime_type=facts.mime_type or fetched.mime_type,
        file_name=facts.file_name or fetched.file_name,
    )


def _fetched(message: InboundMessage, facts: MediaFacts) -> MediaFile:
    instance = message.instance
    cap = instance.media_max_bytes
    if cap <= 0:
        raise MediaUnavailable(
            "The delivery carried no file, and this instance fetches none (media_max_bytes is 0).",
            status=404,
        )
    if facts.size is not None and facts.size > cap:
        raise MediaUnavailable(_too_large(facts.size, cap), status=404)
    target = evolution_target(message=message)
    if not target.base_url or not target.api_key:
        raise MediaUnavailable(
            "The delivery carried no file, and there is no Evolution address to fetch it "
            "from (a legacy-route message keeps its server only until it is finished).",
            status=404,
        )
    key = {"id": message.message_id, "remoteJid": message.chat_jid, "fromMe": False}

    async def fetch() -> MediaFile:
        async with new_http_client(max_connections=2) as http:
            evolution = EvolutionClient(target=target, http=http)
            return await evolution.get_base64(key=key, max_bytes=cap)

    try:
        found = async_to_sync(fetch)()
    except OutboundError as exc:
        reason = scrub_secrets(str(exc), [target.api_key])
        logger.warning("media of message %s not fetched: %s", message.pk, reason)
        if exc.status == 400 and not exc.retryable:
            # "Message not found": Evolution no longer has it (or never stored it).
            raise MediaUnavailable(
                f"Evolution no longer has this message's file: {reason}", status=404
            ) from exc
        raise MediaUnavailable(
            f"The file could not be fetched from Evolution: {reason}", status=502
        ) from exc
    if len(found.data) > cap:
        raise MediaUnavailable(_too_large(len(found.data), cap), status=404)
    if not found.data:
        raise MediaUnavailable("Evolution answered an empty file.", status=502)
    return found


def _too_large(size: int, cap: int) -> str:
    return (
        f"The file is larger than this instance's media_max_bytes "
        f"({human_size(size)} > {human_size(cap)}): not fetched."
    )


def media_response(request: HttpRequest, message: InboundMessage, context: dict[str, Any]) -> Any:
    """The file itself, or a page saying why it cannot be had (404, 502)."""
    facts = media_facts(message.content)
    try:
        if facts is None:
            raise MediaUnavailable("This message has no media.", status=404)
        served = media_bytes(message, facts)
    except MediaUnavailable as exc:
        page = TemplateResponse(
            request,
            "admin/webhooks/inboundmessage/media_unavailable.html",
            {**context, "message": message, "reason": str(exc), "status": exc.status},
            status=exc.status,
        )
        # Evolution may be back in a minute: the next look asks again.
        page["Cache-Control"] = "private, no-store"
        return page
    mime_type = safe_mime_type(served.mime_type)
    inline = shown_inline(mime_type)
    response = HttpResponse(served.data, content_type=mime_type)
    name = safe_file_name(served.file_name, message=message, mime_type=mime_type)
    response["Content-Disposition"] = content_disposition_header(not inline, name)
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = CACHE_CONTROL
    if mime_type.split(";")[0] not in INLINE_TYPES:
        # A PDF viewer needs its own scripts; an image or a player needs none.
        response["Content-Security-Policy"] = MEDIA_CSP
    return response
