"""Validation rules for tenant fields, shared by the model, admin, API and CLI."""

import re
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Every event name Evolution has emitted (the `Events` enum of
# src/api/types/wa.types.ts and EventController.events, v1.8 to 2.4), as it
# names them in webhook bodies. "Webhook by events" appends the slug of the
# event to the webhook URL (webhook.controller.ts: "." and "-" become "_",
# upper-cased, then "_" becomes "-", lower-cased): `send.message.update` ->
# `/send-message-update`.
EVOLUTION_EVENTS = (
    "application.startup",
    "call",
    "chama-ai.action",
    "chats.delete",
    "chats.set",
    "chats.update",
    "chats.upsert",
    "connection.update",
    "contacts.set",
    "contacts.update",
    "contacts.upsert",
    "creds.update",
    "errors",
    "group-participants.update",
    "group.participants.update",
    "group.update",
    "groups.update",
    "groups.upsert",
    "instance.create",
    "instance.delete",
    "labels.association",
    "labels.edit",
    "logout.instance",
    "messages.delete",
    "messages.edited",
    "messages.set",
    "messages.update",
    "messages.upsert",
    "messaging-history.set",
    "new.jwt",
    "new.jwt.token",
    "presence.update",
    "qrcode.updated",
    "remove.instance",
    "send.message",
    "send.message.update",
    "status.instance",
    "typebot.change-status",
    "typebot.change.status",
    "typebot.start",
)


def event_slug(event: str) -> str:
    """The URL suffix Evolution's "webhook by events" gives this event."""
    return re.sub(r"[._-]", "-", event).lower()


# `/webhook/evolution/<segment>` means "the default instance, event <segment>"
# when the segment is one of these, so no instance may take such a name.
EVENT_SLUGS = frozenset(event_slug(event) for event in EVOLUTION_EVENTS)

# What an event suffix looks like. A well-formed suffix that is not in
# EVENT_SLUGS is an event newer than this list: it is answered 200 like any
# event, never 404, which Evolution would take as "drop it for good".
EVENT_SLUG_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*", re.IGNORECASE)
MAX_EVENT_SLUG_LENGTH = 64


def is_event_slug(value: str) -> bool:
    return len(value) <= MAX_EVENT_SLUG_LENGTH and EVENT_SLUG_RE.fullmatch(value) is not None


def validate_instance_name(value: str) -> None:
    if not NAME_RE.fullmatch(value or ""):
        raise ValidationError(
            "Use 1 to 64 characters: letters, digits, '_' or '-'.", code="invalid_name"
        )
    if value.lower() in EVENT_SLUGS:
        raise ValidationError(
            f"'{value}' is an Evolution event name, reserved for the default "
            "instance's /webhook/evolution/<event> route.",
            code="reserved_name",
        )


def validate_http_url(value: str) -> None:
    """Accept only absolute http(s) URLs with a host."""
    if not value:
        return
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValidationError(f"Not a valid URL: {exc}.", code="invalid_url") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(
            "Enter an http:// or https:// URL with a host, e.g. https://evolution.example.com.",
            code="invalid_url",
        )
    if parts.username is not None or parts.password is not None:
        # The URL is shown in the admin, the API and error messages: keys go
        # in their own (secret) fields, never in a URL.
        raise ValidationError(
            "Put no user name or password in the URL; use the key field.",
            code="invalid_url",
        )
    if any(ch.isspace() for ch in value):
        raise ValidationError("A URL cannot contain spaces.", code="invalid_url")


# The mark of an encrypted stored value (instances/crypto.py); kept here so the
# validators need nothing of the encryption itself.
ENCRYPTED_PREFIX = "enc1:"


def validate_secret(value: str) -> None:
    """Secrets travel in HTTP headers: printable ASCII, no spaces."""
    if value and not re.fullmatch(r"[\x21-\x7e]{1,512}", value):
        raise ValidationError(
            "Use printable ASCII characters without spaces (at most 512).",
            code="invalid_secret",
        )
    if value.startswith(ENCRYPTED_PREFIX):
        # Stored in plain text (no key set), it would later read as encrypted.
        raise ValidationError(
            f"A secret cannot start with '{ENCRYPTED_PREFIX}': that marks an encrypted "
            "stored value.",
            code="invalid_secret",
        )


# A phone number (digits, `*` at the end as a prefix wildcard) or a group JID.
CHAT_PATTERN_RE = re.compile(r"^(?:[0-9]{1,20}\*?|\*|[0-9]{1,30}(?:-[0-9]{1,20})?@g\.us)$")
# The bot's own ids for mention matching: its phone digits, or a JID (…@lid, …@s.whatsapp.net).
BOT_ID_RE = re.compile(r"^(?:[0-9]{1,20}|[0-9]{1,30}@(?:lid|s\.whatsapp\.net))$")


def _string_list(value: object, *, pattern: re.Pattern[str], example: str) -> None:
    if not isinstance(value, list):
        raise ValidationError(f"Enter a list, e.g. {example}.", code="not_a_list")
    for item in value:
        if not isinstance(item, str) or not pattern.fullmatch(item):
            raise ValidationError(
                f"{item!r} is not valid here; examples: {example}.", code="invalid_item"
            )


def validate_chat_patterns(value: object) -> None:
    """allow_list / block_list entries."""
    _string_list(
        value,
        pattern=CHAT_PATTERN_RE,
        example='["5511987654321", "5511*", "120363041234567890@g.us"]',
    )


def validate_bot_ids(value: object) -> None:
    _string_list(value, pattern=BOT_ID_RE, example='["5511900000001", "123456789012345@lid"]')
