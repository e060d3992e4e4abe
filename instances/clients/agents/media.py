"""A message's media as every agent kind gets it: what it is, its bytes when the
hub has them, a voice note's transcript, a document's text.

The worker prepares it (webhooks/media_input.py); each kind's build() decides
what of it goes into its request (README, "Media and voice").
"""

import base64
from dataclasses import dataclass
from typing import Any

MEDIA_KINDS = frozenset({"image", "audio", "video", "document"})


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def delivered_base64(payload: dict[str, Any]) -> str | None:
    """The media the delivery carried (Evolution's webhook "base64" option)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return None
    message = data.get("message")
    for holder in (message if isinstance(message, dict) else {}, data):
        value = holder.get("base64")
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class AgentMedia:
    kind: str
    mime_type: str
    file_name: str = ""
    caption: str = ""
    size: int | None = None
    # None: larger than the instance's media_max_bytes, or not to be had.
    data: bytes | None = None
    # Evolution's readable copy (its S3 `mediaUrl`), when it stores one.
    url: str | None = None
    # Why there are no bytes (shown in the message log too).
    note: str = ""
    # A voice note's text: Evolution's speechToText, or the instance's STT.
    transcript: str | None = None
    # A document's text (plain text or PDF), bounded.
    text: str | None = None

    @property
    def base64(self) -> str | None:
        return base64.b64encode(self.data).decode("ascii") if self.data is not None else None

    @property
    def data_url(self) -> str | None:
        """The bytes as a data: URL (an openai image_url part)."""
        encoded = self.base64
        if encoded is None:
            return None
        return f"data:{self.mime_type or 'application/octet-stream'};base64,{encoded}"

    def description(self) -> str:
        """One line for kinds that cannot take the bytes: "[image: foto.jpg, image/jpeg,
        1.2 MB] caption"."""
        facts = [fact for fact in (self.file_name, self.mime_type, human_size(self.size)) if fact]
        if self.note:
            facts.append(self.note)
        head = f"[{self.kind}: {', '.join(facts)}]" if facts else f"[{self.kind}]"
        return f"{head} {self.caption}".strip()

    def voice_text(self) -> str:
        """A transcribed voice note for text-only kinds: "[voice] …"."""
        return f"[voice] {self.transcript or ''}".strip()


def without_data(item: dict[str, Any], key: str = "data") -> dict[str, Any]:
    """A request part as the row keeps it: the file's base64 replaced by its length."""
    value = item.get(key)
    if not isinstance(value, str) or len(value) <= 64:
        return item
    return {**item, key: f"<{len(value)} characters of base64, not kept>"}
