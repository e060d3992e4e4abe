"""Evolution API webhook bodies (v1.8 to 2.4) turned into one normalized message.

Pure functions over decoded JSON: no Django, no I/O. A delivery comes from a
server we do not control, so every field is read defensively: a value of the
wrong type reads as missing, and only ParseError ever leaves parse_message.
"""

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any


class ParseError(ValueError):
    """The body is a JSON object but not a usable delivery of that event."""


# Column sizes of webhooks.InboundMessage: longer identifiers are not real
# WhatsApp ids, and would fail at insert time instead of here.
MAX_ID_LENGTH = 128
MAX_PUSH_NAME_LENGTH = 256

# Wrappers holding the real content in .message. Nesting is bounded so a
# hostile body cannot keep the parser looping.
CONTAINERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "editedMessage",
)
MAX_NESTING = 8

# Content keys in the order they are looked for. senderKeyDistributionMessage
# and messageContextInfo ride along with real content and are not listed;
# protocolMessage comes last so it only wins when nothing else is there.
CONTENT_TYPES = (
    ("conversation", "text"),
    ("extendedTextMessage", "text"),
    ("buttonsResponseMessage", "text"),
    ("templateButtonReplyMessage", "text"),
    ("listResponseMessage", "text"),
    ("imageMessage", "image"),
    ("videoMessage", "video"),
    ("ptvMessage", "video"),
    ("audioMessage", "audio"),
    ("documentMessage", "document"),
    ("stickerMessage", "sticker"),
    ("reactionMessage", "reaction"),
    ("locationMessage", "location"),
    ("liveLocationMessage", "location"),
    ("contactMessage", "contact"),
    ("contactsArrayMessage", "contact"),
    ("pollCreationMessage", "poll"),
    ("pollCreationMessageV2", "poll"),
    ("pollCreationMessageV3", "poll"),
    ("pollUpdateMessage", "poll"),
    ("protocolMessage", "protocol"),
)
TEXT_FIELDS = {
    "extendedTextMessage": "text",
    "buttonsResponseMessage": "selectedDisplayText",
    "templateButtonReplyMessage": "selectedDisplayText",
    "listResponseMessage": "title",
    "reactionMessage": "text",
}
MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})

PN_SUFFIX = "@s.whatsapp.net"
LID_SUFFIX = "@lid"
GROUP_SUFFIX = "@g.us"
BROADCAST_SUFFIX = "@broadcast"
NEWSLETTER_SUFFIX = "@newsletter"
# E.164 numbers have at most 15 digits; anything much longer is not a phone.
PN_JID = re.compile(r"[0-9]{1,20}@s\.whatsapp\.net")
MAX_INT_DIGITS = 20


@dataclass(frozen=True)
class Media:
    mime_type: str
    url: str | None
    base64: str | None
    size: int | None
    file_name: str | None
    caption: str | None


@dataclass(frozen=True)
class ParsedMessage:
    message_id: str
    chat_jid: str
    sender_jid: str
    phone: str
    reply_to: str
    push_name: str
    from_me: bool
    message_type: str
    text: str
    media: Media | None
    quoted: dict[str, str] | None
    mentions: tuple[str, ...]
    timestamp: int | None
    is_group: bool
    is_broadcast: bool
    is_newsletter: bool
    evolution_instance: str

    def to_content(self) -> dict[str, Any]:
        """Everything but the media bytes, which can be megabytes and are fetched again."""
        # Field by field rather than dataclasses.asdict, which deep-copies every
        # value (a fifth of storing a delivery): only `quoted` and `media` are
        # containers, and they are copied here.
        content = {name: getattr(self, name) for name in _MESSAGE_FIELDS}
        content["mentions"] = list(self.mentions)
        if self.quoted is not None:
            content["quoted"] = dict(self.quoted)
        if self.media is not None:
            media = dataclasses.asdict(self.media)
            media["has_base64"] = media.pop("base64") is not None
            content["media"] = media
        return content


_MESSAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ParsedMessage))


def event_name(body: dict) -> str:
    event = body.get("event") if isinstance(body, dict) else None
    if not isinstance(event, str):
        return ""
    return event.strip().lower().replace("_", ".").replace("-", ".")


def strip_secrets(body: dict) -> dict:
    # Evolution puts the instance token in "apikey" when
    # AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES is on; the stored copy must not keep it.
    return {key: value for key, value in body.items() if key != "apikey"}


def message_bodies(body: dict) -> list[dict]:
    """One body per message: a list-shaped `data` holds several, each its own message.

    Each keeps the envelope (event, instance, server_url...) with its own
    element as `data`, so that it is parsed and stored like a single delivery.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, list) and data:
        return [{**body, "data": element} for element in data]
    return [body]


def parse_message(body: dict) -> ParsedMessage:
    """The message of a body whose `data` is one message (see message_bodies)."""
    if not isinstance(body, dict):
        raise ParseError("body is not an object")
    data = body.get("data")
    if not isinstance(data, dict):
        raise ParseError("data is not an object")
    key = data.get("key")
    if not isinstance(key, dict):
        raise ParseError("data.key is not an object")
    message_id = key.get("id")
    if not isinstance(message_id, str) or not message_id.strip():
        raise ParseError("data.key.id is missing")
    if len(message_id) > MAX_ID_LENGTH:
        raise ParseError("data.key.id is too long")
    remote_jid = _jid(key.get("remoteJid"))
    if not remote_jid:
        raise ParseError("data.key.remoteJid is missing")
    if len(remote_jid) > MAX_ID_LENGTH:
        raise ParseError("data.key.remoteJid is too long")

    is_group = remote_jid.endswith(GROUP_SUFFIX)
    is_broadcast = remote_jid.endswith(BROADCAST_SUFFIX)
    is_newsletter = remote_jid.endswith(NEWSLETTER_SUFFIX)
    if is_group or is_broadcast or is_newsletter:
        chat_jid = remote_jid
        sender_jid = _prefer_phone(
            [key.get("participant"), key.get("participantAlt"), key.get("participantPn")]
        )
    else:
        # Which of remoteJid / remoteJidAlt holds the phone changed in 2.3.6,
        # 2.3.7 and 2.4.0-rc2, so the suffix decides, not the position.
        chat_jid = _prefer_phone([remote_jid, key.get("remoteJidAlt"), key.get("senderPn")])
        sender_jid = chat_jid

    raw_message = data.get("message")
    top = raw_message if isinstance(raw_message, dict) else {}
    message = _unwrap(top)
    message_type, content_key, content = _content(message)

    speech = _str(top.get("speechToText")) or _str(data.get("speechToText"))
    text = _text(message_type, content_key, content, speech=speech)
    media = _media(message_type, content, top, message) if message_type in MEDIA_TYPES else None

    contexts = [_dict(data.get("contextInfo"))]
    if isinstance(content, dict):
        contexts.append(_dict(content.get("contextInfo")))

    return ParsedMessage(
        message_id=message_id,
        chat_jid=chat_jid,
        sender_jid=sender_jid,
        phone=_phone(sender_jid),
        reply_to=_phone(chat_jid) or chat_jid,
        push_name=_str(data.get("pushName"))[:MAX_PUSH_NAME_LENGTH],
        from_me=key.get("fromMe") is True,
        message_type=message_type,
        text=text,
        media=media,
        quoted=_quoted(contexts),
        mentions=_mentions(contexts),
        timestamp=_timestamp(data.get("messageTimestamp")),
        is_group=is_group,
        is_broadcast=is_broadcast,
        is_newsletter=is_newsletter,
        evolution_instance=_str(body.get("instance")) or _str(data.get("owner")),
    )


# How much of an over-size body is searched for its message key. Evolution
# writes "event", "instance" and then data.key before data.message (whose
# base64 is what makes a body large), so the key is in the first bytes.
PEEK_BYTES = 64 * 1024
_PEEK_STRING = r'"((?:[^"\\]|\\.){0,256})"'
_PEEK_EVENT = re.compile(rb'"event"\s*:\s*' + _PEEK_STRING.encode())
_PEEK_INSTANCE = re.compile(rb'"instance"\s*:\s*' + _PEEK_STRING.encode())
_PEEK_KEY = re.compile(rb'"key"\s*:\s*\{([^{}]{0,4096})\}')
_PEEK_FIELD = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*' + _PEEK_STRING.encode())
    for name in ("id", "remoteJid", "remoteJidAlt", "participant", "participantAlt")
}
_PEEK_FROM_ME = re.compile(rb'"fromMe"\s*:\s*(true|false)')


def peek_envelope(prefix: bytes) -> dict[str, Any] | None:
    """A stand-in body from the first bytes of a body too large to parse.

    It holds the event, the instance and data.key, found with bounded regular
    expressions (no JSON parse of megabytes); None when the event is not
    there. Values with escapes are decoded as JSON strings; one that does not
    decode is left out.
    """
    head = prefix[:PEEK_BYTES]
    event = _peek_string(_PEEK_EVENT.search(head))
    if event is None:
        return None
    body: dict[str, Any] = {"event": event}
    instance = _peek_string(_PEEK_INSTANCE.search(head))
    if instance is not None:
        body["instance"] = instance
    found = _PEEK_KEY.search(head)
    if found is not None:
        key: dict[str, Any] = {}
        for name, pattern in _PEEK_FIELD.items():
            value = _peek_string(pattern.search(found.group(1)))
            if value is not None:
                key[name] = value
        from_me = _PEEK_FROM_ME.search(found.group(1))
        if from_me is not None:
            key["fromMe"] = from_me.group(1) == b"true"
        body["data"] = {"key": key}
    return body


def _peek_string(found: "re.Match[bytes] | None") -> str | None:
    if found is None:
        return None
    try:
        value = json.loads(b'"' + found.group(1) + b'"')
    except ValueError:
        return None
    return value if isinstance(value, str) and not _UNSTORABLE.search(value) else None


def ignore_reason(message: ParsedMessage, *, now: float, max_age_seconds: int) -> str | None:
    """Why a message is never answered, whatever the chat's settings.

    fromMe messages and groups are not decided here: what they mean depends on
    the instance's settings and the chat's state (webhooks/chat_rules.py).
    """
    if message.is_broadcast:
        return "broadcast"
    if message.is_newsletter:
        return "newsletter"
    if message.message_type in ("reaction", "sticker", "protocol"):
        return message.message_type
    # A zero or negative age would ignore everything: read it as "no limit".
    if (
        max_age_seconds > 0
        and message.timestamp is not None
        and message.timestamp < now - max_age_seconds
    ):
        return "stale"
    if not message.text.strip() and message.media is None:
        return "empty"
    return None


def connection_wuid(body: dict) -> str:
    """The connected account's JID (without its device), which an "open" update carries."""
    data = body.get("data") if isinstance(body, dict) else None
    jid = _jid(data.get("wuid")) if isinstance(data, dict) else ""
    return jid if len(jid) <= MAX_ID_LENGTH else ""


def parse_connection_update(body: dict) -> tuple[str, int | None]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        raise ParseError("data is not an object")
    state = _str(data.get("state")).strip()
    if not state:
        raise ParseError("data.state is missing")
    reason = _int(data.get("statusReason"))
    # Stored in a 32-bit column; anything outside is not a real status code.
    return state, reason if reason is not None and -(2**31) <= reason < 2**31 else None


# NUL and lone UTF-16 surrogates are valid in JSON strings, but neither
# PostgreSQL nor SQLite's UTF-8 can store them.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_DEPTH = 64


def make_storable(value: Any, depth: int = 0) -> Any:
    """The same JSON with unstorable characters replaced by U+FFFD.

    Raises ParseError past MAX_DEPTH levels of nesting: Evolution never nests
    that deep, and the JSON encoder would recurse out of its stack on saving.
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value
    if depth >= MAX_DEPTH and isinstance(value, dict | list):
        raise ParseError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {make_storable(k, depth + 1): make_storable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [make_storable(v, depth + 1) for v in value]
    return value


# What in a UTF-8 JSON text can decode to NUL or a lone surrogate: its escapes
# (\u0000, \uD800-\uDFFF), or a surrogate's own UTF-8 bytes (json.loads
# decodes bytes with surrogatepass). A false alarm (an escaped backslash before
# "u0000", a surrogate pair) only costs the full walk.
_MAYBE_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])|\xed[\xa0-\xbf]")


def storable_needs_walk(raw: bytes) -> bool:
    """Whether make_storable could change or refuse this JSON text once parsed.

    False when it holds no NUL byte (a UTF-16 or UTF-32 text always does), nothing
    that decodes to an unstorable character, and fewer objects and arrays than
    MAX_DEPTH, so none can be nested that deep: the parsed value is storable as
    it is, and the walk (a third of a delivery's parse) is skipped.
    """
    return (
        b"\x00" in raw
        or raw.count(b"{") + raw.count(b"[") >= MAX_DEPTH
        or _MAYBE_UNSTORABLE.search(raw) is not None
    )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _int(value: object) -> int | None:
    """An integer in any encoding Evolution has used: number, decimal string, Long.js halves."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if isinstance(value, str):
        digits = value.strip()
        if 0 < len(digits) <= MAX_INT_DIGITS and re.fullmatch(r"-?[0-9]+", digits):
            return int(digits)
        return None
    if isinstance(value, dict):
        low, high = value.get("low"), value.get("high")
        if type(low) is not int or type(high) is not int:
            return None
        # Long.js keeps both halves as signed 32-bit numbers; the flag says
        # whether the high half carries a sign.
        if value.get("unsigned") is True:
            high &= 0xFFFFFFFF
        return (high << 32) + (low & 0xFFFFFFFF)
    return None


def _timestamp(value: object) -> int | None:
    seconds = _int(value)
    # Seconds up to 10**11 (year 5138), milliseconds above; beyond that it is
    # not a time at all.
    if seconds is None or not 0 < seconds <= 10**14:
        return None
    return seconds // 1000 if seconds > 10**11 else seconds


def _jid(value: object) -> str:
    """The JID without its device part ("5511...:12@s.whatsapp.net")."""
    jid = _str(value).strip()
    user, at, server = jid.partition("@")
    if at and ":" in user:
        jid = f"{user.partition(':')[0]}@{server}"
    return jid


def _prefer_phone(values: list[object]) -> str:
    """The phone JID among the candidates, else the @lid one, else the first at all."""
    jids = [jid for jid in map(_jid, values) if jid and len(jid) <= MAX_ID_LENGTH]
    for jid in jids:
        if PN_JID.fullmatch(jid):
            return jid
    for jid in jids:
        if jid.endswith(LID_SUFFIX):
            return jid
    return jids[0] if jids else ""


def _phone(jid: str) -> str:
    return jid.removesuffix(PN_SUFFIX) if PN_JID.fullmatch(jid) else ""


def _unwrap(message: dict[str, Any]) -> dict[str, Any]:
    for _ in range(MAX_NESTING):
        for name in CONTAINERS:
            inner = _dict(_dict(message.get(name)).get("message"))
            if inner:
                message = inner
                break
        else:
            return message
    return message


def _content(message: dict[str, Any]) -> tuple[str, str, Any]:
    """(message_type, content key, content value) of an unwrapped message."""
    for name, message_type in CONTENT_TYPES:
        value = message.get(name)
        if name == "conversation":
            if isinstance(value, str) and value:
                return message_type, name, value
        elif isinstance(value, dict):
            return message_type, name, value
    return "unknown", "", None


def _text(message_type: str, content_key: str, content: Any, *, speech: str = "") -> str:
    if isinstance(content, str):
        return content
    value = _dict(content)
    if content_key in TEXT_FIELDS:
        return _str(value.get(TEXT_FIELDS[content_key]))
    if message_type == "audio":
        return speech
    if message_type in MEDIA_TYPES:
        return _str(value.get("caption"))
    if message_type == "location":
        return _location_text(value)
    if content_key == "contactMessage":
        return "[contact] " + _contact_text(value)
    if content_key == "contactsArrayMessage":
        contacts = [_contact_text(_dict(item)) for item in _list(value.get("contacts"))]
        return "[contact] " + "; ".join(contact for contact in contacts if contact)
    if message_type == "poll" and content_key != "pollUpdateMessage":
        options = [_str(_dict(item).get("optionName")) for item in _list(value.get("options"))]
        question = _str(value.get("name")).strip()
        listed = " / ".join(option for option in options if option)
        return " ".join(part for part in ("[poll]", question, listed and f"({listed})") if part)
    return ""


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _location_text(location: dict[str, Any]) -> str:
    """ "[location] latitude, longitude (name, address)": the coordinates first, as
    a map link or a geocoder takes them."""
    label = ", ".join(
        part for part in (_str(location.get(k)).strip() for k in ("name", "address")) if part
    )
    parts = ["[location]"]
    latitude = location.get("degreesLatitude")
    longitude = location.get("degreesLongitude")
    if latitude is not None or longitude is not None:
        # Protobuf JSON leaves a zero coordinate out: missing reads as 0.
        lat = 0.0 if latitude is None else _number(latitude)
        long = 0.0 if longitude is None else _number(longitude)
        if lat is not None and long is not None:
            parts.append(f"{lat}, {long}")
    if label:
        parts.append(f"({label})" if len(parts) > 1 else label)
    return " ".join(parts)


def _contact_text(contact: dict[str, Any]) -> str:
    name = _str(contact.get("displayName")).strip()
    phone = _vcard_phone(_str(contact.get("vcard")))
    if name and phone:
        return f"{name} ({phone})"
    return name or phone


def _vcard_phone(vcard: str) -> str:
    """The first TEL of a vCard, as +<waid> when WhatsApp tagged it."""
    for line in vcard.splitlines():
        head, colon, value = line.partition(":")
        name, *params = head.split(";")
        if not colon or not name.upper().endswith("TEL"):
            continue
        for param in params:
            label, _, waid = param.partition("=")
            if label.strip().lower() == "waid" and waid.strip().isdecimal():
                return "+" + waid.strip()
        return value.strip()
    return ""


def _media(
    message_type: str, content: Any, top: dict[str, Any], message: dict[str, Any]
) -> Media | None:
    value = _dict(content)
    size = _int(value.get("fileLength"))
    return Media(
        mime_type=_str(value.get("mimetype")),
        # mediaUrl is Evolution's S3 copy, readable as is; url is WhatsApp's
        # encrypted file.
        url=_str(top.get("mediaUrl")) or _str(value.get("url")) or None,
        base64=_str(top.get("base64")) or _str(message.get("base64")) or None,
        size=size if size is not None and size >= 0 else None,
        file_name=_str(value.get("fileName")) or None,
        caption=_str(value.get("caption")) or None,
    )


def _quoted(contexts: list[dict[str, Any]]) -> dict[str, str] | None:
    # Evolution 2.x copies contextInfo to data.contextInfo; older versions and
    # unnormalised types keep it inside the content.
    for context in contexts:
        stanza_id = _str(context.get("stanzaId"))
        if stanza_id:
            quoted = _unwrap(_dict(context.get("quotedMessage")))
            message_type, content_key, content = _content(quoted)
            return {
                "id": stanza_id,
                "participant": _str(context.get("participant")),
                "text": _text(message_type, content_key, content),
            }
    return None


def _mentions(contexts: list[dict[str, Any]]) -> tuple[str, ...]:
    mentions: dict[str, None] = {}
    for context in contexts:
        for jid in _list(context.get("mentionedJid")):
            if isinstance(jid, str) and jid:
                mentions[jid] = None
    return tuple(mentions)


def parse_message_updates(body: dict) -> list[tuple[str, str]]:
    """A messages.update delivery's (key id, status) pairs for the hub's own messages.

    Evolution 2.x sends one update as `data` {keyId, remoteJid, fromMe, status:
    "DELIVERY_ACK" | "READ" | ...}; older ones {key: {id, fromMe}, update:
    {status: 3}} (numbers: 2 server, 3 delivered, 4 read, 5 played), also as a
    list. Updates of messages the hub did not send (not fromMe) are left out.
    """
    data = body.get("data") if isinstance(body, dict) else None
    items = data if isinstance(data, list) else [data]
    found: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        key = item.get("key") if isinstance(item.get("key"), dict) else {}
        key_id = item.get("keyId") or key.get("id")
        from_me = item.get("fromMe", key.get("fromMe"))
        update = item.get("update") if isinstance(item.get("update"), dict) else {}
        status = item.get("status", update.get("status"))
        if not isinstance(key_id, str) or not key_id or from_me is False:
            continue
        if isinstance(status, bool) or not isinstance(status, str | int):
            continue
        found.append((key_id[:128], str(status).upper()))
    return found
