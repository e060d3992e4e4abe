"""A reply as the WhatsApp messages it goes out as: pure functions, no I/O.

`split_replies` cuts the text on blank lines; `send_media_links` turns a
markdown image, a markdown link to a file, or a bare URL ending in a media
extension into a sendMedia of its own, with the alt or link text as its
caption. Everything keeps the order the agent wrote it in.
"""

import mimetypes
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

# Evolution's sendMedia `mediatype` for each extension the hub recognises.
MEDIA_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".gif", ".webp"), "image"),
    **dict.fromkeys((".mp4", ".mov", ".3gp", ".webm"), "video"),
    **dict.fromkeys((".mp3", ".ogg", ".oga", ".opus", ".m4a", ".wav", ".aac"), "audio"),
    **dict.fromkeys(
        (".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".csv", ".zip"), "document"
    ),
}
# ![alt](url) or [text](url); an optional "title" after the URL is dropped.
_MARKDOWN = re.compile(
    r"(?P<image>!?)\[(?P<label>[^\]\n]*)\]\((?P<url>https?://[^\s)]+)(?:\s+\"[^\"]*\")?\)"
)
_BARE_URL = re.compile(r"https?://[^\s<>()\[\]]+")
# Punctuation that ends a sentence, not the URL written before it.
_TRAILING = ".,;:!?'\""
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
TYPING_MIN_MS = 1000
TYPING_MAX_MS = 8000


@dataclass(frozen=True)
class Part:
    """One WhatsApp message of a reply: text, or media (`media_url` set)."""

    text: str = ""
    media_url: str = ""
    mediatype: str = ""
    mimetype: str = ""
    file_name: str = ""

    @property
    def is_media(self) -> bool:
        return bool(self.media_url)

    @property
    def echo_text(self) -> str:
        """What the message's echo shows as its text (a media message: its caption),
        so that the hub knows its own message while the send is in flight."""
        return self.text


def media_kind(url: str) -> str:
    """The mediatype a URL's path names by its extension ("" for none known)."""
    path = urlsplit(url).path
    return MEDIA_EXTENSIONS.get(PurePosixPath(path).suffix.lower(), "")


def media_part(*, url: str, caption: str, kind: str) -> Part:
    name = unquote(PurePosixPath(urlsplit(url).path).name) or kind
    mimetype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    # WhatsApp shows no caption under an audio message: the label goes unsaid.
    return Part(
        text="" if kind == "audio" else caption.strip(),
        media_url=url,
        mediatype=kind,
        mimetype=mimetype,
        file_name=name,
    )


def _pieces(text: str) -> list[Part]:
    """The text cut around its media links: Part(text=...) and media Parts, in order."""
    parts: list[Part] = []
    position = 0
    for match in _MARKDOWN.finditer(text):
        url, label = match["url"], match["label"]
        kind = media_kind(url) or ("image" if match["image"] else "")
        if not kind:
            # A link to a page stays text, as the agent wrote it.
            continue
        parts.extend(_bare_urls(text[position : match.start()]))
        parts.append(media_part(url=url, caption=label, kind=kind))
        position = match.end()
    parts.extend(_bare_urls(text[position:]))
    return parts


def _bare_urls(text: str) -> list[Part]:
    parts: list[Part] = []
    position = 0
    for match in _BARE_URL.finditer(text):
        url = match.group().rstrip(_TRAILING)
        kind = media_kind(url)
        if not kind:
            continue
        parts.append(Part(text=text[position : match.start()]))
        parts.append(media_part(url=url, caption="", kind=kind))
        # The punctuation after the URL ended its sentence: it goes with it, not
        # at the start of the next message.
        position = match.end()
    parts.append(Part(text=text[position:]))
    return parts


def reply_parts(*, text: str, split: bool, media_links: bool) -> list[Part]:
    """The messages a reply is sent as, in order; one text Part when both are off."""
    if not split and not media_links:
        return [Part(text=text)]
    pieces = _pieces(text) if media_links else [Part(text=text)]
    if not split and not any(piece.is_media for piece in pieces):
        # Nothing to cut: the text goes exactly as the agent wrote it.
        return [Part(text=text)]
    parts: list[Part] = []
    for piece in pieces:
        if piece.is_media:
            parts.append(piece)
            continue
        chunks = _BLANK_LINE.split(piece.text) if split else [piece.text]
        parts.extend(Part(text=chunk.strip()) for chunk in chunks if chunk.strip())
    return parts or [Part(text=text)]


def typing_ms(*, part: Part, ms_per_char: int) -> int:
    """How long WhatsApp shows "typing…" before a part (Evolution's `delay`): its
    length times ms_per_char, clamped to 1-8 s; 0 when off."""
    if ms_per_char <= 0:
        return 0
    length = len(part.text) or len(part.file_name)
    return max(TYPING_MIN_MS, min(TYPING_MAX_MS, length * ms_per_char))
